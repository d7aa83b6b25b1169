"""The ops endpoints every service serves: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio

from pointsman import metrics
from pointsman.ops import OpsServer


async def get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_health_readiness_and_metrics() -> None:
    ready = False
    server = OpsServer("127.0.0.1", 0, ready=lambda: ready)
    await server.start()
    try:
        assert await get(server.port, "/healthz") == (200, "ok\n")
        assert (await get(server.port, "/readyz"))[0] == 503
        ready = True
        assert await get(server.port, "/readyz") == (200, "ready\n")
        metrics.DEAD_LETTERS.labels("ops-test", "empty").inc()
        status, body = await get(server.port, "/metrics")
        assert status == 200
        assert 'pointsman_dead_letters_total{reason="empty",service="ops-test"} 1.0' in body
        assert (await get(server.port, "/nope"))[0] == 404
    finally:
        await server.stop()
