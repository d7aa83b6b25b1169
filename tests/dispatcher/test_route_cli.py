"""`pointsman policy validate` and `pointsman route --dry-run`, as a user runs them."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pointsman.cli import main
from pointsman.events import ChatMessage, QueryEvent, QueryMetadata, TaggedQueryEvent, Tags
from pointsman_dispatcher.policy import ROUTING_FILE_ENV

ROOT = Path(__file__).resolve().parents[2]
PROVIDERS_FILE = ROOT / "deploy" / "dispatcher" / "routing.providers.yaml"
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def tagged_line(
    query_id: str,
    text: str = "how do I reverse a list in python?",
    *,
    domain: str = "code",
    risk: str = "none",
    confidence: float = 0.95,
    ambiguous: bool = False,
    conversation: str | None = None,
    turns: int = 1,
    deadline: datetime | None = None,
) -> str:
    if turns > 1:
        messages = [ChatMessage(role="user", content=f"{text} ({i})") for i in range(turns)]
        query = QueryEvent(
            query_id=query_id,
            messages=messages,
            conversation_id=conversation,
            metadata=QueryMetadata(deadline=deadline),
        )
    else:
        query = QueryEvent(
            query_id=query_id,
            text=text,
            conversation_id=conversation,
            metadata=QueryMetadata(deadline=deadline),
        )
    tags = Tags(
        domain=domain,  # type: ignore[arg-type]
        risk=risk,  # type: ignore[arg-type]
        domain_probs={domain: confidence},  # type: ignore[dict-item]
        risk_probs={risk: 1.0},  # type: ignore[dict-item]
        confidence=confidence,
        ambiguous=ambiguous,
        model_version="test",
    )
    event = TaggedQueryEvent(
        query_id=query_id, query=query, tags=tags, conversation_id=conversation
    )
    return event.to_json().decode()


def run_cli(
    args: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    stdin: str = "",
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def records(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture(autouse=True)
def no_routing_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ROUTING_FILE_ENV, raising=False)


def test_validate_the_embedded_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run_cli(["policy", "validate"], capsys, monkeypatch)
    assert code == 0
    assert out.count("\n") == 1
    assert out.startswith("ok: embedded routing.yaml: 12 models")


def test_validate_a_bad_file_lists_every_error_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = PROVIDERS_FILE.read_text(encoding="utf-8")
    text = text.replace("input_per_mtok: 2.50,", "input_per_mtok: -1,", 1)
    text = text.replace("default_model: gpt-4o ", "default_model: gpt-9 ", 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text, encoding="utf-8")
    code, out, err = run_cli(["policy", "validate", str(bad)], capsys, monkeypatch)
    assert code == 2 and out == ""
    assert "models.gpt-4o.price.input_per_mtok: -1 is less than the minimum of 0" in err
    # Cross-references are checked once the schema passes: fix the price, see the model name.
    bad.write_text(text.replace("input_per_mtok: -1,", "input_per_mtok: 2.50,"), encoding="utf-8")
    code, _, err = run_cli(["policy", "validate", str(bad)], capsys, monkeypatch)
    assert code == 2 and "policy.default_model: unknown model 'gpt-9'" in err


def test_validate_honours_the_env_var(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ROUTING_FILE_ENV, str(PROVIDERS_FILE))
    code, out, _ = run_cli(["policy", "validate"], capsys, monkeypatch)
    assert code == 0 and "10 models" in out and str(PROVIDERS_FILE) in out


def test_route_dry_run_decides_each_line_and_reports_bad_ones(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [
        tagged_line("q1"),
        "{not json",
        "",
        json.dumps({"event_type": "tagged_query", "query_id": "q4"}),
        tagged_line("q5", domain="medical", risk="self_harm"),
        tagged_line("q6", risk="harmful"),
    ]
    code, out, err = run_cli(["route", "--dry-run"], capsys, monkeypatch, "\n".join(lines) + "\n")
    assert code == 1
    rows = records(out)
    assert [r["line"] for r in rows] == [1, 2, 4, 5, 6]
    assert rows[0]["query_id"] == "q1" and rows[0]["action"] == "route"
    assert rows[0]["reason_code"] == "domain.code" and rows[0]["candidates"][0] == "local-code"
    assert rows[0]["expected_cost_usd"] > 0
    assert rows[0]["counterfactual_cost_usd"] > rows[0]["expected_cost_usd"]
    assert rows[1]["error"]["type"] == "invalid_json"
    assert rows[2]["error"]["type"] == "schema_violation" and "query" in rows[2]["error"]["message"]
    assert rows[3]["reason_code"] == "risk.self_harm" and rows[3]["candidates"] == ["local-crisis"]
    assert rows[3]["review"] == {"reason": "self_harm", "priority": "urgent"}
    assert rows[4]["action"] == "refuse" and rows[4]["reason_code"] == "risk.harmful"
    assert "3 decisions (1 refused), 2 bad lines" in err


def test_route_reads_what_pointsman_tail_prints(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pointsman tail tagged | pointsman route --dry-run`: tail adds a `_kafka` annotation."""
    line = json.loads(tagged_line("q1"))
    line["_kafka"] = {"partition": 3, "offset": 17}
    code, out, _ = run_cli(["route", "--dry-run"], capsys, monkeypatch, json.dumps(line) + "\n")
    [row] = records(out)
    assert code == 0 and row["query_id"] == "q1" and row["action"] == "route"


