"""Anthropic Messages: exact requests, SSE events with usage, 529 and in-stream errors."""

from __future__ import annotations

import httpx
import pytest

from pointsman_dispatcher.fake_provider import Behaviour, FakeProvider
from pointsman_dispatcher.providers import provider_for
from pointsman_dispatcher.providers.anthropic import AnthropicStreamDecoder
from pointsman_dispatcher.providers.base import ChatMessage, ChatRequest, ProviderError
from tests.dispatcher.conftest import API_KEY, TargetFactory

CHAT = ChatRequest(
    (
        ChatMessage("system", "Answer in French."),
        ChatMessage("user", "hi"),
        ChatMessage("assistant", "bonjour"),
        ChatMessage("user", "a joke?"),
    ),
    system="You are terse.",
    max_tokens=100,
    temperature=0.0,
)


@pytest.mark.parametrize("stream", [False, True])
async def test_request_is_exact(
    stream: bool,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    request = ChatRequest(CHAT.messages, CHAT.system, CHAT.max_tokens, CHAT.temperature, stream)
    result = await provider_for("anthropic", provider_client).complete(
        provider_target("anthropic"), request
    )
    [sent] = fake_provider.requests
    assert sent.target == "/v1/messages"
    assert sent.headers["x-api-key"] == API_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    expected = {
        "model": "claude-3-5-haiku-20241022",
        "max_tokens": 100,
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "bonjour"},
            {"role": "user", "content": "a joke?"},
        ],
        "system": "You are terse.\n\nAnswer in French.",
        "temperature": 0.0,
    }
    if stream:
        expected["stream"] = True
    assert sent.json == expected
    assert (result.input_tokens, result.output_tokens) == (10, 4)
    assert result.provider_model == "claude-3-5-haiku-20241022"


async def test_version_and_base_url_with_v1(
    fake_provider: FakeProvider, provider_client: httpx.AsyncClient, provider_target: TargetFactory
) -> None:
    target = provider_target(
        "anthropic", base_url=fake_provider.url + "/v1/", api_version="2024-01-01"
    )
    await provider_for("anthropic", provider_client).complete(target, CHAT)
    [sent] = fake_provider.requests
    assert sent.target == "/v1/messages"
    assert sent.headers["anthropic-version"] == "2024-01-01"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (529, "overloaded"),
        (429, "rate_limited"),
        (413, "bad_request"),
        (403, "auth"),
        (500, "server_error"),
    ],
)
async def test_error_types(
    status: int,
    kind: str,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    fake_provider.script(Behaviour(status=status, headers={"retry-after": "4"}))
    with pytest.raises(ProviderError) as caught:
        await provider_for("anthropic", provider_client).complete(
            provider_target("anthropic"), CHAT
        )
    error = caught.value
    assert (error.kind, error.http_status, error.retry_after_s) == (kind, status, 4.0)
    if kind != "auth":
        assert "fake" in error.message  # the provider's message is kept, scrubbed


async def test_overloaded_event_mid_stream_is_committed(
    fake_provider: FakeProvider, provider_client: httpx.AsyncClient, provider_target: TargetFactory
) -> None:
    fake_provider.script(Behaviour(error_after_frames=5, error_status=529))
    deltas: list[str] = []
    request = ChatRequest(CHAT.messages, stream=True)
    with pytest.raises(ProviderError) as caught:
        await provider_for("anthropic", provider_client).complete(
            provider_target("anthropic"), request, on_delta=deltas.append
        )
    error = caught.value
    assert (error.kind, error.committed, error.partial_text) == ("overloaded", True, "fake answer ")
    assert deltas == ["fake ", "answer "]


def test_decoder_counts_cache_tokens_and_cumulative_usage() -> None:
    decoder = AnthropicStreamDecoder()
    stream = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
        b'"type":"message","role":"assistant","model":"claude-x","content":[],"stop_reason":null,'
        b'"usage":{"input_tokens":12,"cache_creation_input_tokens":100,'
        b'"cache_read_input_tokens":50,"output_tokens":1}}}\n\n'
        b'event: ping\ndata: {"type": "ping"}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"Hi"}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        b'"max_tokens","stop_sequence":null},"usage":{"output_tokens":15}}\n\n'
    )
    assert decoder.feed(stream) == ["Hi"]
    assert not decoder.finished
    decoder.feed(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert decoder.finished
    reply = decoder.reply()
    assert (reply.input_tokens, reply.output_tokens, reply.finish_reason) == (162, 15, "length")
