"""The I/O edge shared by all adapters: send one prepared call, map transport failures.

Adapters are pure where they can be: they build an :class:`HttpCall`, parse a body into a
:class:`ParsedReply` or feed stream bytes to a :class:`StreamDecoder`. This module owns the
clock, the timeouts, ``on_delta`` and the rules that turn network failures into kinds
(``timeout``, ``connection``, ``cut_stream``) and mark streamed text as committed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import orjson

from pointsman_dispatcher.providers.base import (
    ChatRequest,
    ChatResult,
    DeltaCallback,
    ProviderError,
    ProviderTarget,
)
from pointsman_dispatcher.providers.errors import scrub, target_secrets
from pointsman_dispatcher.providers.pool import ClientSource, leased


@dataclass(frozen=True)
class HttpCall:
    """One POST ready to send. Headers hold credentials, so they stay out of the repr."""

    provider: str
    url: str
    body: bytes
    headers: dict[str, str] = field(repr=False)


@dataclass(frozen=True)
class ParsedReply:
    text: str
    finish_reason: str | None
    input_tokens: int
    output_tokens: int
    model: str | None


class StreamDecoder(Protocol):
    """A provider's stream format as a state machine: bytes in, text deltas out."""

    @property
    def finished(self) -> bool:
        """True once the provider's final frame arrived."""
        ...

    def feed(self, chunk: bytes) -> list[str]:
        """Text deltas completed by ``chunk``; raises ProviderError for in-stream errors."""
        ...

    def close(self) -> list[str]:
        """Deltas still buffered at end of stream."""
        ...

    def reply(self) -> ParsedReply:
        """What the stream said, once it is over."""
        ...


ErrorParser = Callable[[int, Mapping[str, str], bytes], ProviderError]
BodyParser = Callable[[bytes], ParsedReply]

# What reading a body of the wrong shape raises (orjson's decode error is a ValueError).
INVALID_BODY = (ValueError, KeyError, TypeError, IndexError, AttributeError)


def json_object(raw: bytes | str) -> dict[str, Any]:
    """``raw`` as a JSON object; ValueError for anything else."""
    value = orjson.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def json_bytes(value: object) -> bytes:
    return orjson.dumps(value)


def int_field(value: object) -> int:
    """A token count, 0 when absent or null."""
    return int(value) if isinstance(value, int | float) else 0


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _finish(
    error: ProviderError, secrets: tuple[str, ...], started: float, emitted: list[str]
) -> ProviderError:
    """The error as the caller sees it: scrubbed, timed, committed if text went out."""
    text = "".join(emitted)
    return dataclasses.replace(
        error,
        message=scrub(error.message, secrets),
        latency_ms=_elapsed_ms(started),
        committed=bool(text),
        partial_text=text,
    )


def _transport_error(exc: httpx.RequestError, provider: str, in_body: bool) -> ProviderError:
    """A failure below HTTP. ``in_body``: the 2xx head had arrived, the stream broke."""
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return ProviderError("timeout", f"{provider}: {name}")
    if in_body:
        return ProviderError("cut_stream", f"{provider}: stream broke ({name})", http_status=200)
    return ProviderError("connection", f"{provider}: {name}")


def _result(reply: ParsedReply, status: int, started: float, streamed: bool) -> ChatResult:
    if reply.finish_reason == "content_filter" and not reply.text:
        raise ProviderError("content_filter", "the provider withheld the answer", status)
    return ChatResult(
        text=reply.text,
        finish_reason=reply.finish_reason,
        input_tokens=reply.input_tokens,
        output_tokens=reply.output_tokens,
        http_status=status,
        latency_ms=_elapsed_ms(started),
        streamed=streamed,
        provider_model=reply.model,
    )


