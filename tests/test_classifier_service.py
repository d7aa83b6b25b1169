"""The classifier service against the real broker, with the packaged model: every query comes
back tagged exactly once (across a SIGKILL, across two replicas); bad input is dead-lettered."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from pointsman.client import Client
from pointsman.config import Settings
from pointsman.events import ChatMessage, QueryEvent
from pointsman_classifier.service import classification_text
from tests.kafka_helpers import collect, group_members, values, wait_for

ROOT = Path(__file__).resolve().parents[1]


def test_chat_is_classified_on_its_latest_user_turn_with_bounded_context() -> None:
    chat = QueryEvent(
        query_id="q",
        messages=[
            ChatMessage(role="system", content="be nice"),
            ChatMessage(role="user", content="I want to pay my mortgage off faster. " * 30),
            ChatMessage(role="assistant", content="Overpay a little each month."),
            ChatMessage(role="user", content="write a python script for my amortization table"),
        ],
    )
    text = classification_text(chat, context_chars=100)
    assert text.startswith("write a python script for my amortization table")
    assert "Overpay a little each month." in text and len(text) < 200
    assert classification_text(QueryEvent(query_id="q", text="hi")) == "hi"
    first = QueryEvent(query_id="q", messages=[ChatMessage(role="user", content="hello")])
    assert classification_text(first) == "hello"


def start_service(settings: Settings, instance: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "POINTSMAN_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "POINTSMAN_TOPIC_PREFIX": settings.topics.prefix,
        "POINTSMAN_LOG_LEVEL": "INFO",
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pointsman",
            "classifier",
            "--instance-id",
            instance,
            "--ops-port",
            "0",
            "--max-batch",
            "64",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def publish(settings: Settings, queries: list[QueryEvent]) -> None:
    async with Client(settings) as client:
        for q in queries:
            await client.send(q)


def queries(n: int, prefix: str) -> list[QueryEvent]:
    texts = [
        "is it legal to bring melatonin into Japan?",
        "write a haiku about autumn rain",
        "how do I reverse a linked list in python",
        "what is the derivative of x^3",
        "my card was charged twice, how do I get a refund",
        "best time to visit kyoto",
    ]
    return [QueryEvent(query_id=f"{prefix}-{i}", text=texts[i % len(texts)]) for i in range(n)]


async def has_members(settings: Settings, n: int) -> bool:
    return await group_members(settings, "pointsman-classifier") == n


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.kafka
async def test_every_query_is_tagged_with_the_expected_tags(kafka_settings: Settings) -> None:
    proc = start_service(kafka_settings, "t0")
    try:
        qs = queries(60, "ok")
        await publish(kafka_settings, qs)
        await publish_raw(kafka_settings, [b"{broken", orjson.dumps({"query_id": "e", "text": ""})])
        tagged = values(await collect(kafka_settings, "tagged", 60, timeout_s=90))
        dead = values(await collect(kafka_settings, "dead_letters", 2, timeout_s=30))
    finally:
        stop(proc)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    by_id = {t["query_id"]: t for t in tagged}
    assert set(by_id) == {q.query_id for q in qs} and len(tagged) == 60
    expected = ["legal", "creative", "code", "math", "finance", "travel"]
    for i, q in enumerate(qs):
        tags = by_id[q.query_id]["tags"]
        assert tags["domain"] == expected[i % 6], (q.text, tags)
        assert tags["risk"] == "none"
        assert by_id[q.query_id]["query"]["text"] == q.text
        assert (
            by_id[q.query_id]["trace"]["traceparent"].split("-")[1]
            == q.trace.traceparent.split("-")[1]
        )
    assert sorted(d["reason"] for d in dead) == ["empty", "invalid_json"]


async def publish_raw(settings: Settings, raws: list[bytes]) -> None:
    async with Client(settings) as client:
        for raw in raws:
            await client.send_raw(raw)


@pytest.mark.kafka
async def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(
    kafka_settings: Settings,
) -> None:
    n = 3000
    qs = queries(n, "kill")
    await publish(kafka_settings, qs)
    proc = start_service(kafka_settings, "k0")
    try:
        # wait until it is mid-stream, then kill it without warning
        await collect(kafka_settings, "tagged", 200, timeout_s=90)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        partial = len(await collect(kafka_settings, "tagged", 0, timeout_s=2))
        assert partial < n, "the worker finished before it could be killed; raise n"
        proc = start_service(kafka_settings, "k0")  # same instance id: fences the zombie
        tagged = values(await collect(kafka_settings, "tagged", n, timeout_s=180))
        await asyncio.sleep(2)
        tagged = values(await collect(kafka_settings, "tagged", n, timeout_s=5))
    finally:
        stop(proc)
    counts = Counter(t["query_id"] for t in tagged)
    assert set(counts) == {q.query_id for q in qs}
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]
    assert len(tagged) == n


@pytest.mark.kafka
async def test_two_replicas_share_the_work_and_survive_one_leaving(
    kafka_settings: Settings,
) -> None:
    a = start_service(kafka_settings, "r1")
    b = start_service(kafka_settings, "r2")
    try:
        await wait_for(lambda: has_members(kafka_settings, 2), timeout_s=60)
        await publish(kafka_settings, queries(400, "two"))
        await collect(kafka_settings, "tagged", 100, timeout_s=90)
        stop(b)  # graceful: finishes its batch, commits, leaves the group
        await publish(kafka_settings, queries(400, "after"))
        tagged = values(await collect(kafka_settings, "tagged", 800, timeout_s=120))
        await asyncio.sleep(2)
        tagged = values(await collect(kafka_settings, "tagged", 800, timeout_s=5))
    finally:
        stop(a)
        stop(b)
    counts = Counter(t["query_id"] for t in tagged)
    assert len(counts) == 800 and max(counts.values()) == 1
    assert b.returncode == 0


@pytest.mark.kafka
async def test_sighup_reloads_the_model_without_dropping_messages(kafka_settings: Settings) -> None:
    proc = start_service(kafka_settings, "h0")
    try:
        await publish(kafka_settings, queries(300, "before"))
        await collect(kafka_settings, "tagged", 50, timeout_s=90)
        proc.send_signal(signal.SIGHUP)
        await publish(kafka_settings, queries(300, "after"))
        tagged = values(await collect(kafka_settings, "tagged", 600, timeout_s=120))
    finally:
        stop(proc)
    logs = proc.stderr.read().decode() if proc.stderr else ""
    assert "model reloaded" in logs
    counts = Counter(t["query_id"] for t in tagged)
    assert len(counts) == 600 and max(counts.values()) == 1
