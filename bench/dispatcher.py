"""Benchmark of the dispatcher service on a real broker against a zero-latency fake provider.

    make bench-dispatcher       # or: .venv/bin/python bench/dispatcher.py [--queries 20000]
    .venv/bin/python bench/dispatcher.py --profile [--queries 5000]   # where the time goes

Starts its own single-node Kafka on free ports (or uses POINTSMAN_BENCH_BOOTSTRAP) and one
local fake provider process (pointsman_dispatcher.fake_provider: correct answers in each
provider's wire format, no delay), then:
1. decision latency: route_input_from_event + decide() per query over K tagged inputs that
   cover every domain x risk class, with ambiguity, constraints, stickiness and health mixed in;
2. for each configuration (1 replica, 2 replicas, all models on the OpenAI wire format; then at
   the better replica count: the models spread over the five provider formats, and
   --max-in-flight 64): start the replicas, wait until the group is stable, warm up, preload K
   tagged queries in one producer transaction (so they all become visible at once), and time
   from the first response to the K-th (req/s; start-up, group join and HTTP connection set-up
   excluded); peak RSS and CPU seconds per replica;
3. latency from publish to response (read_committed) at steady rates below capacity, best
   configuration of the service.
The broker, the fake provider, the replicas and this process share the host's cores, so the
figures are for the whole pipeline on one machine, not for the dispatcher alone.
Prints the figures and writes bench/results/dispatcher.json.

``--profile`` runs the dispatcher's handler in this process (no Kafka: decode, route, call the
fake, build the response records) with the service's own providers and client pool, reports its
req/s for several batch and in-flight settings and the functions where cProfile sees the time.
POINTSMAN_BENCH_CPROFILE=<dir> runs the replicas of a full run under cProfile (one .prof per
replica, written when it stops).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import io
import itertools
import json
import logging
import os
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]

from harness import (  # noqa: E402
    fresh_settings,
    machine,
    service_env,
    stop_all,
    wait_for_group,
    write_result,
)

from pointsman.broker import Cluster, fetch_jars  # noqa: E402
from pointsman.config import Settings, load_settings  # noqa: E402
from pointsman.deadletter import Limits, Rejected, decode  # noqa: E402
from pointsman.events import (  # noqa: E402
    ChatMessage,
    QueryEvent,
    QueryMetadata,
    TaggedQueryEvent,
    Tags,
)
from pointsman.kafka import make_consumer, make_producer  # noqa: E402
from pointsman.worker import Incoming  # noqa: E402
from pointsman_dispatcher.fake_provider import serve as serve_fake  # noqa: E402
from pointsman_dispatcher.policy import RoutingConfig, load_routing_config  # noqa: E402
from pointsman_dispatcher.providers import ClientPool  # noqa: E402
from pointsman_dispatcher.routing import (  # noqa: E402
    ModelHealth,
    RouteInput,
    decide,
    route_input_from_event,
)
from pointsman_dispatcher.service import Dispatcher, RoutingHolder, make_providers  # noqa: E402

DOMAINS = ("medical", "finance", "legal", "travel", "code", "math", "creative", "general")
RISKS = ("none", "self_harm", "harmful", "jailbreak")
# Share of each risk class in the throughput and latency runs (harmful ones are refused
# without a provider call, so they are kept rare to keep "routed" honest).
RISK_MIX = {"none": 0.91, "self_harm": 0.03, "jailbreak": 0.03, "harmful": 0.03}
PROVIDERS = ("openai", "azure_openai", "anthropic", "bedrock", "gemini")
KEY_ENV = "POINTSMAN_BENCH_PROVIDER_KEY"
AWS_ID_ENV = "POINTSMAN_BENCH_AWS_ACCESS_KEY_ID"
AWS_SECRET_ENV = "POINTSMAN_BENCH_AWS_SECRET_ACCESS_KEY"
FAKE_KEY = "fake-key"  # the fake provider's defaults: it checks each provider's auth
FAKE_AWS_ID = "AKIDFAKEEXAMPLE"
FAKE_AWS_SECRET = "fake-secret-access-key"
FAKE_REGION = "us-east-1"
WARMUP = 48
TUNED_ARGS = ("--max-in-flight", "64")


# --------------------------------------------------------------------------- inputs
def natural_rows() -> dict[str, list[tuple[str, str]]]:
    """(text, domain) rows of data/natural by risk class."""
    pools: dict[str, list[tuple[str, str]]] = {r: [] for r in RISKS}
    for path in sorted((ROOT / "data" / "natural").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                pools[row["risk"]].append((row["text"], row["domain"]))
    return pools


def tagged_event(
    query_id: str,
    text: str,
    domain: str,
    risk: str,
    confidence: float,
    *,
    metadata: QueryMetadata | None = None,
    conversation: str | None = None,
    history: Sequence[str] = (),
) -> TaggedQueryEvent:
    """A tagged query as the classifier would publish it (tags given, not inferred)."""
    if history:
        turns = [
            ChatMessage(role="user" if i % 2 == 0 else "assistant", content=h)
            for i, h in enumerate(history)
        ]
        query = QueryEvent(
            query_id=query_id,
            messages=[*turns, ChatMessage(role="user", content=text)],
            conversation_id=conversation,
            metadata=metadata or QueryMetadata(),
        )
    else:
        query = QueryEvent(
            query_id=query_id,
            text=text,
            conversation_id=conversation,
            metadata=metadata or QueryMetadata(),
        )
    others = [d for d in DOMAINS if d != domain]
    domain_probs = {domain: confidence, others[0]: round(1 - confidence, 4)}
    risk_probs = {"none": 0.97} if risk == "none" else {risk: 0.95, "none": 0.05}
    return TaggedQueryEvent(
        query_id=query_id,
        conversation_id=conversation,
        trace=query.trace.child(),
        query=query,
        tags=Tags(
            domain=domain,
            risk=risk,
            domain_probs=domain_probs,
            risk_probs=risk_probs,
            confidence=confidence,
            ambiguous=confidence < 0.6,
            model_version="bench",
        ),
    )


def workload(k: int, prefix: str, seed: int = 7) -> list[TaggedQueryEvent]:
    """``k`` tagged queries: natural texts, risk classes in RISK_MIX proportions, tags as the
    classifier would give them (10% ambiguous, the rest confident)."""
    pools = natural_rows()
    rng = random.Random(seed)
    risks = list(RISK_MIX)
    weights = list(RISK_MIX.values())
    out = []
    for i in range(k):
        risk = rng.choices(risks, weights)[0]
        text, domain = rng.choice(pools[risk])
        confidence = rng.uniform(0.35, 0.59) if rng.random() < 0.1 else rng.uniform(0.8, 0.99)
        out.append(tagged_event(f"{prefix}{i}", text, domain, risk, round(confidence, 4)))
    return out


def decision_inputs(
    k: int, config: RoutingConfig, seed: int = 11
) -> list[tuple[TaggedQueryEvent, int | None, dict[str, ModelHealth]]]:
    """``k`` (event, conversation tier, health) triples cycling over every domain x risk class,
    with ambiguity, per-query constraints, multi-turn chats and degraded models mixed in."""
    pools = natural_rows()
    by_domain: dict[str, list[str]] = {d: [] for d in DOMAINS}
    for text, domain in pools["none"]:
        by_domain[domain].append(text)
    rng = random.Random(seed)
    models = sorted(config.models)
    now = datetime.now(UTC)
    out = []
    for i in range(k):
        domain = DOMAINS[i % len(DOMAINS)]
        risk = RISKS[(i // len(DOMAINS)) % len(RISKS)]
        text = rng.choice(by_domain[domain] if risk == "none" else [t for t, _ in pools[risk]])
        confidence = round(rng.uniform(0.35, 0.99), 4)
        variant = i % 10
        metadata = QueryMetadata()
        if variant == 1:
            metadata = QueryMetadata(max_cost_usd=rng.choice([0.0001, 0.001, 0.01]))
        elif variant == 2:
            metadata = QueryMetadata(allowed_models=rng.sample(models, 3))
        elif variant == 3:
            metadata = QueryMetadata(forbidden_models=rng.sample(models, 2))
        elif variant == 4:
            metadata = QueryMetadata(deadline=now + timedelta(seconds=rng.choice([-1, 30])))
        history: list[str] = []
        conversation = None
        tier = None
        if variant in (5, 6):
            conversation = f"c{i % 97}"
            history = [rng.choice(by_domain[domain]), "an earlier answer"]
            tier = rng.choice([None, 1, 2, 3])
        health: dict[str, ModelHealth] = {}
        if variant == 7:
            health = {
                m: ModelHealth(rng.choice(["degraded", "down"]), 900.0)
                for m in rng.sample(models, 3)
            }
        event = tagged_event(
            f"d{i}",
            text,
            domain,
            risk,
            confidence,
            metadata=metadata,
            conversation=conversation,
            history=history,
        )
        out.append((event, tier, health))
    return out


def decision_latency(path: Path, k: int) -> dict[str, Any]:
    """Per-query time of what the service times (input from the event, then decide) and of
    decide() alone, in microseconds, after one warm-up pass."""
    config = load_routing_config(path)
    triples = decision_inputs(k, config)
    now = datetime.now(UTC)

    def build(t: tuple[TaggedQueryEvent, int | None, dict[str, ModelHealth]]) -> RouteInput:
        return route_input_from_event(t[0], now=now, conversation_tier=t[1], health=t[2])

    inputs = [build(t) for t in triples]
    decisions = [decide(inp, config) for inp in inputs]  # warm-up
    full_ns = []
    for t in triples:
        start = time.perf_counter_ns()
        decide(build(t), config)
        full_ns.append(time.perf_counter_ns() - start)
    decide_ns = []
    for inp in inputs:
        start = time.perf_counter_ns()
        decide(inp, config)
        decide_ns.append(time.perf_counter_ns() - start)
    full = np.array(full_ns) / 1000
    only = np.array(decide_ns) / 1000
    return {
        "inputs": k,
        "combinations_covered": len({(i.domain, i.risk) for i in inputs}),
        "reason_codes": dict(Counter(d.reason_code for d in decisions).most_common()),
        "with_input_build_us": _summary(full),
        "decide_only_us": _summary(only),
    }


def _summary(values_us: np.ndarray[Any, Any]) -> dict[str, float]:
    return {
        "p50": round(float(np.percentile(values_us, 50)), 2),
        "p90": round(float(np.percentile(values_us, 90)), 2),
        "p99": round(float(np.percentile(values_us, 99)), 2),
        "max": round(float(values_us.max()), 2),
        "mean": round(float(values_us.mean()), 2),
    }


# --------------------------------------------------------------------------- routing file
def _model(
    model_id: str,
    provider: str,
    url: str,
    family: str,
    tier: str,
    domains: list[str],
    capabilities: list[str],
    price: tuple[float, float],
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "provider": provider,
        "endpoint": {
            "openai": f"{url}/v1",
            "azure_openai": url,
            "anthropic": f"{url}/v1",
            "bedrock": url,
            "gemini": f"{url}/v1beta",
        }[provider],
        "model": f"bench-{model_id}",
        "family": family,
        "tier": tier,
        "domains": domains,
        "capabilities": capabilities,
        "context_window": 128000,
        "max_output_tokens": 256,
        "timeout_s": 30,
        "price": {"input_per_mtok": price[0], "output_per_mtok": price[1]},
        "limits": {"max_in_flight": 1024},
        "system_prompt": f"You are the {model_id} route. Answer briefly.",
    }
    if provider == "bedrock":
        entry["aws_credentials"] = {
            "access_key_id": {"env": AWS_ID_ENV},
            "secret_access_key": {"env": AWS_SECRET_ENV},
        }
        entry["options"] = {"region": FAKE_REGION}
    else:
        entry["credential"] = {"env": KEY_ENV}
    if provider == "azure_openai":
        entry["options"] = {"deployment": f"bench-{model_id}", "api_version": "2024-10-21"}
    if provider == "anthropic":
        entry["options"] = {"api_version": "2023-06-01"}
    return entry


def routing_document(url: str, mixed: bool) -> dict[str, Any]:
    """The demo's routing shape (a specialist per domain, a small/medium/large general ladder,
    crisis and hardened routes, refusal of harmful), every model pointing at the fake. With
    ``mixed`` the models are spread over the five provider wire formats."""
    specs: list[tuple[str, str, str, list[str], list[str], tuple[float, float]]] = [
        ("general-small", "general", "small", ["general"], ["chat"], (0.15, 0.6)),
        ("general-medium", "general", "medium", ["general"], ["chat"], (0.8, 4.0)),
        ("general-large", "general", "large", ["general"], ["chat"], (2.5, 10.0)),
        *(
            (f"{d}-medium", d, "medium", [d], ["chat"], (0.8, 4.0))
            for d in DOMAINS
            if d != "general"
        ),
        ("crisis", "crisis", "large", ["general"], ["chat", "crisis_safe"], (2.5, 10.0)),
        ("guard", "guard", "large", ["general"], ["chat", "hardened"], (2.5, 10.0)),
    ]
    providers = itertools.cycle(PROVIDERS if mixed else ("openai",))
    models = {
        mid: _model(mid, next(providers), url, fam, tier, doms, caps, price)
        for mid, fam, tier, doms, caps, price in specs
    }
    domains = {d: [f"{d}-medium", "general-large"] for d in DOMAINS if d != "general"}
    domains["general"] = ["general-medium", "general-large"]
    return {
        "version": 1,
        "models": models,
        "policy": {
            "default_model": "general-large",
            "expected_output_tokens": 200,
            "max_candidates": 3,
            "domains": domains,
            "ambiguous": {"candidates": ["general-large", "general-medium"]},
            "risk": {
                "self_harm": {
                    "action": "route",
                    "candidates": ["crisis"],
                    "require_capability": "crisis_safe",
                    "min_probability": 0.3,
                    "review": {"priority": "urgent"},
                },
                "harmful": {
                    "action": "refuse",
                    "min_probability": 0.6,
                    "review": {"priority": "high"},
                },
                "jailbreak": {
                    "action": "route",
                    "candidates": ["guard"],
                    "require_capability": "hardened",
                    "review": {"priority": "low"},
                },
            },
            "tiering": {
                "enabled": True,
                "min_confidence": 0.8,
                "max_input_tokens": 300,
                "single_turn_only": True,
            },
        },
    }


def write_routing(directory: Path, url: str, mixed: bool) -> Path:
    path = directory / f"routing-{'mixed' if mixed else 'openai'}.yaml"
    path.write_text(yaml.safe_dump(routing_document(url, mixed), sort_keys=False))
    load_routing_config(path)  # fail here, not in a replica, if the file is wrong
    return path


def credential_env() -> dict[str, str]:
    return {KEY_ENV: FAKE_KEY, AWS_ID_ENV: FAKE_AWS_ID, AWS_SECRET_ENV: FAKE_AWS_SECRET}


# --------------------------------------------------------------------------- processes
def start_fake_provider() -> tuple[subprocess.Popen[bytes], str]:
    """The fake provider in its own process; returns it and its base URL."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve-fake-provider"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().decode().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise RuntimeError("the fake provider did not start")
    return proc, url


