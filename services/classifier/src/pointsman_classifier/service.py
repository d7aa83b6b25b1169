"""The classifier service: queries in, tagged queries out, through the shared worker.

`pointsman classifier` runs it. The shared :class:`~pointsman.worker.Worker` does the Kafka part
(consumer group, dead letters, one transaction per batch with the offsets inside, so exactly one
tagged event per query across crashes); this module adds what is the classifier's own:

- :func:`classification_text` (pure): what to classify — the text, or for a chat the latest user
  turn followed by a bounded slice of the preceding turn (truncation at the model's max length
  cuts the context first, never the question);
- :class:`Tagger`: the handler — one model call per batch, in a worker thread so the event loop
  keeps serving Kafka and the ops endpoints;
- the process: ops endpoints (/healthz, /readyz, /metrics), JSON logs, SIGTERM (finish the batch,
  commit, leave the group) and SIGHUP (load the model again and swap it in between batches).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import Gauge, Histogram

from pointsman.config import Settings
from pointsman.events import QueryEvent, TaggedQueryEvent, Tags
from pointsman.ops import OpsServer
from pointsman.replica import add_replica_arguments, run_replica
from pointsman.worker import Incoming, Outcome, Worker, WorkerOptions, event_record
from pointsman_classifier.runtime import ClassifierModel, Prediction, inference_environment

log = logging.getLogger("pointsman.classifier")
CONTEXT_CHARS = 300
GROUP_ID = "pointsman-classifier"

MODEL_INFO = Gauge(
    "pointsman_classifier_model_info", "Loaded model version (value 1).", ["model_version"]
)
INFERENCE_SECONDS = Histogram(
    "pointsman_classifier_inference_seconds",
    "Model time per batch.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)


def classification_text(query: QueryEvent, context_chars: int = CONTEXT_CHARS) -> str:
    """The latest user turn, then up to ``context_chars`` of the turn before it (if any)."""
    if query.messages is None:
        return query.query_text()
    turns = [m for m in query.messages if m.content.strip() and m.role in ("user", "assistant")]
    last = max(i for i, m in enumerate(turns) if m.role == "user")
    if last == 0 or context_chars <= 0:
        return turns[last].content
    before = turns[last - 1].content.strip()
    return f"{turns[last].content}\n\n(context: {before[-context_chars:]})"


def tagged_event(query: QueryEvent, prediction: Prediction) -> TaggedQueryEvent:
    return TaggedQueryEvent(
        query_id=query.query_id,
        tenant=query.tenant,
        conversation_id=query.conversation_id,
        trace=query.trace.child(),
        query=query,
        tags=Tags(
            domain=prediction.domain,
            risk=prediction.risk,
            domain_probs=prediction.domain_probs,
            risk_probs=prediction.risk_probs,
            confidence=min(1.0, max(0.0, prediction.confidence)),
            ambiguous=prediction.ambiguous,
            model_version=prediction.model_version,
            truncated=prediction.truncated,
        ),
    )


class Tagger:
    """The worker's handler; holds the model and swaps it on reload."""

    def __init__(self, settings: Settings, model: ClassifierModel, threads: int = 1) -> None:
        self.topic = settings.topics.name("tagged")
        self.model = model
        self.threads = threads
        MODEL_INFO.labels(model.version).set(1)

    async def __call__(self, batch: Sequence[Incoming[QueryEvent]]) -> list[Outcome]:
        model = self.model  # one model for the whole batch, even if a reload lands meanwhile
        texts = [classification_text(item.event) for item in batch]
        with INFERENCE_SECONDS.time():
            predictions = await asyncio.to_thread(model.predict, texts)
        return [
            [event_record(self.topic, tagged_event(item.event, p))]
            for item, p in zip(batch, predictions, strict=True)
        ]

    async def reload(self, directory: Path | None) -> None:
        fresh = await asyncio.to_thread(
            ClassifierModel.load, directory, intra_op_threads=self.threads
        )
        old = self.model
        self.model = fresh
        MODEL_INFO.clear()
        MODEL_INFO.labels(fresh.version).set(1)
        log.info("model reloaded", extra={"old": old.version, "new": fresh.version})


async def serve(settings: Settings, args: argparse.Namespace) -> int:
    model_dir = Path(args.model) if args.model else None
    model = await asyncio.to_thread(ClassifierModel.load, model_dir, intra_op_threads=args.threads)
    tagger = Tagger(settings, model, args.threads)
    worker: Worker[QueryEvent] = Worker(
        settings,
        service="classifier",
        source_topic=settings.topics.name("queries"),
        model=QueryEvent,
        handler=tagger,
        group_id=args.group,
        instance_id=args.instance_id,
        options=WorkerOptions(max_batch=args.max_batch, poll_timeout_ms=args.max_wait_ms),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(tagger.reload(model_dir))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    ops = OpsServer(args.ops_host, args.ops_port, ready=worker.ready.is_set)
    await ops.start()
    log.info(
        "classifier starting",
        extra={
            "model_version": model.version,
            "ops_port": ops.port,
            "instance_id": args.instance_id,
            **inference_environment(),  # speed depends on the CPU's int8 features
        },
    )
    try:
        await worker.run(stop)
    finally:
        await ops.stop()
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "classifier",
        help="run the classifier service (queries → tagged queries)",
        description="A consumer-group worker: tags every query on the queries topic and writes "
        "one tagged query per query (Kafka transactions). Replicas share the partitions.",
    )
    p.add_argument("--model", help="artifact folder (default: the packaged model)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    # 512, not the shared 256: a bigger batch sorts into tighter token-length chunks (less
    # padding) and needs half the transactions; measured 1,450 -> 1,560 msg/s (median of 5 and 3
    # runs, 2 replicas x 1 thread, docs/classifier-service.md).
    add_replica_arguments(p, group_id=GROUP_ID, ops_port=9400, max_batch=512)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_replica(args, serve)
