"""`pointsman eval`, the scoring half: the int8 artifact on the held-out test rows, into the Report
that `model_card` renders and metadata.json records.

Only test rows count (public and natural test splits side by side, never pooled) and nothing is
tuned here: temperatures, risk thresholds and the ambiguity cut-off are the artifact's own, chosen
on validation rows. The one exception, recall at 1% benign FPR (threshold at the test benign rows'
99th percentile), is labelled as a ranking measure, not what the deployed model would do.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pointsman_classifier import calibrate, data
from pointsman_classifier.metrics import (
    MAX_FPR,
    BoolArray,
    ClassScores,
    FloatArray,
    IntArray,
    RecallAtFpr,
    accuracy,
    confusion_matrix,
    macro_f1,
    per_class_prf,
    rate,
    recall_at_fpr,
    roc_auc,
    wilson_interval,
)
from pointsman_classifier.runtime import ClassifierModel, inference_environment
from pointsman_classifier.train import batched_logits, is_hard_benign

COVERAGE_LEVELS = (1.0, 0.95, 0.9, 0.8, 0.5)
FP32_NAME = "model.fp32.onnx"  # an fp32 export kept beside the artifact, if any
PUBLIC, NATURAL = "public", "natural"
SET_TITLES = {PUBLIC: "public test", NATURAL: "natural test (second test set)"}


# ---------------------------------------------------------------------------------------------
# Scoring the artifact
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """The artifact's calibrated outputs on some rows, in row order."""

    rows: list[data.Example]
    domain_logits: FloatArray
    risk_logits: FloatArray
    domain_probs: FloatArray  # stored temperature
    risk_probs: FloatArray  # stored temperature
    domain_pred: IntArray  # argmax of the calibrated domain probabilities
    risk_pred: IntArray  # the runtime's decision rule at the stored thresholds

    def subset(self, mask: BoolArray) -> Scored:
        idx = np.flatnonzero(mask)
        return Scored(
            [self.rows[i] for i in idx],
            self.domain_logits[idx],
            self.risk_logits[idx],
            self.domain_probs[idx],
            self.risk_probs[idx],
            self.domain_pred[idx],
            self.risk_pred[idx],
        )

    def where(self, keep: Callable[[data.Example], bool]) -> Scored:
        return self.subset(np.array([bool(keep(e)) for e in self.rows], dtype=bool))

    def __len__(self) -> int:
        return len(self.rows)


def score(
    model: ClassifierModel,
    rows: list[data.Example],
    domain_logits: FloatArray,
    risk_logits: FloatArray,
) -> Scored:
    dp = calibrate.softmax(domain_logits, model.t_domain)
    rp = calibrate.softmax(risk_logits, model.t_risk)
    return Scored(
        rows,
        domain_logits,
        risk_logits,
        dp,
        rp,
        dp.argmax(axis=1).astype(np.int64),
        calibrate.decide_risk(rp, model.risk_thresholds),
    )


def select_test_rows(
    examples: list[data.Example], max_rows_per_source: int | None = None, seed: int = 13
) -> list[data.Example]:
    """The test split; optionally a seeded sample of at most ``max_rows_per_source`` per source."""
    by_source: dict[str, list[data.Example]] = defaultdict(list)
    for e in examples:
        if e.split == "test":
            by_source[e.source].append(e)
    rng = random.Random(seed)
    out: list[data.Example] = []
    for source in sorted(by_source):
        items = by_source[source]
        if max_rows_per_source is not None and len(items) > max_rows_per_source:
            items = sorted(rng.sample(items, max_rows_per_source), key=lambda e: e.text)
        out += items
    return out


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainReport:
    n: int
    accuracy: float
    macro_f1: float
    classes: list[ClassScores]
    confusion: IntArray


@dataclass(frozen=True)
class RiskClassReport:
    label: str
    positives: int
    auc: float
    at_test_fpr: RecallAtFpr  # threshold chosen on the test benign rows: a ranking measure
    stored_threshold: float
    recall: float  # decided == this class, stored thresholds
    recall_flagged: float  # flagged as any risk class
    benign_fpr: float  # benign rows decided as this class
    hard_benign_fpr: float


@dataclass(frozen=True)
class RiskReport:
    n: int
    benign: int
    hard_benign: int
    classes: list[RiskClassReport]
    benign_fpr: float  # benign rows flagged as any class, stored thresholds
    hard_benign_fpr: float


