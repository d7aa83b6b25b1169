"""A local fake of the five provider wire formats, for tests and the dispatcher benchmark.

A real HTTP/1.1 server on 127.0.0.1 (asyncio streams, keep-alive, Content-Length and chunked
streaming) that routes by path to OpenAI, Azure OpenAI, Anthropic, Bedrock or Gemini, checks each
one's authentication the way the provider does, and answers with that provider's exact response,
stream and error shapes. Tests script faults per request (status and body, Retry-After headers,
delays, connection resets, streams cut after N frames, in-stream errors, malformed bodies) and
read back every request received.

Answers are deterministic: the text is ``fake answer from <model>`` unless scripted; input tokens
are the words of the prompt (system included), output tokens the words of the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
import socket
import struct
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

Json = dict[str, Any]
_WORDS = re.compile(r"\S+\s*")
_REASONS = {529: "Overloaded"}


@dataclass(frozen=True)
class Behaviour:
    """What the fake does with one request. The default is a correct answer."""

    status: int = 200
    body: bytes | str | Json | None = None  # replaces the provider's body (not streams)
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. {"retry-after": "2"}
    delay_s: float = 0.0  # before the response head
    reset: bool = False  # drop the connection (RST) instead of answering
    cut_after_frames: int | None = None  # stream: close after N frames, no final frame
    error_after_frames: int | None = None  # stream: after N frames, the provider's error frame
    error_status: int = 529  # which error the in-stream error frame reports
    malformed: bool = False  # 2xx whose body (or first stream frame) does not parse
    text: str | None = None  # the answer text


@dataclass(frozen=True)
class RecordedRequest:
    provider: str  # openai, azure_openai, anthropic, bedrock, gemini, unknown
    method: str
    target: str  # raw request target: path and query, exactly as sent
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    json: Any  # the parsed body, None when it is not JSON


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    frames: list[bytes] | None = None  # a chunked streaming response
    close_after: bool = False


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return _REASONS.get(status, "Error")


def _json(value: object) -> bytes:
    return orjson.dumps(value)


def _raw(body: bytes | str | Json) -> bytes:
    if isinstance(body, bytes):
        return body
    return body.encode() if isinstance(body, str) else _json(body)


def _words(text: str) -> list[str]:
    return _WORDS.findall(text)


def _count(texts: list[str]) -> int:
    return sum(len(t.split()) for t in texts)


def _error_reply(
    status: int, body: Json | bytes, headers: Mapping[str, str] | None = None
) -> Reply:
    raw = body if isinstance(body, bytes) else _json(body)
    return Reply(status, {"content-type": "application/json", **(headers or {})}, raw)


# --------------------------------------------------------------------------- wire formats
class WireFormat:
    """One provider's side of the protocol."""

    name = "unknown"
    stream_content_type = "text/event-stream"

    def authenticate(self, req: RecordedRequest) -> Reply | None:
        raise NotImplementedError

    def is_stream(self, req: RecordedRequest) -> bool:
        return bool(isinstance(req.json, dict) and req.json.get("stream"))

    def model(self, req: RecordedRequest) -> str:
        return str(req.json.get("model", "model")) if isinstance(req.json, dict) else "model"

    def prompt_texts(self, body: Json) -> list[str]:
        raise NotImplementedError

    def validate(self, req: RecordedRequest) -> Reply | None:
        """A 400 in the provider's shape for a request the provider would refuse."""
        return None

    def answer(self, req: RecordedRequest, text: str, usage: tuple[int, int]) -> bytes:
        raise NotImplementedError

    def frames(self, req: RecordedRequest, text: str, usage: tuple[int, int]) -> list[bytes]:
        raise NotImplementedError

    def error_body(self, status: int, message: str) -> tuple[Json, dict[str, str]]:
        raise NotImplementedError

    def error_frame(self, status: int, message: str) -> bytes:
        body, _ = self.error_body(status, message)
        return b"data: " + _json(body) + b"\n\n"

    def malformed_frame(self) -> bytes:
        return b'data: {"choices": [ not json\n\n'


