"""What every adapter must do the same way: fault mapping, committed streams, no secrets.

Each fault is injected by the fake provider in the provider's own wire format and must come
back as the same ProviderError kind from all five adapters.
"""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from pointsman_dispatcher.fake_provider import Behaviour, FakeProvider
from pointsman_dispatcher.providers import make_client, provider_for
from pointsman_dispatcher.providers.anthropic import AnthropicProvider
from pointsman_dispatcher.providers.base import ChatMessage, ChatRequest, ProviderError
from pointsman_dispatcher.providers.bedrock import BedrockProvider
from pointsman_dispatcher.providers.errors import kind_for_status, parse_retry_after, scrub
from pointsman_dispatcher.providers.gemini import GeminiProvider
from pointsman_dispatcher.providers.openai import OpenAIProvider
from pointsman_dispatcher.providers.sse import SseEvent, SseParser
from tests.dispatcher.conftest import (
    API_KEY,
    AWS_ACCESS_KEY_ID,
    AWS_SECRET,
    AWS_SESSION_TOKEN,
    PROVIDERS,
    TargetFactory,
)

SECRETS = (API_KEY, AWS_SECRET, AWS_SESSION_TOKEN, AWS_ACCESS_KEY_ID)
REQUEST = ChatRequest((ChatMessage("user", "what is the capital of France?"),), system="be brief")
STREAM = ChatRequest(REQUEST.messages, system="be brief", stream=True)
# Frames after which the fake's stream has carried some text / no text yet.
FRAMES_WITH_TEXT = {"openai": 3, "azure_openai": 3, "anthropic": 5, "bedrock": 3, "gemini": 2}
FRAMES_WITHOUT_TEXT = {"openai": 1, "azure_openai": 1, "anthropic": 3, "bedrock": 1, "gemini": 0}
# The error each fake sends inside a stream, and the kind it must map to. OpenAI's in-stream
# error carries no status, only ``type: server_error``.
IN_STREAM_ERRORS = {
    "openai": (503, "server_error"),
    "azure_openai": (503, "server_error"),
    "anthropic": (529, "overloaded"),  # event: error, overloaded_error
    "bedrock": (429, "rate_limited"),  # :exception-type throttlingException
    "gemini": (503, "overloaded"),  # status UNAVAILABLE
}


def assert_no_secret(error: ProviderError) -> None:
    for text in (str(error), repr(error), error.message):
        for secret in SECRETS:
            assert secret not in text


async def fail(
    fake: FakeProvider,
    client: httpx.AsyncClient,
    target: TargetFactory,
    provider: str,
    behaviour: Behaviour,
    request: ChatRequest = REQUEST,
    **overrides: object,
) -> tuple[ProviderError, list[str]]:
    fake.script(behaviour)
    deltas: list[str] = []
    with pytest.raises(ProviderError) as caught:
        await provider_for(provider, client).complete(
            target(provider, **overrides), request, on_delta=deltas.append
        )
    assert_no_secret(caught.value)
    return caught.value, deltas


# -- pure pieces --------------------------------------------------------------------------------
def test_sse_parser_handles_split_frames_and_every_line_ending() -> None:
    stream = "event: a\r\ndata: 1\r\n\r\n: comment\ndata: x\ndata: y\n\nid: 7\rdata: z\r\r"
    for size in (1, 2, 3, 5, len(stream)):
        parser = SseParser()
        events = []
        for i in range(0, len(stream), size):
            events += parser.feed(stream[i : i + size])
        events += parser.close()
        assert events == [
            SseEvent("a", "1"),
            SseEvent("message", "x\ny"),
            SseEvent("message", "z", "7"),
        ], size


def test_sse_parser_drops_a_frame_without_its_blank_line() -> None:
    parser = SseParser()
    assert parser.feed('data: {"a": 1}\n') == []
    assert parser.close() == []


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "bad_request"),
        (401, "auth"),
        (403, "auth"),
        (404, "bad_request"),
        (408, "timeout"),
        (422, "bad_request"),
        (429, "rate_limited"),
        (500, "server_error"),
        (502, "server_error"),
        (503, "overloaded"),
        (504, "timeout"),
        (529, "overloaded"),
    ],
)
def test_kind_for_status(status: int, kind: str) -> None:
    assert kind_for_status(status) == kind


