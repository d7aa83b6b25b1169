"""Google Gemini API: ``models/{model}:generateContent`` and ``:streamGenerateContent?alt=sse``.

Gemini names roles ``user``/``model``, takes the system prompt as ``systemInstruction``, reports
errors as ``google.rpc.Status`` (``RESOURCE_EXHAUSTED`` with a ``RetryInfo`` delay; a bad key is
a 400 whose ``ErrorInfo`` reason is ``API_KEY_INVALID``), and ends a stream with the chunk whose
candidate carries ``finishReason`` rather than with a terminator frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from pointsman_dispatcher.providers.base import (
    ChatRequest,
    ErrorKind,
    ProviderError,
    ProviderTarget,
)
from pointsman_dispatcher.providers.errors import (
    http_error,
    parse_duration,
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

PROVIDER = "gemini"
_ROLES = {"user": "user", "assistant": "model"}
_FILTERED = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length"} | dict.fromkeys(_FILTERED, "content_filter")
STATUS_KINDS: dict[str, ErrorKind] = {
    "INVALID_ARGUMENT": "bad_request",
    "FAILED_PRECONDITION": "bad_request",
    "OUT_OF_RANGE": "bad_request",
    "NOT_FOUND": "bad_request",
    "UNAUTHENTICATED": "auth",
    "PERMISSION_DENIED": "auth",
    "RESOURCE_EXHAUSTED": "rate_limited",
    "UNAVAILABLE": "overloaded",
    "INTERNAL": "server_error",
    "UNKNOWN": "server_error",
    "DEADLINE_EXCEEDED": "timeout",
}
_AUTH_REASONS = {"API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_SERVICE_BLOCKED"}


def build_call(target: ProviderTarget, request: ChatRequest) -> HttpCall:
    """URL, headers and body of one generateContent call (pure)."""
    system, turns = split_system(request)
    body: dict[str, Any] = {
        "contents": [{"role": _ROLES[m.role], "parts": [{"text": m.content}]} for m in turns]
    }
    if system is not None:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    config: dict[str, Any] = {"maxOutputTokens": request.max_tokens}
    if request.temperature is not None:
        config["temperature"] = request.temperature
    body["generationConfig"] = config
    base = target.base_url.rstrip("/")
    if not base.endswith(("/v1beta", "/v1")):
        base += "/v1beta"
    model = quote(target.model.removeprefix("models/"), safe="")
    method = "streamGenerateContent?alt=sse" if request.stream else "generateContent"
    headers = {
        "content-type": "application/json",
        "accept": "text/event-stream" if request.stream else "application/json",
        **dict(target.extra_headers),
    }
    if target.api_key is not None:
        headers["x-goog-api-key"] = target.api_key.get_secret_value()
    return HttpCall(PROVIDER, f"{base}/models/{model}:{method}", json_bytes(body), headers)


def _status_fields(error: object) -> tuple[ErrorKind | None, str | None, str, float | None]:
    """(kind, status name, message, RetryInfo delay) of a ``google.rpc.Status``."""
    if not isinstance(error, dict):
        return None, None, "", None
    status = error.get("status")
    kind = STATUS_KINDS.get(str(status)) if status else None
    delay = None
    for detail in error.get("details") or ():
        if not isinstance(detail, dict):
            continue
        type_url = str(detail.get("@type", ""))
        if type_url.endswith("google.rpc.ErrorInfo") and detail.get("reason") in _AUTH_REASONS:
            kind = "auth"
        elif type_url.endswith("google.rpc.RetryInfo"):
            delay = parse_duration(str(detail.get("retryDelay", "")))
    return kind, (str(status) if status else None), str(error.get("message") or ""), delay


def parse_error(status: int, headers: Mapping[str, str], body: bytes) -> ProviderError:
    kind: ErrorKind | None = None
    name = delay = None
    detail: str | None
    try:
        kind, name, detail, delay = _status_fields(json_object(body).get("error"))
    except ValueError:
        detail = body[:200].decode("utf-8", "replace")
    return http_error(
        provider=PROVIDER,
        status=status,
        kind=kind,
        error_type=name,
        detail=detail,
        retry_after_s=parse_retry_after(headers) if delay is None else delay,
    )


class _Chunk:
    """What one GenerateContentResponse adds: text, finish reason, usage, model."""

    def __init__(self, obj: dict[str, Any]) -> None:
        if "error" in obj:
            kind, name, detail, _ = _status_fields(obj["error"])
            raise stream_error(PROVIDER, kind or "server_error", name, detail)
        candidates = obj.get("candidates") or []
        block = (obj.get("promptFeedback") or {}).get("blockReason")
        if not candidates and block:
            raise ProviderError("content_filter", f"gemini blocked the prompt ({block})", 200)
        candidate = candidates[0] if candidates else {}
        parts = (candidate.get("content") or {}).get("parts") or []
        self.text = "".join(p["text"] for p in parts if "text" in p and not p.get("thought"))
        raw_finish = candidate.get("finishReason")
        self.finish: str | None = _FINISH.get(raw_finish, raw_finish) if raw_finish else None
        self.usage: dict[str, Any] | None = obj.get("usageMetadata")
        self.model: str | None = obj.get("modelVersion")


def _tokens(usage: Mapping[str, Any]) -> tuple[int, int]:
    """Thinking tokens are billed as output."""
    output = int_field(usage.get("candidatesTokenCount")) + int_field(
        usage.get("thoughtsTokenCount")
    )
    return int_field(usage.get("promptTokenCount")), output


def parse_body(raw: bytes) -> ParsedReply:
    chunk = _Chunk(json_object(raw))
    if chunk.finish is None and not chunk.text:
        raise ValueError("no candidate")
    prompt, output = _tokens(chunk.usage or {})
    return ParsedReply(chunk.text, chunk.finish, prompt, output, chunk.model)


class GeminiStreamDecoder(SseStreamDecoder):
    """Each ``data:`` frame is a GenerateContentResponse; the one with ``finishReason`` is
    the final frame, and the last ``usageMetadata`` seen holds the totals."""

    provider = PROVIDER

    def __init__(self) -> None:
        super().__init__()
        self._text: list[str] = []
        self._finish: str | None = None
        self._usage: dict[str, Any] = {}
        self._model: str | None = None

    def on_event(self, event: SseEvent) -> str | None:
        chunk = _Chunk(json_object(event.data))
        self._model = chunk.model or self._model
        if chunk.usage:
            self._usage = chunk.usage
        if chunk.finish:
            self._finish = chunk.finish
            self._finished = True
        if chunk.text:
            self._text.append(chunk.text)
        return chunk.text or None

    def reply(self) -> ParsedReply:
        prompt, output = _tokens(self._usage)
        return ParsedReply("".join(self._text), self._finish, prompt, output, self._model)


WIRE = Wire(
    build_call=build_call,
    decoder=lambda _target: GeminiStreamDecoder(),
    parse_body=lambda _target, raw: parse_body(raw),
    parse_error=lambda _target, status, headers, body: parse_error(status, headers, body),
)


class GeminiProvider(HttpProvider):
    """Google Gemini generateContent and streamGenerateContent (SSE)."""

    def __init__(self, client: ClientSource) -> None:
        super().__init__(client, WIRE)
