"""`pointsman check-batch`: format, copies and cross-split paraphrases of new team rows."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pointsman_classifier import batchcheck
from pointsman_classifier.cli import cmd_check_batch
from pointsman_classifier.data import natural_split


def row(text: str, domain: str = "travel", risk: str = "none", kind: str = "typical") -> str:
    obj = {"text": text, "domain": domain, "risk": risk, "kind": kind, "author": "pointsman-team"}
    return json.dumps(obj)


def landing(stem: str, split: str) -> str:
    """``stem`` plus a suffix that puts the text in ``split`` (the split hashes the text)."""
    return next(f"{stem} {n}" for n in range(1000) if natural_split(f"{stem} {n}") == split)


def write(folder: Path, name: str, lines: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(line + "\n" for line in lines))


def reasons(problems: list[batchcheck.Problem]) -> dict[str, str]:
    return {p.row.text: p.reason for p in problems}


def test_a_paraphrase_of_a_held_out_row_fails_and_a_train_train_one_passes(
    tmp_path: Path,
) -> None:
    held_out = landing("how long does a passport renewal by mail take these days", "test")
    train_old = landing("cheapest way to get from the airport to the old town in lisbon", "train")
    write(tmp_path / "natural", "travel.jsonl", [row(held_out), row(train_old)])
    leak = landing("how long does passport renewal by mail take right now", "train")
    same_side = landing("cheapest way from the airport to the old town of lisbon", "train")
    unrelated = "which vaccines do I need before a trip to ghana"
    write(tmp_path / "batch", "travel.jsonl", [row(leak), row(same_side), row(unrelated)])

    rows, problems = batchcheck.check_batch(tmp_path / "batch", tmp_path / "natural")

    assert len(rows) == 3
    assert reasons(problems) == {leak: "paraphrase"}
    near = batchcheck.similarities(*[[v] for v in batchcheck.tfidf([same_side, train_old])])
    assert near[0, 0] > batchcheck.DEFAULT_THRESHOLD  # close too, but both sides train
    assert "(test; this row: train)" in problems[0].detail


def test_a_held_out_new_row_next_to_a_training_paraphrase_fails(tmp_path: Path) -> None:
    train_old = landing("what is the capital gains tax on selling an inherited house", "train")
    write(tmp_path / "natural", "finance.jsonl", [row(train_old, "finance")])
    leak = landing("capital gains tax on selling an inherited house explained", "validation")
    write(tmp_path / "batch", "finance.jsonl", [row(leak, "finance")])

    _, problems = batchcheck.check_batch(tmp_path / "batch", tmp_path / "natural")

    assert reasons(problems) == {leak: "paraphrase"}


def test_copies_up_to_case_and_punctuation_and_bad_rows_fail(tmp_path: Path) -> None:
    write(tmp_path / "natural", "medical.jsonl", [row("Can you overdose on vitamin D?", "medical")])
    lines = [
        row("can you overdose on vitamin d", "medical"),  # copy of an existing row
        row("best hiking boots for wide feet", "general"),
        row("Best hiking boots, for wide feet!", "general"),  # copy within the batch
        row("x", "sports"),  # unknown domain
        row("y", kind="rant"),  # unknown kind
        json.dumps({"text": "no kind", "domain": "travel", "risk": "none", "author": "a"}),
        "{not json",
    ]
    write(tmp_path / "batch", "mixed.jsonl", lines)

    rows, problems = batchcheck.check_batch(tmp_path / "batch", tmp_path / "natural")

    assert [r.text for r in rows] == [
        "can you overdose on vitamin d",
        "best hiking boots for wide feet",
        "Best hiking boots, for wide feet!",
    ]
    assert [(p.row.line, p.reason) for p in sorted(problems, key=lambda p: p.row.line)] == [
        (1, "duplicate"),
        (3, "duplicate"),
        (4, "format"),
        (5, "format"),
        (6, "format"),
        (7, "format"),
    ]


def test_the_command_fails_on_problems_and_drop_removes_exactly_those_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "natural", "code.jsonl", [row("git undo last commit", "code")])
    batch = tmp_path / "batch"
    lines = [row("Git: undo last commit?", "code"), row("regex for emails", "code")]
    write(batch, "code.jsonl", lines)
    args = argparse.Namespace(
        batch=str(batch), natural=str(tmp_path / "natural"), threshold=None, drop=False
    )

    assert cmd_check_batch(args) == 1
    assert "code.jsonl:1: duplicate" in capsys.readouterr().out
    assert len((batch / "code.jsonl").read_text().splitlines()) == 2

    assert cmd_check_batch(argparse.Namespace(**{**vars(args), "drop": True})) == 0
    assert (batch / "code.jsonl").read_text() == row("regex for emails", "code") + "\n"
    assert cmd_check_batch(args) == 0


def test_an_empty_batch_folder_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "natural", "code.jsonl", [row("git undo last commit", "code")])
    (tmp_path / "empty").mkdir()
    args = argparse.Namespace(
        batch=str(tmp_path / "empty"), natural=str(tmp_path / "natural"), threshold=None, drop=False
    )
    with pytest.raises(SystemExit, match=r"no \*\.jsonl files"):
        cmd_check_batch(args)
