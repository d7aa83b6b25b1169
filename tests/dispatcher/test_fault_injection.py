"""The chain executor with the real adapters, over real HTTP, against scripted provider faults.

``test_executor.py`` drives the executor through in-process stand-ins on a fake clock; here the
same decisions are checked end to end: the real adapters on a pooled httpx client talk to
:class:`FakeProvider` servers (the providers' exact wire formats) that inject the faults, and
time is real (waits of at most about a second). Two servers stand for two endpoints whenever a
test needs one model failing and another healthy, so each server's recorded requests show which
endpoint the chain actually called.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr

from pointsman_dispatcher.cost import Price
from pointsman_dispatcher.executor import (
    Budget,
    Candidate,
    Execution,
    RetryPolicy,
    execute,
    public_endpoint,
)
from pointsman_dispatcher.fake_provider import (
    Behaviour,
    FakeProvider,
    OpenAIFormat,
    RecordedRequest,
)
from pointsman_dispatcher.providers import provider_for
from pointsman_dispatcher.providers.base import (
    ChatMessage,
    ChatRequest,
    Provider,
)
from pointsman_dispatcher.resilience import BreakerBoard, BreakerSettings, ModelLimits
from tests.dispatcher.conftest import (
    API_KEY,
    AWS_ACCESS_KEY_ID,
    AWS_SECRET,
    AWS_SESSION_TOKEN,
    PROVIDERS,
    REGION,
    TargetFactory,
)

WRONG_KEY = "sk-wrong-SECRET-00112233445566778899"
SECRETS = (API_KEY, AWS_SECRET, AWS_SESSION_TOKEN, AWS_ACCESS_KEY_ID, WRONG_KEY)
PRICE = Price(0.15, 0.6)
REQUEST = ChatRequest(
    (ChatMessage("user", "what is the capital of France?"),), system="be brief", max_tokens=64
)
STREAM = ChatRequest(REQUEST.messages, system="be brief", max_tokens=64, stream=True)
# Small jitter on top of Retry-After and short backoffs, so real-time retries stay fast.
RETRY = RetryPolicy(base_s=0.02, cap_s=0.05)
BREAKER_FAILURES = 3
COOL_DOWN_S = 0.6
# Frames after which the fake's stream has carried some text / no text yet.
FRAMES_WITH_TEXT = {"openai": 3, "anthropic": 5}
FRAMES_WITHOUT_TEXT = {"openai": 1, "anthropic": 3}
SLACK_S = 0.5  # scheduling allowance on a shared, busy machine


@pytest.fixture
async def backup_provider() -> AsyncIterator[FakeProvider]:
    """A second, independent endpoint with the same credentials as ``fake_provider``."""
    async with FakeProvider(
        api_key=API_KEY,
        aws_access_key_id=AWS_ACCESS_KEY_ID,
        aws_secret_access_key=AWS_SECRET,
        region=REGION,
    ) as fake:
        yield fake


def base_url(url: str, provider: str) -> str:
    return url + ("/v1" if provider == "openai" else "")


@dataclass
class Chain:
    """Builds candidates at the two fake servers and runs the executor with real time."""

    primary_fake: FakeProvider
    backup_fake: FakeProvider
    target: TargetFactory
    providers: dict[str, Provider]
    board: BreakerBoard
    deltas: list[str] = field(default_factory=list)

    def at(
        self, fake: FakeProvider, model: str, provider: str, max_attempts: int = 2, **over: Any
    ) -> Candidate:
        over.setdefault("base_url", base_url(fake.url, provider))
        target = self.target(provider, **over)
        return Candidate(model, target, PRICE, max_attempts=max_attempts)

    def primary(self, provider: str, max_attempts: int = 2, **over: Any) -> Candidate:
        return self.at(self.primary_fake, "primary-model", provider, max_attempts, **over)

    def backup(self, provider: str, max_attempts: int = 2, **over: Any) -> Candidate:
        return self.at(self.backup_fake, "backup-model", provider, max_attempts, **over)

    async def run(
        self,
        *chain: Candidate,
        request: ChatRequest = REQUEST,
        deadline_s: float = 5.0,
        max_cost_usd: float | None = None,
    ) -> tuple[Execution, float]:
        """The execution and its wall-clock duration; checks no secret leaked into it."""
        started = time.monotonic()
        execution = await execute(
            chain,
            request,
            Budget(started + deadline_s, max_cost_usd),
            self.providers,
            self.board,
            retry=RETRY,
            rng=random.Random(7),
            on_delta=self.deltas.append if request.stream else None,
        )
        elapsed = time.monotonic() - started
        assert_no_secret(execution)
        return execution, elapsed


def assert_no_secret(execution: Execution) -> None:
    texts = [repr(execution), execution.partial_text, *execution.fallback_reasons]
    texts += [attempt.model_dump_json() for attempt in execution.attempts]
    if execution.error is not None:
        texts += [execution.error.message, repr(execution.error)]
    if execution.result is not None:
        texts.append(repr(execution.result))
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


@pytest.fixture
def chain(
    fake_provider: FakeProvider,
    backup_provider: FakeProvider,
    provider_target: TargetFactory,
    provider_client: httpx.AsyncClient,
) -> Chain:
    board = BreakerBoard(
        {},
        global_max_in_flight=16,
        clock=time.monotonic,
        default=ModelLimits(
            breaker=BreakerSettings(consecutive_failures=BREAKER_FAILURES, cool_down_s=COOL_DOWN_S)
        ),
    )
    providers = {name: provider_for(name, provider_client) for name in PROVIDERS}
    return Chain(fake_provider, backup_provider, provider_target, providers, board)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def statuses(execution: Execution) -> list[tuple[str, str, int | None]]:
    return [(a.model, a.status, a.http_status) for a in execution.attempts]


# -- rate limiting -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("provider", "header", "value", "wait_s"),
    [
        ("openai", "retry-after-ms", "400", 0.4),
        ("anthropic", "retry-after", "1", 1.0),
    ],
)
async def test_429_is_retried_on_the_same_model_after_retry_after(
    chain: Chain, provider: str, header: str, value: str, wait_s: float
) -> None:
    chain.primary_fake.script(Behaviour(status=429, headers={header: value}))
    execution, elapsed = await chain.run(chain.primary(provider), chain.backup("openai"))

    assert execution.ok and execution.model == "primary-model" and not execution.fallback
    assert statuses(execution) == [
        ("primary-model", "rate_limited", 429),
        ("primary-model", "ok", 200),
    ]
    assert wait_s <= elapsed < wait_s + SLACK_S
    assert len(chain.primary_fake.requests) == 2
    assert chain.backup_fake.requests == []


async def test_retry_after_past_the_deadline_moves_on_without_waiting(chain: Chain) -> None:
    chain.primary_fake.script(Behaviour(status=429, headers={"retry-after": "30"}))
    execution, elapsed = await chain.run(
        chain.primary("openai"), chain.backup("anthropic"), deadline_s=3.0
    )

    assert execution.ok and execution.model == "backup-model" and execution.fallback
    assert execution.fallback_reasons == ("primary-model:retry_after_past_deadline",)
    assert statuses(execution) == [
        ("primary-model", "rate_limited", 429),
        ("backup-model", "ok", 200),
    ]
    assert elapsed < SLACK_S
    assert len(chain.primary_fake.requests) == 1
    assert len(chain.backup_fake.requests) == 1


# -- server errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("primary", "status", "reason", "backup"),
    [
        ("openai", 500, "server_error", "anthropic"),
        ("openai", 503, "overloaded", "anthropic"),
        ("anthropic", 529, "overloaded", "openai"),
        ("azure_openai", 502, "server_error", "gemini"),
        ("gemini", 503, "overloaded", "bedrock"),
        ("bedrock", 500, "server_error", "azure_openai"),
    ],
)
async def test_repeated_server_errors_fall_back_to_another_provider_family(
    chain: Chain, primary: str, status: int, reason: str, backup: str
) -> None:
    chain.primary_fake.script(Behaviour(status=status), Behaviour(status=status))
    execution, _ = await chain.run(chain.primary(primary), chain.backup(backup))

    assert execution.ok and execution.model == "backup-model" and execution.fallback
    assert execution.result is not None
    assert execution.result.text.startswith("fake answer from")
    assert execution.fallback_reasons == (f"primary-model:{reason}",)
    assert statuses(execution) == [
        ("primary-model", "error", status),
        ("primary-model", "error", status),
        ("backup-model", "ok", 200),
    ]
    assert [a.provider for a in execution.attempts] == [primary, primary, backup]
    assert all(a.latency_ms > 0 for a in execution.attempts)
    assert execution.attempts[0].endpoint == public_endpoint(chain.primary(primary).target)
    assert execution.attempts[2].usage is not None and execution.attempts[2].cost_usd > 0
    assert execution.cost_usd == execution.attempts[2].cost_usd
    assert [r.provider for r in chain.primary_fake.requests] == [primary, primary]
    assert [r.provider for r in chain.backup_fake.requests] == [backup]


# -- timeouts ------------------------------------------------------------------------------------
async def test_a_slow_model_times_out_then_the_chain_falls_back(chain: Chain) -> None:
    chain.primary_fake.script(Behaviour(delay_s=2.0))
    execution, elapsed = await chain.run(
        chain.primary("openai", max_attempts=1, timeout_s=0.3),
        chain.backup("anthropic"),
        deadline_s=2.0,
    )

    assert execution.ok and execution.model == "backup-model"
    assert execution.fallback_reasons == ("primary-model:timeout",)
    assert statuses(execution) == [
        ("primary-model", "timeout", None),
        ("backup-model", "ok", 200),
    ]
    assert 300 <= execution.attempts[0].latency_ms < (0.3 + SLACK_S) * 1000
    assert 0.3 <= elapsed < 0.3 + SLACK_S


async def test_the_deadline_bounds_a_chain_of_slow_models(chain: Chain) -> None:
    chain.primary_fake.script(Behaviour(delay_s=3.0), Behaviour(delay_s=3.0))
    chain.backup_fake.script(Behaviour(delay_s=3.0))
    execution, elapsed = await chain.run(
        chain.primary("openai", timeout_s=5.0), chain.backup("anthropic"), deadline_s=0.6
    )

    assert not execution.ok
    assert execution.error is not None and execution.error.type == "deadline_exceeded"
    assert 0.6 <= elapsed < 0.6 + SLACK_S
    assert statuses(execution)[0] == ("primary-model", "timeout", None)
    assert all(a.status in ("timeout", "skipped") for a in execution.attempts)
    assert chain.backup_fake.requests == []


# -- broken connections --------------------------------------------------------------------------
async def test_connection_reset_falls_back(chain: Chain) -> None:
    chain.primary_fake.script(Behaviour(reset=True), Behaviour(reset=True))
    execution, _ = await chain.run(chain.primary("anthropic"), chain.backup("openai"))

    assert execution.ok and execution.model == "backup-model"
    assert execution.fallback_reasons == ("primary-model:connection",)
    assert statuses(execution) == [
        ("primary-model", "error", None),
        ("primary-model", "error", None),
        ("backup-model", "ok", 200),
    ]
    assert len(chain.primary_fake.requests) == 2


async def test_connection_refused_falls_back(chain: Chain) -> None:
    refused = chain.primary(
        "openai", max_attempts=1, base_url=base_url(f"http://127.0.0.1:{closed_port()}", "openai")
    )
    execution, elapsed = await chain.run(refused, chain.backup("gemini"))

    assert execution.ok and execution.model == "backup-model"
    assert execution.fallback_reasons == ("primary-model:connection",)
    assert statuses(execution) == [("primary-model", "error", None), ("backup-model", "ok", 200)]
    assert execution.attempts[0].error is not None
    assert execution.attempts[0].error.startswith("connection:")
    assert elapsed < SLACK_S


# -- streams -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("provider", "behaviour"),
    [
        ("openai", Behaviour(cut_after_frames=FRAMES_WITH_TEXT["openai"])),
        ("anthropic", Behaviour(cut_after_frames=FRAMES_WITH_TEXT["anthropic"])),
        ("anthropic", Behaviour(error_after_frames=FRAMES_WITH_TEXT["anthropic"])),
    ],
)
async def test_a_stream_broken_after_text_reached_the_caller_does_not_switch_models(
    chain: Chain, provider: str, behaviour: Behaviour
) -> None:
    chain.primary_fake.script(behaviour)
    execution, _ = await chain.run(chain.primary(provider), chain.backup("gemini"), request=STREAM)

    assert not execution.ok
    assert execution.error is not None and execution.error.type == "stream_interrupted"
    assert execution.model == "primary-model" and not execution.fallback
    assert execution.fallback_reasons == ("primary-model:stream_interrupted",)
    assert chain.deltas and "".join(chain.deltas) == execution.partial_text
    assert "fake answer from".startswith(execution.partial_text.strip())
    assert statuses(execution) == [("primary-model", "error", 200)]
    assert len(chain.primary_fake.requests) == 1  # no retry on the same model either
    assert chain.backup_fake.requests == []


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_stream_cut_before_any_text_falls_back(chain: Chain, provider: str) -> None:
    chain.primary_fake.script(Behaviour(cut_after_frames=FRAMES_WITHOUT_TEXT[provider]))
    execution, _ = await chain.run(
        chain.primary(provider, max_attempts=1), chain.backup("anthropic"), request=STREAM
    )

    assert execution.ok and execution.model == "backup-model" and execution.fallback
    assert execution.fallback_reasons == ("primary-model:cut_stream",)
    assert statuses(execution) == [("primary-model", "error", 200), ("backup-model", "ok", 200)]
    assert execution.result is not None and execution.result.streamed
    assert "".join(chain.deltas) == execution.result.text  # only the backup's text went out
    assert len(chain.backup_fake.requests) == 1


@pytest.fixture
async def stalling_openai() -> AsyncIterator[str]:
    """An OpenAI endpoint whose stream sends two words, then stalls (a hung upstream): the
    frames are the fake's own OpenAI wire format, only the pacing differs. Yields its URL."""
    release = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await reader.readexactly(length)
        request = RecordedRequest("openai", "POST", "/", "/", {}, {}, body, orjson.loads(body))
        frames = OpenAIFormat(API_KEY).frames(request, "slow answer never finished", (9, 4))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        writer.write(b"transfer-encoding: chunked\r\n\r\n")
        for frame in frames[:3]:  # the role chunk, "slow ", "answer "
            writer.write(b"%x\r\n%s\r\n" % (len(frame), frame))
        await writer.drain()
        await release.wait()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1"
    release.set()
    server.close()
    await server.wait_closed()