def test_route_keeps_a_conversation_on_its_tier(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [
        tagged_line("t1", "hi there", domain="general", conversation="c1"),
        tagged_line("t2", "and then?", domain="general", conversation="c1", turns=3),
        tagged_line("t3", "thanks", domain="general", conversation="c1"),
        tagged_line("t4", "hello", domain="general", conversation="c2"),
    ]
    code, out, _ = run_cli(["route", "--dry-run", "-"], capsys, monkeypatch, "\n".join(lines))
    assert code == 0
    rows = records(out)
    assert [(r["candidates"][0], r["reason_code"]) for r in rows] == [
        ("local-small", "tier.small"),
        ("local-large", "tier.large"),
        ("local-large", "tier.sticky"),
        ("local-small", "tier.small"),
    ]


def test_route_with_health_and_a_fixed_clock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    health = tmp_path / "health.json"
    health.write_text(json.dumps({"local-code": "down"}), encoding="utf-8")
    source = tmp_path / "in.jsonl"
    source.write_text(
        tagged_line("h1") + "\n" + tagged_line("h2", deadline=NOW - timedelta(seconds=1)) + "\n",
        encoding="utf-8",
    )
    args = ["route", "--dry-run", "--health", str(health), "--now", NOW.isoformat(), str(source)]
    code, out, _ = run_cli(args, capsys, monkeypatch)
    assert code == 0
    first, second = records(out)
    assert first["reason_code"] == "health.down" and "local-code" not in first["candidates"]
    assert first["fallback_reasons"] == ["health.down:local-code"]
    assert (second["action"], second["error_type"]) == ("refuse", "deadline_exceeded")


def test_route_with_another_policy_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["route", "--dry-run", "--policy", str(PROVIDERS_FILE)]
    code, out, _ = run_cli(args, capsys, monkeypatch, tagged_line("p1", risk="jailbreak"))
    assert code == 0
    (row,) = records(out)
    assert row["action"] == "refuse" and row["review"]["priority"] == "normal"
    assert row["counterfactual_cost_usd"] > 0


def test_route_needs_dry_run_and_a_valid_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(["route"], capsys, monkeypatch, tagged_line("x"))
    assert code == 2 and "--dry-run" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 2\n", encoding="utf-8")
    code, out, err = run_cli(["route", "--dry-run", "--policy", str(bad)], capsys, monkeypatch)
    assert code == 2 and out == ""
    assert "version" in err and "policy: required key is missing" in err
    code, _, err = run_cli(
        ["route", "--dry-run", str(tmp_path / "nope.jsonl")], capsys, monkeypatch
    )
    assert code == 2 and "cannot read" in err


def test_ten_thousand_decisions_end_to_end_under_five_seconds(tmp_path: Path) -> None:
    shapes = [
        {"domain": "code"},
        {"domain": "general", "text": "hi"},
        {"domain": "medical", "confidence": 0.6},
        {"domain": "general", "risk": "self_harm"},
        {"domain": "legal", "ambiguous": True, "confidence": 0.4},
        {"domain": "general", "conversation": "c", "turns": 2},
    ]
    source = tmp_path / "10k.jsonl"
    with source.open("w", encoding="utf-8") as out:
        for i in range(10_000):
            out.write(tagged_line(f"q{i}", **shapes[i % len(shapes)]) + "\n")
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pointsman", "route", "--dry-run", str(source)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != ROUTING_FILE_ENV},
        cwd=ROOT,
        timeout=60,
    )
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 10_000
    assert "10000 decisions" in done.stderr
    print(f"\n10k decisions end to end: {elapsed:.2f} s; {done.stderr.strip()}")
    assert elapsed < 5.0
