"""Bedrock Converse / ConverseStream: SigV4 by botocore (verified by the fake), event-stream
decoding, AWS error types."""

from __future__ import annotations

import httpx
import pytest

from pointsman_dispatcher.fake_provider import Behaviour, FakeProvider, event_stream_message
from pointsman_dispatcher.providers import provider_for
from pointsman_dispatcher.providers.base import ChatMessage, ChatRequest, ProviderError
from pointsman_dispatcher.providers.bedrock import BedrockStreamDecoder, endpoint
from tests.dispatcher.conftest import AWS_ACCESS_KEY_ID, AWS_SESSION_TOKEN, REGION, TargetFactory

CHAT = ChatRequest(
    (ChatMessage("user", "hi"), ChatMessage("assistant", "hello"), ChatMessage("user", "joke?")),
    system="You are terse.",
    max_tokens=200,
    temperature=0.3,
)


@pytest.mark.parametrize("stream", [False, True])
async def test_request_is_exact_and_signed(
    stream: bool,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    request = ChatRequest(CHAT.messages, CHAT.system, CHAT.max_tokens, CHAT.temperature, stream)
    result = await provider_for("bedrock", provider_client).complete(
        provider_target("bedrock"), request
    )
    [sent] = fake_provider.requests
    operation = "converse-stream" if stream else "converse"
    assert sent.target == f"/model/anthropic.claude-3-haiku-20240307-v1%3A0/{operation}"
    auth = sent.headers["authorization"]
    assert auth.startswith(f"AWS4-HMAC-SHA256 Credential={AWS_ACCESS_KEY_ID}/")
    assert f"/{REGION}/bedrock/aws4_request" in auth
    assert "x-amz-date" in sent.headers
    assert sent.headers["x-amz-security-token"] == AWS_SESSION_TOKEN
    assert sent.json == {
        "messages": [
            {"role": "user", "content": [{"text": "hi"}]},
            {"role": "assistant", "content": [{"text": "hello"}]},
            {"role": "user", "content": [{"text": "joke?"}]},
        ],
        "system": [{"text": "You are terse."}],
        "inferenceConfig": {"maxTokens": 200, "temperature": 0.3},
    }
    # The fake recomputed the signature with botocore over what arrived: it answered.
    assert result.text == "fake answer from anthropic.claude-3-haiku-20240307-v1:0"
    assert (result.input_tokens, result.output_tokens) == (6, 4)


async def test_wrong_region_fails_signature(
    fake_provider: FakeProvider, provider_client: httpx.AsyncClient, provider_target: TargetFactory
) -> None:
    with pytest.raises(ProviderError) as caught:
        await provider_for("bedrock", provider_client).complete(
            provider_target("bedrock", region="us-west-2"), CHAT
        )
    assert (caught.value.kind, caught.value.http_status) == ("auth", 403)
    assert "InvalidSignatureException" in caught.value.message


def test_endpoint_from_region(provider_target: TargetFactory) -> None:
    target = provider_target("bedrock", base_url="", region="us-east-1")
    assert endpoint(target) == "https://bedrock-runtime.us-east-1.amazonaws.com"


@pytest.mark.parametrize(
    ("status", "error_type", "kind"),
    [
        (429, "ThrottlingException", "rate_limited"),
        (400, "ServiceQuotaExceededException", "rate_limited"),
        (503, "ServiceUnavailableException", "overloaded"),
        (408, "ModelTimeoutException", "timeout"),
        (424, "ModelErrorException", "server_error"),
        (400, "ValidationException", "bad_request"),
        (403, "AccessDeniedException", "auth"),
    ],
)
async def test_error_types(
    status: int,
    error_type: str,
    kind: str,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    header = {
        "x-amzn-errortype": f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/"
    }
    fake_provider.script(Behaviour(status=status, body={"message": "nope"}, headers=header))
    with pytest.raises(ProviderError) as caught:
        await provider_for("bedrock", provider_client).complete(provider_target("bedrock"), CHAT)
    assert (caught.value.kind, caught.value.http_status) == (kind, status)
    assert error_type in caught.value.message


async def test_error_type_from_body_when_no_header(
    fake_provider: FakeProvider, provider_client: httpx.AsyncClient, provider_target: TargetFactory
) -> None:
    body = {"__type": "com.amazon.coral.availability#ThrottlingException", "message": "slow down"}
    fake_provider.script(Behaviour(status=400, body=body, headers={"x-amzn-errortype": ""}))
    with pytest.raises(ProviderError) as caught:
        await provider_for("bedrock", provider_client).complete(provider_target("bedrock"), CHAT)
    assert caught.value.kind == "rate_limited"


def test_decoder_reads_split_event_stream_and_exceptions() -> None:
    def event(name: str, payload: bytes) -> bytes:
        headers = {
            ":event-type": name,
            ":content-type": "application/json",
            ":message-type": "event",
        }
        return event_stream_message(headers, payload)

    stream = (
        event("messageStart", b'{"role":"assistant"}')
        + event("contentBlockDelta", b'{"contentBlockIndex":0,"delta":{"text":"Hi"},"p":"abc"}')
        + event("messageStop", b'{"stopReason":"max_tokens"}')
        + event("metadata", b'{"usage":{"inputTokens":5,"outputTokens":1,"totalTokens":6}}')
    )
    decoder = BedrockStreamDecoder()
    deltas = [d for i in range(0, len(stream), 5) for d in decoder.feed(stream[i : i + 5])]
    assert deltas == ["Hi"] and decoder.finished
    reply = decoder.reply()
    assert (reply.finish_reason, reply.input_tokens, reply.output_tokens) == ("length", 5, 1)

    throttled = event_stream_message(
        {
            ":exception-type": "throttlingException",
            ":content-type": "application/json",
            ":message-type": "exception",
        },
        b'{"message":"Too many requests"}',
    )
    with pytest.raises(ProviderError) as caught:
        BedrockStreamDecoder().feed(throttled)
    assert caught.value.kind == "rate_limited"
