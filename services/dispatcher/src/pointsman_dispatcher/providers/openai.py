"""OpenAI Chat Completions, as spoken by OpenAI, Azure OpenAI and the compatible servers (vLLM,
Ollama, llama.cpp server, OpenRouter, ``pointsman local-llm``).

One adapter covers both families: Azure differs only in the URL (deployment path and
``api-version`` query), the ``api-key`` header and the absence of ``model`` in the body.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

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

AZURE_DEFAULT_API_VERSION = "2024-10-21"
# Models that reject ``max_tokens`` and take ``max_completion_tokens`` (reasoning models).
_COMPLETION_TOKENS_PREFIXES = ("o1", "o3", "o4", "gpt-5")
_FINISH = {"function_call": "tool_calls"}


def max_tokens_field(target: ProviderTarget) -> str:
    """OpenAI itself deprecated ``max_tokens`` (reasoning models reject it); the compatible
    servers and older Azure API versions only know ``max_tokens``."""
    host = urlsplit(target.base_url).hostname or ""
    model = (target.deployment or target.model).lower()
    if host == "api.openai.com" or model.startswith(_COMPLETION_TOKENS_PREFIXES):
        return "max_completion_tokens"
    return "max_tokens"


def build_call(target: ProviderTarget, request: ChatRequest) -> HttpCall:
    """URL, headers and body of one chat completion (pure)."""
    azure = target.provider == "azure_openai"
    system, turns = split_system(request)
    messages: list[dict[str, str]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.extend({"role": m.role, "content": m.content} for m in turns)
    body: dict[str, Any] = {} if azure else {"model": target.model}
    body["messages"] = messages
    body[max_tokens_field(target)] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    base = target.base_url.rstrip("/")
    headers = {
        "content-type": "application/json",
        "accept": "text/event-stream" if request.stream else "application/json",
        **dict(target.extra_headers),
    }
    if azure:
        deployment = quote(target.deployment or target.model, safe="")
        version = quote(target.api_version or AZURE_DEFAULT_API_VERSION, safe="")
        url = f"{base}/openai/deployments/{deployment}/chat/completions?api-version={version}"
        if target.api_key is not None:
            headers["api-key"] = target.api_key.get_secret_value()
    else:
        url = f"{base}/chat/completions"
        if target.api_key is not None:
            headers["authorization"] = f"Bearer {target.api_key.get_secret_value()}"
    return HttpCall(target.provider, url, json_bytes(body), headers)


def _kind(error_type: str | None, code: str | None) -> ErrorKind | None:
    if "content_filter" in (error_type, code):
        return "content_filter"
    if "insufficient_quota" in (error_type, code):
        return "auth"  # billing: retrying or waiting will not help, another provider may
    return None


def _error_fields(error: object) -> tuple[str | None, str | None, str | None]:
    """(type, code, message) of an ``error`` member, whatever shape the server used."""
    if isinstance(error, dict):
        error_type = error.get("type")
        code = error.get("code")
        return (
            str(error_type) if error_type is not None else None,
            str(code) if code is not None else None,
            str(error.get("message") or ""),
        )
    if isinstance(error, str):
        return None, None, error
    return None, None, None


def parse_error(
    provider: str, status: int, headers: Mapping[str, str], body: bytes
) -> ProviderError:
    """``{"error": {"message", "type", "param", "code"}}`` (Azure: code/message only)."""
    error_type = code = detail = None
    try:
        error_type, code, detail = _error_fields(json_object(body).get("error"))
    except ValueError:
        detail = body[:200].decode("utf-8", "replace")
    return http_error(
        provider=provider,
        status=status,
        kind=_kind(error_type, code),
        error_type=code or error_type,
        detail=detail,
        retry_after_s=parse_retry_after(headers),
    )


def _raise_embedded_error(provider: str, obj: dict[str, Any]) -> None:
    """Some servers answer 2xx (or stream a frame) carrying only ``{"error": ...}``."""
    if "error" in obj and "choices" not in obj:
        error_type, code, detail = _error_fields(obj["error"])
        kind = _kind(error_type, code) or "server_error"
        raise stream_error(provider, kind, code or error_type, detail)


def parse_body(provider: str, raw: bytes) -> ParsedReply:
    obj = json_object(raw)
    _raise_embedded_error(provider, obj)
    choice = obj["choices"][0]
    message = choice["message"]
    content = message.get("content")
    finish = choice.get("finish_reason")
    if content is None:
        if not message.get("refusal"):
            raise ValueError("no content")
        content, finish = "", "content_filter"
    usage = obj.get("usage") or {}
    return ParsedReply(
        text=str(content),
        finish_reason=_FINISH.get(finish, finish),
        input_tokens=int_field(usage.get("prompt_tokens")),
        output_tokens=int_field(usage.get("completion_tokens")),
        model=obj.get("model"),
    )


class OpenAIStreamDecoder(SseStreamDecoder):
    """``data: {chat.completion.chunk}`` frames; usage in the last chunk (``include_usage``);
    ``data: [DONE]`` is the final frame."""

    def __init__(self, provider: str) -> None:
        super().__init__()
        self.provider = provider
        self._finish: str | None = None
        self._usage: dict[str, Any] = {}
        self._model: str | None = None
        self._text: list[str] = []

    def on_event(self, event: SseEvent) -> str | None:
        if event.data == "[DONE]":
            self._finished = True
            return None
        obj = json_object(event.data)
        _raise_embedded_error(self.provider, obj)
        self._model = obj.get("model") or self._model
        if obj.get("usage"):
            self._usage = obj["usage"]
        pieces: list[str] = []
        for choice in obj.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            content = (choice.get("delta") or {}).get("content")
            if content:
                pieces.append(content)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        text = "".join(pieces)
        self._text.append(text)
        return text or None

    def reply(self) -> ParsedReply:
        return ParsedReply(
            text="".join(self._text),
            finish_reason=_FINISH.get(self._finish or "", self._finish),
            input_tokens=int_field(self._usage.get("prompt_tokens")),
            output_tokens=int_field(self._usage.get("completion_tokens")),
            model=self._model,
        )


WIRE = Wire(
    build_call=build_call,
    decoder=lambda target: OpenAIStreamDecoder(target.provider),
    parse_body=lambda target, raw: parse_body(target.provider, raw),
    parse_error=lambda target, status, headers, body: parse_error(
        target.provider, status, headers, body
    ),
)


class OpenAIProvider(HttpProvider):
    """Chat completions; ``target.provider`` picks OpenAI(-compatible) or Azure OpenAI."""

    def __init__(self, client: ClientSource) -> None:
        super().__init__(client, WIRE)