@dataclass(frozen=True)
class CalibrationReport:
    head: str
    n: int
    ece_before: float
    ece_after: float
    reliability_before: list[tuple[float, float, int]]
    reliability_after: list[tuple[float, float, int]]


@dataclass(frozen=True)
class CoverageReport:
    n: int
    curve: list[calibrate.CoveragePoint]
    threshold: float
    coverage: float
    accuracy: float
    levels: list[tuple[float, float, float]]  # (target coverage, coverage, accuracy)


@dataclass(frozen=True)
class SetReport:
    name: str
    rows: int
    domain: DomainReport | None
    risk: RiskReport | None
    calibration: list[CalibrationReport]
    coverage: CoverageReport | None


@dataclass(frozen=True)
class SourceRow:
    group: str  # a source, or a natural `kind`
    domain_n: int
    domain_accuracy: float
    domain_macro_f1: float
    risky_n: int
    risky_recall: float
    benign_n: int
    benign_fpr: float


@dataclass(frozen=True)
class HardNegatives:
    name: str
    n: int
    flagged: int
    by_class: dict[str, int]


@dataclass(frozen=True)
class TargetRow:
    target: str
    test_set: str
    n: int
    measured: str
    met: bool | None  # None: not measurable on this set


@dataclass
class Report:
    metadata: dict[str, Any]
    sets: dict[str, SetReport]
    per_source: list[SourceRow]
    by_kind: list[SourceRow]
    hard_negatives: list[HardNegatives]
    agreement: dict[str, Any]
    targets: list[TargetRow]
    data_summary: list[dict[str, Any]]
    data_fingerprint: str
    max_rows_per_source: int | None
    environment: dict[str, Any] = field(default_factory=dict)  # runtime.inference_environment
    plots: dict[str, str] = field(default_factory=dict)


def domain_report(s: Scored, domains: Sequence[str]) -> DomainReport | None:
    s = s.where(lambda e: e.domain is not None)
    if not len(s):
        return None
    y = np.array([domains.index(str(e.domain)) for e in s.rows], dtype=np.int64)
    cm = confusion_matrix(y, s.domain_pred, len(domains))
    return DomainReport(
        len(s), accuracy(y, s.domain_pred), macro_f1(cm), per_class_prf(cm, domains), cm
    )


def risk_report(s: Scored, risks: Sequence[str], thresholds: FloatArray) -> RiskReport | None:
    s = s.where(lambda e: e.risk is not None)
    if not len(s):
        return None
    y = np.array([risks.index(str(e.risk)) for e in s.rows], dtype=np.int64)
    benign = y == 0
    hard = benign & np.array([is_hard_benign(e) for e in s.rows], dtype=bool)
    classes = []
    for i, label in enumerate(risks):
        if i == 0:
            continue
        pos = y == i
        p = s.risk_probs[:, i]
        classes.append(
            RiskClassReport(
                label=label,
                positives=int(pos.sum()),
                auc=roc_auc(p, pos),
                at_test_fpr=recall_at_fpr(p, pos, benign, MAX_FPR),
                stored_threshold=float(thresholds[i]),
                recall=rate(s.risk_pred[pos] == i),
                recall_flagged=rate(s.risk_pred[pos] != 0),
                benign_fpr=rate(s.risk_pred[benign] == i),
                hard_benign_fpr=rate(s.risk_pred[hard] == i),
            )
        )
    return RiskReport(
        len(s),
        int(benign.sum()),
        int(hard.sum()),
        classes,
        rate(s.risk_pred[benign] != 0),
        rate(s.risk_pred[hard] != 0),
    )


def calibration_report(
    head: str, logits: FloatArray, labels: IntArray, temperature: float
) -> CalibrationReport:
    before = calibrate.softmax(logits, 1.0)
    after = calibrate.softmax(logits, temperature)
    return CalibrationReport(
        head,
        len(labels),
        calibrate.expected_calibration_error(before, labels),
        calibrate.expected_calibration_error(after, labels),
        calibrate.reliability(before, labels),
        calibrate.reliability(after, labels),
    )