def run_fake_provider() -> int:
    def ready(url: str) -> None:
        print(url, flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_fake(on_ready=ready, api_key=FAKE_KEY))
    return 0


def start_replicas(
    settings: Settings,
    routing: Path,
    replicas: int,
    group: str,
    log_dir: Path,
    extra_args: Sequence[str],
) -> list[subprocess.Popen[bytes]]:
    env = service_env(settings, **credential_env())
    procs = []
    for i in range(replicas):
        with (log_dir / f"{group}-{i}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        *_cprofile_args(f"{group}-{i}"),
                        "-m",
                        "pointsman",
                        "dispatcher",
                        "--routing",
                        str(routing),
                        "--group",
                        group,
                        "--instance-id",
                        f"bench-{i}",
                        "--ops-port",
                        "0",
                        *extra_args,
                    ],
                    env=env,
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
    return procs


def _cprofile_args(name: str) -> list[str]:
    """Run a replica under cProfile when $POINTSMAN_BENCH_CPROFILE names a directory (the
    profile is written when the replica exits on SIGTERM)."""
    directory = os.environ.get("POINTSMAN_BENCH_CPROFILE")
    return ["-m", "cProfile", "-o", f"{directory}/{name}.prof"] if directory else []


def proc_status_mb(pid: int, field: str = "VmHWM") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- Kafka


