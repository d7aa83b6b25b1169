"""The `pointsman` command line: help everywhere, clear errors, publish and read for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pointsman.cli import build_parser
from pointsman.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def run(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pointsman", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        input=stdin,
        timeout=timeout,
        cwd=ROOT,
    )


def all_command_paths() -> list[list[str]]:
    import argparse

    paths: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        paths.append(prefix)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*prefix, name])

    walk(build_parser(), [])
    return paths


def test_help_works_for_every_command() -> None:
    paths = all_command_paths()
    assert ["kafka", "start"] in paths and ["topics", "create"] in paths and ["send"] in paths
    for path in paths:
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args([*path, "--help"])
        assert info.value.code == 0, path


def test_bad_config_is_a_clear_error_with_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("topics:\n  queries: {name: q, partitions: -1}\n")
    result = run("--config", str(bad), "config", "validate")
    assert result.returncode == 2
    assert "topics.queries.partitions" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_show_never_prints_the_password() -> None:
    env = {
        "POINTSMAN_SECURITY_PROTOCOL": "SASL_SSL",
        "POINTSMAN_SASL_MECHANISM": "SCRAM-SHA-256",
        "POINTSMAN_SASL_USERNAME": "u",
        "POINTSMAN_SASL_PASSWORD": "pa55-w0rd-xyz",
    }
    result = run("config", "show", env=env)
    assert result.returncode == 0, result.stderr
    assert "SASL_SSL" in result.stdout and "pa55-w0rd-xyz" not in result.stdout + result.stderr


def test_schemas_check_passes_on_the_committed_files() -> None:
    result = run("schemas", "check")
    assert result.returncode == 0, result.stderr


def test_a_service_without_a_command_says_so() -> None:
    result = run("auditor")
    assert result.returncode == 2
    assert "auditor" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.kafka
async def test_send_and_tail_through_the_broker(kafka_settings: Settings) -> None:
    env = {
        "POINTSMAN_BOOTSTRAP_SERVERS": kafka_settings.kafka.bootstrap_servers,
        "POINTSMAN_TOPIC_PREFIX": kafka_settings.topics.prefix,
    }
    lines = "\n".join(
        [
            json.dumps({"text": "what is a roth ira", "query_id": "cli-1"}),
            "plain text line becomes a query",
            json.dumps({"messages": [{"role": "user", "content": "hola"}], "query_id": "cli-3"}),
        ]
    )
    sent = run("send", "--tenant", "acme", env=env, stdin=lines)
    assert sent.returncode == 0, sent.stderr
    ids = [json.loads(x)["query_id"] for x in sent.stdout.splitlines()]
    assert ids[0] == "cli-1" and ids[2] == "cli-3" and len(ids) == 3
    tail = run("tail", "queries", "--max", "3", "--timeout", "10", env=env)
    assert tail.returncode == 0, tail.stderr
    events = [json.loads(x) for x in tail.stdout.splitlines()]
    assert sorted(e["query_id"] for e in events) == sorted(ids)
    assert all(e["tenant"] == "acme" for e in events)
    bad = run("send", env=env, stdin=json.dumps({"text": "x", "metadata": {"max_cost_usd": -2}}))
    assert bad.returncode != 0 and "max_cost_usd" in bad.stderr
