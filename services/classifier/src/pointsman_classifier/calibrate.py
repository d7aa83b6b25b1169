"""Calibration: temperatures, risk thresholds and the ambiguity band (pure numpy).

- **Temperature scaling** per head: one scalar T minimising the negative log-likelihood of the
  validation labels under softmax(logits / T).
- **Risk thresholds**: per risk class r, the lowest threshold t_r with at most ``max_fpr`` of the
  benign validation rows scoring p_r >= t_r. A query is flagged with the class of highest p_r / t_r
  among those over their threshold.
- **Ambiguity band**: the dispatcher falls back when the domain confidence is below a cut-off,
  chosen on the risk-coverage curve: the lowest cut-off whose kept rows are at least
  ``target_accuracy`` accurate, as long as no more than ``max_escalation`` of traffic escalates;
  if no cut-off reaches the target within that budget, the cut-off at the budget is taken and the
  accuracy it does reach is recorded.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


def softmax(logits: Array, temperature: float = 1.0) -> Array:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: Array = e / e.sum(axis=1, keepdims=True)
    return out


def nll(logits: Array, labels: NDArray[np.int64], temperature: float) -> float:
    p = softmax(logits, temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1.0))))


def fit_temperature(logits: Array, labels: NDArray[np.int64]) -> float:
    """Golden-section search of log T in [log 0.05, log 20]."""
    lo, hi = np.log(0.05), np.log(20.0)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logits, labels, float(np.exp(a))), nll(logits, labels, float(np.exp(b)))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(logits, labels, float(np.exp(a)))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logits, labels, float(np.exp(b)))
    return float(np.exp((lo + hi) / 2))


def expected_calibration_error(probs: Array, labels: NDArray[np.int64], bins: int = 15) -> float:
    """ECE of the top-1 prediction, equal-width confidence bins."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def reliability(
    probs: Array, labels: NDArray[np.int64], bins: int = 15
) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) per non-empty bin, for the reliability diagram."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for lo, hi in itertools.pairwise(edges):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            out.append(
                (float(conf[in_bin].mean()), float(correct[in_bin].mean()), int(in_bin.sum()))
            )
    return out


def threshold_at_fpr(benign_scores: Array, max_fpr: float) -> float:
    """Lowest t with mean(benign_scores >= t) <= max_fpr."""
    s = np.sort(benign_scores)[::-1]
    allowed = int(np.floor(max_fpr * len(s)))
    if allowed >= len(s):
        return 0.0
    # flag strictly above the (allowed+1)-th highest benign score
    return float(np.nextafter(s[allowed], np.inf))


def risk_thresholds(
    risk_probs: Array, benign: NDArray[np.bool_], classes: tuple[str, ...], max_fpr: float = 0.01
) -> dict[str, float]:
    """Per risk class (all but index 0, 'none'), the threshold at ``max_fpr`` on benign rows."""
    return {
        name: threshold_at_fpr(risk_probs[benign, i], max_fpr)
        for i, name in enumerate(classes)
        if i > 0
    }


def decide_risk(risk_probs: Array, thresholds: Array) -> NDArray[np.int64]:
    """Index of the flagged risk class per row (0 = none). ``thresholds[0]`` is ignored."""
    ratio = risk_probs[:, 1:] / thresholds[1:]
    best = ratio.argmax(axis=1)
    flagged = ratio[np.arange(len(best)), best] >= 1.0
    out: NDArray[np.int64] = np.where(flagged, best + 1, 0).astype(np.int64)
    return out


@dataclass(frozen=True)
class CoveragePoint:
    threshold: float
    coverage: float
    accuracy: float


def risk_coverage_curve(confidence: Array, correct: NDArray[np.bool_]) -> list[CoveragePoint]:
    """Accuracy of the rows kept (confidence >= t) against the share kept, for each cut-off."""
    order = np.argsort(-confidence, kind="stable")
    conf = confidence[order]
    cum_correct = np.cumsum(correct[order])
    n = len(conf)
    points = []
    for k in range(1, n + 1):
        if k < n and conf[k] == conf[k - 1]:
            continue  # only cut between distinct confidences
        points.append(CoveragePoint(float(conf[k - 1]), k / n, float(cum_correct[k - 1] / k)))
    return points


@dataclass(frozen=True)
class Band:
    threshold: float  # confidence below this is ambiguous
    coverage: float
    accuracy: float
    target_met: bool


def ambiguity_band(
    confidence: Array,
    correct: NDArray[np.bool_],
    target_accuracy: float = 0.99,
    max_escalation: float = 0.10,
) -> Band:
    curve = risk_coverage_curve(confidence, correct)
    allowed = [p for p in curve if p.coverage >= 1.0 - max_escalation - 1e-12]
    meeting = [p for p in allowed if p.accuracy >= target_accuracy]
    if meeting:
        best = max(meeting, key=lambda p: p.coverage)
        return Band(best.threshold, best.coverage, best.accuracy, True)
    edge = min(allowed, key=lambda p: p.coverage)
    return Band(edge.threshold, edge.coverage, edge.accuracy, False)