def test_parse_retry_after_forms() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after({"retry-after": "3"}, now) == 3.0
    assert parse_retry_after({"retry-after": "0.5"}, now) == 0.5
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}, now) == 1.5
    assert parse_retry_after({"retry-after": "Wed, 01 Jan 2025 12:00:30 GMT"}, now) == 30.0
    assert parse_retry_after({"retry-after": "Wed, 01 Jan 2025 11:00:00 GMT"}, now) == 0.0
    assert parse_retry_after({"retry-after": "soon"}, now) is None
    assert parse_retry_after({}, now) is None


def test_scrub_removes_known_secrets_and_key_shapes() -> None:
    text = (
        f"bad key {API_KEY} and sk-proj-abc123def456 and Bearer abcdefghijkl and AIzaSyA1234567890"
    )
    cleaned = scrub(text, [API_KEY])
    assert API_KEY not in cleaned
    assert "sk-proj-abc123def456" not in cleaned
    assert "abcdefghijkl" not in cleaned
    assert "AIzaSyA1234567890" not in cleaned
    assert len(scrub("x" * 1000, [])) < 400


def test_provider_for_picks_the_adapter() -> None:
    client = make_client()
    assert isinstance(provider_for("openai", client), OpenAIProvider)
    assert isinstance(provider_for("azure_openai", client), OpenAIProvider)
    assert isinstance(provider_for("anthropic", client), AnthropicProvider)
    assert isinstance(provider_for("bedrock", client), BedrockProvider)
    assert isinstance(provider_for("gemini", client), GeminiProvider)
    with pytest.raises(ValueError, match="unknown provider"):
        provider_for("cohere", client)


