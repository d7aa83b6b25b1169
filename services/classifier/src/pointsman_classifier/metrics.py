"""Pure numpy metrics, apart from the artifact and the card, so tests check them by hand."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from pointsman_classifier import calibrate

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

MAX_FPR = 0.01


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
