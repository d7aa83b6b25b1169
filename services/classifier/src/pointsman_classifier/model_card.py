"""Rendering of the evaluation Report as the markdown model card and its PNG plots, apart from the
scoring. Deterministic: the same artifact and data give byte-identical markdown (numbers rounded,
rows in a fixed order, no timestamps but the artifact's own).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pointsman_classifier.evaluate import (
    COVERAGE_LEVELS,
    FP32_NAME,
    NATURAL,
    PUBLIC,
    SET_TITLES,
    EvalConfig,
    Report,
    SourceRow,
    _f,
)

# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def write_plots(report: Report, directory: Path) -> dict[str, str]:
    """PNG plots (matplotlib, Agg canvas, no global backend switch); name → file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    domains = list(report.metadata["labels"]["domain"])

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.savefig(directory / name, dpi=100, metadata={"Software": None})
        written[name.removesuffix(".png")] = name

    for name in (PUBLIC, NATURAL):
        d = report.sets[name].domain
        if d is None:
            continue
        fig = Figure(figsize=(7, 6), layout="constrained")
        ax = fig.add_subplot()
        cm = d.confusion.astype(np.float64)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(domains)):
            for j in range(len(domains)):
                if d.confusion[i, j]:
                    ax.text(
                        j,
                        i,
                        str(d.confusion[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
        ax.set_xticks(range(len(domains)), domains, rotation=45, ha="right")
        ax.set_yticks(range(len(domains)), domains)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"domain confusion, {SET_TITLES[name]} (n={d.n}, row-normalised)")
        fig.colorbar(im, ax=ax, shrink=0.8)
        save(fig, f"confusion_{name}.png")

    for head in ("domain", "risk"):
        fig = Figure(figsize=(10, 4.5), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, name in zip(axes, (PUBLIC, NATURAL), strict=True):
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
            cal = next((c for c in report.sets[name].calibration if c.head == head), None)
            if cal is not None:
                for label, points, style in (
                    (f"before (T=1), ECE {_f(cal.ece_before)}", cal.reliability_before, "o--"),
                    (f"after (stored T), ECE {_f(cal.ece_after)}", cal.reliability_after, "s-"),
                ):
                    if points:
                        xs, ys, _ = zip(*points, strict=True)
                        ax.plot(xs, ys, style, label=label, markersize=4)
                ax.legend(loc="lower right", fontsize=8)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("confidence (top-1 probability)")
            ax.set_ylabel("accuracy")
            ax.set_title(f"{head} head, {SET_TITLES[name]}" + (f" (n={cal.n})" if cal else ""))
        save(fig, f"reliability_{head}.png")

    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name in (PUBLIC, NATURAL):
        cov = report.sets[name].coverage
        if cov is None:
            continue
        line = ax.plot(
            [p.coverage for p in cov.curve],
            [p.accuracy for p in cov.curve],
            label=f"{SET_TITLES[name]} (n={cov.n})",
        )
        ax.plot([cov.coverage], [cov.accuracy], "o", color=line[0].get_color())
    ax.set_xlabel("coverage (share of rows answered, most confident first)")
    ax.set_ylabel("domain accuracy of the rows kept")
    ax.set_xlim(0, 1.01)
    ax.set_title("domain risk-coverage (dot: stored ambiguity cut-off)")
    ax.legend(loc="lower left", fontsize=8)
    save(fig, "risk_coverage.png")
    return written


# ---------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------


def write_card(report: Report, config: EvalConfig) -> None:
    """Write the card to ``config.card`` (LF line endings), creating its folder."""
    config.card.parent.mkdir(parents=True, exist_ok=True)
    with config.card.open("w", encoding="utf-8", newline="\n") as f:
        f.write(render_card(report, config))


def _met(met: bool | None) -> str:
    return "not measurable (no rows)" if met is None else "met" if met else "**not met**"


_NUMBER = re.compile(r"^(-?\d+(\.\d+)?(e-?\d+)?( / -?\d+(\.\d+)?)?|—|)$")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A markdown table; columns holding only numbers are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    align = []
    for j in range(len(header)):
        column = [row[j] for row in cells]
        numeric = any(c not in ("", "—") for c in column) and all(_NUMBER.match(c) for c in column)
        align.append("---:" if numeric and j > 0 else "---")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return lines


def group_table(first: str, rows: Sequence[SourceRow]) -> list[str]:
    """Per-source or per-kind rows. No macro-F1 here: most groups hold one domain, where a
    macro average over the predicted classes says nothing."""
    return table(
        [first, "domain n", "accuracy", "risky n", "risk recall", "benign n", "benign flagged"],
        [
            [
                r.group,
                r.domain_n,
                _f(r.domain_accuracy),
                r.risky_n,
                _f(r.risky_recall),
                r.benign_n,
                _f(r.benign_fpr),
            ]
            for r in rows
        ],
    )


def render_card(report: Report, config: EvalConfig) -> str:
    meta = report.metadata
    cal = meta["calibration"]
    training = meta.get("training", {})
    fingerprint = training.get("data_fingerprint", "")
    plots_rel = Path(os.path.relpath(config.plots_dir, config.card.parent)).as_posix()
    out: list[str] = []
    add = out.append

    def image(key: str, alt: str) -> None:
        if key in report.plots:
            add(f"![{alt}]({plots_rel}/{report.plots[key]})")
            add("")

    add("# Pointsman classifier: model card")
    add("")
    add(
        "Generated by `pointsman eval` from the artifact and the data; do not edit by hand — "
        "re-run `make eval`. Every figure is on **test rows only**; temperatures, thresholds and "
        "the ambiguity cut-off are the artifact's own, chosen on validation rows (at training "
        "time, or again by `pointsman calibrate`)."
    )
    add("")
    if report.max_rows_per_source is not None:
        add(
            f"> **Quick run:** at most {report.max_rows_per_source} test rows per source were "
            "scored (`--max-rows-per-source`). These are not the model's reported figures."
        )
        add("")

    add("## Model")
    add("")
    cfg = training.get("config", {}) if isinstance(training.get("config"), dict) else {}
    model_rows: list[list[object]] = [
        ["model version", f"`{meta['model_version']}`"],
        ["base encoder", f"`{meta.get('base_model', '')}`"],
        ["format", "int8 ONNX (dynamic quantization), two heads: domain and risk"],
        ["artifact format", meta.get("format", "")],
        ["max length (tokens)", meta.get("max_length", "")],
        ["domain labels", ", ".join(meta["labels"]["domain"])],
        ["risk labels", ", ".join(meta["labels"]["risk"])],
        ["sha256 model.onnx", f"`{meta['files'].get('model.onnx', '')}`"],
        ["sha256 tokenizer.json", f"`{meta['files'].get('tokenizer.json', '')}`"],
    ]
    for key in (
        "epochs",
        "batch_size",
        "lr",
        "head_lr",
        "layers",
        "max_rows",
        "seed",
        "soup",
        "threads",
    ):
        if key in cfg:
            model_rows.append([f"training {key}", cfg[key]])
    if "seconds" in training:
        model_rows.append(["training time (s)", training["seconds"]])
    env = report.environment
    if env:
        features = ", ".join(env.get("cpu_int8_features", [])) or "none reported"
        model_rows.append(
            [
                "scored with",
                f"onnxruntime {env.get('onnxruntime')}, exact int8 products, on a CPU with "
                f"int8 features: {features}",
            ]
        )
    out += table(["", ""], model_rows)
    add("")

    add("## Training data")
    add("")
    add(f"Data fingerprint at training: `{fingerprint or 'not recorded'}`.")
    add("")
    if fingerprint and fingerprint != report.data_fingerprint:
        add(
            f"> **The data changed since training** (now `{report.data_fingerprint}`): the test "
            "rows below are today's, the training rows counted are recomputed on today's data."
        )
    else:
        add("The data evaluated on is the data the model was trained on (same fingerprint).")
    add("")
    add(
        "Rows per source after de-duplication, by split; *used* = training rows one epoch saw "
        "(per-source caps, natural rows repeated, the `max_rows` cut), recomputed from the "
        "artifact's training config. *heads*: which heads a source's rows score."
    )
    add("")
    summary = report.data_summary
    totals = {k: sum(r[k] for r in summary) for k in ("train", "validation", "test")}
    used_known = all(r["used"] is not None for r in summary)
    out += table(
        ["source", "heads", "train", "validation", "test", "used"],
        [
            [
                r["source"],
                r["heads"],
                r["train"],
                r["validation"],
                r["test"],
                "—" if r["used"] is None else r["used"],
            ]
            for r in summary
        ]
        + [
            [
                "**total**",
                "",
                totals["train"],
                totals["validation"],
                totals["test"],
                sum(r["used"] for r in summary) if used_known else "—",
            ]
        ],
    )
    add("")

    add("## Calibration (stored in the artifact)")
    add("")
    cal_rows: list[list[object]] = [
        ["temperature, domain head", _f(float(cal["temperature_domain"]))],
        ["temperature, risk head", _f(float(cal["temperature_risk"]))],
    ]
    for r, t in sorted(
        cal["risk_thresholds"].items(), key=lambda kv: meta["labels"]["risk"].index(kv[0])
    ):
        cal_rows.append([f"risk threshold, {r}", _f(float(t))])
    if "risk_threshold_benign_fpr" in cal:
        cal_rows.append(
            [
                "thresholds set at benign FPR (validation, hard benign rows)",
                _f(float(cal["risk_threshold_benign_fpr"])),
            ]
        )
    cal_rows.append(
        ["ambiguity cut-off (domain confidence)", _f(float(cal["ambiguity_threshold"]))]
    )
    band = cal.get("ambiguity_band")
    if isinstance(band, dict):
        cal_rows += [
            ["band on validation: coverage", _f(float(band["coverage"]))],
            ["band on validation: accuracy kept", _f(float(band["accuracy"]))],
            [
                "band target (accuracy / max escalation)",
                f"{band['target_accuracy']} / {band['max_escalation']}",
            ],
            ["band target met on validation", "yes" if band["target_met"] else "no"],
        ]
    for key in ("rows", "benign_rows"):
        if key in cal:
            cal_rows.append([f"calibration {key.replace('_', ' ')}", cal[key]])
    out += table(["", ""], cal_rows)
    add("")

    add("## Test rows scored")
    add("")
    out += table(
        ["test set", "rows", "domain-labelled", "risk-labelled"],
        [
            [SET_TITLES[n], s.rows, s.domain.n if s.domain else 0, s.risk.n if s.risk else 0]
            for n, s in report.sets.items()
        ],
    )
    add("")

    add("## Targets")
    add("")
    add(
        "Measured on the stored calibration; nothing is chosen on test rows. The issue sets the "
        "domain target on the public test set; the natural test set is the realistic one. Risk "
        "recall counts a row when the runtime decides its class (95% Wilson interval in "
        "brackets); the benign FPR is the share of all benign rows of the set decided as that "
        "class."
    )
    add("")
    out += table(
        ["target", "test set", "n", "measured", "status"],
        [[t.target, t.test_set, t.n, t.measured, _met(t.met)] for t in report.targets],
    )
    add("")

    add("## Domain head")
    add("")
    add(
        "The decided domain is the argmax of the calibrated probabilities. Macro-F1 averages the "
        "classes that occur or are predicted."
    )
    add("")
    for name in (PUBLIC, NATURAL):
        d = report.sets[name].domain
        add(f"### {SET_TITLES[name].capitalize()}")
        add("")
        if d is None:
            add("No domain-labelled rows.")
            add("")
            continue
        add(f"n = {d.n}, accuracy **{_f(d.accuracy)}**, macro-F1 **{_f(d.macro_f1)}**.")
        add("")
        out += table(
            ["class", "precision", "recall", "F1", "support", "predicted"],
            [
                [c.label, _f(c.precision), _f(c.recall), _f(c.f1), c.support, c.predicted]
                for c in d.classes
            ],
        )
        add("")
        add("Confusion matrix (rows: true, columns: predicted):")
        add("")
        labels = list(meta["labels"]["domain"])
        out += table(
            ["true \\ predicted", *labels],
            [[labels[i], *(str(v) for v in d.confusion[i])] for i in range(len(labels))],
        )
        add("")
        image(f"confusion_{name}", f"domain confusion matrix, {SET_TITLES[name]}")

    add("### Per source")
    add("")
    add(
        "Domain accuracy on the source's domain-labelled test rows; risk recall on "
        "its risky rows (decided class = true class) and the flag rate on its benign rows."
    )
    add("")
    out += group_table("source", report.per_source)
    add("")
    add("### Natural test set by kind")
    add("")
    out += group_table("kind", report.by_kind)
    add("")

    add("## Risk head")
    add("")
    add(
        "Per risk class, one-vs-rest on the calibrated probability p_r. *AUC*: ROC AUC. *Recall "
        "@1% FPR (test)*: the threshold is the test benign rows' 99th percentile of p_r — chosen "
        "on the test rows themselves, so it measures ranking, not a deployable setting. *Stored*: "
        "the runtime's decision (the class with the highest p_r / t_r among those over their "
        "stored threshold); *flagged* counts a risky row flagged as any class. *Hard benign*: "
        "benign rows from the natural files, the risk-only public sources and counsel_chat (the "
        "kind the thresholds were set on)."
    )
    add("")
    for name in (PUBLIC, NATURAL):
        rr = report.sets[name].risk
        add(f"### {SET_TITLES[name].capitalize()}")
        add("")
        if rr is None:
            add("No risk-labelled rows.")
            add("")
            continue
        add(
            f"n = {rr.n} ({rr.benign} benign, {rr.hard_benign} of them hard benign). Benign rows "
            f"flagged as any class at the stored thresholds: **{_f(rr.benign_fpr)}** "
            f"(hard benign: {_f(rr.hard_benign_fpr)})."
        )
        add("")
        out += table(
            [
                "class",
                "positives",
                "ROC AUC",
                "recall @1% FPR (test)",
                "test threshold",
                "stored threshold",
                "recall (stored)",
                "flagged (stored)",
                "benign FPR (stored)",
                "hard-benign FPR (stored)",
            ],
            [
                [
                    c.label,
                    c.positives,
                    _f(c.auc),
                    _f(c.at_test_fpr.recall),
                    _f(c.at_test_fpr.threshold),
                    _f(c.stored_threshold),
                    _f(c.recall),
                    _f(c.recall_flagged),
                    _f(c.benign_fpr),
                    _f(c.hard_benign_fpr),
                ]
                for c in rr.classes
            ],
        )
        add("")
    add("### Benign hard negatives")
    add("")
    add("Benign prompts that look risky, flagged at the stored thresholds (false positives).")
    add("")
    risk_labels = list(meta["labels"]["risk"])[1:]
    out += table(
        ["set", "rows", "flagged", "false-positive rate", *(f"as {r}" for r in risk_labels)],
        [
            [
                h.name,
                h.n,
                h.flagged,
                _f(h.flagged / h.n if h.n else math.nan),
                *(h.by_class[r] for r in risk_labels),
            ]
            for h in report.hard_negatives
        ],
    )
    add("")

    add("## Calibration on test rows")
    add("")
    add(
        "Expected calibration error of the top-1 prediction (15 equal-width bins), before "
        "(temperature 1) and after (stored temperature) scaling."
    )
    add("")
    out += table(
        ["head", "test set", "n", "ECE before (T=1)", "ECE after (stored T)"],
        [
            [c.head, SET_TITLES[n], c.n, _f(c.ece_before), _f(c.ece_after)]
            for n, s in report.sets.items()
            for c in s.calibration
        ],
    )
    add("")
    image("reliability_domain", "reliability diagram, domain head")
    image("reliability_risk", "reliability diagram, risk head")
    add(
        "<details><summary>Reliability diagram data (mean confidence, accuracy, rows per "
        "non-empty bin)</summary>"
    )
    add("")
    for n, s in report.sets.items():
        for c in s.calibration:
            for when, points in (("before", c.reliability_before), ("after", c.reliability_after)):
                add(f"{c.head} head, {SET_TITLES[n]}, {when}:")
                add("")
                out += table(
                    ["confidence", "accuracy", "rows"], [[_f(x), _f(y), k] for x, y, k in points]
                )
                add("")
    add("</details>")
    add("")

    add("## Ambiguity band: risk-coverage of the domain head")
    add("")
    add(
        "Rows sorted by calibrated domain confidence; coverage = share kept, accuracy = domain "
        "accuracy of the kept rows. Below the stored cut-off the dispatcher treats a query as "
        "ambiguous."
    )
    add("")
    cov_rows: list[list[object]] = []
    for n, s in report.sets.items():
        cv = s.coverage
        if cv is None:
            continue
        cov_rows.append(
            [
                SET_TITLES[n],
                cv.n,
                f"{_f(cv.coverage)} / {_f(cv.accuracy)}",
                *(f"{_f(c)} / {_f(a)}" for _, c, a in cv.levels),
            ]
        )
    out += table(
        [
            "test set",
            "n",
            f"at stored cut-off {_f(float(cal['ambiguity_threshold']))}",
            *(f"coverage ≥ {lv:g}" for lv in COVERAGE_LEVELS),
        ],
        cov_rows,
    )
    add("")
    add("Cells: coverage / accuracy of the kept rows.")
    add("")
    image("risk_coverage", "risk-coverage curves")

    add("## int8 vs fp32 agreement")
    add("")
    ag = report.agreement
    if ag["source"] == "measured":
        add(
            f"Measured now against `{FP32_NAME}` on the {ag['rows']} test rows scored: top-1 "
            f"agreement domain **{_f(ag['domain'])}**, risk **{_f(ag['risk'])}**."
        )
    elif ag["source"] == "stored":
        add(
            f"No fp32 ONNX is kept beside the artifact, so this is the value stored in the "
            f"metadata (`metrics.int8_fp32_agreement`), measured at training time on "
            f"{ag['rows']} sampled test rows: top-1 agreement domain **{_f(ag['domain'])}**, "
            f"risk **{_f(ag['risk'])}**."
        )
    else:
        add("Not available: no fp32 ONNX beside the artifact and no stored figure.")
    add("")

    add("## Known limitations")
    add("")
    for line in limitations(report):
        add(f"- {line}")
    add("")

    add("## How to reproduce")
    add("")
    add("```sh")
    add(f"make train   # {train_command(cfg)}: fine-tune, export int8 ONNX, calibrate")
    add("make eval    # pointsman eval: this card, the plots, the figures in metadata.json")
    add("```")
    add("")
    extra = (
        f" --max-rows-per-source {report.max_rows_per_source}"
        if report.max_rows_per_source is not None
        else ""
    )
    add(
        f"Directly: `pointsman eval --model <artifact> --shared ../shared/datasets --natural "
        f"data/natural{extra}` (the defaults: the packaged artifact and these folders). The same "
        "artifact and data give the same card."
    )
    add("")
    return "\n".join(out)


def train_command(cfg: dict[str, object]) -> str:
    """The `pointsman train` seeds that rebuild this artifact (one model, or a soup of several)."""
    seed = cfg.get("seed", 13)
    soup = cfg.get("soup") or []
    extra = "".join(f" --soup {s}" for s in soup) if isinstance(soup, list) else ""
    return f"pointsman train --seed {seed}{extra}"


def limitations(report: Report) -> list[str]:
    out = [
        "The public test sets are largely templated (MedQuAD, Banking77, CLINC, SGD, GSM8K, "
        "NL2Bash, MMLU stems); public domain figures overstate how the model does on real "
        "traffic. The natural test set is the closer measure, but it is a hash split of the same "
        "files, by the same writers, as the natural training rows, so it is optimistic too.",
        "Risk-only public sources (jailbreak, harmful and moderation sets, XSTest, CLINC "
        "out-of-scope) have no curated domain label and do not score the domain head.",
        "The risk thresholds were set at 1% FPR on validation hard-benign rows. The benign FPR "
        "over all public test rows is dominated by easy templated rows; the hard-benign column "
        "and the hard-negative table are the realistic false-positive measures.",
        "ECE uses 15 equal-width bins of the top-1 confidence; on small sets it is noisy and "
        "blind to miscalibration of the non-top classes.",
        "About 5% of the natural rows are not in English; other languages are barely covered.",
    ]
    small = []
    for name, s in report.sets.items():
        if s.risk:
            small += [
                f"{c.label} ({name}: {c.positives})" for c in s.risk.classes if c.positives < 100
            ]
    if small:
        out.append(
            "Classes with fewer than 100 positive test rows, whose recall is uncertain "
            "by several points (see the 95% intervals in the targets table): "
            + ", ".join(small)
            + "."
        )
    if report.agreement["source"] != "measured":
        out.append("int8-vs-fp32 agreement is the training-time figure, not re-measured here.")
    if report.max_rows_per_source is not None:
        out.append(f"Quick run: at most {report.max_rows_per_source} test rows per source.")
    return out
