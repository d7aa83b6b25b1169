"""AWS Bedrock Runtime Converse and ConverseStream, signed with botocore's SigV4.

The request is signed by botocore (``SigV4Auth`` over an ``AWSRequest``) and sent by httpx with
the same URL, body and headers. ConverseStream answers in the AWS binary event-stream encoding,
decoded (with its CRC checks) by botocore's ``EventStreamBuffer``. Errors are named by the
``x-amzn-ErrorType`` header (or ``__type`` in the body), e.g. ``ThrottlingException``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer, ParserError

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
from pointsman_dispatcher.providers.transport import (
    INVALID_BODY,
    HttpCall,
    HttpProvider,
    ParsedReply,
    Wire,
    int_field,
    json_bytes,
    json_object,
)

PROVIDER = "bedrock"
SERVICE = "bedrock"
# botocore logs the canonical request (with the session token) at DEBUG: never let it.
logging.getLogger("botocore.auth").setLevel(logging.INFO)

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}
ERROR_KINDS: dict[str, ErrorKind] = {
    "ThrottlingException": "rate_limited",
    "ServiceQuotaExceededException": "rate_limited",
    "ModelNotReadyException": "rate_limited",
    "ServiceUnavailableException": "overloaded",
    "InternalServerException": "server_error",
    "ModelErrorException": "server_error",
    "ModelStreamErrorException": "server_error",
    "ModelTimeoutException": "timeout",
    "ValidationException": "bad_request",
    "ResourceNotFoundException": "bad_request",
    "AccessDeniedException": "auth",
    "UnrecognizedClientException": "auth",
    "InvalidSignatureException": "auth",
    "ExpiredTokenException": "auth",
    "MissingAuthenticationTokenException": "auth",
    "IncompleteSignatureException": "auth",
}


def endpoint(target: ProviderTarget) -> str:
    """``base_url`` if set, else the region's public runtime endpoint."""
    if target.base_url:
        return target.base_url.rstrip("/")
    if not target.region:
        raise ValueError("a Bedrock target needs base_url or region")
    return f"https://bedrock-runtime.{target.region}.amazonaws.com"


def build_call(target: ProviderTarget, request: ChatRequest) -> HttpCall:
    """URL, signed headers and body of one Converse/ConverseStream call. Signing reads the
    clock; everything else is a function of the inputs."""
    if target.aws is None or not target.region:
        raise ProviderError("auth", "bedrock target without AWS credentials or region")
    system, turns = split_system(request)
    body: dict[str, Any] = {
        "messages": [{"role": m.role, "content": [{"text": m.content}]} for m in turns],
    }
    if system is not None:
        body["system"] = [{"text": system}]
    config: dict[str, Any] = {"maxTokens": request.max_tokens}
    if request.temperature is not None:
        config["temperature"] = request.temperature
    body["inferenceConfig"] = config
    operation = "converse-stream" if request.stream else "converse"
    # Model ids contain ':' (and ARNs '/'): percent-encoded in the path, as the AWS SDKs do.
    url = f"{endpoint(target)}/model/{quote(target.model, safe='')}/{operation}"
    payload = json_bytes(body)
    unsigned = {
        "content-type": "application/json",
        "accept": "application/vnd.amazon.eventstream" if request.stream else "application/json",
        **dict(target.extra_headers),
    }
    aws = target.aws
    credentials = Credentials(
        aws.access_key_id,
        aws.secret_access_key.get_secret_value(),
        aws.session_token.get_secret_value() if aws.session_token is not None else None,
    )
    signed = AWSRequest(method="POST", url=url, data=payload, headers=unsigned)
    SigV4Auth(credentials, SERVICE, target.region).add_auth(signed)
    return HttpCall(PROVIDER, url, payload, {k.lower(): str(v) for k, v in signed.headers.items()})


def _error_type(headers: Mapping[str, str], obj: Mapping[str, Any]) -> str | None:
    """``ThrottlingException`` from ``x-amzn-ErrorType: ThrottlingException:http://...`` or
    a body ``__type``/``code`` such as ``com.amazon.coral.service#ThrottlingException``."""
    raw = headers.get("x-amzn-errortype") or obj.get("__type") or obj.get("code")
    if not raw:
        return None
    return str(raw).split(":", 1)[0].rsplit("#", 1)[-1]