def _openai_error(status: int, message: str) -> Json:
    types = {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        404: ("invalid_request_error", "model_not_found"),
        429: ("requests", "rate_limit_exceeded"),
    }
    error_type, code = types.get(status, ("server_error", None))
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


class OpenAIFormat(WireFormat):
    name = "openai"

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    def authenticate(self, req: RecordedRequest) -> Reply | None:
        given = req.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return None
        shown = given.removeprefix("Bearer ")
        message = (
            f"Incorrect API key provided: {shown}. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
        )
        return _error_reply(401, _openai_error(401, message))

    def prompt_texts(self, body: Json) -> list[str]:
        return [str(m.get("content", "")) for m in body.get("messages", [])]

    def validate(self, req: RecordedRequest) -> Reply | None:
        body = req.json
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error_reply(400, _openai_error(400, "'messages' is a required property"))
        return None

    def _completion(self, req: RecordedRequest) -> Json:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": self.model(req),
            "system_fingerprint": "fp_fake",
        }

    def _usage(self, usage: tuple[int, int]) -> Json:
        return {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": usage[0] + usage[1],
        }

    def answer(self, req: RecordedRequest, text: str, usage: tuple[int, int]) -> bytes:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
        body = self._completion(req) | {
            "object": "chat.completion",
            "choices": [choice],
            "usage": self._usage(usage),
        }
        return _json(body)

    def frames(self, req: RecordedRequest, text: str, usage: tuple[int, int]) -> list[bytes]:
        head = self._completion(req) | {"object": "chat.completion.chunk"}
        include_usage = bool((req.json.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: Json, finish: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            body = head | {"choices": [choice]}
            if include_usage:
                body["usage"] = None
            return b"data: " + _json(body) + b"\n\n"

        frames = [chunk({"role": "assistant", "content": ""}, None)]
        frames += [chunk({"content": word}, None) for word in _words(text)]
        frames.append(chunk({}, "stop"))
        if include_usage:
            usage_chunk = head | {"choices": [], "usage": self._usage(usage)}
            frames.append(b"data: " + _json(usage_chunk) + b"\n\n")
        frames.append(b"data: [DONE]\n\n")
        return frames

    def error_body(self, status: int, message: str) -> tuple[Json, dict[str, str]]:
        return _openai_error(status, message), {}


class AzureOpenAIFormat(OpenAIFormat):
    name = "azure_openai"

    def authenticate(self, req: RecordedRequest) -> Reply | None:
        if not hmac.compare_digest(req.headers.get("api-key", "").encode(), self.api_key.encode()):
            message = (
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
                "to provide a valid key for an active subscription and use a correct regional "
                "API endpoint for your resource."
            )
            return _error_reply(401, {"error": {"code": "401", "message": message}})
        if "api-version" not in req.query:
            return _error_reply(404, {"error": {"code": "404", "message": "Resource not found"}})
        return None

    def model(self, req: RecordedRequest) -> str:
        return unquote(req.path.split("/")[3])  # /openai/deployments/{deployment}/...

    def error_body(self, status: int, message: str) -> tuple[Json, dict[str, str]]:
        return {"error": {"code": str(status), "message": message}}, {}


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class AnthropicFormat(WireFormat):
    name = "anthropic"

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    def authenticate(self, req: RecordedRequest) -> Reply | None:
        if not hmac.compare_digest(
            req.headers.get("x-api-key", "").encode(), self.api_key.encode()
        ):
            body, _ = self.error_body(401, "invalid x-api-key")
            return _error_reply(401, body)
        if "anthropic-version" not in req.headers:
            body, _ = self.error_body(400, "anthropic-version: header is required")
            return _error_reply(400, body)
        return None

    def validate(self, req: RecordedRequest) -> Reply | None:
        body = req.json
        problem = None
        if not isinstance(body, dict):
            problem = "request body must be JSON"
        elif "max_tokens" not in body:
            problem = "max_tokens: Field required"
        elif any(m.get("role") == "system" for m in body.get("messages", [])):
            problem = 'messages: Unexpected role "system". Use the top-level `system` parameter.'
        if problem is None:
            return None
        error, _ = self.error_body(400, problem)
        return _error_reply(400, error)

    def prompt_texts(self, body: Json) -> list[str]:
        texts = [str(body.get("system", ""))]
        return texts + [str(m.get("content", "")) for m in body.get("messages", [])]

    def _message(
        self, req: RecordedRequest, content: list[Json], stop: str | None, usage: Json
    ) -> Json:
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": self.model(req),
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
        }

    def answer(self, req: RecordedRequest, text: str, usage: tuple[int, int]) -> bytes:
        counts = {
            "input_tokens": usage[0],
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": usage[1],
        }
        return _json(self._message(req, [{"type": "text", "text": text}], "end_turn", counts))

    def frames(self, req: RecordedRequest, text: str, usage: tuple[int, int]) -> list[bytes]:
        def event(name: str, data: Json) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + _json(data) + b"\n\n"

        start_usage = {"input_tokens": usage[0], "output_tokens": 1}
        frames = [
            event(
                "message_start",
                {
                    "type": "message_start",
                    "message": self._message(req, [], None, start_usage),
                },
            ),
            event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            event("ping", {"type": "ping"}),
        ]
        frames += [
            event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": word},
                },
            )
            for word in _words(text)
        ]
        frames += [
            event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": usage[1]},
                },
            ),
            event("message_stop", {"type": "message_stop"}),
        ]
        return frames

    def error_body(self, status: int, message: str) -> tuple[Json, dict[str, str]]:
        error_type = _ANTHROPIC_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": error_type, "message": message}}, {}

    def error_frame(self, status: int, message: str) -> bytes:
        body, _ = self.error_body(status, message)
        return b"event: error\ndata: " + _json(body) + b"\n\n"

    def malformed_frame(self) -> bytes:
        return b"event: message_start\ndata: {not json\n\n"


_GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class GeminiFormat(WireFormat):
    name = "gemini"

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    def authenticate(self, req: RecordedRequest) -> Reply | None:
        given = req.headers.get("x-goog-api-key")
        if given is None:
            message = (
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API."
            )
            body, _ = self.error_body(403, message)
            return _error_reply(403, body)
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            body, _ = self.error_body(400, "API key not valid. Please pass a valid API key.")
            body["error"]["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }
            ]
            return _error_reply(400, body)
        return None

    def is_stream(self, req: RecordedRequest) -> bool:
        return req.path.endswith(":streamGenerateContent")

    def model(self, req: RecordedRequest) -> str:
        return unquote(req.path.rsplit("/", 1)[-1].split(":", 1)[0])

    def validate(self, req: RecordedRequest) -> Reply | None:
        problem = None
        if self.is_stream(req) and req.query.get("alt") != "sse":
            problem = "this fake only streams with alt=sse"
        elif not isinstance(req.json, dict) or not req.json.get("contents"):
            problem = "* GenerateContentRequest.contents: contents is not specified"
        if problem is None:
            return None
        body, _ = self.error_body(400, problem)
        return _error_reply(400, body)

    def prompt_texts(self, body: Json) -> list[str]:
        blocks = [body.get("systemInstruction") or {}, *body.get("contents", [])]
        return [str(p.get("text", "")) for b in blocks for p in b.get("parts", [])]

    def _response(
        self, req: RecordedRequest, text: str, finish: str | None, usage: Json | None
    ) -> Json:
        candidate: Json = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
        if finish:
            candidate["finishReason"] = finish
        body: Json = {"candidates": [candidate]}
        if usage is not None:
            body["usageMetadata"] = usage
        body["modelVersion"] = self.model(req)
        body["responseId"] = uuid.uuid4().hex[:22]
        return body

    def _usage(self, usage: tuple[int, int]) -> Json:
        return {
            "promptTokenCount": usage[0],
            "candidatesTokenCount": usage[1],
            "totalTokenCount": usage[0] + usage[1],
        }

    def answer(self, req: RecordedRequest, text: str, usage: tuple[int, int]) -> bytes:
        return _json(self._response(req, text, "STOP", self._usage(usage)))

    def frames(self, req: RecordedRequest, text: str, usage: tuple[int, int]) -> list[bytes]:
        words = _words(text) or [""]
        partial = {"promptTokenCount": usage[0], "totalTokenCount": usage[0]}
        frames = []
        for i, word in enumerate(words):
            last = i == len(words) - 1
            body = self._response(
                req, word, "STOP" if last else None, self._usage(usage) if last else partial
            )
            frames.append(b"data: " + _json(body) + b"\r\n\r\n")
        return frames

    def error_body(self, status: int, message: str) -> tuple[Json, dict[str, str]]:
        name = _GEMINI_STATUS.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")
        error: Json = {"code": status, "message": message, "status": name}
        if status == 429:
            error["details"] = [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}
            ]
        return {"error": error}, {}


