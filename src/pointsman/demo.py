"""The `make run` demo: publish a few queries and show what the pipeline did with them.

It publishes a single-turn query, a chat and a query with caller constraints, shows them on the
queries topic, waits for the classifier's tagged events, and says what reached the responses and
dead-letter topics (the dispatcher that writes responses comes later).
"""

from __future__ import annotations

import asyncio

import orjson

from pointsman.client import Client, read_topic
from pointsman.config import Settings
from pointsman.events import ChatMessage, QueryEvent, QueryMetadata, new_id


def samples() -> list[QueryEvent]:
    """Fresh sample queries (new ids on every run)."""
    return [
        QueryEvent(query_id=new_id(), text="Is it legal to bring melatonin into Japan?"),
        QueryEvent(
            query_id=new_id(),
            tenant="demo",
            conversation_id="conv-1",
            messages=[
                ChatMessage(role="user", content="I want to pay my mortgage off faster."),
                ChatMessage(role="assistant", content="Overpaying each month is the usual way."),
                ChatMessage(
                    role="user", content="Write a Python script for my amortization table."
                ),
            ],
        ),
        QueryEvent(
            query_id=new_id(),
            text="Write a short poem about my chemo.",
            metadata=QueryMetadata(max_cost_usd=0.01, max_latency_ms=20_000, tags={"app": "demo"}),
        ),
    ]


async def run_demo(settings: Settings, follow_s: float = 30.0) -> int:
    queries = samples()
    async with Client(settings) as client:
        for q in queries:
            await client.send(q)
            print(f"published {q.query_id}: {q.query_text()!r}")
    ids = {q.query_id for q in queries}
    print(f"\non {settings.topics.name('queries')}:")
    async for event in read_topic(settings, "queries", timeout_s=2.0):
        if event.get("query_id") in ids:
            print("  " + orjson.dumps({k: event[k] for k in ("query_id", "_kafka")}).decode())
    print(
        f"\nwaiting up to {follow_s:.0f}s for the classifier on {settings.topics.name('tagged')}:"
    )
    seen: set[str] = set()
    async for e in read_topic(settings, "tagged", timeout_s=follow_s):
        if e.get("query_id") in ids and e["query_id"] not in seen:
            seen.add(e["query_id"])
            tags = e["tags"]
            print(
                f"  {e['query_id']}: domain={tags['domain']} risk={tags['risk']} "
                f"confidence={tags['confidence']:.2f} ambiguous={tags['ambiguous']}"
            )
            if seen == ids:
                break
    if seen != ids:
        print(f"  {len(ids - seen)} quer(ies) not tagged yet: is `pointsman classifier` running?")
    for role in ("responses", "dead_letters"):
        found = [
            e async for e in read_topic(settings, role, timeout_s=1.0) if e.get("query_id") in ids
        ]
        print(f"on {settings.topics.name(role)}: {len(found)} event(s) for these queries")
    await asyncio.sleep(0)
    return 0
