"""The dispatcher service: tagged queries in, one response (and review requests) out.

`pointsman dispatcher` runs it. The shared :class:`~pointsman.worker.Worker` does the Kafka part
(consumer group, dead letters, one transaction per batch with the offsets inside, so exactly one
response per query across crashes, and partitions paused while a slow batch is in flight); this
module adds what is the dispatcher's own:

- :class:`RoutingHolder`: the routing file, reloaded between batches when it changes (or on
  SIGHUP), so a reload never splits a batch and never loses or repeats a message;
- :class:`Dispatcher`: the handler — for each tagged query, a pure routing decision, then the
  candidate chain run by :func:`~pointsman_dispatcher.executor.execute` (retries, breakers, rate
  limits, fallback within the deadline and budget), then the response event with every attempt,
  costs and the counterfactual cost of the default big model;
- :class:`HealthWatcher`: per-model health from the compacted model-health topic, fed into
  routing so degraded models are demoted;
- the process: ops endpoints, JSON logs, SIGTERM (finish the batch, commit, leave the group).

Provider calls are side effects outside the transaction: after a crash the batch is read again
and its calls are made again (at-least-once calls), but only one response per query is ever
visible to read_committed consumers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Counter, Gauge, Histogram

from pointsman import metrics
from pointsman.config import Settings
from pointsman.deadletter import Rejected, dead_letter_for
from pointsman.events import (
    Attempt,
    DeadLetterReason,
    ErrorInfo,
    ModelHealthEvent,
    ResponseEvent,
    ReviewRequestEvent,
    Route,
    TaggedQueryEvent,
    Usage,
)
from pointsman.kafka import make_consumer
from pointsman.ops import OpsServer
from pointsman.replica import add_replica_arguments, run_replica
from pointsman.worker import Incoming, Outcome, Produce, Worker, WorkerOptions, event_record
from pointsman_dispatcher.cost import cost_usd
from pointsman_dispatcher.executor import Budget, Candidate, Execution, execute
from pointsman_dispatcher.policy import RoutingConfig, RoutingConfigError, load_routing_config
from pointsman_dispatcher.profiles import CredentialError, provider_target
from pointsman_dispatcher.providers import ClientPool, ClientSource, provider_for
from pointsman_dispatcher.providers.base import ChatMessage, ChatRequest, Provider
from pointsman_dispatcher.resilience import BREAKER_STATE_CODES, BreakerBoard, ModelLimits
from pointsman_dispatcher.routing import (
    Decision,
    ModelHealth,
    RouteInput,
    as_utc,
    decide,
    health_map,
    route_input_from_event,
)

log = logging.getLogger("pointsman.dispatcher")
GROUP_ID = "pointsman-dispatcher"
SERVICE = "dispatcher"
REFUSAL_TEXT = (
    "I can't help with that request. If you think this is a mistake, please rephrase or "
    "contact the operator of this service."
)
DEFAULT_DEADLINE_S = 60.0
STICKY_CONVERSATIONS = 100_000

DECISION_SECONDS = Histogram(
    "pointsman_dispatcher_decision_seconds",
    "Routing decision time per query (pure policy function).",
    buckets=(0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005),
)
DISPATCH_SECONDS = Histogram(
    "pointsman_dispatcher_dispatch_seconds",
    "Decision plus provider calls per query.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RESPONSES = Counter(
    "pointsman_dispatcher_responses_total",
    "Response events by status, model and reason code.",
    ["status", "model", "reason_code"],
)
ATTEMPTS = Counter(
    "pointsman_dispatcher_attempts_total", "Provider attempts by outcome.", ["model", "status"]
)
FALLBACKS = Counter("pointsman_dispatcher_fallbacks_total", "Queries answered by a fallback.")
COST = Counter("pointsman_dispatcher_cost_usd_total", "Spent on providers, USD.", ["model"])
COUNTERFACTUAL = Counter(
    "pointsman_dispatcher_counterfactual_cost_usd_total",
    "What the same answers would have cost on the default big model, USD.",
)
BREAKER_STATE = Gauge(
    "pointsman_dispatcher_breaker_state",
    "Circuit breaker per model and endpoint: 0 closed, 1 half-open, 2 open.",
    ["model", "endpoint"],
)
IN_FLIGHT = Gauge("pointsman_dispatcher_in_flight", "Provider requests in flight.")
ROUTING_INFO = Gauge(
    "pointsman_dispatcher_routing_info", "Loaded routing file (value 1).", ["source", "digest"]
)
ROUTING_RELOADS = Counter(
    "pointsman_dispatcher_routing_reloads_total", "Routing file reloads.", ["result"]
)


def _digest(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()[:12]


class RoutingHolder:
    """The routing config in force, and the file it came from (reloaded when it changes)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp = self._file_stamp()
        self.config = load_routing_config(path)
        self.digest = _digest(path.read_bytes()) if path else "embedded"
        self._publish()

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def changed(self) -> bool:
        return self.path is not None and self._file_stamp() != self._stamp

    def reload(self) -> bool:
        """Load the file again; a bad file is logged and the config in force stays."""
        if self.path is None:
            return False
        stamp = self._file_stamp()
        try:
            fresh = load_routing_config(self.path)
            digest = _digest(self.path.read_bytes())
        except (RoutingConfigError, OSError) as exc:
            self._stamp = stamp  # do not retry a broken file on every batch
            ROUTING_RELOADS.labels("rejected").inc()
            log.error("routing reload rejected, keeping the config in force: %s", exc)
            return False
        self._stamp = stamp
        self.config, self.digest = fresh, digest
        ROUTING_RELOADS.labels("ok").inc()
        self._publish()
        log.info("routing reloaded", extra={"digest": digest, "summary": fresh.summary()})
        return True

    def _publish(self) -> None:
        ROUTING_INFO.clear()
        ROUTING_INFO.labels(str(self.path or "embedded"), self.digest).set(1)