def parse_error(status: int, headers: Mapping[str, str], body: bytes) -> ProviderError:
    obj: dict[str, Any] = {}
    detail: str | None
    try:
        obj = json_object(body)
        detail = str(obj.get("message") or obj.get("Message") or "")
    except ValueError:
        detail = body[:200].decode("utf-8", "replace")
    error_type = _error_type(headers, obj)
    return http_error(
        provider=PROVIDER,
        status=status,
        kind=ERROR_KINDS.get(error_type or ""),
        error_type=error_type,
        detail=detail,
        retry_after_s=parse_retry_after(headers),
    )


def _text(content: list[dict[str, Any]]) -> str:
    return "".join(block["text"] for block in content if "text" in block)


def parse_body(raw: bytes) -> ParsedReply:
    """``output.message.content[].text``, ``stopReason``, ``usage.inputTokens/outputTokens``."""
    obj = json_object(raw)
    text = _text(obj["output"]["message"]["content"])
    stop = obj.get("stopReason")
    usage = obj.get("usage") or {}
    return ParsedReply(
        text=text,
        finish_reason=_FINISH.get(stop or "", stop),
        input_tokens=int_field(usage.get("inputTokens")),
        output_tokens=int_field(usage.get("outputTokens")),
        model=None,
    )


class BedrockStreamDecoder:
    """Event-stream messages: messageStart, contentBlockDelta*, contentBlockStop, messageStop
    (the final frame), metadata (usage). Exception messages raise."""

    def __init__(self) -> None:
        self._buffer = EventStreamBuffer()
        self._text: list[str] = []
        self._stop: str | None = None
        self._usage: dict[str, Any] = {}
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer.add_data(chunk)
        deltas: list[str] = []
        try:
            for message in self._buffer:
                delta = self._on_message(message.headers, message.payload)
                if delta:
                    deltas.append(delta)
        except ProviderError:
            raise
        except (ParserError, *INVALID_BODY) as exc:
            raise ProviderError(
                "invalid_response", f"bedrock: bad event-stream frame ({type(exc).__name__})", 200
            ) from None
        return deltas

    def close(self) -> list[str]:
        return []

    def _on_message(self, headers: Mapping[str, Any], payload: bytes) -> str | None:
        message_type = headers.get(":message-type")
        if message_type == "exception":
            name = str(headers.get(":exception-type", ""))
            error_type = name[:1].upper() + name[1:]  # throttlingException → ThrottlingException
            detail = str(json_object(payload).get("message") or "") if payload else ""
            raise stream_error(
                PROVIDER, ERROR_KINDS.get(error_type, "server_error"), error_type, detail
            )
        if message_type == "error":
            code = str(headers.get(":error-code", ""))
            detail = str(headers.get(":error-message", ""))
            raise stream_error(PROVIDER, ERROR_KINDS.get(code, "server_error"), code, detail)
        event = headers.get(":event-type")
        if event == "contentBlockDelta":
            text = json_object(payload)["delta"].get("text")
            if text:
                self._text.append(text)
                return str(text)
        elif event == "messageStop":
            self._stop = json_object(payload).get("stopReason")
            self._finished = True
        elif event == "metadata":
            self._usage = json_object(payload).get("usage") or {}
        return None

    def reply(self) -> ParsedReply:
        return ParsedReply(
            text="".join(self._text),
            finish_reason=_FINISH.get(self._stop or "", self._stop),
            input_tokens=int_field(self._usage.get("inputTokens")),
            output_tokens=int_field(self._usage.get("outputTokens")),
            model=None,
        )


WIRE = Wire(
    build_call=build_call,
    decoder=lambda _target: BedrockStreamDecoder(),
    parse_body=lambda _target, raw: parse_body(raw),
    parse_error=lambda _target, status, headers, body: parse_error(status, headers, body),
)


class BedrockProvider(HttpProvider):
    """AWS Bedrock Converse and ConverseStream, SigV4-signed."""

    def __init__(self, client: ClientSource) -> None:
        super().__init__(client, WIRE)