def coverage_report(s: Scored, domains: Sequence[str], cutoff: float) -> CoverageReport | None:
    s = s.where(lambda e: e.domain is not None)
    if not len(s):
        return None
    y = np.array([domains.index(str(e.domain)) for e in s.rows], dtype=np.int64)
    confidence = s.domain_probs.max(axis=1)
    correct = s.domain_pred == y
    curve = calibrate.risk_coverage_curve(confidence, correct)
    kept = confidence >= cutoff  # the runtime: ambiguous when confidence < cut-off
    levels = []
    for level in COVERAGE_LEVELS:
        point = min((p for p in curve if p.coverage >= level - 1e-12), key=lambda p: p.coverage)
        levels.append((level, point.coverage, point.accuracy))
    return CoverageReport(len(s), curve, cutoff, rate(kept), rate(correct[kept]), levels)


def set_report(name: str, s: Scored, model: ClassifierModel) -> SetReport:
    domains, risks = model.domains, model.risks
    cal = []
    sd = s.where(lambda e: e.domain is not None)
    if len(sd):
        yd = np.array([domains.index(str(e.domain)) for e in sd.rows], dtype=np.int64)
        cal.append(calibration_report("domain", sd.domain_logits, yd, model.t_domain))
    sr = s.where(lambda e: e.risk is not None)
    if len(sr):
        yr = np.array([risks.index(str(e.risk)) for e in sr.rows], dtype=np.int64)
        cal.append(calibration_report("risk", sr.risk_logits, yr, model.t_risk))
    return SetReport(
        name,
        len(s),
        domain_report(s, domains),
        risk_report(s, risks, model.risk_thresholds),
        cal,
        coverage_report(s, domains, model.ambiguity_threshold),
    )


def group_rows(
    s: Scored, model: ClassifierModel, key: Callable[[data.Example], str | None]
) -> list[SourceRow]:
    """Per group (``key(example)``, None = skip): domain accuracy / macro-F1, risk recall / FPR."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(s.rows):
        k = key(e)
        if k is not None:
            groups[str(k)].append(i)
    out = []
    for name in sorted(groups):
        mask = np.zeros(len(s), dtype=bool)
        mask[groups[name]] = True
        g = s.subset(mask)
        d = domain_report(g, model.domains)
        labelled = g.where(lambda e: e.risk is not None)
        y = np.array([model.risks.index(str(e.risk)) for e in labelled.rows], dtype=np.int64)
        risky = y != 0
        out.append(
            SourceRow(
                group=name,
                domain_n=d.n if d else 0,
                domain_accuracy=d.accuracy if d else math.nan,
                domain_macro_f1=d.macro_f1 if d else math.nan,
                risky_n=int(risky.sum()),
                risky_recall=rate(labelled.risk_pred[risky] == y[risky]),
                benign_n=int((~risky).sum()),
                benign_fpr=rate(labelled.risk_pred[~risky] != 0),
            )
        )
    return out


def hard_negatives(
    s: Scored, name: str, keep: Callable[[data.Example], bool], risks: Sequence[str]
) -> HardNegatives:
    g = s.where(lambda e: e.risk == "none" and keep(e))
    counts = Counter(int(i) for i in g.risk_pred)
    return HardNegatives(
        name,
        len(g),
        int((g.risk_pred != 0).sum()),
        {r: counts.get(i, 0) for i, r in enumerate(risks) if i > 0},
    )


def int8_fp32_agreement(
    model: ClassifierModel, texts: list[str], d8: FloatArray, r8: FloatArray
) -> dict[str, Any]:
    """Agreement with an fp32 export beside the artifact, else the figure stored at training."""
    fp32 = model.directory / FP32_NAME
    if fp32.is_file() and texts:
        d32, r32 = batched_logits(model.with_graph(fp32), texts)
        return {
            "source": "measured",
            "domain": rate(d8.argmax(1) == d32.argmax(1)),
            "risk": rate(r8.argmax(1) == r32.argmax(1)),
            "rows": len(texts),
        }
    stored = model.metadata.get("metrics", {}).get("int8_fp32_agreement")
    if isinstance(stored, dict):
        return {
            "source": "stored",
            "domain": float(stored.get("domain", math.nan)),
            "risk": float(stored.get("risk", math.nan)),
            "rows": int(stored.get("rows", 0)),
        }
    return {"source": "unavailable", "domain": math.nan, "risk": math.nan, "rows": 0}


def _f(x: float, digits: int = 4) -> str:
    return "—" if math.isnan(x) else f"{x:.{digits}f}"


def _r(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 4)


def _ge(x: float, bound: float) -> bool | None:
    return None if math.isnan(x) else x >= bound


def _le(x: float, bound: float) -> bool | None:
    return None if math.isnan(x) else x <= bound


def targets(sets: dict[str, SetReport]) -> list[TargetRow]:
    """The issue's targets, on the stored calibration (nothing chosen on test rows)."""
    out = []
    for name in (PUBLIC, NATURAL):
        s = sets[name]
        title = SET_TITLES[name]
        if s.domain is not None:
            out.append(
                TargetRow(
                    "domain macro-F1 ≥ 0.95",
                    title,
                    s.domain.n,
                    _f(s.domain.macro_f1),
                    _ge(s.domain.macro_f1, 0.95),
                )
            )
        else:
            out.append(TargetRow("domain macro-F1 ≥ 0.95", title, 0, "—", None))
        classes = {c.label: c for c in s.risk.classes} if s.risk else {}
        jb = classes.get("jailbreak")
        if jb is not None and jb.positives:
            met_recall = _ge(jb.recall, 0.90)
            met_fpr = None if math.isnan(jb.benign_fpr) else jb.benign_fpr <= MAX_FPR
            met = None if met_recall is None or met_fpr is None else met_recall and met_fpr
            out.append(
                TargetRow(
                    "jailbreak recall ≥ 0.90 at benign FPR ≤ 1%",
                    title,
                    jb.positives,
                    f"recall {_recall_ci(jb)}, benign FPR {_f(jb.benign_fpr)}",
                    met,
                )
            )
        else:
            out.append(TargetRow("jailbreak recall ≥ 0.90 at benign FPR ≤ 1%", title, 0, "—", None))
        for label in ("self_harm", "harmful"):
            c = classes.get(label)
            if c is not None and c.positives:
                out.append(
                    TargetRow(
                        f"{label} recall ≥ 0.90",
                        title,
                        c.positives,
                        _recall_ci(c),
                        _ge(c.recall, 0.90),
                    )
                )
            else:
                out.append(TargetRow(f"{label} recall ≥ 0.90", title, 0, "—", None))
        for cal in s.calibration:
            out.append(
                TargetRow(
                    f"ECE ≤ 0.03 ({cal.head} head)",
                    title,
                    cal.n,
                    _f(cal.ece_after),
                    _le(cal.ece_after, 0.03),
                )
            )
    return out