class ResponseReader:
    """Reads committed responses (read_committed, no group) and notes when each arrived."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = make_consumer(
            settings.kafka, settings.topics.name("responses"), group_id=None
        )
        self.arrivals: list[tuple[str, float, bytes]] = []  # query id, wall time, value
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ResponseReader:
        await self.consumer.start()
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.consumer.stop()

    async def _read(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=100, max_records=5000)
            now = time.time()
            for records in batch.values():
                for r in records:
                    qid = dict(r.headers or ()).get("query_id", b"").decode()
                    self.arrivals.append((qid, now, r.value))

    async def wait_for(self, prefix: str, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sum(1 for q, _, _ in self.arrivals if q.startswith(prefix)) >= count:
                return
            if self._task is not None and self._task.done():
                self._task.result()
            await asyncio.sleep(0.05)
        seen = sum(1 for q, _, _ in self.arrivals if q.startswith(prefix))
        raise RuntimeError(f"only {seen} of {count} responses ({prefix}*) within {timeout_s} s")


async def publish(
    settings: Settings,
    events: Sequence[TaggedQueryEvent],
    *,
    transactional: bool = False,
    rate: float | None = None,
) -> dict[str, float]:
    """Publish tagged queries; in one transaction (all visible at once to read_committed
    readers), or at a steady ``rate``. Returns the wall time each was handed to the producer."""
    topic = settings.topics.name("tagged")
    producer = make_producer(
        settings.kafka,
        transactional_id=f"bench-preload-{uuid.uuid4().hex[:8]}" if transactional else None,
    )
    sent: dict[str, float] = {}
    await producer.start()
    try:
        futures = []
        context = producer.transaction() if transactional else contextlib.nullcontext()
        async with context:
            start = time.perf_counter()
            for i, e in enumerate(events):
                if rate:
                    delay = start + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                sent[e.query_id] = time.time()
                futures.append(await producer.send(topic, e.to_json(), key=e.partition_key()))
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent


@dataclass
class Running:
    """A started configuration: its replicas, group and response reader."""

    settings: Settings
    procs: list[subprocess.Popen[bytes]]
    reader: ResponseReader


@contextlib.asynccontextmanager
async def running(
    bootstrap: str,
    routing: Path,
    replicas: int,
    log_dir: Path,
    extra_args: Sequence[str],
) -> Any:
    """Fresh topics, ``replicas`` dispatchers in a stable group, warmed up (connections open)."""
    settings = await fresh_settings(bootstrap)
    group = f"bench-dispatcher-{settings.topics.prefix.rstrip('.')}"
    procs = start_replicas(settings, routing, replicas, group, log_dir, extra_args)
    try:
        async with ResponseReader(settings) as reader:
            await wait_for_group(settings, group, replicas, procs)
            await publish(settings, workload(WARMUP, "w", seed=3))
            await reader.wait_for("w", WARMUP, timeout_s=120)
            yield Running(settings, procs, reader)
    finally:
        stop_all(procs)


def _tally(arrivals: Sequence[tuple[str, float, bytes]]) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    models: Counter[str] = Counter()
    providers: Counter[str] = Counter()
    for _, _, value in arrivals:
        event = orjson.loads(value)
        statuses[event["status"]] += 1
        models[event.get("model") or "-"] += 1
        for attempt in event.get("attempts") or ():
            providers[attempt["provider"]] += 1
    return {
        "statuses": dict(statuses),
        "models": dict(models.most_common()),
        "provider_calls": dict(providers),
    }


async def run_config(
    bootstrap: str,
    routing: Path,
    queries: Sequence[TaggedQueryEvent],
    replicas: int,
    name: str,
    log_dir: Path,
    extra_args: Sequence[str],
    fake_pid: int,
) -> dict[str, Any]:
    async with running(bootstrap, routing, replicas, log_dir, extra_args) as run:
        cpu_before = [cpu_seconds(p.pid) for p in run.procs]
        fake_before = cpu_seconds(fake_pid)
        await publish(run.settings, queries, transactional=True)
        await run.reader.wait_for("q", len(queries), timeout_s=900)
        cpu = [cpu_seconds(p.pid) - c for p, c in zip(run.procs, cpu_before, strict=True)]
        fake_cpu = cpu_seconds(fake_pid) - fake_before
        rss = [round(proc_status_mb(p.pid), 1) for p in run.procs]
        arrivals = [a for a in run.reader.arrivals if a[0].startswith("q")]
    ids = Counter(q for q, _, _ in arrivals)
    duplicates = sum(n - 1 for n in ids.values() if n > 1)
    times = sorted(t for _, t, _ in arrivals)
    first, last = times[0], times[len(queries) - 1]
    after_first = sum(1 for t in times[: len(queries)] if t > first)
    seconds = max(1e-9, last - first)
    return {
        "name": name,
        "replicas": replicas,
        "dispatcher_args": list(extra_args),
        "providers": "mixed" if "mixed" in routing.name else "openai",
        "queries": len(queries),
        "req_per_s": round(after_first / seconds, 1),
        "seconds": round(seconds, 2),
        "peak_rss_mb_per_replica": rss,
        "cpu_s_per_replica": [round(c, 2) for c in cpu],
        "dispatcher_cpu_ms_per_request": round(sum(cpu) * 1000 / len(queries), 3),
        "fake_provider_cpu_s": round(fake_cpu, 2),
        "duplicates": duplicates,
        "missing": len(queries) - len(ids),
        **_tally(arrivals),
    }


async def latency(
    bootstrap: str,
    routing: Path,
    queries: Sequence[TaggedQueryEvent],
    replicas: int,
    rate: float,
    log_dir: Path,
    extra_args: Sequence[str],
) -> dict[str, Any]:
    async with running(bootstrap, routing, replicas, log_dir, extra_args) as run:
        sent = await publish(run.settings, queries, rate=rate)
        await run.reader.wait_for("l", len(queries), timeout_s=600)
        arrivals = [a for a in run.reader.arrivals if a[0].startswith("l")]
    lat = np.array([(t - sent[q]) * 1000 for q, t, _ in arrivals if q in sent])
    return {
        "rate_per_s": rate,
        "queries": len(lat),
        "replicas": replicas,
        "providers": "mixed" if "mixed" in routing.name else "openai",
        "dispatcher_args": list(extra_args),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p90_ms": round(float(np.percentile(lat, 90)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "max_ms": round(float(lat.max()), 2),
    }


def default_rates(capacity: float) -> list[float]:
    """200/s, and about half the measured capacity when that is clearly different."""
    half = float(max(50, round(capacity / 100) * 50))
    return [200.0] if abs(half - 200) < 100 else [200.0, half]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    load_at_start = machine()
    work = Path(tempfile.mkdtemp(prefix="pointsman-bench-dispatcher-"))
    fake, url = start_fake_provider()
    cluster = None
    try:
        openai_routing = write_routing(work, url, mixed=False)
        mixed_routing = write_routing(work, url, mixed=True)
        decision = decision_latency(openai_routing, args.decision_queries)
        print(f"decision: {json.dumps(decision['with_input_build_us'])} us", flush=True)
        bootstrap = os.environ.get("POINTSMAN_BENCH_BOOTSTRAP")
        if not bootstrap:
            cluster = Cluster.create(work / "kafka", 1, jars=fetch_jars())
            cluster.start()
            bootstrap = cluster.bootstrap
        queries = workload(args.queries, "q")
        extra = args.dispatcher_args
        runs = []
        for replicas in (1, 2):
            name = f"openai x{replicas}"
            runs.append(
                await run_config(
                    bootstrap, openai_routing, queries, replicas, name, work, extra, fake.pid
                )
            )
            print(f"{name}: {runs[-1]['req_per_s']} req/s", flush=True)
        best_replicas = max(runs, key=lambda r: r["req_per_s"])["replicas"]
        name = f"mixed x{best_replicas}"
        runs.append(
            await run_config(
                bootstrap, mixed_routing, queries, best_replicas, name, work, extra, fake.pid
            )
        )
        print(f"{name}: {runs[-1]['req_per_s']} req/s", flush=True)
        if not extra:  # the flags that shrink httpx's connection pool (see --profile)
            name = f"openai x{best_replicas} {' '.join(TUNED_ARGS)}"
            runs.append(
                await run_config(
                    bootstrap,
                    openai_routing,
                    queries,
                    best_replicas,
                    name,
                    work,
                    TUNED_ARGS,
                    fake.pid,
                )
            )
            print(f"{name}: {runs[-1]['req_per_s']} req/s", flush=True)
        best = max(runs, key=lambda r: r["req_per_s"])
        lat_queries = workload(args.latency_queries, "l", seed=5)
        best_routing = mixed_routing if best["providers"] == "mixed" else openai_routing
        lats = [
            await latency(
                bootstrap,
                best_routing,
                lat_queries,
                best["replicas"],
                rate,
                work,
                best["dispatcher_args"],
            )
            for rate in args.latency_rates or default_rates(best["req_per_s"])
        ]
        for lat in lats:
            print(f"latency at {lat['rate_per_s']}/s: p50 {lat['p50_ms']} p99 {lat['p99_ms']} ms")
    finally:
        stop_all([fake])
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    lat = lats[0]
    decision_p99_ms = decision["with_input_build_us"]["p99"] / 1000
    return {
        "req_per_s": best["req_per_s"],
        "best_configuration": {
            "name": best["name"],
            "replicas": best["replicas"],
            "dispatcher_args": best["dispatcher_args"],
        },
        "decision_p50_ms": decision["with_input_build_us"]["p50"] / 1000,
        "decision_p99_ms": decision_p99_ms,
        "e2e_p50_ms": lat["p50_ms"],
        "e2e_p99_ms": lat["p99_ms"],
        "e2e_rate_per_s": lat["rate_per_s"],
        "peak_rss_mb_per_replica": best["peak_rss_mb_per_replica"],
        "decision": decision,
        "runs": runs,
        "latency": lats,
        "workload": {
            "queries": args.queries,
            "risk_mix": RISK_MIX,
            "ambiguous_share": 0.1,
            "texts": "data/natural (hand-written rows)",
            "dispatcher_args": list(args.dispatcher_args),
        },
        "machine": load_at_start,
        "targets": {
            "req_per_s>=2000": best["req_per_s"] >= 2000,
            "decision_p99_ms<=1": decision_p99_ms <= 1.0,
        },
    }


# --------------------------------------------------------------------------- profile
def _records(events: Sequence[TaggedQueryEvent]) -> list[Any]:
    return [
        SimpleNamespace(
            topic="tagged",
            partition=0,
            offset=i,
            value=e.to_json(),
            key=e.partition_key(),
            timestamp=0,
            headers=(),
        )
        for i, e in enumerate(events)
    ]


@dataclass(frozen=True)
class Variant:
    """One setting of the in-process handler: records per batch and the global in-flight cap."""

    name: str
    batch: int = 256
    in_flight: int = 256


VARIANTS = (
    Variant("service defaults (batch 256, in-flight 256)"),
    Variant("in-flight 64", in_flight=64),
    Variant("batch 64, in-flight 64", batch=64, in_flight=64),
    Variant("batch 1024, in-flight 1024", batch=1024, in_flight=1024),
)


async def handler_throughput(
    routing: Path,
    records: Sequence[Any],
    v: Variant,
    profiler: cProfile.Profile | None = None,
) -> float:
    """req/s of decode + Dispatcher handler + response serialisation, in this process, with the
    providers and lent-client pool `pointsman dispatcher` runs with."""
    settings = load_settings(environ={"POINTSMAN_TOPIC_PREFIX": "p."})
    limits = Limits(settings.limits.max_message_bytes, settings.limits.max_text_chars)
    pool = ClientPool(max_idle=v.in_flight)
    dispatcher = Dispatcher(
        settings,
        RoutingHolder(routing),
        make_providers(pool),
        global_max_in_flight=v.in_flight,
        environ=credential_env(),
    )

    async def one_batch(chunk: Sequence[Any]) -> None:
        decoded = []
        for r in chunk:
            result = decode(r.value, TaggedQueryEvent, limits)
            assert not isinstance(result, Rejected)
            decoded.append(Incoming(result, r))
        outcomes = await dispatcher(decoded)
        assert len(outcomes) == len(chunk)

    try:
        await one_batch(records[: v.batch])  # open connections
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        for i in range(0, len(records), v.batch):
            await one_batch(records[i : i + v.batch])
        elapsed = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
    finally:
        await pool.aclose()
    return len(records) / elapsed


async def profile_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="pointsman-bench-dispatcher-"))
    fake, url = start_fake_provider()
    chosen = [v for v in VARIANTS if args.variants is None or VARIANTS.index(v) in args.variants]
    try:
        routing = write_routing(work, url, mixed=False)
        records = _records(workload(args.queries, "p"))
        results = []
        profiler = cProfile.Profile()
        await handler_throughput(routing, records, VARIANTS[args.profile_variant], profiler)
        for v in chosen:
            fake_before = cpu_seconds(fake.pid)
            rate = await handler_throughput(routing, records, v)
            fake_ms = (cpu_seconds(fake.pid) - fake_before) * 1000 / len(records)
            results.append(
                {
                    **dataclasses.asdict(v),
                    "req_per_s": round(rate, 1),
                    "fake_cpu_ms_per_request": round(fake_ms, 3),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    finally:
        stop_all([fake])
        shutil.rmtree(work, ignore_errors=True)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(args.profile_top)
    stats.sort_stats("cumulative").print_stats(args.profile_top)
    print(f"cProfile of: {VARIANTS[args.profile_variant].name}")
    print(text.getvalue())
    return {"handler_in_process": results, "queries": args.queries}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--decision-queries", type=int, default=20000)
    parser.add_argument("--latency-queries", type=int, default=3000)
    parser.add_argument(
        "--latency-rates",
        type=float,
        nargs="+",
        help="steady publish rates for the latency phase; the first is reported as "
        "e2e_p50_ms/e2e_p99_ms (pick one below capacity; default: 200/s and half the best "
        "configuration's req/s)",
    )
    parser.add_argument(
        "--dispatcher-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="passed to every `pointsman dispatcher` (e.g. --max-batch 512); must come last",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dispatcher.json")
    parser.add_argument("--profile", action="store_true", help="in-process handler profile only")
    parser.add_argument("--profile-top", type=int, default=30)
    parser.add_argument(
        "--profile-variant", type=int, default=0, help="index in VARIANTS to run under cProfile"
    )
    parser.add_argument(
        "--variants", type=int, nargs="+", help="indexes in VARIANTS to time (default: all)"
    )
    parser.add_argument("--serve-fake-provider", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # "Failed fetch offsets ... NotLeaderForPartition": the reader racing topic creation
    logging.getLogger("aiokafka.consumer.fetcher").setLevel(logging.CRITICAL)
    if args.serve_fake_provider:
        return run_fake_provider()
    if args.profile:
        print(json.dumps(asyncio.run(profile_async(args)), indent=2))
        return 0
    result = asyncio.run(main_async(args))
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
