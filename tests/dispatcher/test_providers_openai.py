"""OpenAI and Azure OpenAI chat completions: exact requests, responses and error bodies."""

from __future__ import annotations

import httpx
import orjson
import pytest

from pointsman_dispatcher.fake_provider import Behaviour, FakeProvider
from pointsman_dispatcher.providers import provider_for
from pointsman_dispatcher.providers.base import ChatMessage, ChatRequest, ProviderError
from pointsman_dispatcher.providers.openai import OpenAIStreamDecoder, max_tokens_field
from tests.dispatcher.conftest import API_KEY, TargetFactory

CHAT = ChatRequest(
    (
        ChatMessage("user", "hi"),
        ChatMessage("assistant", "hello, how can I help?"),
        ChatMessage("user", "tell me a joke"),
    ),
    system="You are terse.",
    max_tokens=64,
    temperature=0.2,
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello, how can I help?"},
    {"role": "user", "content": "tell me a joke"},
]


async def test_openai_request_is_exact(
    fake_provider: FakeProvider, provider_client: httpx.AsyncClient, provider_target: TargetFactory
) -> None:
    await provider_for("openai", provider_client).complete(provider_target("openai"), CHAT)
    [sent] = fake_provider.requests
    assert (sent.method, sent.target) == ("POST", "/v1/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["content-type"] == "application/json"
    assert "api-key" not in sent.headers
    assert sent.json == {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "max_tokens": 64,
        "temperature": 0.2,
    }


async def test_openai_stream_asks_for_usage(
    fake_provider: FakeProvider, provider_client: httpx.AsyncClient, provider_target: TargetFactory
) -> None:
    request = ChatRequest(CHAT.messages, system=CHAT.system, max_tokens=64, stream=True)
    result = await provider_for("openai", provider_client).complete(
        provider_target("openai"), request
    )
    [sent] = fake_provider.requests
    assert sent.json["stream"] is True
    assert sent.json["stream_options"] == {"include_usage": True}
    assert "temperature" not in sent.json
    assert sent.headers["accept"] == "text/event-stream"
    assert result.input_tokens == 13 and result.output_tokens == 4
    assert result.provider_model == "gpt-4o-mini"


async def test_compatible_server_without_key_sends_no_authorization(
    fake_provider: FakeProvider, provider_client: httpx.AsyncClient, provider_target: TargetFactory
) -> None:
    target = provider_target("openai", api_key=None, extra_headers=(("x-title", "pointsman"),))
    with pytest.raises(ProviderError) as caught:
        await provider_for("openai", provider_client).complete(target, CHAT)
    assert caught.value.kind == "auth"  # the fake wants a key; a local server would not
    [sent] = fake_provider.requests
    assert "authorization" not in sent.headers
    assert sent.headers["x-title"] == "pointsman"


async def test_azure_request_is_exact(
    fake_provider: FakeProvider, provider_client: httpx.AsyncClient, provider_target: TargetFactory
) -> None:
    result = await provider_for("azure_openai", provider_client).complete(
        provider_target("azure_openai"), CHAT
    )
    [sent] = fake_provider.requests
    assert sent.target == "/openai/deployments/prod-gpt4o/chat/completions?api-version=2024-10-21"
    assert sent.headers["api-key"] == API_KEY
    assert "authorization" not in sent.headers
    assert sent.json == {"messages": MESSAGES, "max_tokens": 64, "temperature": 0.2}
    assert result.text == "fake answer from prod-gpt4o"


def test_max_tokens_field(provider_target: TargetFactory) -> None:
    assert max_tokens_field(provider_target("openai")) == "max_tokens"  # a compatible server
    official = provider_target("openai", base_url="https://api.openai.com/v1")
    assert max_tokens_field(official) == "max_completion_tokens"
    reasoning = provider_target("azure_openai", deployment="o3-mini")
    assert max_tokens_field(reasoning) == "max_completion_tokens"
    assert max_tokens_field(provider_target("azure_openai")) == "max_tokens"


async def test_retry_after_ms_wins_over_retry_after(
    fake_provider: FakeProvider, provider_client: httpx.AsyncClient, provider_target: TargetFactory
) -> None:
    fake_provider.script(
        Behaviour(status=429, headers={"retry-after-ms": "1250", "retry-after": "2"})
    )
    with pytest.raises(ProviderError) as caught:
        await provider_for("azure_openai", provider_client).complete(
            provider_target("azure_openai"), CHAT
        )
    assert (caught.value.kind, caught.value.retry_after_s) == ("rate_limited", 1.25)


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (
            429,
            {
                "error": {
                    "message": "You exceeded your current quota",
                    "type": "insufficient_quota",
                    "param": None,
                    "code": "insufficient_quota",
                }
            },
            "auth",
        ),
        (
            400,
            {
                "error": {
                    "message": "The response was filtered",
                    "type": None,
                    "param": "prompt",
                    "code": "content_filter",
                    "status": 400,
                }
            },
            "content_filter",
        ),
        (
            400,
            {
                "error": {
                    "message": "max_tokens is too large",
                    "type": "invalid_request_error",
                    "param": "max_tokens",
                    "code": None,
                }
            },
            "bad_request",
        ),
        (
            404,
            {"error": {"code": "DeploymentNotFound", "message": "no such deployment"}},
            "bad_request",
        ),
        (502, b"<html>Bad Gateway</html>", "server_error"),
    ],
)
async def test_error_bodies(
    status: int,
    body: object,
    kind: str,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    fake_provider.script(Behaviour(status=status, body=raw))
    with pytest.raises(ProviderError) as caught:
        await provider_for("openai", provider_client).complete(provider_target("openai"), CHAT)
    assert (caught.value.kind, caught.value.http_status) == (kind, status)


async def test_refusal_without_content_is_content_filter(
    fake_provider: FakeProvider, provider_client: httpx.AsyncClient, provider_target: TargetFactory
) -> None:
    refusal = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "refusal": "I can't help."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }
    fake_provider.script(Behaviour(body=refusal))
    with pytest.raises(ProviderError) as caught:
        await provider_for("openai", provider_client).complete(provider_target("openai"), CHAT)
    assert (caught.value.kind, caught.value.http_status) == ("content_filter", 200)


def test_stream_decoder_reads_usage_chunk_and_done() -> None:
    decoder = OpenAIStreamDecoder("openai")
    frames = (
        b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini",'
        b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'
        b'\n\ndata: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini",'
        b'"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'
        b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini",'
        b'"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"length"}]}\n\n'
        b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],'
        b'"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}\n\n'
    )
    deltas = [d for i in range(0, len(frames), 7) for d in decoder.feed(frames[i : i + 7])]
    assert "".join(deltas) == "Hello"
    assert not decoder.finished
    assert decoder.feed(b"data: [DONE]\n\n") == []
    assert decoder.finished
    reply = decoder.reply()
    assert (reply.finish_reason, reply.input_tokens, reply.output_tokens) == ("length", 9, 2)