def board_for(
    config: RoutingConfig, global_max_in_flight: int, clock: Any = time.monotonic
) -> BreakerBoard:
    """Breakers, rate limits and in-flight limits for every model of the config."""
    return BreakerBoard(
        {
            model_id: ModelLimits(
                rpm=p.limits.rpm, tpm=p.limits.tpm, max_in_flight=p.limits.max_in_flight
            )
            for model_id, p in config.models.items()
        },
        global_max_in_flight=global_max_in_flight,
        clock=clock,
    )


def chat_request(event: TaggedQueryEvent, max_tokens: int) -> ChatRequest:
    """The provider-neutral request for a query: its turns, its own system text kept apart (the
    profile's system prompt goes before it)."""
    query = event.query
    if query.messages is None:
        return ChatRequest(messages=(ChatMessage("user", query.text or ""),), max_tokens=max_tokens)
    system = "\n\n".join(m.content for m in query.messages if m.role == "system") or None
    turns = tuple(
        ChatMessage("assistant" if m.role == "assistant" else "user", m.content)
        for m in query.messages
        if m.role != "system" and m.content.strip()
    )
    return ChatRequest(messages=turns, system=system, max_tokens=max_tokens)


@dataclass
class Dispatched:
    """What one query produced, before it becomes records."""

    response: ResponseEvent
    review: ReviewRequestEvent | None
    failed: bool


