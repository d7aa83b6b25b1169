"""Gemini generateContent / streamGenerateContent?alt=sse: requests, usage, google.rpc errors."""

from __future__ import annotations

import httpx
import pytest

from pointsman_dispatcher.fake_provider import Behaviour, FakeProvider
from pointsman_dispatcher.providers import provider_for
from pointsman_dispatcher.providers.base import ChatMessage, ChatRequest, ProviderError
from pointsman_dispatcher.providers.gemini import GeminiStreamDecoder
from tests.dispatcher.conftest import API_KEY, TargetFactory

CHAT = ChatRequest(
    (ChatMessage("user", "hi"), ChatMessage("assistant", "hello"), ChatMessage("user", "joke?")),
    system="You are terse.",
    max_tokens=77,
    temperature=0.5,
)


@pytest.mark.parametrize("stream", [False, True])
async def test_request_is_exact(
    stream: bool,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    request = ChatRequest(CHAT.messages, CHAT.system, CHAT.max_tokens, CHAT.temperature, stream)
    result = await provider_for("gemini", provider_client).complete(
        provider_target("gemini"), request
    )
    [sent] = fake_provider.requests
    if stream:
        assert sent.target == "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
    else:
        assert sent.target == "/v1beta/models/gemini-2.0-flash:generateContent"
    assert sent.headers["x-goog-api-key"] == API_KEY
    assert "key" not in sent.query  # never in the URL, where logs and proxies would see it
    assert sent.json == {
        "contents": [
            {"role": "user", "parts": [{"text": "hi"}]},
            {"role": "model", "parts": [{"text": "hello"}]},
            {"role": "user", "parts": [{"text": "joke?"}]},
        ],
        "systemInstruction": {"parts": [{"text": "You are terse."}]},
        "generationConfig": {"maxOutputTokens": 77, "temperature": 0.5},
    }
    assert (result.input_tokens, result.output_tokens) == (6, 4)
    assert result.provider_model == "gemini-2.0-flash"


async def test_resource_exhausted_uses_retry_info(
    fake_provider: FakeProvider, provider_client: httpx.AsyncClient, provider_target: TargetFactory
) -> None:
    body = {
        "error": {
            "code": 429,
            "message": "Resource has been exhausted (e.g. check quota).",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "13.5s"}
            ],
        }
    }
    fake_provider.script(Behaviour(status=429, body=body))
    with pytest.raises(ProviderError) as caught:
        await provider_for("gemini", provider_client).complete(provider_target("gemini"), CHAT)
    assert (caught.value.kind, caught.value.retry_after_s) == ("rate_limited", 13.5)
    assert "RESOURCE_EXHAUSTED" in caught.value.message


async def test_missing_key_is_auth(
    fake_provider: FakeProvider, provider_client: httpx.AsyncClient, provider_target: TargetFactory
) -> None:
    with pytest.raises(ProviderError) as caught:
        await provider_for("gemini", provider_client).complete(
            provider_target("gemini", api_key=None), CHAT
        )
    assert (caught.value.kind, caught.value.http_status) == ("auth", 403)


async def test_blocked_prompt_is_content_filter(
    fake_provider: FakeProvider, provider_client: httpx.AsyncClient, provider_target: TargetFactory
) -> None:
    blocked = {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
    }
    fake_provider.script(Behaviour(body=blocked))
    with pytest.raises(ProviderError) as caught:
        await provider_for("gemini", provider_client).complete(provider_target("gemini"), CHAT)
    assert caught.value.kind == "content_filter"


def test_decoder_skips_thoughts_and_bills_them_as_output() -> None:
    decoder = GeminiStreamDecoder()
    frames = (
        b'data: {"candidates":[{"content":{"parts":[{"text":"thinking","thought":true},'
        b'{"text":"Hel"}],"role":"model"},"index":0}],"modelVersion":"gemini-2.5-flash"}\r\n\r\n'
        b'data: {"candidates":[{"content":{"parts":[{"text":"lo"}],"role":"model"},'
        b'"finishReason":"SAFETY","index":0}],"usageMetadata":{"promptTokenCount":3,'
        b'"candidatesTokenCount":2,"thoughtsTokenCount":40,"totalTokenCount":45}}\r\n\r\n'
    )
    assert decoder.feed(frames) == ["Hel", "lo"]
    assert decoder.finished
    reply = decoder.reply()
    assert (reply.text, reply.finish_reason) == ("Hello", "content_filter")
    assert (reply.input_tokens, reply.output_tokens, reply.model) == (3, 42, "gemini-2.5-flash")