async def send(
    client: ClientSource,
    call: HttpCall,
    *,
    timeout_s: float,
    parse_body: BodyParser,
    parse_error: ErrorParser,
    secrets: tuple[str, ...],
) -> ChatResult:
    """A non-streaming call, bounded by ``timeout_s`` from start to last byte."""
    started = time.perf_counter()
    empty: list[str] = []
    try:
        async with asyncio.timeout(timeout_s), leased(client) as http:
            response = await http.post(
                call.url, content=call.body, headers=call.headers, timeout=timeout_s
            )
    except TimeoutError:
        error = ProviderError("timeout", f"{call.provider}: no answer within {timeout_s:g}s")
        raise _finish(error, secrets, started, empty) from None
    except httpx.RequestError as exc:
        raise _finish(_transport_error(exc, call.provider, False), secrets, started, empty) from exc
    status = response.status_code
    if not 200 <= status < 300:
        error = parse_error(status, response.headers, response.content)
        raise _finish(error, secrets, started, empty)
    try:
        reply = parse_body(response.content)
        return _result(reply, status, started, streamed=False)
    except ProviderError as failure:
        raise _finish(failure, secrets, started, empty) from None
    except INVALID_BODY as exc:
        invalid = ProviderError(
            "invalid_response", f"{call.provider}: unparseable body ({type(exc).__name__})", status
        )
        raise _finish(invalid, secrets, started, empty) from None


async def stream(
    client: ClientSource,
    call: HttpCall,
    *,
    timeout_s: float,
    decoder: StreamDecoder,
    on_delta: DeltaCallback | None,
    parse_error: ErrorParser,
    secrets: tuple[str, ...],
) -> ChatResult:
    """A streaming call. ``timeout_s`` bounds the wait for the head and every gap between
    reads (an answer may stream for longer; the caller's deadline bounds the whole)."""
    started = time.perf_counter()
    emitted: list[str] = []
    in_body = False
    try:
        async with (
            leased(client) as http,
            http.stream(
                "POST", call.url, content=call.body, headers=call.headers, timeout=timeout_s
            ) as response,
        ):
            status = response.status_code
            if not 200 <= status < 300:
                body = await response.aread()
                raise parse_error(status, response.headers, body)
            in_body = True
            async for chunk in response.aiter_bytes():
                for delta in decoder.feed(chunk):
                    emitted.append(delta)
                    if on_delta is not None:
                        on_delta(delta)
            for delta in decoder.close():
                emitted.append(delta)
                if on_delta is not None:
                    on_delta(delta)
            if not decoder.finished:
                raise ProviderError(
                    "cut_stream", f"{call.provider}: stream ended before its final frame", status
                )
            return _result(decoder.reply(), status, started, streamed=True)
    except ProviderError as failure:
        raise _finish(failure, secrets, started, emitted) from None
    except httpx.RequestError as exc:
        broken = _transport_error(exc, call.provider, in_body)
        raise _finish(broken, secrets, started, emitted) from exc


@dataclass(frozen=True)
class Wire:
    """How one provider family's API is spoken: its call, its answer, its errors, its stream."""

    build_call: Callable[[ProviderTarget, ChatRequest], HttpCall]
    decoder: Callable[[ProviderTarget], StreamDecoder]
    parse_body: Callable[[ProviderTarget, bytes], ParsedReply]
    parse_error: Callable[[ProviderTarget, int, Mapping[str, str], bytes], ProviderError]


class HttpProvider:
    """One provider family over HTTP: sending, streaming, timeouts and scrubbing live here once;
    the family's :class:`Wire` says what goes over it."""

    def __init__(self, client: ClientSource, wire: Wire) -> None:
        self._client = client
        self._wire = wire

    async def complete(
        self,
        target: ProviderTarget,
        request: ChatRequest,
        *,
        on_delta: DeltaCallback | None = None,
    ) -> ChatResult:
        wire = self._wire
        call = wire.build_call(target, request)
        secrets = target_secrets(target)

        def errors(status: int, headers: Mapping[str, str], body: bytes) -> ProviderError:
            return wire.parse_error(target, status, headers, body)

        if request.stream:
            return await stream(
                self._client,
                call,
                timeout_s=target.timeout_s,
                decoder=wire.decoder(target),
                on_delta=on_delta,
                parse_error=errors,
                secrets=secrets,
            )
        return await send(
            self._client,
            call,
            timeout_s=target.timeout_s,
            parse_body=lambda raw: wire.parse_body(target, raw),
            parse_error=errors,
            secrets=secrets,
        )