class Dispatcher:
    """The worker's handler: routes and answers each tagged query of a batch concurrently."""

    def __init__(
        self,
        settings: Settings,
        routing: RoutingHolder,
        providers: Mapping[str, Provider],
        *,
        global_max_in_flight: int = 256,
        default_deadline_s: float = DEFAULT_DEADLINE_S,
        environ: Mapping[str, str] | None = None,
        refusal_text: str = REFUSAL_TEXT,
    ) -> None:
        self.responses_topic = settings.topics.name("responses")
        self.review_topic = settings.topics.name("review")
        self.dead_letter_topic = settings.topics.name("dead_letters")
        self.routing = routing
        self.providers = providers
        self.global_max_in_flight = global_max_in_flight
        self.board = board_for(routing.config, global_max_in_flight)
        self.default_deadline_s = default_deadline_s
        self.environ = os.environ if environ is None else environ
        self.refusal_text = refusal_text
        self.health: dict[str, ModelHealth] = {}
        self.sticky: OrderedDict[str, int] = OrderedDict()
        self.reload_requested = False

    # --- the handler ---------------------------------------------------------------------

    async def __call__(self, batch: Sequence[Incoming[TaggedQueryEvent]]) -> list[Outcome]:
        if self.reload_requested or self.routing.changed():
            self.reload_requested = False
            if self.routing.reload():
                self.board = board_for(self.routing.config, self.global_max_in_flight)
        config, board = self.routing.config, self.board  # one config for the whole batch
        done = await asyncio.gather(*(self.dispatch(item.event, config, board) for item in batch))
        self._export_breakers(board)
        return [self._records(item, d) for item, d in zip(batch, done, strict=True)]

    async def dispatch(
        self, event: TaggedQueryEvent, config: RoutingConfig, board: BreakerBoard
    ) -> Dispatched:
        started = time.perf_counter()
        conversation = event.query.conversation_id
        inp = route_input_from_event(
            event,
            now=datetime.now(UTC),
            conversation_tier=self.sticky.get(conversation) if conversation else None,
            health=self.health,
        )
        decision = decide(inp, config)
        DECISION_SECONDS.observe(time.perf_counter() - started)
        review = self._review(event, decision)
        if decision.action == "refuse":
            dispatched = self._refused(event, decision, review)
        else:
            execution = await self._execute(event, inp, decision, config, board)
            dispatched = self._answered(event, decision, execution, config, review)
            if execution.ok and conversation and decision.sticky_tier is not None:
                self._remember_tier(conversation, decision.sticky_tier)
        DISPATCH_SECONDS.observe(time.perf_counter() - started)
        r = dispatched.response
        RESPONSES.labels(r.status, r.model or "-", r.route.reason_code).inc()
        return dispatched

    async def _execute(
        self,
        event: TaggedQueryEvent,
        inp: RouteInput,
        decision: Decision,
        config: RoutingConfig,
        board: BreakerBoard,
    ) -> Execution:
        chain: list[Candidate] = []
        unusable: list[Attempt] = []
        for model_id in decision.candidates:
            profile = config.models[model_id]
            try:
                target = provider_target(profile, self.environ)
            except CredentialError as exc:  # names the variable or file, never a value
                unusable.append(
                    Attempt(
                        model=model_id,
                        provider=profile.provider,
                        endpoint=profile.endpoint[:500],
                        status="skipped",
                        latency_ms=0.0,
                        error=f"credential unavailable: {exc}"[:2000],
                    )
                )
                continue
            chain.append(
                Candidate(
                    model=model_id,
                    target=target,
                    price=profile.price,
                    system=profile.system_prompt,
                )
            )
        primary = config.models[decision.candidates[0]]
        request = chat_request(event, primary.max_output_tokens)
        remaining_s = (
            inp.remaining_ms / 1000 if inp.remaining_ms is not None else self.default_deadline_s
        )
        budget = Budget(
            deadline=time.monotonic() + max(0.0, min(remaining_s, self.default_deadline_s * 10)),
            max_cost_usd=inp.max_cost_usd,
        )
        IN_FLIGHT.inc()
        try:
            execution = await execute(chain, request, budget, self.providers, board)
        finally:
            IN_FLIGHT.dec()
        if unusable:
            execution = dataclasses.replace(
                execution,
                attempts=(*unusable, *execution.attempts),
                fallback=execution.fallback or execution.ok,
                fallback_reasons=(
                    *(f"{a.model}:credential" for a in unusable),
                    *execution.fallback_reasons,
                ),
            )
        for a in execution.attempts:
            ATTEMPTS.labels(a.model, a.status).inc()
        return execution

    # --- events ----------------------------------------------------------------------------

    def _route(self, decision: Decision, execution: Execution | None = None) -> Route:
        reasons = list(decision.fallback_reasons)
        if execution is not None:
            reasons += list(execution.fallback_reasons)
        return Route(
            reason_code=decision.reason_code,
            fallback=bool(execution and execution.fallback),
            fallback_reasons=[r[:200] for r in reasons][:50],
            candidates=list(decision.candidates),
        )

    def _base(self, event: TaggedQueryEvent) -> dict[str, Any]:
        query = event.query
        latency_ms = max(0.0, (datetime.now(UTC) - as_utc(query.created_at)).total_seconds() * 1000)
        return {
            "query_id": event.query_id,
            "tenant": event.tenant,
            "conversation_id": event.conversation_id,
            "trace": event.trace.child(),
            "latency_ms": latency_ms,
            "caller_tags": dict(query.metadata.tags),
        }

    def _refused(
        self, event: TaggedQueryEvent, decision: Decision, review: ReviewRequestEvent | None
    ) -> Dispatched:
        if decision.error_type is None:  # a policy refusal (e.g. harmful): answered, not failed
            response = ResponseEvent(
                **self._base(event),
                status="refused",
                output=self.refusal_text,
                finish_reason="refused",
                route=self._route(decision),
            )
            return Dispatched(response, review, failed=False)
        response = ResponseEvent(
            **self._base(event),
            status="error",
            route=self._route(decision),
            error=ErrorInfo(
                type=decision.error_type,
                message="no model satisfies the routing policy and the query's constraints: "
                + ", ".join(decision.fallback_reasons)[:1800],
            ),
        )
        return Dispatched(response, review, failed=True)

    def _answered(
        self,
        event: TaggedQueryEvent,
        decision: Decision,
        execution: Execution,
        config: RoutingConfig,
        review: ReviewRequestEvent | None,
    ) -> Dispatched:
        result = execution.result
        if execution.ok and result is not None:
            usage = Usage(input_tokens=result.input_tokens, output_tokens=result.output_tokens)
            default = config.models[config.policy.default_model]
            counterfactual = cost_usd(default.price, result.input_tokens, result.output_tokens)
            COST.labels(execution.model or "-").inc(execution.cost_usd)
            COUNTERFACTUAL.inc(counterfactual)
            if execution.fallback:
                FALLBACKS.inc()
            response = ResponseEvent(
                **self._base(event),
                status="ok",
                model=execution.model,
                output=result.text,
                finish_reason=result.finish_reason,
                route=self._route(decision, execution),
                attempts=list(execution.attempts),
                usage=usage,
                cost_usd=execution.cost_usd,
                counterfactual_cost_usd=counterfactual,
            )
            return Dispatched(response, review, failed=False)
        error = execution.error
        error_type = error.type if error is not None else "all_providers_failed"
        message = error.message if error is not None else "no provider answered"
        COST.labels(execution.model or "-").inc(execution.cost_usd)
        response = ResponseEvent(
            **self._base(event),
            status="error",
            model=execution.model,
            output=execution.partial_text or None,
            route=self._route(decision, execution),
            attempts=list(execution.attempts),
            cost_usd=execution.cost_usd,
            error=ErrorInfo(type=error_type, message=message[:2000]),
        )
        return Dispatched(response, review, failed=True)

    def _review(self, event: TaggedQueryEvent, decision: Decision) -> ReviewRequestEvent | None:
        spec = decision.review
        if spec is None:
            return None
        tags = event.tags
        return ReviewRequestEvent(
            query_id=event.query_id,
            tenant=event.tenant,
            conversation_id=event.conversation_id,
            trace=event.trace.child(),
            reason=spec.reason,
            priority=spec.priority,
            risk=tags.risk,
            domain=tags.domain,
            confidence=tags.confidence,
            text=event.query.query_text(),
            route_reason_code=decision.reason_code,
        )

    def _records(self, item: Incoming[TaggedQueryEvent], d: Dispatched) -> list[Produce]:
        out = [event_record(self.responses_topic, d.response)]
        if d.review is not None:
            out.append(event_record(self.review_topic, d.review))
        if d.failed:  # the error response answers the caller; the dead letter keeps the query
            r = item.record
            error = d.response.error
            detail = f"{error.type}: {error.message}" if error else "dispatch failed"
            letter = dead_letter_for(
                Rejected(
                    DeadLetterReason.delivery_failed,
                    detail,
                    item.event.query_id,
                    item.event.trace,
                ),
                service=SERVICE,
                topic=r.topic,
                partition=r.partition,
                offset=r.offset,
                value=r.value,
                key=r.key,
                timestamp_ms=r.timestamp,
                headers=r.headers or (),
            )
            metrics.DEAD_LETTERS.labels(SERVICE, DeadLetterReason.delivery_failed.value).inc()
            out.append(event_record(self.dead_letter_topic, letter))
        return out

    # --- state -----------------------------------------------------------------------------

    def _remember_tier(self, conversation: str, tier: int) -> None:
        self.sticky[conversation] = max(tier, self.sticky.get(conversation, tier))
        self.sticky.move_to_end(conversation)
        while len(self.sticky) > STICKY_CONVERSATIONS:
            self.sticky.popitem(last=False)

    def _export_breakers(self, board: BreakerBoard) -> None:
        for (model, endpoint), state in board.breaker_states().items():
            BREAKER_STATE.labels(model, endpoint).set(BREAKER_STATE_CODES[state])