def _recall_ci(c: RiskClassReport) -> str:
    lo, hi = wilson_interval(round(c.recall * c.positives), c.positives)
    return f"{_f(c.recall)} (95% CI {_f(lo, 3)}-{_f(hi, 3)})"


def data_summary(examples: list[data.Example], metadata: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows per source and split, and the training rows one epoch saw (recomputed from the
    artifact's training config: caps, repeats, seed, max_rows)."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    domain_rows: Counter[str] = Counter()
    for e in examples:
        counts[e.source][e.split] += 1
        domain_rows[e.source] += e.domain is not None
    cfg = metadata.get("training", {}).get("config")
    used: Counter[str] | None = None
    if isinstance(cfg, dict):
        rows = data.training_rows(
            examples,
            int(cfg.get("seed", 13)),
            dict(cfg.get("caps", data.DEFAULT_CAPS)),
            int(cfg.get("natural_repeat", data.NATURAL_REPEAT)),
            dict(cfg.get("repeats", {})),  # artifacts from before per-source repeats had none
        )
        if cfg.get("max_rows") is not None:
            rows = rows[: int(cfg["max_rows"])]
        used = Counter(r.source for r in rows)
    out = []
    for source in sorted(counts):
        c = counts[source]
        total = sum(c.values())
        heads = (
            "domain + risk"
            if domain_rows[source] == total
            else "risk"
            if domain_rows[source] == 0
            else "mixed"
        )
        out.append(
            {
                "source": source,
                "heads": heads,
                "train": c["train"],
                "validation": c["validation"],
                "test": c["test"],
                "used": None if used is None else used.get(source, 0),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    model_dir: Path
    shared_dir: Path
    natural_dir: Path
    card: Path
    plots_dir: Path
    max_rows_per_source: int | None = None
    update_metadata: bool = True
    seed: int = 13
    plots: bool = True


def evaluate(config: EvalConfig) -> Report:
    """Score the artifact on the test rows, write the card and plots, update its metadata."""
    # Imported here, not at the top: model_card imports this module (the Report, the set names).
    from pointsman_classifier.model_card import write_card, write_plots

    for directory in (config.shared_dir, config.natural_dir):
        if not directory.is_dir():
            raise FileNotFoundError(f"data folder {directory} does not exist")
    model = ClassifierModel.load(config.model_dir)
    examples = data.load_all(config.shared_dir, config.natural_dir)
    rows = select_test_rows(examples, config.max_rows_per_source, config.seed)
    texts = [e.text for e in rows]
    if rows:
        d_logits, r_logits = batched_logits(model, texts)
    else:
        d_logits = np.zeros((0, len(model.domains)))
        r_logits = np.zeros((0, len(model.risks)))
    scored = score(model, rows, d_logits, r_logits)
    public = scored.where(lambda e: not e.source.startswith("natural/"))
    natural = scored.where(lambda e: e.source.startswith("natural/"))
    sets = {PUBLIC: set_report(PUBLIC, public, model), NATURAL: set_report(NATURAL, natural, model)}
    report = Report(
        metadata=model.metadata,
        sets=sets,
        per_source=group_rows(scored, model, lambda e: e.source),
        by_kind=group_rows(natural, model, lambda e: e.kind),
        hard_negatives=[
            hard_negatives(
                public, "XSTest safe prompts (public)", lambda e: e.source == "xstest", model.risks
            ),
            hard_negatives(
                natural,
                "natural/risk_hard_negatives",
                lambda e: e.source == "natural/risk_hard_negatives",
                model.risks,
            ),
            hard_negatives(
                natural,
                "natural rows of kind hard_negative (all files)",
                lambda e: e.kind == "hard_negative",
                model.risks,
            ),
        ],
        agreement=int8_fp32_agreement(model, texts, d_logits, r_logits),
        targets=targets(sets),
        data_summary=data_summary(examples, model.metadata),
        data_fingerprint=data.fingerprint(config.shared_dir, config.natural_dir),
        max_rows_per_source=config.max_rows_per_source,
        environment=inference_environment(),
    )
    if config.plots:
        report.plots = write_plots(report, config.plots_dir)
    write_card(report, config)
    if config.update_metadata:
        update_metadata(config.model_dir / "metadata.json", metrics_summary(report))
    return report


def metrics_summary(report: Report) -> dict[str, Any]:
    """The headline figures, JSON-ready (nan → null), for metadata["metrics"]."""
    out: dict[str, Any] = {
        "max_rows_per_source": report.max_rows_per_source,
        "data_fingerprint": report.data_fingerprint,
    }
    for name, s in report.sets.items():
        entry: dict[str, Any] = {"rows": s.rows}
        if s.domain:
            entry["domain"] = {
                "n": s.domain.n,
                "accuracy": _r(s.domain.accuracy),
                "macro_f1": _r(s.domain.macro_f1),
            }
        if s.risk:
            entry["risk"] = {
                "n": s.risk.n,
                "benign_fpr": _r(s.risk.benign_fpr),
                "hard_benign_fpr": _r(s.risk.hard_benign_fpr),
                **{
                    c.label: {
                        "n": c.positives,
                        "auc": _r(c.auc),
                        "recall": _r(c.recall),
                        "benign_fpr": _r(c.benign_fpr),
                        "recall_at_test_1pct_fpr": _r(c.at_test_fpr.recall),
                    }
                    for c in s.risk.classes
                },
            }
        entry["ece"] = {
            c.head: {"before": _r(c.ece_before), "after": _r(c.ece_after)} for c in s.calibration
        }
        if s.coverage:
            entry["ambiguity"] = {
                "coverage": _r(s.coverage.coverage),
                "accuracy": _r(s.coverage.accuracy),
            }
        out[f"test_{name}"] = entry
    out["hard_negatives_fpr"] = {
        h.name: _r(h.flagged / h.n if h.n else math.nan) for h in report.hard_negatives
    }
    out["targets"] = [
        {"target": t.target, "set": t.test_set, "n": t.n, "measured": t.measured, "met": t.met}
        for t in report.targets
    ]
    return out


def update_metadata(path: Path, evaluation: dict[str, Any]) -> None:
    """Write the figures under metadata["metrics"]["evaluation"]; everything else untouched."""
    meta = json.loads(path.read_text())
    metrics = meta.get("metrics")
    if not isinstance(metrics, dict):
        metrics = {}
    metrics["evaluation"] = evaluation
    meta["metrics"] = metrics
    path.write_text(json.dumps(meta, indent=2) + "\n")