_CORAL = "http://internal.amazon.com/coral/"
_BEDROCK_ERRORS = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}


def event_stream_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (total length, headers length, CRC32), string
    headers (type 7), payload, message CRC32."""
    encoded = b"".join(
        struct.pack("!B", len(name))
        + name.encode()
        + b"\x07"
        + struct.pack("!H", len(value.encode()))
        + value.encode()
        for name, value in headers.items()
    )
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack("!II", total, len(encoded))
    prelude += struct.pack("!I", zlib.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack("!I", zlib.crc32(message))


class BedrockFormat(WireFormat):
    name = "bedrock"
    stream_content_type = "application/vnd.amazon.eventstream"

    def __init__(self, access_key_id: str, secret_access_key: str, region: str) -> None:
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.region = region

    def _denied(self, error_type: str, message: str) -> Reply:
        return _error_reply(
            403,
            {"message": message},
            {"x-amzn-errortype": f"{error_type}:{_CORAL}com.amazon.coral.service/"},
        )

    def authenticate(self, req: RecordedRequest) -> Reply | None:
        auth = req.headers.get("authorization", "")
        if not auth.startswith("AWS4-HMAC-SHA256 ") or "x-amz-date" not in req.headers:
            return self._denied(
                "MissingAuthenticationTokenException", "Missing Authentication Token"
            )
        fields = dict(
            part.strip().split("=", 1) for part in auth.removeprefix("AWS4-HMAC-SHA256 ").split(",")
        )
        if fields.get("Credential", "").split("/", 1)[0] != self.access_key_id:
            return self._denied(
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        if not hmac.compare_digest(fields.get("Signature", ""), self._signature(req, fields)):
            return self._denied(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided. "
                "Check your AWS Secret Access Key and signing method.",
            )
        return None

    def _signature(self, req: RecordedRequest, fields: Mapping[str, str]) -> str:
        """Recompute SigV4 over what actually arrived, with botocore, for the signed headers."""
        signed = fields.get("SignedHeaders", "").split(";")
        headers = {name: req.headers.get(name, "") for name in signed}
        url = f"http://{req.headers.get('host', '')}{req.target}"
        request = AWSRequest(method=req.method, url=url, data=req.body, headers=headers)
        request.context["timestamp"] = req.headers["x-amz-date"]
        token = req.headers.get("x-amz-security-token")
        signer = SigV4Auth(
            Credentials(self.access_key_id, self.secret_access_key, token), "bedrock", self.region
        )
        canonical = signer.canonical_request(request)
        return str(signer.signature(signer.string_to_sign(request, canonical), request))

    def is_stream(self, req: RecordedRequest) -> bool:
        return req.path.endswith("/converse-stream")

    def model(self, req: RecordedRequest) -> str:
        return unquote(req.path.split("/")[2])

    def validate(self, req: RecordedRequest) -> Reply | None:
        body = req.json
        if isinstance(body, dict) and isinstance(body.get("messages"), list):
            for message in body["messages"]:
                if not all(isinstance(block, dict) for block in message.get("content", [None])):
                    break
            else:
                return None
        error, headers = self.error_body(
            400, "Malformed input request, please reformat your input and try again."
        )
        return _error_reply(400, error, headers)

    def prompt_texts(self, body: Json) -> list[str]:
        blocks = list(body.get("system", []))
        for message in body.get("messages", []):
            blocks += message.get("content", [])
        return [str(block.get("text", "")) for block in blocks]

    def _usage(self, usage: tuple[int, int]) -> Json:
        return {"inputTokens": usage[0], "outputTokens": usage[1], "totalTokens": sum(usage)}

    def answer(self, req: RecordedRequest, text: str, usage: tuple[int, int]) -> bytes:
        return _json(
            {
                "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
                "stopReason": "end_turn",
                "usage": self._usage(usage),
                "metrics": {"latencyMs": 1},
            }
        )

    def _event(self, name: str, payload: Json) -> bytes:
        headers = {
            ":event-type": name,
            ":content-type": "application/json",
            ":message-type": "event",
        }
        return event_stream_message(headers, _json(payload))

    def frames(self, req: RecordedRequest, text: str, usage: tuple[int, int]) -> list[bytes]:
        frames = [self._event("messageStart", {"role": "assistant"})]
        frames += [
            self._event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": word}})
            for word in _words(text)
        ]
        frames += [
            self._event("contentBlockStop", {"contentBlockIndex": 0}),
            self._event("messageStop", {"stopReason": "end_turn"}),
            self._event("metadata", {"usage": self._usage(usage), "metrics": {"latencyMs": 1}}),
        ]
        return frames

    def error_body(self, status: int, message: str) -> tuple[Json, dict[str, str]]:
        error_type = _BEDROCK_ERRORS.get(status, "InternalServerException")
        return {"message": message}, {
            "x-amzn-errortype": f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/"
        }

    def error_frame(self, status: int, message: str) -> bytes:
        error_type = _BEDROCK_ERRORS.get(status, "InternalServerException")
        headers = {
            ":exception-type": error_type[0].lower() + error_type[1:],
            ":content-type": "application/json",
            ":message-type": "exception",
        }
        return event_stream_message(headers, _json({"message": message}))

    def malformed_frame(self) -> bytes:
        frame = bytearray(self._event("messageStart", {"role": "assistant"}))
        frame[-1] ^= 0xFF  # a wrong message CRC
        return bytes(frame)


# --------------------------------------------------------------------------- the server
class FakeProvider:
    """``async with FakeProvider() as fake:`` — a fake provider on a free port at ``fake.url``.

    ``fake.script(Behaviour(status=429, headers={"retry-after": "1"}), Behaviour())`` queues
    behaviours for the next requests (any route, in order); requests beyond the script get a
    correct answer. ``fake.requests`` lists what arrived (when ``record`` is on).
    """

    def __init__(
        self,
        *,
        api_key: str = "fake-key",
        aws_access_key_id: str = "AKIDFAKEEXAMPLE",
        aws_secret_access_key: str = "fake-secret-access-key",
        region: str = "us-east-1",
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = True,
        reply_text: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.record = record
        self.reply_text = reply_text
        self.requests: list[RecordedRequest] = []
        self._queue: deque[Behaviour] = deque()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        openai = OpenAIFormat(api_key)
        self._formats: dict[str, WireFormat] = {
            "openai": openai,
            "azure_openai": AzureOpenAIFormat(api_key),
            "anthropic": AnthropicFormat(api_key),
            "gemini": GeminiFormat(api_key),
            "bedrock": BedrockFormat(aws_access_key_id, aws_secret_access_key, region),
        }

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def script(self, *behaviours: Behaviour) -> None:
        self._queue.extend(behaviours)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve_connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, drop open connections and wait for their handlers to end."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> FakeProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- HTTP/1.1 -------------------------------------------------------------------------
    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    break
                keep_alive = request.headers.get("connection", "").lower() != "close"
                if not await self._respond(request, writer) or not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels a handler: end quietly (Python 3.11's stream callback
            # would otherwise log the cancelled task as an error).
            writer.transport.abort()
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> RecordedRequest | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked(reader)
        else:
            body = b""
        path, _, query = target.partition("?")
        try:
            parsed: Any = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        return RecordedRequest(
            provider=self._route(method, path),
            method=method,
            target=target,
            path=path,
            query=dict(parse_qsl(query)),
            headers=headers,
            body=body,
            json=parsed,
        )

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)

    @staticmethod
    def _route(method: str, path: str) -> str:
        if method != "POST":
            return "unknown"
        if path.startswith("/openai/deployments/") and path.endswith("/chat/completions"):
            return "azure_openai"
        if path.endswith("/chat/completions"):
            return "openai"
        if path.endswith("/v1/messages"):
            return "anthropic"
        if path.startswith("/model/") and path.endswith(("/converse", "/converse-stream")):
            return "bedrock"
        if path.endswith((":generateContent", ":streamGenerateContent")):
            return "gemini"
        return "unknown"

    def _reply(self, request: RecordedRequest, behaviour: Behaviour) -> Reply:
        """The response for one request: a pure function of the request and the behaviour."""
        wire = self._formats.get(request.provider)
        if wire is None:
            return Reply(404, {"content-type": "text/plain"}, b"no such route in the fake\n")
        refusal = wire.authenticate(request) or wire.validate(request)
        if refusal is not None:
            return refusal
        if behaviour.status != 200:
            error, headers = wire.error_body(behaviour.status, f"fake {_phrase(behaviour.status)}")
            raw = _raw(behaviour.body) if behaviour.body is not None else _json(error)
            return _error_reply(behaviour.status, raw, {**headers, **behaviour.headers})
        text = (
            behaviour.text
            if behaviour.text is not None
            else (self.reply_text or f"fake answer from {wire.model(request)}")
        )
        prompt = wire.prompt_texts(request.json) if isinstance(request.json, dict) else []
        usage = (_count(prompt), len(_words(text)))
        if wire.is_stream(request):
            frames = wire.frames(request, text, usage)
            if behaviour.malformed:
                frames = [wire.malformed_frame()]
            elif behaviour.error_after_frames is not None:
                frames = frames[: behaviour.error_after_frames]
                frames.append(wire.error_frame(behaviour.error_status, "Overloaded"))
            cut = behaviour.cut_after_frames is not None
            if cut:
                frames = frames[: behaviour.cut_after_frames]
            headers = {"content-type": wire.stream_content_type, **behaviour.headers}
            return Reply(200, headers, frames=frames, close_after=cut)
        if behaviour.malformed:
            body = b'{"id": "broken", "choices": ['
        elif behaviour.body is not None:
            body = _raw(behaviour.body)
        else:
            body = wire.answer(request, text, usage)
        return Reply(200, {"content-type": "application/json", **behaviour.headers}, body)

    async def _respond(self, request: RecordedRequest, writer: asyncio.StreamWriter) -> bool:
        """Write the response; False when the connection must not be reused."""
        if self.record:
            self.requests.append(request)
        behaviour = self._queue.popleft() if self._queue else _DEFAULT
        if behaviour.delay_s:
            await asyncio.sleep(behaviour.delay_s)
        if behaviour.reset:
            _reset(writer)
            return False
        reply = self._reply(request, behaviour)
        head = [f"HTTP/1.1 {reply.status} {_phrase(reply.status)}"]
        head += [f"{name}: {value}" for name, value in reply.headers.items()]
        if reply.frames is None:
            head.append(f"content-length: {len(reply.body)}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body)
            await writer.drain()
            return True
        head.append("transfer-encoding: chunked")
        out = [("\r\n".join(head) + "\r\n\r\n").encode("latin-1")]
        out += [b"%x\r\n%s\r\n" % (len(frame), frame) for frame in reply.frames]
        if not reply.close_after:
            out.append(b"0\r\n\r\n")
        writer.write(b"".join(out))
        await writer.drain()
        if reply.close_after:
            writer.close()
            return False
        return True


_DEFAULT = Behaviour()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, as a crashed or overloaded proxy does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    on_ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
    **options: Any,
) -> None:
    """Run a fake provider (no recording) until ``stop`` is set or the task is cancelled.
    ``on_ready`` receives its base URL. For benchmarks: correct answers with zero latency."""
    options.setdefault("record", False)
    async with FakeProvider(host=host, port=port, **options) as fake:
        if on_ready is not None:
            on_ready(fake.url)
        await (stop.wait() if stop is not None else asyncio.Event().wait())