class HealthWatcher:
    """Keeps ``dispatcher.health`` up to date from the compacted model-health topic (read from
    the beginning, no consumer group: every replica sees every model's latest status)."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.latest: dict[str, ModelHealthEvent] = {}
        self.caught_up = asyncio.Event()  # the topic was read to its end once

    async def run(self, stop: asyncio.Event) -> None:
        consumer = make_consumer(
            self.settings.kafka,
            self.settings.topics.name("model_health"),
            group_id=None,
            client_id=f"pointsman-dispatcher-health-{socket.gethostname()}",
        )
        await consumer.start()
        try:
            ends: dict[Any, int] | None = None
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200)
                changed = False
                for records in batch.values():
                    for r in records:
                        changed |= self.apply(r.value)
                if changed:
                    self.dispatcher.health = health_map(self.latest.values())
                if not self.caught_up.is_set() and consumer.assignment():
                    if ends is None:
                        ends = await consumer.end_offsets(list(consumer.assignment()))
                    positions = [await consumer.position(tp) for tp in ends]
                    if all(p >= ends[tp] for p, tp in zip(positions, ends, strict=True)):
                        self.caught_up.set()
        finally:
            await consumer.stop()

    def apply(self, value: bytes | None) -> bool:
        if not value:
            return False
        try:
            event = ModelHealthEvent.model_validate(orjson.loads(value))
        except (orjson.JSONDecodeError, ValueError):
            log.warning("ignoring a malformed model-health record")
            return False
        seen = self.latest.get(event.model)
        if seen is not None and seen.created_at > event.created_at:
            return False
        self.latest[event.model] = event
        return True


def make_providers(client: ClientSource) -> dict[str, Provider]:
    return {
        name: provider_for(name, client)
        for name in ("openai", "azure_openai", "anthropic", "bedrock", "gemini")
    }


async def serve(settings: Settings, args: argparse.Namespace) -> int:
    routing = RoutingHolder(Path(args.routing) if args.routing else None)
    client = ClientPool(max_idle=args.max_in_flight)
    dispatcher = Dispatcher(
        settings,
        routing,
        make_providers(client),
        global_max_in_flight=args.max_in_flight,
        default_deadline_s=args.default_deadline_s,
    )
    worker: Worker[TaggedQueryEvent] = Worker(
        settings,
        service=SERVICE,
        source_topic=settings.topics.name("tagged"),
        model=TaggedQueryEvent,
        handler=dispatcher,
        group_id=args.group,
        instance_id=args.instance_id,
        options=WorkerOptions(
            max_batch=args.max_batch,
            poll_timeout_ms=args.max_wait_ms,
            transaction_timeout_ms=60_000,
        ),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def on_hup() -> None:
        dispatcher.reload_requested = True

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    watcher = HealthWatcher(settings, dispatcher)
    health = asyncio.create_task(watcher.run(stop))
    try:  # route with the models' known health from the first query on
        await asyncio.wait_for(watcher.caught_up.wait(), 15)
    except TimeoutError:
        log.warning("model health not read within 15 s; routing without it for now")
    ops = OpsServer(args.ops_host, args.ops_port, ready=worker.ready.is_set)
    await ops.start()
    log.info(
        "dispatcher starting",
        extra={
            "routing": routing.config.summary(),
            "ops_port": ops.port,
            "instance_id": args.instance_id,
        },
    )
    try:
        await worker.run(stop)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await health
        await ops.stop()
        await client.aclose()
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "dispatcher",
        help="run the dispatcher service (tagged queries → responses)",
        description="A consumer-group worker: routes every tagged query by the routing policy, "
        "calls the chosen model over HTTP with retries and fallback, and writes one response "
        "per query (Kafka transactions). Replicas share the partitions.",
    )
    p.add_argument(
        "--routing",
        default=os.environ.get("POINTSMAN_ROUTING_FILE"),
        help="routing file (models + policy); default $POINTSMAN_ROUTING_FILE, else the "
        "embedded demo file. Reloaded between batches when it changes, and on SIGHUP",
    )
    p.add_argument(
        "--max-in-flight", type=int, default=256, help="provider requests in flight, all models"
    )
    p.add_argument(
        "--default-deadline-s",
        type=float,
        default=DEFAULT_DEADLINE_S,
        help="deadline for queries that set none",
    )
    add_replica_arguments(p, group_id=GROUP_ID, ops_port=9401)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return run_replica(args, serve)
    except RoutingConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
