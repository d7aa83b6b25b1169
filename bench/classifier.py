"""Benchmark of the classifier service on a real broker.

    make bench-classifier       # or: .venv/bin/python bench/classifier.py [--queries 20000]

Starts its own single-node Kafka on free ports (or uses POINTSMAN_BENCH_BOOTSTRAP), then:
1. raw ORT batch throughput of the model on the same texts, same machine, same run (measured
   before and again after the services; the better figure per thread count is the reference);
2. for each configuration (1 replica x 1 thread, 1 replica x 2 threads, 2 replicas x 1 thread):
   preload K queries drawn from the test splits, start the replicas, and time from the first
   tagged event after every replica has joined the consumer group to the K-th (msg/s in steady
   state; model load and group join excluded), peak RSS per replica;
3. latency from publish to tagged event (read_committed) at steady rates (100/s and 300/s by
   default) with the best configuration; the broker, the publisher and the reader share the
   same 2 cores, so near capacity the latency is mostly queueing for CPU.
Prints the figures and writes bench/results/classifier.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

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
from pointsman.client import Client  # noqa: E402
from pointsman.config import Settings  # noqa: E402
from pointsman.events import QueryEvent  # noqa: E402
from pointsman.kafka import make_consumer  # noqa: E402
from pointsman_classifier import data  # noqa: E402
from pointsman_classifier.runtime import ClassifierModel  # noqa: E402
from pointsman_classifier.service import GROUP_ID  # noqa: E402

CONFIGS = [(1, 1), (1, 2), (2, 1)]  # (replicas, intra-op threads)


def texts_from_test_splits(k: int, seed: int = 7) -> list[str]:
    examples = data.load_all(ROOT.parent / "shared" / "datasets", ROOT / "data" / "natural")
    texts = [e.text for e in examples if e.split == "test"]
    random.Random(seed).shuffle(texts)
    return [texts[i % len(texts)] for i in range(k)]


def raw_throughput(
    texts: list[str], threads: int, model_dir: Path | None = None, batch: int = 256, passes: int = 3
) -> float:
    """Queries/s of the model alone in batches of ``batch``: the best of ``passes`` passes (the
    host is a shared VM; one pass can be slowed by a neighbour, which would flatter the ratio)."""
    model = ClassifierModel.load(model_dir, intra_op_threads=threads)
    model.predict(texts[:batch])
    best = 0.0
    for _ in range(passes):
        start = time.perf_counter()
        for i in range(0, len(texts), batch):
            model.predict(texts[i : i + batch])
        best = max(best, len(texts) / (time.perf_counter() - start))
    return best


async def publish(
    settings: Settings, texts: list[str], rate: float | None = None
) -> dict[str, float]:
    sent: dict[str, float] = {}
    async with Client(settings) as client:
        start = time.perf_counter()
        futures = []
        for i, text in enumerate(texts):
            q = QueryEvent(query_id=f"q{i}", text=text)
            if rate:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            sent[q.query_id] = time.time()
            futures.append(await client.submit(q))
        await asyncio.gather(*futures)
    return sent


def start_replicas(
    settings: Settings, replicas: int, threads: int, model_dir: Path | None = None
) -> list[subprocess.Popen[bytes]]:
    env = service_env(settings)
    model = ["--model", str(model_dir)] if model_dir else []
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pointsman",
                "classifier",
                "--instance-id",
                f"bench-{i}",
                "--threads",
                str(threads),
                "--ops-port",
                "0",
                *model,
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(replicas)
    ]


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def consume_tagged(
    settings: Settings, count: int, timeout_s: float
) -> list[tuple[str, float]]:
    """(query_id, arrival wall time) for ``count`` committed tagged events."""
    consumer = make_consumer(settings.kafka, settings.topics.name("tagged"), group_id=None)
    await consumer.start()
    out: list[tuple[str, float]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=100, max_records=5000)
            now = time.time()
            for records in batch.values():
                for r in records:
                    out.append((r.key.decode() if r.key else "", now))
    finally:
        await consumer.stop()
    if len(out) < count:
        raise RuntimeError(f"only {len(out)} of {count} tagged events within {timeout_s}s")
    return out


async def run_config(
    bootstrap: str, texts: list[str], replicas: int, threads: int, model_dir: Path | None
) -> dict[str, Any]:
    settings = await fresh_settings(bootstrap)
    await publish(settings, texts)
    procs = start_replicas(settings, replicas, threads, model_dir)
    try:
        reader = asyncio.create_task(consume_tagged(settings, len(texts), timeout_s=900))
        all_joined = await wait_for_group(settings, GROUP_ID, replicas, procs)
        arrivals = await reader
        rss = [peak_rss_mb(p.pid) for p in procs]
    finally:
        stop_all(procs)
    # Steady state: from the first tagged event after every replica has joined the group (the
    # first replica to load its model otherwise works alone for a few seconds) to the K-th.
    first = min((t for _, t in arrivals if t >= all_joined), default=arrivals[-1][1])
    last = arrivals[-1][1]
    counted = sum(1 for _, t in arrivals if t > first)
    if counted < len(texts) // 2:
        raise RuntimeError(
            f"only {counted} of {len(texts)} queries were tagged after all {replicas} replicas "
            "had joined: too few to measure steady state, use more --queries"
        )
    msgs_per_s = counted / max(1e-9, last - first)
    return {
        "replicas": replicas,
        "threads": threads,
        "queries": len(texts),
        "queries_counted": counted,
        "seconds_counted": last - first,
        "msgs_per_s": msgs_per_s,
        "peak_rss_mb_per_replica": rss,
    }


async def latency(
    bootstrap: str,
    texts: list[str],
    replicas: int,
    threads: int,
    rate: float,
    model_dir: Path | None,
) -> dict[str, Any]:
    settings = await fresh_settings(bootstrap)
    procs = start_replicas(settings, replicas, threads, model_dir)
    try:
        await publish(settings, texts[:50])  # warm-up: join the group, load the model
        await consume_tagged(settings, 50, timeout_s=120)
        reader = asyncio.create_task(consume_tagged(settings, len(texts), timeout_s=600))
        sent = await publish(settings, texts[50:], rate=rate)
        arrivals = await reader
    finally:
        stop_all(procs)
    lat = [(t - sent[qid]) * 1000 for qid, t in arrivals if qid in sent]
    return {
        "rate_per_s": rate,
        "queries": len(lat),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "replicas": replicas,
        "threads": threads,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    texts = texts_from_test_splits(args.queries)

    def raw_per_threads() -> dict[str, float]:
        return {f"{t}_threads": raw_throughput(texts[:5000], t, args.model) for t in (1, 2)}

    raw_before = raw_per_threads()
    bootstrap = os.environ.get("POINTSMAN_BENCH_BOOTSTRAP")
    cluster = None
    if not bootstrap:
        cluster = Cluster.create(
            Path(tempfile.mkdtemp(prefix="pointsman-bench-")), 1, jars=fetch_jars()
        )
        cluster.start()
        bootstrap = cluster.bootstrap
    try:
        runs = [await run_config(bootstrap, texts, r, t, args.model) for r, t in CONFIGS]
        best = max(runs, key=lambda r: r["msgs_per_s"])
        lats = [
            await latency(
                bootstrap,
                texts[: args.latency_queries],
                best["replicas"],
                best["threads"],
                rate,
                args.model,
            )
            for rate in args.latency_rates
        ]
        lat = lats[0]
    finally:
        if cluster is not None:
            cluster.stop()
    # Raw throughput again after the services, with the broker stopped; the better of the two
    # per thread count is the reference (a neighbour on this shared VM can slow one pass down,
    # and a low reference would flatter the ratio).
    raw_after = raw_per_threads()
    raw = {k: max(raw_before[k], raw_after[k]) for k in raw_before}
    raw_best = max(raw.values())
    return {
        "msgs_per_s": best["msgs_per_s"],
        "model_version": ClassifierModel.load(args.model).version,
        "best_configuration": {"replicas": best["replicas"], "threads": best["threads"]},
        "ratio_to_raw": best["msgs_per_s"] / raw_best,
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "latency_rate_per_s": lat["rate_per_s"],
        "raw_ort_batch_throughput": raw,
        "raw_ort_batch_throughput_before_and_after": {"before": raw_before, "after": raw_after},
        "runs": runs,
        "latency": lats,
        "machine": machine(),
        "targets": {
            "msgs_per_s>=1500": best["msgs_per_s"] >= 1500,
            "ratio_to_raw>=0.7": best["msgs_per_s"] / raw_best >= 0.7,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--latency-queries", type=int, default=3000)
    parser.add_argument(
        "--latency-rates",
        type=float,
        nargs="+",
        default=[100.0, 300.0],
        help="steady publish rates for the latency phase; the first is reported "
        "as p50_ms/p99_ms (pick one below capacity)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "classifier.json")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="artifact folder to serve (default: the packaged model), e.g. a smaller student",
    )
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
