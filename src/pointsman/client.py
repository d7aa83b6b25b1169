"""A small client for upstream and downstream systems: publish queries, read any topic.

>>> async with Client(settings) as client:
...     query_id = await client.send(QueryEvent(query_id=new_id(), text="is it legal to ..."))
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from pointsman.config import Settings
from pointsman.events import QueryEvent
from pointsman.kafka import make_consumer, make_producer
from pointsman.worker import event_record


class Client:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> Client:
        self._producer = make_producer(self.settings.kafka)
        await self._producer.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def send(self, query: QueryEvent) -> str:
        """Publish a query (acks=all, idempotent); returns its query id once the broker has it."""
        assert self._producer is not None, "use `async with Client(...)`"
        record = event_record(self.settings.topics.name("queries"), query)
        await self._producer.send_and_wait(
            record.topic, record.value, key=record.key, headers=list(record.headers)
        )
        return query.query_id

    async def submit(self, query: QueryEvent) -> asyncio.Future[Any]:
        """Queue a query for sending; the returned future resolves when the broker has it
        (for high-rate publishers that do not wait message by message)."""
        assert self._producer is not None, "use `async with Client(...)`"
        record = event_record(self.settings.topics.name("queries"), query)
        future: asyncio.Future[Any] = await self._producer.send(
            record.topic, record.value, key=record.key, headers=list(record.headers)
        )
        return future

    async def send_raw(self, value: bytes, key: bytes | None = None, role: str = "queries") -> None:
        """Publish bytes as they are (for tests and replays of dead letters)."""
        assert self._producer is not None, "use `async with Client(...)`"
        await self._producer.send_and_wait(self.settings.topics.name(role), value, key=key)


async def read_topic(
    settings: Settings,
    role: str,
    *,
    from_beginning: bool = True,
    max_messages: int | None = None,
    timeout_s: float = 5.0,
    query_id: str | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Yield the JSON events of a topic (committed ones only) until ``max_messages`` or
    ``timeout_s`` without a new message. Uses no consumer group: it commits nothing."""
    consumer = make_consumer(
        settings.kafka,
        settings.topics.name(role),
        group_id=None,
        auto_offset_reset="earliest" if from_beginning else "latest",
        client_id=f"pointsman-reader-{uuid.uuid4().hex[:8]}",
    )
    await consumer.start()
    try:
        seen = 0
        last = time.monotonic()
        while time.monotonic() - last < timeout_s:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    last = time.monotonic()
                    try:
                        event = orjson.loads(r.value) if r.value else None
                    except orjson.JSONDecodeError:
                        event = None
                    if not isinstance(event, dict):
                        event = {"_raw": (r.value or b"").decode("utf-8", "replace")}
                    if query_id is not None and event.get("query_id") != query_id:
                        continue
                    event["_kafka"] = {"partition": r.partition, "offset": r.offset}
                    yield event
                    seen += 1
                    if max_messages is not None and seen >= max_messages:
                        return
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
