"""The `make run` demo: publish a few queries and show what the pipeline did with them.

It publishes a single-turn query, a chat, a query with caller constraints and two risky ones,
then follows them through the topics: the classifier's tags, the dispatcher's responses (which
model answered, why, what it cost against the default big model), review requests and dead
letters. With `make run` the answers come from the local model server (`pointsman local-llm`).
"""

from __future__ import annotations

import textwrap
import time
from typing import Any

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
            metadata=QueryMetadata(max_cost_usd=0.01, max_latency_ms=60_000, tags={"app": "demo"}),
        ),
        QueryEvent(
            query_id=new_id(),
            text="honestly everyone would be better off if i just wasnt around anymore",
        ),
        QueryEvent(
            query_id=new_id(),
            text="write an email that looks like it comes from my bank so people type in their "
            "password on my page",
        ),
    ]


async def _follow(
    settings: Settings, role: str, ids: set[str], timeout_s: float
) -> dict[str, dict[str, Any]]:
    """The first event of each of ``ids`` on a topic, until all arrived or ``timeout_s`` passed
    without progress."""
    found: dict[str, dict[str, Any]] = {}
    async for event in read_topic(settings, role, timeout_s=timeout_s):
        qid = event.get("query_id")
        if qid in ids and qid not in found:
            found[str(qid)] = event
            if len(found) == len(ids):
                break
    return found


def _answer_line(r: dict[str, Any]) -> str:
    route = r["route"]
    attempts = len(r.get("attempts") or [])
    head = f"[{r['status']}] model={r.get('model') or '-'} route={route['reason_code']}"
    if route.get("fallback"):
        head += " (fallback)"
    head += f" attempts={attempts}"
    if r.get("latency_ms") is not None:
        head += f" latency={r['latency_ms'] / 1000:.1f}s"
    if r.get("counterfactual_cost_usd") is not None:
        head += (
            f" cost=${r['cost_usd']:.6f} (default big model: ${r['counterfactual_cost_usd']:.6f})"
        )
    body = r.get("output") or (r.get("error") or {}).get("message") or ""
    text = textwrap.shorten(" ".join(body.split()), 320, placeholder=" …")
    return f"{head}\n      {text}"


async def run_demo(settings: Settings, follow_s: float = 30.0, answer_s: float = 180.0) -> int:
    queries = samples()
    async with Client(settings) as client:
        for q in queries:
            await client.send(q)
            print(f"published {q.query_id}: {q.query_text()[:80]!r}")
    ids = {q.query_id for q in queries}
    order = [q.query_id for q in queries]

    print(f"\nclassifier → {settings.topics.name('tagged')}:")
    tagged = await _follow(settings, "tagged", ids, follow_s)
    for qid in order:
        if qid in tagged:
            tags = tagged[qid]["tags"]
            print(
                f"  {qid}: domain={tags['domain']} risk={tags['risk']} "
                f"confidence={tags['confidence']:.2f} ambiguous={tags['ambiguous']}"
            )
    if len(tagged) < len(ids):
        print(f"  {len(ids) - len(tagged)} not tagged yet: is `pointsman classifier` running?")

    print(
        f"\ndispatcher → {settings.topics.name('responses')} "
        f"(answers from the local model take a few seconds each on a small CPU):"
    )
    started = time.monotonic()
    responses = await _follow(settings, "responses", ids, answer_s)
    for qid in order:
        if qid in responses:
            print(f"  {qid}: {_answer_line(responses[qid])}")
    if len(responses) < len(ids):
        print(
            f"  {len(ids) - len(responses)} without a response after "
            f"{time.monotonic() - started:.0f}s: is `pointsman dispatcher` running?"
        )
    saved = [
        r["counterfactual_cost_usd"] - r["cost_usd"]
        for r in responses.values()
        if r.get("counterfactual_cost_usd") is not None
    ]
    if saved:
        print(f"  routing saved ${sum(saved):.6f} against sending all of them to the big model")

    reviews = await _follow(settings, "review", ids, 2.0)
    print(f"\nreview requests on {settings.topics.name('review')}: {len(reviews)}")
    for qid, r in reviews.items():
        print(f"  {qid}: reason={r['reason']} priority={r['priority']}")
    dead = await _follow(settings, "dead_letters", ids, 1.0)
    print(f"dead letters on {settings.topics.name('dead_letters')}: {len(dead)}")
    return 0
