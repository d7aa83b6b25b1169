"""What every service's command shares: the replica options and the way it starts.

Each service (`pointsman classifier`, `pointsman dispatcher`, ...) is a consumer-group worker that
operators scale by adding replicas; the options that make a replica one (a stable instance id for
its transactional id, the group, batch size and wait, the ops endpoint) are defined here once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from pointsman.config import Settings, load_settings
from pointsman.logs import setup_logging

Serve = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]


def add_replica_arguments(p: Any, *, group_id: str, ops_port: int, max_batch: int = 256) -> None:
    """--instance-id, --group, --max-batch, --max-wait-ms, --ops-host, --ops-port."""
    p.add_argument(
        "--instance-id",
        default=os.environ.get("POINTSMAN_INSTANCE_ID", socket.gethostname()),
        help="stable per replica (its transactional id); default $POINTSMAN_INSTANCE_ID "
        "or the host name",
    )
    p.add_argument("--group", default=group_id, help=f"consumer group (default {group_id})")
    p.add_argument(
        "--max-batch", type=int, default=max_batch, help=f"records per batch (default {max_batch})"
    )
    p.add_argument("--max-wait-ms", type=int, default=20, help="poll wait for a batch")
    p.add_argument("--ops-host", default="127.0.0.1")
    p.add_argument(
        "--ops-port", type=int, default=ops_port, help="/healthz /readyz /metrics (0: any)"
    )


def run_replica(args: argparse.Namespace, serve: Serve) -> int:
    """Load the settings, set up JSON logging, and serve until stopped."""
    settings = load_settings(args.config)
    setup_logging(settings.logging.level, settings.logging.format)
    return asyncio.run(serve(settings, args))
