"""Prometheus metrics shared by every Kafka worker, labelled by service.

Counters and histograms are module-level (one registry per process, as Prometheus expects);
:func:`serve` exposes them on ``/metrics`` for operators.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

MESSAGES_IN = Counter("pointsman_messages_in_total", "Records consumed.", ["service", "topic"])
MESSAGES_OUT = Counter("pointsman_messages_out_total", "Records produced.", ["service", "topic"])
DEAD_LETTERS = Counter(
    "pointsman_dead_letters_total", "Records sent to the dead-letter topic.", ["service", "reason"]
)
BATCH_SIZE = Histogram(
    "pointsman_batch_size",
    "Records per processed batch.",
    ["service"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BATCH_SECONDS = Histogram(
    "pointsman_batch_seconds",
    "Time to process and commit one batch.",
    ["service"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONSUMER_LAG = Gauge(
    "pointsman_consumer_lag",
    "Records behind the partition's high watermark, after a batch.",
    ["service", "topic", "partition"],
)
ABORTED_TRANSACTIONS = Counter(
    "pointsman_aborted_transactions_total", "Transactions aborted and retried.", ["service"]
)

PAUSED_PARTITIONS = Gauge(
    "pointsman_paused_partitions",
    "Partitions paused because the batch in flight is slow (backpressure).",
    ["service"],
)


def serve(port: int, host: str = "127.0.0.1") -> None:
    start_http_server(port, addr=host)