# -- every adapter against the fake --------------------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stream", [False, True])
async def test_answers_and_usage(
    provider: str,
    stream: bool,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    fake_provider.script(Behaviour(text="Paris is the capital."))
    deltas: list[str] = []
    result = await provider_for(provider, provider_client).complete(
        provider_target(provider), STREAM if stream else REQUEST, on_delta=deltas.append
    )
    assert result.text == "Paris is the capital."
    assert result.finish_reason == "stop"
    assert (result.input_tokens, result.output_tokens) == (8, 4)  # prompt words incl. system
    assert result.http_status == 200
    assert result.streamed is stream
    assert result.latency_ms > 0
    assert deltas == (["Paris ", "is ", "the ", "capital."] if stream else [])


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_429_with_retry_after(
    provider: str,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    behaviour = Behaviour(status=429, headers={"retry-after": "3"})
    error, _ = await fail(fake_provider, provider_client, provider_target, provider, behaviour)
    assert error.kind == "rate_limited"
    assert error.retryable
    assert error.http_status == 429
    # Gemini's RetryInfo in the body (7s in the fake) is more specific than the header.
    assert error.retry_after_s == (7.0 if provider == "gemini" else 3.0)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("status", "kind"), [(500, "server_error"), (503, "overloaded")])
async def test_server_errors(
    provider: str,
    status: int,
    kind: str,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    behaviour = Behaviour(status=status)
    error, _ = await fail(fake_provider, provider_client, provider_target, provider, behaviour)
    assert (error.kind, error.http_status, error.retryable) == (kind, status, True)
    assert error.retry_after_s is None


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stream", [False, True])
async def test_timeout(
    provider: str,
    stream: bool,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    error, _ = await fail(
        fake_provider,
        provider_client,
        provider_target,
        provider,
        Behaviour(delay_s=2.0),
        STREAM if stream else REQUEST,
        timeout_s=0.2,
    )
    assert error.kind == "timeout"
    assert 150 < error.latency_ms < 1500
    assert not error.committed


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stream", [False, True])
async def test_connection_reset(
    provider: str,
    stream: bool,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    request = STREAM if stream else REQUEST
    behaviour = Behaviour(reset=True)
    error, _ = await fail(
        fake_provider, provider_client, provider_target, provider, behaviour, request
    )
    assert (error.kind, error.committed) == ("connection", False)


async def test_connection_refused(
    provider_client: httpx.AsyncClient, provider_target: TargetFactory
) -> None:
    target = provider_target("openai", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ProviderError) as caught:
        await provider_for("openai", provider_client).complete(target, REQUEST)
    assert caught.value.kind == "connection"


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_stream_cut_after_text_is_committed(
    provider: str,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    behaviour = Behaviour(cut_after_frames=FRAMES_WITH_TEXT[provider])
    error, deltas = await fail(
        fake_provider, provider_client, provider_target, provider, behaviour, STREAM
    )
    assert error.kind == "cut_stream"
    assert error.committed
    assert deltas and error.partial_text == "".join(deltas)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_stream_cut_before_text_is_not_committed(
    provider: str,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    behaviour = Behaviour(cut_after_frames=FRAMES_WITHOUT_TEXT[provider])
    error, deltas = await fail(
        fake_provider, provider_client, provider_target, provider, behaviour, STREAM
    )
    assert (error.kind, error.committed, error.partial_text, deltas) == (
        "cut_stream",
        False,
        "",
        [],
    )


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_error_frame_inside_a_stream(
    provider: str,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    status, kind = IN_STREAM_ERRORS[provider]
    behaviour = Behaviour(error_after_frames=FRAMES_WITH_TEXT[provider], error_status=status)
    error, deltas = await fail(
        fake_provider, provider_client, provider_target, provider, behaviour, STREAM
    )
    assert error.kind == kind
    assert error.committed and error.partial_text == "".join(deltas) != ""


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stream", [False, True])
async def test_malformed_body(
    provider: str,
    stream: bool,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    request = STREAM if stream else REQUEST
    behaviour = Behaviour(malformed=True)
    error, _ = await fail(
        fake_provider, provider_client, provider_target, provider, behaviour, request
    )
    assert (error.kind, error.http_status, error.retryable) == ("invalid_response", 200, False)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_wrong_credentials_are_auth_errors_without_the_key(
    provider: str,
    fake_provider: FakeProvider,
    provider_client: httpx.AsyncClient,
    provider_target: TargetFactory,
) -> None:
    from pydantic import SecretStr

    from pointsman_dispatcher.providers.base import AwsCredentials

    wrong = "sk-wrong-SECRET-0123456789abcdef"
    if provider == "bedrock":
        overrides: dict[str, object] = {
            "aws": AwsCredentials(AWS_ACCESS_KEY_ID, SecretStr(wrong), SecretStr(AWS_SESSION_TOKEN))
        }
    else:
        overrides = {"api_key": SecretStr(wrong)}
    fake_provider.script(Behaviour())
    with pytest.raises(ProviderError) as caught:
        await provider_for(provider, provider_client).complete(
            provider_target(provider, **overrides), REQUEST
        )
    error = caught.value
    assert error.kind == "auth"
    assert not error.retryable
    for text in (str(error), repr(error)):
        assert wrong not in text and wrong[:12] not in text
        assert API_KEY not in text and AWS_SECRET not in text


@pytest.mark.parametrize("provider", PROVIDERS)
def test_prepared_call_repr_holds_no_secret(provider: str, provider_target: TargetFactory) -> None:
    from pointsman_dispatcher.providers import anthropic, bedrock, gemini, openai

    builders = {
        "openai": openai.build_call,
        "azure_openai": openai.build_call,
        "anthropic": anthropic.build_call,
        "bedrock": bedrock.build_call,
        "gemini": gemini.build_call,
    }
    target = provider_target(provider)
    call = builders[provider](target, REQUEST)
    assert call.headers  # the credentials are there, for the wire only
    for text in (repr(call), repr(target)):
        for secret in (API_KEY, AWS_SECRET, AWS_SESSION_TOKEN):
            assert secret not in text
