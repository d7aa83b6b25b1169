"""Judging candidate models on validation rows, so that the choice never looks at test rows.

Every candidate is calibrated afresh on the same calibration rows (its own temperatures, risk
thresholds and ambiguity band, as `pointsman calibrate` would fit them) and scored on those rows:
domain accuracy and macro-F1, risk recall per class at its own thresholds, the hard benign rows
it flags, and its band. Models trained on different data are compared on the same rows; the rows
of one folder of new data (``focus``) can be reported apart, e.g. a batch's own validation rows.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pointsman_classifier import calibrate, data, metrics
from pointsman_classifier.labels import DOMAINS, RISKS
from pointsman_classifier.runtime import ClassifierModel
from pointsman_classifier.train import (
    batched_logits,
    calibration_from_logits,
    calibration_rows,
    is_hard_benign,
)

FloatArray = NDArray[np.float64]
GROUPS = ("public", "natural", "focus")


@dataclass(frozen=True)
class GroupFigures:
    """One group of validation rows, decided at the model's own calibration."""

    domain_rows: int
    domain_accuracy: float
    domain_macro_f1: float
    risk_rows: dict[str, int]  # positives per risk class
    risk_recall: dict[str, float]  # decided as that class
    hard_benign: int
    hard_benign_flagged: float  # decided as any risk class


@dataclass(frozen=True)
class Judgement:
    model: str
    model_version: str
    rows: int
    groups: dict[str, GroupFigures]
    thresholds: dict[str, float]
    band_accuracy: float
    band_coverage: float


def group_of(e: data.Example, focus: Collection[str]) -> list[str]:
    """The groups a row is reported in: public or natural, and focus as well if its text is in
    the focus folder."""
    if not e.source.startswith("natural/"):
        return ["public"]
    return ["natural", "focus"] if data.normalise(e.text) in focus else ["natural"]


def group_figures(
    rows: Sequence[data.Example], domain_probs: FloatArray, risk_decided: NDArray[np.int64]
) -> GroupFigures:
    """Figures for the rows given (pure): ``domain_probs`` calibrated, ``risk_decided`` the
    index of the risk class each row is decided as (0 = none)."""
    has_d = np.array([e.domain is not None for e in rows], dtype=bool)
    yd = np.array([DOMAINS.index(e.domain) if e.domain else -1 for e in rows], dtype=np.int64)
    pd = domain_probs.argmax(axis=1) if len(rows) else np.zeros(0, dtype=np.int64)
    confusion = metrics.confusion_matrix(yd[has_d], pd[has_d], len(DOMAINS))
    risk_rows: dict[str, int] = {}
    risk_recall: dict[str, float] = {}
    for i, name in enumerate(RISKS[1:], start=1):
        positive = np.array([e.risk == name for e in rows], dtype=bool)
        risk_rows[name] = int(positive.sum())
        risk_recall[name] = metrics.rate(risk_decided[positive] == i)
    hard = np.array([is_hard_benign(e) for e in rows], dtype=bool)
    return GroupFigures(
        domain_rows=int(has_d.sum()),
        domain_accuracy=metrics.accuracy(yd[has_d], pd[has_d]),
        domain_macro_f1=metrics.macro_f1(confusion) if has_d.any() else math.nan,
        risk_rows=risk_rows,
        risk_recall=risk_recall,
        hard_benign=int(hard.sum()),
        hard_benign_flagged=metrics.rate(risk_decided[hard] > 0),
    )


