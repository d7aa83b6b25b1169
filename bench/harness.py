"""What the benchmarks share: a fresh topic prefix on a broker, the environment a service
process gets, stopping processes cleanly, the machine's description, and writing the figures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError

from pointsman.config import Settings, load_settings
from pointsman.kafka import make_admin
from pointsman.topics import provision, topic_specs


async def fresh_settings(bootstrap: str) -> Settings:
    """Settings with a new topic prefix, its topics provisioned (runs never see each other)."""
    settings = load_settings(
        environ={
            "POINTSMAN_BOOTSTRAP_SERVERS": bootstrap,
            "POINTSMAN_TOPIC_PREFIX": f"b{uuid.uuid4().hex[:8]}.",
        }
    )
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        await provision(admin, topic_specs(settings))
    finally:
        await admin.close()
    return settings


async def wait_for_group(
    settings: Settings,
    group_id: str,
    members: int,
    procs: Sequence[subprocess.Popen[bytes]] = (),
    timeout_s: float = 180.0,
) -> float:
    """Wait until the consumer group is Stable with ``members`` members (every replica has
    joined and holds partitions, no rebalance under way); returns the wall time it was first
    seen so. Replicas join one by one, so until then the first one works alone. Fails at once
    when one of ``procs`` has exited."""
    admin = make_admin(settings.kafka)
    await admin.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a replica of group {group_id} exited during start-up")
            # retriable errors, e.g. no coordinator yet while __consumer_offsets is created
            with contextlib.suppress(KafkaError):
                for response in await admin.describe_consumer_groups([group_id]):
                    for group in response.to_object()["groups"]:
                        if group["state"] == "Stable" and len(group["members"]) == members:
                            return time.time()
            await asyncio.sleep(0.05)
    finally:
        await admin.close()
    raise RuntimeError(f"group {group_id} not stable with {members} members in {timeout_s}s")


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a service process pointed at ``settings``' broker and topics."""
    return {
        **os.environ,
        **extra,
        "POINTSMAN_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "POINTSMAN_TOPIC_PREFIX": settings.topics.prefix,
        "POINTSMAN_LOG_LEVEL": "WARNING",
    }


def stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process, then wait (and kill what does not stop within 30 s)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Save the figures as JSON (bench/results/...) and print them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def machine() -> dict[str, Any]:
    """The figures' context: CPU model and int8 features, memory, Python, onnxruntime, load."""
    from pointsman_classifier.runtime import inference_environment

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        **inference_environment(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
