"""`pointsman eval`: the int8 artifact on the held-out test rows, written up as the model card.

Only test rows are scored (``data.load_all`` then ``split == "test"``): the public sets' test
splits and the team's natural test split (the second test set), reported side by side and never
pooled. Nothing here tunes anything: temperatures, risk thresholds and the ambiguity cut-off are
the artifact's own, chosen on validation rows at training time. The one figure that does choose a
threshold on test rows — recall at 1% benign FPR, threshold at the test benign rows' 99th
percentile — is labelled as such: it measures how well the head ranks, not what it would do when
deployed.

The metric functions at the top are small, pure numpy and importable, so tests check them on
hand-computed cases. The card is deterministic: the same artifact and data give byte-identical
markdown (numbers rounded, rows in a fixed order, no timestamps but the artifact's own).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pointsman_classifier import calibrate, data
from pointsman_classifier.runtime import ClassifierModel
from pointsman_classifier.train import batched_logits, is_hard_benign

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

MAX_FPR = 0.01
COVERAGE_LEVELS = (1.0, 0.95, 0.9, 0.8, 0.5)
FP32_NAME = "model.fp32.onnx"  # an fp32 export kept beside the artifact, if any
PUBLIC, NATURAL = "public", "natural"
SET_TITLES = {PUBLIC: "public test", NATURAL: "natural test (second test set)"}


# ---------------------------------------------------------------------------------------------
# Pure metric functions
# ---------------------------------------------------------------------------------------------


def accuracy(y_true: IntArray, y_pred: IntArray) -> float:
    """Share of rows predicted right (nan for no rows)."""
    if len(y_true) == 0:
        return math.nan
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def confusion_matrix(y_true: IntArray, y_pred: IntArray, n_classes: int) -> IntArray:
    """Counts, rows = true class, columns = predicted class."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m


@dataclass(frozen=True)
class ClassScores:
    label: str
    precision: float  # nan when the class is never predicted
    recall: float  # nan when the class has no rows
    f1: float  # nan when the class neither occurs nor is predicted
    support: int
    predicted: int


def per_class_prf(confusion: IntArray, labels: Sequence[str]) -> list[ClassScores]:
    """Precision, recall, F1 and support per class from a confusion matrix."""
    out = []
    for i, label in enumerate(labels):
        tp = int(confusion[i, i])
        support = int(confusion[i, :].sum())
        predicted = int(confusion[:, i].sum())
        out.append(
            ClassScores(
                label=label,
                precision=tp / predicted if predicted else math.nan,
                recall=tp / support if support else math.nan,
                f1=2 * tp / (support + predicted) if support + predicted else math.nan,
                support=support,
                predicted=predicted,
            )
        )
    return out


def macro_f1(confusion: IntArray) -> float:
    """Unweighted mean F1 over the classes that occur or are predicted (scikit-learn's default
    label set, with F1 = 0 for a class that occurs but is never predicted right)."""
    f1s = [c.f1 for c in per_class_prf(confusion, [str(i) for i in range(len(confusion))])]
    present = [f for f in f1s if not math.isnan(f)]
    return float(np.mean(present)) if present else math.nan


def _average_ranks(x: FloatArray) -> FloatArray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts_mask = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(starts_mask) - 1
    starts = np.flatnonzero(starts_mask)
    ends = np.r_[starts[1:], len(x)]
    average = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = average[group]
    return ranks


def roc_auc(scores: FloatArray, positive: BoolArray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half); nan without both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(scores)
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


@dataclass(frozen=True)
class RecallAtFpr:
    threshold: float
    recall: float
    fpr: float  # the benign false-positive rate actually reached (≤ max_fpr)


def recall_at_fpr(
    scores: FloatArray, positive: BoolArray, benign: BoolArray, max_fpr: float = MAX_FPR
) -> RecallAtFpr:
    """Recall of ``positive`` rows at the lowest threshold flagging at most ``max_fpr`` of the
    ``benign`` rows (``calibrate.threshold_at_fpr``: the benign (1 - max_fpr) quantile)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    benign = np.asarray(benign, dtype=bool)
    if not benign.any():
        return RecallAtFpr(math.nan, math.nan, math.nan)
    t = calibrate.threshold_at_fpr(scores[benign], max_fpr)
    return RecallAtFpr(t, rate(scores[positive] >= t), rate(scores[benign] >= t))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% for z = 1.96); nan for no rows."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(flags: BoolArray) -> float:
    """Share of True (nan for no rows)."""
    return float(np.mean(flags)) if len(flags) else math.nan


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
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"])
        ref = ClassifierModel(model.directory, model.metadata, session, model.tokenizer)
        d32, r32 = batched_logits(ref, texts)
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
    artifact's training config: caps, natural repeat, seed, max_rows)."""
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
    )
    if config.plots:
        report.plots = write_plots(report, config.plots_dir)
    config.card.parent.mkdir(parents=True, exist_ok=True)
    with config.card.open("w", encoding="utf-8", newline="\n") as f:
        f.write(render_card(report, config))
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


def _f(x: float, digits: int = 4) -> str:
    return "—" if math.isnan(x) else f"{x:.{digits}f}"


def _r(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 4)


def _ge(x: float, bound: float) -> bool | None:
    return None if math.isnan(x) else x >= bound


def _le(x: float, bound: float) -> bool | None:
    return None if math.isnan(x) else x <= bound


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
        "the ambiguity cut-off are the artifact's own, chosen on validation rows at training time."
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
    for key in ("epochs", "batch_size", "lr", "head_lr", "max_rows", "seed", "threads"):
        if key in cfg:
            model_rows.append([f"training {key}", cfg[key]])
    if "seconds" in training:
        model_rows.append(["training time (s)", training["seconds"]])
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
        "Domain accuracy and macro-F1 on the source's domain-labelled test rows; risk recall on "
        "its risky rows (decided class = true class) and the flag rate on its benign rows."
    )
    add("")
    out += table(
        [
            "source",
            "domain n",
            "accuracy",
            "macro-F1",
            "risky n",
            "risk recall",
            "benign n",
            "benign flagged",
        ],
        [
            [
                r.group,
                r.domain_n,
                _f(r.domain_accuracy),
                _f(r.domain_macro_f1),
                r.risky_n,
                _f(r.risky_recall),
                r.benign_n,
                _f(r.benign_fpr),
            ]
            for r in report.per_source
        ],
    )
    add("")
    add("### Natural test set by kind")
    add("")
    out += table(
        [
            "kind",
            "domain n",
            "accuracy",
            "macro-F1",
            "risky n",
            "risk recall",
            "benign n",
            "benign flagged",
        ],
        [
            [
                r.group,
                r.domain_n,
                _f(r.domain_accuracy),
                _f(r.domain_macro_f1),
                r.risky_n,
                _f(r.risky_recall),
                r.benign_n,
                _f(r.benign_fpr),
            ]
            for r in report.by_kind
        ],
    )
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
    add("make train   # pointsman train: fine-tune, export int8 ONNX, calibrate")
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
