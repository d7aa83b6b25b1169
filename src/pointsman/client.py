"""A small client for upstream and downstream systems: publish queries, await answers, read
any topic.

>>> async with Client(settings) as client:
...     query_id = await client.send(QueryEvent(query_id=new_id(), text="is it legal to ..."))
...     response = await client.ask(QueryEvent(query_id=new_id(), text="..."), timeout_s=30)

``ask`` is request/reply over Kafka: the client reads the responses topic (committed records only,
no consumer group, from the end as it was before the first query was sent) and resolves each
waiting query by its id. One reader serves every ``ask`` of a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from pointsman.config import Settings
from pointsman.events import QueryEvent, ResponseEvent
from pointsman.kafka import make_consumer, make_producer
from pointsman.worker import event_record


class ResponseTimeout(TimeoutError):
    """No response arrived for a query within the caller's timeout (the query may still be
    answered later; its response stays on the responses topic)."""

    def __init__(self, query_id: str, timeout_s: float) -> None:
        super().__init__(f"no response for query {query_id} within {timeout_s:g}s")
        self.query_id = query_id


class Client:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._waiting: dict[str, asyncio.Future[ResponseEvent]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._reader_ready: asyncio.Event | None = None

    async def __aenter__(self) -> Client:
        self._producer = make_producer(self.settings.kafka)
        await self._producer.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
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

    async def ask(self, query: QueryEvent, timeout_s: float = 60.0) -> ResponseEvent:
        """Publish a query and wait for its response event (ok, refused or error).

        Raises :class:`ResponseTimeout` when none arrives within ``timeout_s``."""
        await self._start_reader()
        future: asyncio.Future[ResponseEvent] = asyncio.get_running_loop().create_future()
        self._waiting[query.query_id] = future
        try:
            await self.send(query)
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise ResponseTimeout(query.query_id, timeout_s) from None
        finally:
            self._waiting.pop(query.query_id, None)

    async def _start_reader(self) -> None:
        if self._reader is None:
            self._reader_ready = asyncio.Event()
            self._reader = asyncio.create_task(self._read_responses(self._reader_ready))
        assert self._reader_ready is not None
        ready = asyncio.create_task(self._reader_ready.wait())
        done, _ = await asyncio.wait({ready, self._reader}, return_when=asyncio.FIRST_COMPLETED)
        if self._reader in done:  # the reader failed before it was positioned
            ready.cancel()
            self._reader.result()

    async def _read_responses(self, ready: asyncio.Event) -> None:
        topic = self.settings.topics.name("responses")
        consumer = make_consumer(
            self.settings.kafka,
            topic,
            group_id=None,  # every partition, nothing committed
            auto_offset_reset="latest",
            client_id=f"pointsman-ask-{uuid.uuid4().hex[:8]}",
        )
        await consumer.start()
        try:
            for _ in range(100):
                if consumer.assignment():
                    break
                await asyncio.sleep(0.1)
            assigned = sorted(consumer.assignment())
            if not assigned:
                raise RuntimeError(f"topic {topic} does not exist (run `pointsman topics create`)")
            await consumer.seek_to_end(*assigned)
            for tp in assigned:  # resolve the end offsets now, before any query is sent
                await consumer.position(tp)
            ready.set()
            while True:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for r in records:
                        self._resolve(r.value)
        finally:
            await consumer.stop()

    def _resolve(self, value: bytes | None) -> None:
        try:
            event = orjson.loads(value or b"")
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        future = self._waiting.get(str(event.get("query_id")))
        if future is None or future.done():
            return
        try:
            future.set_result(ResponseEvent.model_validate(event))
        except ValueError as exc:
            future.set_exception(exc)

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
