"""The shared worker against the real broker: bad input is dead-lettered with a typed reason and
the source offset, good input next to it is still processed, and everything is committed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Sequence

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from pointsman.config import LimitsSettings, Settings
from pointsman.events import QueryEvent
from pointsman.kafka import client_kwargs
from pointsman.worker import (
    Failure,
    Handler,
    Incoming,
    Outcome,
    Produce,
    Worker,
    WorkerOptions,
    event_record,
)
from tests.kafka_helpers import collect, committed_lag, values, wait_for

pytestmark = pytest.mark.kafka


def echo_handler(settings: Settings):  # type: ignore[no-untyped-def]
    """Writes each query to the responses topic; refuses (Failure) texts that say 'poison'."""

    async def handle(batch: Sequence[Incoming[QueryEvent]]) -> list[Outcome]:
        out: list[Outcome] = []
        for item in batch:
            if "poison" in item.event.query_text():
                out.append(Failure("the handler refuses poison"))
            else:
                out.append([event_record(settings.topics.name("responses"), item.event)])
        return out

    return handle


@contextlib.asynccontextmanager
async def running(worker: Worker[QueryEvent]) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.wait_for(worker.ready.wait(), 30)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def good(n: int) -> bytes:
    return QueryEvent(query_id=f"good-{n}", text=f"good query {n}").to_json()


def query_worker(
    settings: Settings,
    service: str,
    handler: Handler[QueryEvent],
    options: WorkerOptions | None = None,
    cls: type[Worker[QueryEvent]] = Worker,
) -> Worker[QueryEvent]:
    """A worker on the queries topic, alone in a fresh group named after ``service``."""
    return cls(
        settings,
        service=service,
        source_topic=settings.topics.name("queries"),
        model=QueryEvent,
        handler=handler,
        group_id=f"{service}-{uuid.uuid4().hex[:6]}",
        instance_id="0",
        options=options,
    )


async def send_good(settings: Settings, numbers: Sequence[int], gap_s: float = 0.0) -> None:
    """Publish good(n) for each number, in order, on one key (one partition), each acknowledged
    before the next; ``gap_s`` apart."""
    producer = AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all")
    await producer.start()
    try:
        for n in numbers:
            await producer.send_and_wait(settings.topics.name("queries"), good(n), key=b"x")
            if gap_s:
                await asyncio.sleep(gap_s)
    finally:
        await producer.stop()


BAD = [
    ("invalid_json", b'{"query_id": "b1", "text": '),
    ("schema_violation", orjson.dumps({"query_id": "b2", "text": "x", "priority": "high"})),
    ("empty", b""),
    ("empty", orjson.dumps({"query_id": "b4", "text": "   "})),
    ("oversized", b'{"query_id": "b5", "text": "' + b"a" * 25_000 + b'"}'),
    ("oversized", orjson.dumps({"query_id": "b6", "text": "z" * 1_500})),
    ("bad_encoding", b'{"query_id": "b7", "text": "caf\xe9"}'),
    ("processing_error", orjson.dumps({"query_id": "b8", "text": "poison pill"})),
]


async def test_bad_input_is_dead_lettered_and_the_next_good_one_processed(
    kafka_settings: Settings,
) -> None:
    settings = kafka_settings.model_copy(
        update={"limits": LimitsSettings(max_message_bytes=20_000, max_text_chars=1_000)}
    )
    worker = query_worker(settings, "echo", echo_handler(settings))
    async with running(worker):
        await check_dead_letters(settings, worker.group_id)


async def check_dead_letters(settings: Settings, group: str) -> None:
    # all on one key, so one partition, in this order: good, bad, good, bad, ... good
    sent: list[tuple[str, bytes]] = [("good", good(0))]
    for i, (reason, raw) in enumerate(BAD, 1):
        sent += [(reason, raw), ("good", good(i))]
    producer = AIOKafkaProducer(
        **client_kwargs(settings.kafka), acks="all", max_request_size=2_000_000
    )
    await producer.start()
    offsets = []
    try:
        for _, raw in sent:
            meta = await producer.send_and_wait(
                settings.topics.name("queries"), raw, key=b"k", headers=[("source", b"test")]
            )
            offsets.append((meta.partition, meta.offset))
    finally:
        await producer.stop()

    responses = values(await collect(settings, "responses", len(BAD) + 1))
    assert sorted(r["query_id"] for r in responses) == sorted(
        f"good-{i}" for i in range(len(BAD) + 1)
    )

    dead = values(await collect(settings, "dead_letters", len(BAD)))
    dead.sort(key=lambda d: d["source"]["offset"])
    assert [d["reason"] for d in dead] == [reason for reason, _ in BAD]
    bad_offsets = [offsets[i] for i, (kind, _) in enumerate(sent) if kind != "good"]
    for d, (reason, raw), (partition, offset) in zip(dead, BAD, bad_offsets, strict=True):
        assert d["service"] == "echo"
        assert d["source"]["topic"] == settings.topics.name("queries")
        assert (d["source"]["partition"], d["source"]["offset"]) == (partition, offset)
        assert base64.b64decode(d["original_b64"]) == raw, reason
        assert base64.b64decode(d["source"]["key_b64"]) == b"k"
        assert base64.b64decode(d["original_headers"]["source"]) == b"test"
        assert d["detail"]
    assert dead[1]["query_id"] == "b2" and "priority" in dead[1]["detail"]
    assert dead[0]["query_id"].startswith("unknown:")

    async def caught_up() -> bool:
        return await committed_lag(settings, group, "queries") == 0

    await wait_for(caught_up)


async def test_handler_that_keeps_failing_is_dead_lettered_not_stuck(
    kafka_settings: Settings,
) -> None:
    calls = 0

    async def broken(batch: Sequence[Incoming[QueryEvent]]) -> list[Outcome]:
        nonlocal calls
        calls += 1
        raise RuntimeError("model server is gone")

    options = WorkerOptions(max_attempts=3, retry_backoff_s=0.01)
    worker = query_worker(kafka_settings, "broken", broken, options)
    async with running(worker):
        await send_good(kafka_settings, [1])
        [dead] = values(await collect(kafka_settings, "dead_letters", 1))
    assert dead["reason"] == "processing_error"
    assert "failed 3 times" in dead["detail"] and dead["query_id"] == "good-1"
    assert calls == 3


def test_event_record_headers() -> None:
    q = QueryEvent(query_id="q-9", text="x", tenant="t", conversation_id="c")
    rec: Produce = event_record("topic", q)
    assert rec.key == b"t/c"
    assert dict(rec.headers)["query_id"] == b"q-9"
    assert dict(rec.headers)["traceparent"] == q.trace.traceparent.encode()


async def test_partitions_are_paused_while_a_slow_batch_is_in_flight(
    kafka_settings: Settings,
) -> None:
    seen_paused: list[tuple[int, int]] = []  # (paused, assigned) inside the slow handler
    holder: list[Worker[QueryEvent]] = []

    async def slow(batch: Sequence[Incoming[QueryEvent]]) -> list[Outcome]:
        await asyncio.sleep(0.6)  # longer than pause_after_s
        consumer = holder[0].consumer
        assert consumer is not None
        seen_paused.append((len(consumer.paused()), len(consumer.assignment())))
        return [[event_record(kafka_settings.topics.name("responses"), i.event)] for i in batch]

    worker = query_worker(kafka_settings, "slow", slow, WorkerOptions(pause_after_s=0.2))
    holder.append(worker)
    async with running(worker):
        await send_good(kafka_settings, range(3))
        out = values(await collect(kafka_settings, "responses", 3))
        assert worker.consumer is not None
        await wait_for(lambda: _resumed(worker), timeout_s=10)
    assert {o["query_id"] for o in out} == {"good-0", "good-1", "good-2"}
    assert seen_paused and all(p == a > 0 for p, a in seen_paused), seen_paused


async def _resumed(worker: Worker[QueryEvent]) -> bool:
    return worker.consumer is not None and not worker.consumer.paused()


async def test_next_batch_is_handled_while_the_previous_transaction_commits(
    kafka_settings: Settings,
) -> None:
    """Under a backlog (full batches) a batch's transaction runs in the background while the next
    batch is handled, but the transactions themselves never overlap and commit in batch order; a
    batch that is not full (the worker keeps up) commits before the next one is handled; every
    query comes out once."""
    loop = asyncio.get_running_loop()
    spans: dict[str, list[tuple[float, float, frozenset[str]]]] = {"handle": [], "commit": []}

    async def handle(batch: Sequence[Incoming[QueryEvent]]) -> list[Outcome]:
        started = loop.time()
        await asyncio.sleep(0.05)
        ids = frozenset(i.event.query_id for i in batch)
        spans["handle"].append((started, loop.time(), ids))
        return [[event_record(kafka_settings.topics.name("responses"), i.event)] for i in batch]

    class SlowCommit(Worker[QueryEvent]):
        async def _commit(self, outputs: list[Produce], offsets: dict) -> None:  # type: ignore[type-arg]
            started = loop.time()
            await asyncio.sleep(0.3)  # a slow transaction round trip
            await super()._commit(outputs, offsets)
            ids = frozenset(orjson.loads(o.value)["query_id"] for o in outputs)
            spans["commit"].append((started, loop.time(), ids))

    options = WorkerOptions(max_batch=5, pause_after_s=None)
    worker = query_worker(kafka_settings, "overlap", handle, options, cls=SlowCommit)
    await send_good(kafka_settings, range(40))  # a backlog before the worker starts
    async with running(worker):
        out = values(await collect(kafka_settings, "responses", 40))
        await wait_for(lambda: _all_committed(kafka_settings, worker.group_id), timeout_s=10)
        backlog = len(spans["commit"])
        # one at a time: the second arrives while the first commits
        await send_good(kafka_settings, [40, 41], gap_s=0.15)
        out = values(await collect(kafka_settings, "responses", 42))
        await wait_for(lambda: _all_committed(kafka_settings, worker.group_id), timeout_s=10)
    assert sorted(o["query_id"] for o in out) == sorted(f"good-{n}" for n in range(42))
    (_, first_committed, _), (second_handled, _, second) = spans["commit"][-2], spans["handle"][-1]
    assert second == {"good-41"} and second_handled >= first_committed, "small batch overlapped"
    commits, handles = spans["commit"][:backlog], spans["handle"][:backlog]
    assert len(commits) == len(handles) >= 8
    for (_, end, _), (start, _, _) in itertools.pairwise(commits):
        assert start >= end, "two transactions were open at once"
    assert [ids for _, _, ids in commits] == [ids for _, _, ids in handles], "commit order"
    overlapped = sum(
        1
        for (c_start, c_end, _), (h_start, _, _) in zip(commits, handles[1:], strict=False)
        if c_start < h_start < c_end
    )
    assert overlapped >= len(commits) // 2, (overlapped, len(commits))


async def _all_committed(settings: Settings, group_id: str) -> bool:
    return await committed_lag(settings, group_id, "queries") == 0


async def test_partitions_are_paused_while_a_transaction_is_slow(kafka_settings: Settings) -> None:
    """Backpressure covers produce latency too: a transaction still open after pause_after_s
    pauses every assigned partition until it has committed."""
    seen_paused: list[tuple[int, int]] = []  # (paused, assigned) at the end of each commit

    class SlowProduce(Worker[QueryEvent]):
        async def _commit(self, outputs: list[Produce], offsets: dict) -> None:  # type: ignore[type-arg]
            await asyncio.sleep(0.6)  # longer than pause_after_s
            assert self.consumer is not None
            seen_paused.append((len(self.consumer.paused()), len(self.consumer.assignment())))
            await super()._commit(outputs, offsets)

    options = WorkerOptions(pause_after_s=0.2)
    handler = echo_handler(kafka_settings)
    worker = query_worker(kafka_settings, "slow-produce", handler, options, cls=SlowProduce)
    async with running(worker):
        await send_good(kafka_settings, range(3))
        out = values(await collect(kafka_settings, "responses", 3))
        await wait_for(lambda: _resumed(worker), timeout_s=10)
    assert {o["query_id"] for o in out} == {"good-0", "good-1", "good-2"}
    assert seen_paused and all(p == a > 0 for p, a in seen_paused), seen_paused
