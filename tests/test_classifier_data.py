"""The training-data rules (pure): splits, masks, de-duplication, caps, weights, fingerprint."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pointsman_classifier import batchcheck, data

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


def write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def row(
    text: str, domain: str = "general", risk: str = "none", split: str = "train"
) -> dict[str, str]:
    return {"text": text, "domain": domain, "risk": risk, "split": split, "source": "x"}


def test_hash_splits_are_stable_and_proportioned() -> None:
    texts = [f"query number {i}" for i in range(5000)]
    splits = Counter(data.natural_split(t) for t in texts)
    assert 0.66 < splits["train"] / 5000 < 0.74
    assert 0.12 < splits["test"] / 5000 < 0.18
    assert data.natural_split("  same text ") == data.natural_split("same text")
    assert Counter(data.shared_hash_split(t) for t in texts)["train"] / 5000 > 0.76


def test_masked_files_train_the_risk_head_only(tmp_path: Path) -> None:
    write(tmp_path / "xstest.jsonl", [row("How can I kill a Python process?")])
    write(tmp_path / "banking77.jsonl", [row("my card has not arrived", "finance")])
    by_source = {e.source: e for e in data.load_shared(tmp_path)}
    assert by_source["xstest"].domain is None and by_source["xstest"].risk == "none"
    assert by_source["banking77"].domain == "finance"


def test_evaluation_only_sources_are_resplit(tmp_path: Path) -> None:
    write(
        tmp_path / "policyqa.jsonl",
        [row(f"does the app sell my data {i}", "legal", split="test") for i in range(200)],
    )
    splits = Counter(e.split for e in data.load_shared(tmp_path))
    assert splits["train"] > 120 and splits["test"] > 5


def test_unknown_labels_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "bad.jsonl", [row("x", domain="astrology")])
    with pytest.raises(ValueError, match="unknown label"):
        data.load_shared(tmp_path)


def test_dedup_keeps_the_most_held_out_copy_and_masks_conflicts() -> None:
    a = data.Example("Reset my PIN", "finance", "none", "banking77", "train")
    b = data.Example("reset   my pin", "finance", "none", "clinc150", "test")
    c = data.Example("write malware", "code", "harmful", "advbench", "train")
    d = data.Example("Write malware", "general", "harmful", "harmbench", "validation")
    out = data.deduplicate([a, b, c, d])
    assert len(out) == 2
    pin = next(e for e in out if "pin" in e.text.lower())
    assert pin.split == "test"
    malware = next(e for e in out if "malware" in e.text.lower())
    assert malware.domain is None and malware.risk == "harmful" and malware.split == "validation"


def test_training_rows_cap_sources_and_repeat_natural_and_named_sources() -> None:
    rows = [data.Example(f"q{i}", "medical", "none", "medquad", "train") for i in range(50)]
    rows += [data.Example(f"n{i}", "legal", "none", "natural/legal", "train") for i in range(5)]
    rows += [data.Example("held out", "legal", "none", "natural/legal", "test")]
    rows += [data.Example(f"h{i}", None, "harmful", "advbench", "train") for i in range(4)]
    out = data.training_rows(
        rows, seed=1, caps={"medquad": 10}, natural_repeat=3, repeats={"advbench": 2}
    )
    counts = Counter(e.source for e in out)
    assert counts == {"medquad": 10, "natural/legal": 15, "advbench": 8}
    default = Counter(e.source for e in data.training_rows(rows, seed=1, caps={"medquad": 10}))
    assert default["advbench"] == 4  # no public source is repeated by default
    assert default["natural/legal"] == 5 * data.NATURAL_REPEAT
    assert all(e.split == "train" for e in out)
    assert data.training_rows(rows, seed=1, caps={"medquad": 10}) == data.training_rows(
        rows, seed=1, caps={"medquad": 10}
    )


def test_class_weights_favour_rare_classes() -> None:
    rows = [data.Example("a", "general", "none", "s", "train")] * 90
    rows += [data.Example("b", "legal", "self_harm", "s", "train")] * 10
    w = data.class_weights(rows, "domain")
    assert w["legal"] > w["general"] and w["creative"] == 0.0
    mean = (90 * w["general"] + 10 * w["legal"]) / 100
    assert mean == pytest.approx(1.0)


def test_fingerprint_changes_with_the_data(tmp_path: Path) -> None:
    write(tmp_path / "a.jsonl", [row("one")])
    first = data.fingerprint(tmp_path)
    write(tmp_path / "a.jsonl", [row("two")])
    assert data.fingerprint(tmp_path) != first


def test_the_real_data_loads_with_every_label_and_no_test_text_in_train() -> None:
    examples = data.load_all(SHARED, ROOT / "data" / "natural")
    splits: dict[str, set[str]] = {"train": set(), "validation": set(), "test": set()}
    for e in examples:
        splits[e.split].add(data.normalise(e.text))
    assert not splits["train"] & splits["test"]
    assert not splits["validation"] & splits["test"]
    train = data.training_rows(examples)
    assert {e.domain for e in train} >= {"creative", "legal", "medical", None}
    assert {e.risk for e in train} == {"none", "jailbreak", "self_harm", "harmful"}
    natural_test = [e for e in examples if e.source.startswith("natural/") and e.split == "test"]
    assert len(natural_test) > 700


def test_the_rows_waiting_in_unused_pass_the_batch_check() -> None:
    """Batches are checked before they join data/natural (`pointsman check-batch`); the ones
    waiting must stay clean against today's data, copies and cross-split paraphrases included."""
    natural = ROOT / "data" / "natural"
    batches = sorted(p for p in (natural / "unused").iterdir() if any(p.glob("*.jsonl")))
    assert batches
    for batch in batches:
        rows, problems = batchcheck.check_batch(batch, natural)
        lines = sum(
            1 for f in batch.glob("*.jsonl") for line in f.read_text().splitlines() if line.strip()
        )
        assert lines > 0 and len(rows) == lines, batch  # every written row was read and checked
        assert problems == [], batch


def test_a_missing_data_folder_is_an_error_not_an_empty_set(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no \*\.jsonl"):
        data.load_all(tmp_path / "absent", tmp_path)


def test_train_repeat_option_parses_pairs_and_refuses_bad_ones() -> None:
    from pointsman_classifier.cli import _source_repeats

    assert _source_repeats(["advbench=3", "xstest=2"]) == {"advbench": 3, "xstest": 2}
    assert _source_repeats([]) == {}
    for bad in ("advbench", "advbench=0", "=3", "advbench=x"):
        with pytest.raises(SystemExit, match="SOURCE=N"):
            _source_repeats([bad])


def test_train_natural_repeat_option_defaults_to_the_recipe_and_refuses_zero() -> None:
    from pointsman.cli import build_parser
    from pointsman_classifier.cli import _natural_repeat

    assert build_parser().parse_args(["train"]).natural_repeat == data.NATURAL_REPEAT
    assert _natural_repeat(3) == 3
    for bad in (0, -2):
        with pytest.raises(SystemExit, match="--natural-repeat"):
            _natural_repeat(bad)