def judge(
    name: str,
    version: str,
    rows: Sequence[data.Example],
    d_logits: FloatArray,
    r_logits: FloatArray,
    focus: Collection[str] = (),
) -> Judgement:
    """Calibrate on ``rows`` and score the same rows (pure numpy)."""
    cal = calibration_from_logits(list(rows), d_logits, r_logits)
    dp = calibrate.softmax(d_logits, cal["temperature_domain"])
    rp = calibrate.softmax(r_logits, cal["temperature_risk"])
    thresholds = np.array([1.0] + [cal["risk_thresholds"][r] for r in RISKS[1:]])
    decided = calibrate.decide_risk(rp, thresholds)
    members: dict[str, list[int]] = {g: [] for g in GROUPS}
    for i, e in enumerate(rows):
        for g in group_of(e, focus):
            members[g].append(i)
    groups = {
        g: group_figures([rows[i] for i in idx], dp[idx], decided[idx])
        for g, idx in members.items()
        if idx
    }
    return Judgement(
        model=name,
        model_version=version,
        rows=len(rows),
        groups=groups,
        thresholds=dict(cal["risk_thresholds"]),
        band_accuracy=float(cal["ambiguity_band"]["accuracy"]),
        band_coverage=float(cal["ambiguity_band"]["coverage"]),
    )


def focus_texts(folder: Path | None) -> set[str]:
    """Normalised texts of every row in a folder of team data files (empty without one)."""
    if folder is None:
        return set()
    return {data.normalise(e.text) for e in data.load_natural(folder)}


def compare(
    directories: Sequence[Path],
    examples: list[data.Example],
    cap: int = 400,
    seed: int = 13,
    focus: Collection[str] = (),
) -> list[Judgement]:
    """Judge each artifact on the calibration rows of ``examples``."""
    rows = calibration_rows(examples, cap, seed)
    texts = [e.text for e in rows]
    out = []
    for directory in directories:
        model = ClassifierModel.load(directory)
        d_logits, r_logits = batched_logits(model, texts)
        out.append(judge(str(directory), model.version, rows, d_logits, r_logits, focus))
    return out


def _cell(x: float, digits: int = 3) -> str:
    return "—" if math.isnan(x) else f"{x:.{digits}f}"


def table(judgements: Sequence[Judgement]) -> str:
    """A markdown table: one column per model, one line per figure."""
    lines: list[tuple[str, list[str]]] = []

    def line(label: str, values: list[str]) -> None:
        lines.append((label, values))

    js = list(judgements)
    for g in GROUPS:
        present = [j.groups.get(g) for j in js]
        first = next((f for f in present if f is not None), None)
        if first is None:
            continue
        for r in RISKS[1:]:
            line(
                f"{g} {r} recall ({first.risk_rows[r]})",
                [_cell(f.risk_recall[r]) if f else "—" for f in present],
            )
        line(
            f"{g} hard benign flagged ({first.hard_benign})",
            [_cell(f.hard_benign_flagged) if f else "—" for f in present],
        )
        line(
            f"{g} domain accuracy / macro-F1 ({first.domain_rows})",
            [
                f"{_cell(f.domain_accuracy)} / {_cell(f.domain_macro_f1)}" if f else "—"
                for f in present
            ],
        )
    line(
        "ambiguity band accuracy at its coverage",
        [f"{_cell(j.band_accuracy)} at {_cell(j.band_coverage)}" for j in js],
    )
    line(
        "thresholds " + " / ".join(RISKS[1:]),
        [" / ".join(_cell(j.thresholds[r], 2) for r in RISKS[1:]) for j in js],
    )
    head = "| validation rows | " + " | ".join(j.model_version for j in js) + " |"
    rule = "|---|" + "---:|" * len(js)
    body = [f"| {label} | " + " | ".join(values) + " |" for label, values in lines]
    return "\n".join([head, rule, *body]) + "\n"


def as_json(judgements: Sequence[Judgement]) -> list[dict[str, Any]]:
    """The judgements as plain data (nan as null)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float):
            return None if math.isnan(x) else round(x, 6)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return x

    return [
        {
            "model": j.model,
            "model_version": j.model_version,
            "rows": j.rows,
            "thresholds": clean(j.thresholds),
            "band": {"accuracy": clean(j.band_accuracy), "coverage": clean(j.band_coverage)},
            "groups": {g: clean(vars(f)) for g, f in j.groups.items()},
        }
        for j in judgements
    ]