async def test_a_stream_stalled_past_the_model_timeout_keeps_the_text_already_sent(
    chain: Chain, stalling_openai: str
) -> None:
    stalled = chain.primary("openai", timeout_s=0.4, base_url=stalling_openai)
    execution, elapsed = await chain.run(stalled, chain.backup("anthropic"), request=STREAM)

    assert execution.error is not None and execution.error.type == "stream_interrupted"
    assert "".join(chain.deltas) == "slow answer "
    assert execution.partial_text == "slow answer "  # what the response event reports
    assert statuses(execution) == [("primary-model", "timeout", None)]
    assert 0.4 <= elapsed < 0.4 + SLACK_S
    assert chain.backup_fake.requests == []


# -- circuit breaker -----------------------------------------------------------------------------
async def test_the_breaker_opens_skips_the_model_then_a_probe_closes_it(chain: Chain) -> None:
    primary, backup = chain.primary("openai", max_attempts=1), chain.backup("anthropic")
    key = (primary.model, public_endpoint(primary.target))

    def state() -> str:
        return chain.board.breaker(*key).state

    chain.primary_fake.script(*[Behaviour(status=503)] * BREAKER_FAILURES)

    for _ in range(BREAKER_FAILURES):
        execution, _ = await chain.run(primary, backup)
        assert execution.ok and execution.model == "backup-model"
    assert state() == "open"
    assert len(chain.primary_fake.requests) == BREAKER_FAILURES

    # Open: the model is skipped without any request to its endpoint.
    execution, _ = await chain.run(primary, backup)
    assert execution.ok and execution.model == "backup-model"
    assert execution.fallback_reasons == ("primary-model:circuit_open",)
    assert statuses(execution) == [
        ("primary-model", "circuit_open", None),
        ("backup-model", "ok", 200),
    ]
    assert len(chain.primary_fake.requests) == BREAKER_FAILURES

    # After the cool-down, one probe goes through; it fails, so the breaker opens again.
    await asyncio.sleep(COOL_DOWN_S + 0.05)
    assert state() == "half_open"
    chain.primary_fake.script(Behaviour(status=503))
    execution, _ = await chain.run(primary, backup)
    assert statuses(execution)[0] == ("primary-model", "error", 503)
    assert state() == "open"
    assert len(chain.primary_fake.requests) == BREAKER_FAILURES + 1
    execution, _ = await chain.run(primary, backup)
    assert statuses(execution)[0][1] == "circuit_open"
    assert len(chain.primary_fake.requests) == BREAKER_FAILURES + 1

    # The next probe succeeds: the breaker closes and the model answers again.
    await asyncio.sleep(COOL_DOWN_S + 0.05)
    execution, _ = await chain.run(primary, backup)
    assert execution.ok and execution.model == "primary-model" and not execution.fallback
    assert state() == "closed"
    assert len(chain.primary_fake.requests) == BREAKER_FAILURES + 2
    execution, _ = await chain.run(primary, backup)
    assert execution.model == "primary-model"
    assert len(chain.backup_fake.requests) == BREAKER_FAILURES + 3


