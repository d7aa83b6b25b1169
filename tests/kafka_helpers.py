"""Helpers for tests against the real broker: read what a topic holds, wait for group offsets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from pointsman.config import Settings
from pointsman.kafka import client_kwargs, make_admin


async def collect(settings: Settings, role: str, count: int, timeout_s: float = 30.0) -> list[Any]:
    """Read ``count`` committed records from the start of a topic (fails after ``timeout_s``)."""
    consumer = AIOKafkaConsumer(
        settings.topics.name(role),
        **client_kwargs(settings.kafka),
        group_id=None,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(out) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()
    assert len(out) >= count, f"{role}: wanted {count} records, got {len(out)} in {timeout_s}s"
    return out


def values(records: list[Any]) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in records]


async def committed_lag(settings: Settings, group_id: str, role: str) -> int:
    """Records of ``role`` not yet committed by ``group_id`` (0 when it is caught up)."""
    topic = settings.topics.name(role)
    admin = make_admin(settings.kafka)
    await admin.start()
    consumer = AIOKafkaConsumer(
        **client_kwargs(settings.kafka), group_id=None, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        ends = await consumer.end_offsets(tps)
        committed = await admin.list_consumer_group_offsets(group_id, partitions=tps)
        done = {tp: max(0, committed[tp].offset) if tp in committed else 0 for tp in tps}
        return sum(ends[tp] - done[tp] for tp in tps)
    finally:
        await consumer.stop()
        await admin.close()


async def wait_for(predicate: Any, timeout_s: float = 30.0, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(every_s)


async def group_members(settings: Settings, group_id: str) -> int:
    """How many members the consumer group has now (0 if it does not exist)."""
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        try:
            [response] = await admin.describe_consumer_groups([group_id])
        except KafkaError:  # e.g. the coordinator is not elected yet on a fresh broker
            return 0
        groups = response.groups
        return (
            len(groups[0][5]) if groups else 0
        )  # (error, id, state, protocol type, protocol, members)
    finally:
        await admin.close()
