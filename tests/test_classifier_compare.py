"""`pointsman compare`: candidate models judged side by side on validation rows, each at its
own calibration."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from pointsman_classifier import compare, data
from pointsman_classifier.labels import DOMAINS, RISKS
from pointsman_classifier.train import calibration_rows, fit_calibration

ROOT = Path(__file__).resolve().parents[1]
SHARED, NATURAL = ROOT.parent / "shared" / "datasets", ROOT / "data" / "natural"


def row(text: str, domain: str | None, risk: str | None, source: str) -> data.Example:
    return data.Example(text, domain, risk, source, "validation")


def onehot(indices: list[int], n: int, scale: float = 8.0) -> np.ndarray:
    out = np.zeros((len(indices), n))
    out[np.arange(len(indices)), indices] = scale
    return out


def test_group_figures_count_recall_at_the_decided_class_and_benign_flags() -> None:
    rows = [
        row("a", "medical", "none", "natural/medical"),
        row("b", "legal", "none", "natural/risk_hard_negatives"),
        row("c", "general", "harmful", "natural/risk_harmful"),
        row("d", "general", "harmful", "natural/risk_harmful"),
        row("e", "general", "self_harm", "natural/risk_self_harm"),
    ]
    domain_probs = np.eye(len(DOMAINS))[
        [DOMAINS.index(d) for d in ("medical", "finance", "general", "general", "medical")]
    ]
    # c decided harmful; d flagged, but as jailbreak (not a harmful hit); b benign but flagged
    decided = np.array([0, RISKS.index("self_harm"), 3, 1, RISKS.index("self_harm")])
    f = compare.group_figures(rows, domain_probs, decided)
    assert f.domain_rows == 5
    assert f.domain_accuracy == 3 / 5
    assert f.risk_rows == {"jailbreak": 0, "self_harm": 1, "harmful": 2}
    assert f.risk_recall["harmful"] == 0.5 and f.risk_recall["self_harm"] == 1.0
    assert math.isnan(f.risk_recall["jailbreak"])
    assert f.hard_benign == 2 and f.hard_benign_flagged == 0.5


def test_rows_of_the_focus_folder_are_reported_apart_as_well_as_with_their_group() -> None:
    focus = {data.normalise("New Row")}
    assert compare.group_of(row("new row", "general", "none", "natural/general"), focus) == [
        "natural",
        "focus",
    ]
    assert compare.group_of(row("old row", "general", "none", "natural/general"), focus) == [
        "natural"
    ]
    assert compare.group_of(row("new row", "math", "none", "gsm8k"), focus) == ["public"]


def test_each_model_is_judged_at_its_own_thresholds() -> None:
    rng = np.random.default_rng(0)
    rows = [row(f"benign {i}", "general", "none", "natural/general") for i in range(300)]
    rows += [row(f"harm {i}", "general", "harmful", "natural/risk_harmful") for i in range(50)]
    d_logits = onehot([DOMAINS.index("general")] * len(rows), len(DOMAINS))
    # harmful rows score 2..4 on the harmful logit, benign rows 0..3: the benign tail overlaps
    r = np.zeros((len(rows), len(RISKS)))
    r[:300, 3] = rng.uniform(0.0, 3.0, 300)
    r[300:, 3] = rng.uniform(2.0, 4.0, 50)
    low = compare.judge("low", "v1", rows, d_logits, r)
    high = compare.judge("high", "v2", rows, d_logits, r + np.array([0, 0, 0, 1.0]))
    for j in (low, high):  # 1% benign FPR per class: a few of 300 benign rows flagged
        assert 0.0 < j.groups["natural"].hard_benign_flagged <= 0.03
        assert 0.0 < j.groups["natural"].risk_recall["harmful"] < 1.0
    # shifting every harmful logit by the same amount moves the threshold, not the decisions
    assert low.groups["natural"].risk_recall == high.groups["natural"].risk_recall
    assert low.thresholds["harmful"] != high.thresholds["harmful"]
    assert set(low.groups) == {"natural"}


def test_compare_cli_prints_one_column_per_model_and_matches_the_artifact_calibration(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    out = tmp_path / "compare.json"
    focus = tmp_path / "focus"
    focus.mkdir()
    examples = data.load_all(SHARED, NATURAL)
    chosen = [e for e in calibration_rows(examples, 400, 13) if e.source == "natural/legal"][:5]
    (focus / "legal.jsonl").write_text(
        "".join(
            json.dumps({"text": e.text, "domain": e.domain, "risk": e.risk, "kind": "typical"})
            + "\n"
            for e in chosen
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pointsman",
            "compare",
            str(tiny_artifact),
            str(tiny_artifact),
            "--focus",
            str(focus),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    header = result.stdout.splitlines()[0]
    assert header.count("|") == 4  # label column and two model columns
    assert "public harmful recall" in result.stdout and "focus" in result.stdout
    judged = json.loads(out.read_text())
    assert len(judged) == 2 and judged[0]["groups"] == judged[1]["groups"]
    assert judged[0]["groups"]["focus"]["domain_rows"] == 5
    assert set(judged[0]["groups"]) == {"public", "natural", "focus"}
    # the thresholds it judges with are the ones `pointsman calibrate` would store
    from pointsman_classifier.runtime import ClassifierModel

    fitted = fit_calibration(ClassifierModel.load(tiny_artifact), examples, 400, 13)
    for name, t in fitted["risk_thresholds"].items():
        assert abs(judged[0]["thresholds"][name] - t) < 1e-6