# -- exhausted chains ----------------------------------------------------------------------------
async def test_every_candidate_failing_is_all_providers_failed(chain: Chain) -> None:
    chain.primary_fake.script(Behaviour(status=500), Behaviour(status=500))
    chain.backup_fake.script(Behaviour(status=529), Behaviour(reset=True))
    execution, _ = await chain.run(chain.primary("openai"), chain.backup("anthropic"))

    assert not execution.ok and execution.result is None and execution.model is None
    assert execution.error is not None and execution.error.type == "all_providers_failed"
    assert execution.fallback_reasons == ("primary-model:server_error", "backup-model:connection")
    assert statuses(execution) == [
        ("primary-model", "error", 500),
        ("primary-model", "error", 500),
        ("backup-model", "error", 529),
        ("backup-model", "error", None),
    ]
    assert "2 candidates, 4 attempts" in execution.error.message
    assert execution.cost_usd == 0.0


async def test_a_tiny_budget_is_budget_exhausted_without_any_request(chain: Chain) -> None:
    execution, _ = await chain.run(
        chain.primary("openai"), chain.backup("anthropic"), max_cost_usd=1e-9
    )

    assert execution.error is not None and execution.error.type == "budget_exhausted"
    assert statuses(execution) == [
        ("primary-model", "skipped", None),
        ("backup-model", "skipped", None),
    ]
    assert chain.primary_fake.requests == []
    assert chain.backup_fake.requests == []


