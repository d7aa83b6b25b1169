"""An event published by a plain aiokafka producer round-trips and validates."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from aiokafka import AIOKafkaProducer

from pointsman.client import Client, read_topic
from pointsman.config import Settings
from pointsman.events import ChatMessage, QueryEvent, QueryMetadata
from pointsman.kafka import client_kwargs
from tests.kafka_helpers import collect

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.kafka


async def test_plain_aiokafka_event_round_trips_and_validates(kafka_settings: Settings) -> None:
    example = json.loads((ROOT / "schemas/examples/query.chat.json").read_text())
    producer = AIOKafkaProducer(**client_kwargs(kafka_settings.kafka), acks="all")
    await producer.start()
    try:
        raw = json.dumps(example).encode()
        await producer.send_and_wait(
            kafka_settings.topics.name("queries"), raw, key=b"acme/conv-77"
        )
    finally:
        await producer.stop()
    [record] = await collect(kafka_settings, "queries", 1)
    assert record.key == b"acme/conv-77"
    data = json.loads(record.value)
    schema = json.loads((ROOT / "schemas/query.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(data)
    event = QueryEvent.model_validate(data)
    assert event.query_text() == "Write a python script for my amortization table."
    assert event == QueryEvent.model_validate(example)


async def test_client_keeps_a_conversation_in_one_partition(kafka_settings: Settings) -> None:
    turns = [
        QueryEvent(
            query_id=f"turn-{i}",
            tenant="acme",
            conversation_id="c-1",
            messages=[ChatMessage(role="user", content=f"question {i}")],
            metadata=QueryMetadata(tags={"n": str(i)}),
        )
        for i in range(12)
    ]
    async with Client(kafka_settings) as client:
        for q in turns:
            await client.send(q)
    records = await collect(kafka_settings, "queries", 12)
    assert len({r.partition for r in records}) == 1
    assert [json.loads(r.value)["query_id"] for r in records] == [q.query_id for q in turns]
    headers = dict(records[0].headers)
    assert headers["event_type"] == b"query" and headers["query_id"] == b"turn-0"
    seen = [
        e["query_id"]
        async for e in read_topic(kafka_settings, "queries", timeout_s=1, query_id="turn-3")
    ]
    assert seen == ["turn-3"]
