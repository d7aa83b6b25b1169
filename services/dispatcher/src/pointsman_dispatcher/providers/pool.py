"""Lent one-connection clients: the connection pool the dispatcher actually uses.

httpcore's pool walks every connection it holds on each request's start and finish (part of that
walk grows with the square of the connection count), and against HTTP/1.1 backends every request
in flight holds its own connection. With hundreds in flight that bookkeeping was 34-63% of the
dispatcher's CPU (bench/dispatcher.py, cProfile). Lending each call its own client with a single
keep-alive connection keeps the bookkeeping constant per request; clients go back to a free list
(most recently used first, so warm connections are reused) and one SSL context is shared by all.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator

import httpx


class ClientPool:
    """A free list of ``httpx.AsyncClient`` objects with one connection each."""

    def __init__(
        self,
        *,
        http2: bool = True,
        max_idle: int = 256,
        keepalive_expiry_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        trust_env: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.http2 = http2
        self.max_idle = max_idle
        self.keepalive_expiry_s = keepalive_expiry_s
        self.connect_timeout_s = connect_timeout_s
        self.trust_env = trust_env
        self.ssl_context = ssl_context or httpx.create_ssl_context(trust_env=trust_env)
        self._free: list[httpx.AsyncClient] = []
        self.created = 0
        self._closed = False

    def _new_client(self) -> httpx.AsyncClient:
        self.created += 1
        return httpx.AsyncClient(
            http2=self.http2,
            verify=self.ssl_context,
            limits=httpx.Limits(
                max_connections=1,
                max_keepalive_connections=1,
                keepalive_expiry=self.keepalive_expiry_s,
            ),
            timeout=httpx.Timeout(30.0, connect=self.connect_timeout_s),
            follow_redirects=False,
            trust_env=self.trust_env,
        )

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[httpx.AsyncClient]:
        """A client for one request (or one stream); returned to the free list afterwards."""
        if self._closed:
            raise RuntimeError("the client pool is closed")
        client = self._free.pop() if self._free else self._new_client()
        try:
            yield client
        finally:
            if self._closed or len(self._free) >= self.max_idle:
                await client.aclose()
            else:
                self._free.append(client)

    @property
    def idle(self) -> int:
        return len(self._free)

    async def aclose(self) -> None:
        self._closed = True
        free, self._free = self._free, []
        for client in free:
            await client.aclose()

    async def __aenter__(self) -> ClientPool:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


ClientSource = httpx.AsyncClient | ClientPool


@contextlib.asynccontextmanager
async def leased(source: ClientSource) -> AsyncIterator[httpx.AsyncClient]:
    """The client to use for one call: a shared client as it is, or one lent by a pool."""
    if isinstance(source, ClientPool):
        async with source.lease() as client:
            yield client
    else:
        yield source