# -- secrets -------------------------------------------------------------------------------------
async def test_no_credential_reaches_the_execution_even_when_providers_echo_it(
    chain: Chain,
) -> None:
    # Each provider echoes the credentials it was sent (never another provider's).
    echo = f"upstream rejected {API_KEY}"
    aws_echo = f"upstream rejected {AWS_ACCESS_KEY_ID}:{AWS_SECRET} token {AWS_SESSION_TOKEN}"
    chain.primary_fake.script(
        Behaviour(status=500, body={"error": {"message": echo, "type": "server_error"}}),
        Behaviour(
            status=503, body={"type": "error", "error": {"type": "api_error", "message": echo}}
        ),
        Behaviour(status=500, body={"message": aws_echo}),
    )
    chain.backup_fake.script(
        Behaviour(
            status=503, body={"error": {"code": 503, "message": echo, "status": "UNAVAILABLE"}}
        )
    )
    candidates = [
        chain.primary("openai", max_attempts=1),
        chain.at(chain.primary_fake, "claude", "anthropic", max_attempts=1),
        chain.at(chain.primary_fake, "bedrock-haiku", "bedrock", max_attempts=1),
        chain.backup("gemini", max_attempts=1),
        # A wrong key: the fake's 401 echoes it back, as OpenAI does.
        chain.at(
            chain.backup_fake,
            "wrong-key-model",
            "openai",
            max_attempts=1,
            api_key=SecretStr(WRONG_KEY),
        ),
    ]
    execution, _ = await chain.run(*candidates)  # run() asserts no secret in any field

    assert execution.error is not None and execution.error.type == "all_providers_failed"
    assert [a.status for a in execution.attempts] == ["error"] * 5
    assert [a.http_status for a in execution.attempts] == [500, 503, 500, 503, 401]
    errors = [a.error or "" for a in execution.attempts]
    assert all("upstream rejected" in e for e in errors[:4])  # provider text kept, keys masked
    assert WRONG_KEY in chain.backup_fake.requests[-1].headers["authorization"]
