"""Anthropic Messages API (``POST /v1/messages``), non-streaming and SSE streaming.

Differences from OpenAI that matter here: the key goes in ``x-api-key`` with an
``anthropic-version`` header, the system prompt is a top-level field, ``max_tokens`` is required,
overload is HTTP 529 (``overloaded_error``), and errors can also arrive as an ``error`` event
inside a 200 stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pointsman_dispatcher.providers.base import (
    ChatRequest,
    ErrorKind,
    ProviderError,
    ProviderTarget,
)
from pointsman_dispatcher.providers.errors import (
    http_error,
    parse_retry_after,
    stream_error,
)
from pointsman_dispatcher.providers.messages import split_system
from pointsman_dispatcher.providers.pool import ClientSource
from pointsman_dispatcher.providers.sse import SseEvent, SseStreamDecoder
from pointsman_dispatcher.providers.transport import (
    HttpCall,
    HttpProvider,
    ParsedReply,
    Wire,
    int_field,
    json_bytes,
    json_object,
)

DEFAULT_VERSION = "2023-06-01"
PROVIDER = "anthropic"

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
ERROR_KINDS: dict[str, ErrorKind] = {
    "invalid_request_error": "bad_request",
    "not_found_error": "bad_request",
    "request_too_large": "bad_request",
    "authentication_error": "auth",
    "permission_error": "auth",
    "billing_error": "auth",
    "rate_limit_error": "rate_limited",
    # "api_error" is generic: the HTTP status says more (500 vs 503); in a stream, server_error.
    "overloaded_error": "overloaded",
    "timeout_error": "timeout",
}


def build_call(target: ProviderTarget, request: ChatRequest) -> HttpCall:
    """URL, headers and body of one Messages call (pure)."""
    system, turns = split_system(request)
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": request.max_tokens,
        "messages": [{"role": m.role, "content": m.content} for m in turns],
    }
    if system is not None:
        body["system"] = system
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.stream:
        body["stream"] = True
    base = target.base_url.rstrip("/")
    url = f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"
    headers = {
        "content-type": "application/json",
        "accept": "text/event-stream" if request.stream else "application/json",
        "anthropic-version": target.api_version or DEFAULT_VERSION,
        **dict(target.extra_headers),
    }
    if target.api_key is not None:
        headers["x-api-key"] = target.api_key.get_secret_value()
    return HttpCall(PROVIDER, url, json_bytes(body), headers)


def _error_fields(obj: dict[str, Any]) -> tuple[str | None, str | None]:
    error = obj.get("error")
    if not isinstance(error, dict):
        return None, None
    error_type = error.get("type")
    return (str(error_type) if error_type else None), str(error.get("message") or "")


def parse_error(status: int, headers: Mapping[str, str], body: bytes) -> ProviderError:
    """``{"type": "error", "error": {"type": "rate_limit_error", "message": ...}}``."""
    error_type = detail = None
    try:
        error_type, detail = _error_fields(json_object(body))
    except ValueError:
        detail = body[:200].decode("utf-8", "replace")
    return http_error(
        provider=PROVIDER,
        status=status,
        kind=ERROR_KINDS.get(error_type or ""),
        error_type=error_type,
        detail=detail,
        retry_after_s=parse_retry_after(headers),
    )


def _input_tokens(usage: Mapping[str, Any]) -> int:
    """Prompt tokens including those written to or read from the prompt cache."""
    return (
        int_field(usage.get("input_tokens"))
        + int_field(usage.get("cache_creation_input_tokens"))
        + int_field(usage.get("cache_read_input_tokens"))
    )


def parse_body(raw: bytes) -> ParsedReply:
    obj = json_object(raw)
    if obj.get("type") != "message":
        raise ValueError("not a message")
    text = "".join(block["text"] for block in obj["content"] if block.get("type") == "text")
    usage = obj.get("usage") or {}
    stop = obj.get("stop_reason")
    return ParsedReply(
        text=text,
        finish_reason=_FINISH.get(stop or "", stop),
        input_tokens=_input_tokens(usage),
        output_tokens=int_field(usage.get("output_tokens")),
        model=obj.get("model"),
    )


class AnthropicStreamDecoder(SseStreamDecoder):
    """message_start → content_block_* → message_delta (stop reason, output usage) →
    message_stop (the final frame); ``ping`` is ignored, ``error`` raises."""

    provider = PROVIDER

    def __init__(self) -> None:
        super().__init__()
        self._text: list[str] = []
        self._stop: str | None = None
        self._input = 0
        self._output = 0
        self._model: str | None = None

    def on_event(self, event: SseEvent) -> str | None:
        obj = json_object(event.data)
        kind = obj.get("type", event.event)
        if kind == "content_block_delta":
            delta = obj["delta"]
            if delta.get("type") == "text_delta" and delta.get("text"):
                self._text.append(delta["text"])
                return str(delta["text"])
        elif kind == "message_start":
            message = obj["message"]
            self._model = message.get("model")
            usage = message.get("usage") or {}
            self._input = _input_tokens(usage)
            self._output = int_field(usage.get("output_tokens"))
        elif kind == "message_delta":
            self._stop = (obj.get("delta") or {}).get("stop_reason") or self._stop
            usage = obj.get("usage") or {}
            # Cumulative counts; input appears here too in newer API versions.
            self._output = max(self._output, int_field(usage.get("output_tokens")))
            self._input = max(self._input, _input_tokens(usage))
        elif kind == "message_stop":
            self._finished = True
        elif kind == "error":
            error_type, detail = _error_fields(obj)
            raise stream_error(
                PROVIDER, ERROR_KINDS.get(error_type or "", "server_error"), error_type, detail
            )
        return None

    def reply(self) -> ParsedReply:
        return ParsedReply(
            text="".join(self._text),
            finish_reason=_FINISH.get(self._stop or "", self._stop),
            input_tokens=self._input,
            output_tokens=self._output,
            model=self._model,
        )


WIRE = Wire(
    build_call=build_call,
    decoder=lambda _target: AnthropicStreamDecoder(),
    parse_body=lambda _target, raw: parse_body(raw),
    parse_error=lambda _target, status, headers, body: parse_error(status, headers, body),
)


class AnthropicProvider(HttpProvider):
    """Anthropic Messages API."""

    def __init__(self, client: ClientSource) -> None:
        super().__init__(client, WIRE)
