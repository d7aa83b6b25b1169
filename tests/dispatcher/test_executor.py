"""The candidate chain under injected faults: retries, fallback, breaker, budget, deadline.

The providers here are in-process stand-ins at the adapter interface (``Provider.complete``),
scripted per model with results and typed :class:`ProviderError`s; time is a fake clock.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pytest
from pydantic import SecretStr

from pointsman.events import ErrorInfo, ResponseEvent, Route
from pointsman_dispatcher.cost import Price
from pointsman_dispatcher.executor import (
    Budget,
    Candidate,
    Execution,
    RetryPolicy,
    execute,
    expected_cost_usd,
    public_endpoint,
)
from pointsman_dispatcher.providers.base import (
    ChatMessage,
    ChatRequest,
    ChatResult,
    DeltaCallback,
    Provider,
    ProviderError,
    ProviderTarget,
)
from pointsman_dispatcher.resilience import BreakerBoard, BreakerSettings, ModelLimits

API_KEY = "sk-test-abcdefghijklmnop"
DEFAULT_PRICE = Price(2.5, 10.0)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


Step = ChatResult | ProviderError | Callable[[], ChatResult]


@dataclass
class ScriptedProvider:
    """Answers each model's calls from its own script, in order."""

    clock: FakeClock
    scripts: dict[str, list[Step]]
    latency_s: float = 0.0
    calls: list[ProviderTarget] = field(default_factory=list)

    async def complete(
        self,
        target: ProviderTarget,
        request: ChatRequest,
        *,
        on_delta: DeltaCallback | None = None,
    ) -> ChatResult:
        self.calls.append(target)
        step = self.scripts[target.model].pop(0)
        self.clock.now += self.latency_s
        if isinstance(step, ProviderError):
            if step.partial_text and on_delta is not None:
                on_delta(step.partial_text)
            raise step
        result = step() if callable(step) else step
        if on_delta is not None:
            on_delta(result.text)
        return result

    def calls_to(self, model: str) -> int:
        return sum(1 for t in self.calls if t.model == model)


class HangingProvider:
    """Never answers (a provider that accepted the connection and went silent)."""

    async def complete(
        self,
        target: ProviderTarget,
        request: ChatRequest,
        *,
        on_delta: DeltaCallback | None = None,
    ) -> ChatResult:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")


class BrokenProvider:
    """An adapter with a bug: raises something that is not a ProviderError."""

    async def complete(
        self,
        target: ProviderTarget,
        request: ChatRequest,
        *,
        on_delta: DeltaCallback | None = None,
    ) -> ChatResult:
        raise KeyError(f"choices (key={API_KEY})")


def ok(text: str = "hi", input_tokens: int = 1000, output_tokens: int = 500) -> ChatResult:
    return ChatResult(
        text=text,
        finish_reason="stop",
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        http_status=200,
        latency_ms=120.0,
    )


def fail(
    kind: str, status: int | None = None, message: str | None = None, **extra: object
) -> ProviderError:
    text = message or f"{kind} from fake"
    return ProviderError(kind, text, http_status=status, **extra)  # type: ignore[arg-type]


def candidate(
    model: str,
    *,
    provider: str = "openai",
    price: Price = DEFAULT_PRICE,
    max_attempts: int = 3,
    timeout_s: float = 30.0,
    base_url: str = "https://api.example.com/v1",
) -> Candidate:
    return Candidate(
        model=model,
        target=ProviderTarget(
            provider=provider,  # type: ignore[arg-type]
            base_url=base_url,
            model=model,
            api_key=SecretStr(API_KEY),
            timeout_s=timeout_s,
        ),
        price=price,
        max_attempts=max_attempts,
    )


REQUEST = ChatRequest(messages=(ChatMessage("user", "what is a pointsman?"),), max_tokens=200)


def board_for(clock: FakeClock, **limits: ModelLimits) -> BreakerBoard:
    default = ModelLimits(breaker=BreakerSettings(consecutive_failures=5, cool_down_s=60.0))
    return BreakerBoard(limits, global_max_in_flight=8, clock=clock, default=default)


async def run(
    chain: list[Candidate],
    provider: Provider,
    clock: FakeClock,
    board: BreakerBoard | None = None,
    *,
    deadline_s: float = 60.0,
    max_cost_usd: float | None = None,
    request: ChatRequest = REQUEST,
    on_delta: DeltaCallback | None = None,
    providers: Mapping[str, Provider] | None = None,
) -> Execution:
    return await execute(
        chain,
        request,
        Budget(deadline=clock() + deadline_s, max_cost_usd=max_cost_usd),
        providers or {"openai": provider},
        board or board_for(clock),
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(5),
        retry=RetryPolicy(base_s=0.5, cap_s=4.0),
        on_delta=on_delta,
    )


def statuses(execution: Execution) -> list[tuple[str, str]]:
    return [(a.model, a.status) for a in execution.attempts]


async def test_success_on_the_first_try() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(clock, {"big": [ok("a pointsman switches trains")]})
    execution = await run([candidate("big"), candidate("other")], provider, clock)
    assert execution.ok and execution.error is None
    assert execution.result is not None and execution.result.text == "a pointsman switches trains"
    assert execution.model == "big" and not execution.fallback and execution.fallback_reasons == ()
    [attempt] = execution.attempts
    assert attempt.status == "ok" and attempt.http_status == 200 and attempt.latency_ms == 120.0
    assert attempt.usage is not None and attempt.usage.input_tokens == 1000
    assert attempt.cost_usd == pytest.approx(1000 * 2.5e-6 + 500 * 10e-6)
    assert execution.cost_usd == pytest.approx(0.0075)
    assert attempt.endpoint == "https://api.example.com/v1" and attempt.provider == "openai"
    assert provider.calls[0].timeout_s == 30.0  # the model's timeout: the deadline is further
    assert clock.slept == []


async def test_rate_limited_with_retry_after_then_success_on_the_same_model() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(
        clock, {"big": [fail("rate_limited", 429, retry_after_s=2.0), ok()], "other": [ok()]}
    )
    board = board_for(clock)
    execution = await run([candidate("big"), candidate("other")], provider, clock, board)
    assert execution.ok and execution.model == "big" and not execution.fallback
    assert statuses(execution) == [("big", "rate_limited"), ("big", "ok")]
    assert execution.attempts[0].http_status == 429
    [delay] = clock.slept
    assert 2.0 <= delay <= 2.5  # never before Retry-After, at most one base of jitter
    assert provider.calls_to("other") == 0
    breaker = board.breaker("big", "https://api.example.com/v1")
    assert breaker.state == "closed"
    # a 429 says nothing about health: four more failures are still needed to open
    for _ in range(4):
        breaker.record("server_error")
    assert breaker.state == "closed"


async def test_server_errors_exhaust_the_model_then_fall_back() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(
        clock, {"big": [fail("server_error", 500)] * 3, "small": [ok(output_tokens=10)]}
    )
    board = board_for(clock)
    execution = await run([candidate("big"), candidate("small")], provider, clock, board)
    assert execution.ok and execution.model == "small" and execution.fallback
    assert execution.fallback_reasons == ("big:server_error",)
    assert statuses(execution) == [("big", "error")] * 3 + [("small", "ok")]
    assert [a.http_status for a in execution.attempts] == [500, 500, 500, 200]
    assert len(clock.slept) == 2  # backoff between the three calls on "big", none after
    assert clock.slept[0] <= 0.5 and clock.slept[1] <= 1.0  # full jitter ceilings
    assert board.breaker("big", "https://api.example.com/v1").state == "closed"  # 3 < 5


async def test_failures_open_the_breaker_and_the_next_query_skips_the_model() -> None:
    clock = FakeClock()
    flaky = ModelLimits(breaker=BreakerSettings(consecutive_failures=2, cool_down_s=30.0))
    board = board_for(clock, big=flaky)
    provider = ScriptedProvider(
        clock, {"big": [fail("overloaded", 503)] * 2, "small": [ok(), ok(), ok()]}
    )
    first = await run([candidate("big"), candidate("small")], provider, clock, board)
    assert first.model == "small"
    assert board.breaker("big", "https://api.example.com/v1").state == "open"

    second = await run([candidate("big"), candidate("small")], provider, clock, board)
    assert provider.calls_to("big") == 2  # not called again
    assert statuses(second) == [("big", "circuit_open"), ("small", "ok")]
    assert second.fallback and second.fallback_reasons == ("big:circuit_open",)
    assert second.attempts[0].error is not None and "circuit open" in second.attempts[0].error

    clock.now += 30.0  # cool-down over: one probe goes through and closes the breaker
    provider.scripts["big"] = [ok()]
    third = await run([candidate("big"), candidate("small")], provider, clock, board)
    assert third.model == "big" and not third.fallback
    assert board.breaker("big", "https://api.example.com/v1").state == "closed"


async def test_open_breaker_on_one_endpoint_does_not_block_another() -> None:
    clock = FakeClock()
    board = board_for(clock)
    east, west = "https://east.example/v1", "https://west.example/v1"
    for _ in range(5):
        board.breaker("big", east).record("connection")
    provider = ScriptedProvider(clock, {"big": [ok()]})
    chain = [candidate("big", base_url=east), candidate("big", base_url=west)]
    execution = await run(chain, provider, clock, board)
    assert statuses(execution) == [("big", "circuit_open"), ("big", "ok")]
    assert [a.endpoint for a in execution.attempts] == [east, west]
    assert execution.fallback


async def test_a_hanging_provider_times_out_and_falls_back() -> None:
    clock = FakeClock()
    answering = ScriptedProvider(clock, {"small": [ok()]})
    execution = await run(
        [
            candidate("slow", provider="anthropic", timeout_s=0.05, max_attempts=1),
            candidate("small"),
        ],
        answering,
        clock,
        providers={"anthropic": HangingProvider(), "openai": answering},
    )
    assert statuses(execution) == [("slow", "timeout"), ("small", "ok")]
    assert execution.fallback_reasons == ("slow:timeout",)
    assert execution.attempts[0].provider == "anthropic"


async def test_timeouts_are_retried_then_counted_against_the_breaker() -> None:
    clock = FakeClock()
    board = board_for(clock)
    provider = ScriptedProvider(clock, {"big": [fail("timeout"), fail("timeout"), ok()]})
    execution = await run([candidate("big")], provider, clock, board)
    assert statuses(execution) == [("big", "timeout"), ("big", "timeout"), ("big", "ok")]
    assert execution.ok and not execution.fallback


async def test_connection_reset_is_retried_on_the_same_model() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(
        clock, {"big": [fail("connection", message="reset by peer"), ok()], "small": [ok()]}
    )
    execution = await run([candidate("big"), candidate("small")], provider, clock)
    assert statuses(execution) == [("big", "error"), ("big", "ok")]
    assert execution.attempts[0].error == "connection: reset by peer"
    assert execution.model == "big" and provider.calls_to("small") == 0


async def test_non_retryable_errors_move_on_at_once() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(clock, {"big": [fail("bad_request", 400)], "small": [ok()]})
    execution = await run([candidate("big"), candidate("small")], provider, clock)
    assert statuses(execution) == [("big", "error"), ("small", "ok")]
    assert execution.fallback_reasons == ("big:bad_request",) and clock.slept == []


async def test_budget_too_small_for_every_candidate_is_a_typed_error() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(clock, {"big": [ok()], "small": [ok()]})
    chain = [candidate("big", price=Price(5, 15)), candidate("small", price=Price(1, 2))]
    cheapest = expected_cost_usd(chain[1], REQUEST)
    execution = await run(chain, provider, clock, max_cost_usd=cheapest * 0.9)
    assert not execution.ok and provider.calls == []
    assert statuses(execution) == [("big", "skipped"), ("small", "skipped")]
    assert execution.error is not None and execution.error.type == "budget_exhausted"
    assert all(a.error is not None and "over budget" in a.error for a in execution.attempts)
    assert execution.cost_usd == 0.0


async def test_budget_skips_the_expensive_model_for_a_cheaper_one() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(clock, {"big": [ok()], "small": [ok(input_tokens=10)]})
    chain = [candidate("big", price=Price(5, 15)), candidate("small", price=Price(1, 2))]
    budget = expected_cost_usd(chain[1], REQUEST) * 1.01
    execution = await run(chain, provider, clock, max_cost_usd=budget)
    assert statuses(execution) == [("big", "skipped"), ("small", "ok")]
    assert execution.fallback_reasons == ("big:over_budget",)
    assert execution.cost_usd == pytest.approx((10 * 1 + 500 * 2) / 1e6)


async def test_retry_after_beyond_the_deadline_moves_on() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(
        clock, {"big": [fail("rate_limited", 429, retry_after_s=50.0)], "small": [ok()]}
    )
    execution = await run([candidate("big"), candidate("small")], provider, clock, deadline_s=10)
    assert statuses(execution) == [("big", "rate_limited"), ("small", "ok")]
    assert execution.fallback_reasons == ("big:retry_after_past_deadline",)
    assert clock.slept == []  # did not wait 50 s for a 10 s deadline


async def test_deadline_exhaustion_is_a_typed_error() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(
        clock, {"big": [fail("server_error", 502)] * 3, "small": [ok()]}, latency_s=4.0
    )
    execution = await run([candidate("big"), candidate("small")], provider, clock, deadline_s=6.0)
    assert not execution.ok
    assert execution.error is not None and execution.error.type == "deadline_exceeded"
    # big: a 502 after 4 s, a retry within the 2 s left (timeout capped), then no time for small
    assert provider.calls_to("small") == 0
    assert statuses(execution)[-1] == ("small", "skipped")
    assert provider.calls[0].timeout_s == pytest.approx(6.0)  # per-attempt timeout = time left
    assert all(c.timeout_s <= 6.0 for c in provider.calls)


async def test_local_rate_limit_waits_when_that_fits_the_deadline() -> None:
    clock = FakeClock()
    board = board_for(clock, big=ModelLimits(rpm=60))
    provider = ScriptedProvider(clock, {"big": [ok() for _ in range(61)]})
    for _ in range(60):
        assert (await run([candidate("big")], provider, clock, board)).ok
    assert clock.slept == []
    execution = await run([candidate("big")], provider, clock, board)
    assert execution.ok and clock.slept == [pytest.approx(1.0)]  # one request per second


async def test_local_rate_limit_past_the_deadline_skips_the_model() -> None:
    clock = FakeClock()
    probing = BreakerSettings(consecutive_failures=1, cool_down_s=1.0, half_open_probes=1)
    board = board_for(clock, big=ModelLimits(tpm=1000, breaker=probing))
    provider = ScriptedProvider(clock, {"big": [ok(input_tokens=900, output_tokens=100)]})
    assert (await run([candidate("big")], provider, clock, board)).ok  # bucket now empty
    breaker = board.breaker("big", "https://api.example.com/v1")
    breaker.record("server_error")
    clock.now += 1.0
    assert breaker.state == "half_open"
    provider.scripts["big"].append(ok())
    provider.scripts["small"] = [ok()]
    execution = await run(
        [candidate("big"), candidate("small")], provider, clock, board, deadline_s=5.0
    )
    assert statuses(execution) == [("big", "skipped"), ("small", "ok")]
    assert execution.fallback_reasons == ("big:rate_limit_past_deadline",)
    assert clock.slept == []
    # the probe reserved for "big" was handed back unused: the next query may still probe
    assert breaker.allow()


async def test_retry_after_holds_the_model_for_the_next_queries_too() -> None:
    clock = FakeClock()
    board = board_for(clock)
    provider = ScriptedProvider(
        clock, {"big": [fail("rate_limited", 429, retry_after_s=30.0)], "small": [ok(), ok()]}
    )
    chain = [candidate("big", max_attempts=1), candidate("small")]
    first = await run(chain, provider, clock, board)
    assert first.model == "small"
    second = await run(chain, provider, clock, board, deadline_s=10.0)
    assert provider.calls_to("big") == 1  # the provider said 30 s; nobody asks it sooner
    assert statuses(second) == [("big", "skipped"), ("small", "ok")]
    assert second.fallback_reasons == ("big:rate_limit_past_deadline",)


async def test_cut_stream_after_committed_text_stops_without_switching() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(
        clock,
        {
            "big": [fail("cut_stream", 200, committed=True, partial_text="A pointsman is a")],
            "small": [ok()],
        },
    )
    deltas: list[str] = []
    execution = await run(
        [candidate("big"), candidate("small")],
        provider,
        clock,
        request=ChatRequest(messages=REQUEST.messages, stream=True),
        on_delta=deltas.append,
    )
    assert provider.calls_to("small") == 0 and provider.calls_to("big") == 1  # no retry either
    assert deltas == ["A pointsman is a"]
    assert execution.error is not None and execution.error.type == "stream_interrupted"
    assert execution.model == "big" and execution.partial_text == "A pointsman is a"
    assert statuses(execution) == [("big", "error")]
    assert not execution.fallback


async def test_delivered_text_counts_as_committed_even_if_the_adapter_forgot() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(
        clock, {"big": [fail("connection", partial_text="A points")], "small": [ok()]}
    )
    deltas: list[str] = []
    execution = await run(
        [candidate("big"), candidate("small")], provider, clock, on_delta=deltas.append
    )
    assert execution.error is not None and execution.error.type == "stream_interrupted"
    assert provider.calls_to("small") == 0 and deltas == ["A points"]


async def test_cut_stream_before_any_text_may_fall_back() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(clock, {"big": [fail("cut_stream")], "small": [ok("done")]})
    deltas: list[str] = []
    execution = await run(
        [candidate("big", max_attempts=1), candidate("small")],
        provider,
        clock,
        on_delta=deltas.append,
    )
    assert execution.model == "small" and execution.fallback and deltas == ["done"]


async def test_every_candidate_failing_is_a_typed_error_with_every_attempt() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(
        clock,
        {
            "a": [fail("auth", 401)],
            "b": [fail("server_error", 500), fail("overloaded", 529)],
            "c": [fail("content_filter", 400)],
        },
    )
    chain = [candidate("a"), candidate("b", max_attempts=2), candidate("c")]
    execution = await run(chain, provider, clock)
    assert not execution.ok and execution.result is None and execution.model is None
    assert execution.error is not None and execution.error.type == "all_providers_failed"
    assert statuses(execution) == [("a", "error"), ("b", "error"), ("b", "error"), ("c", "error")]
    assert [a.http_status for a in execution.attempts] == [401, 500, 529, 400]
    assert execution.fallback_reasons == ("a:auth", "b:overloaded", "c:content_filter")
    assert "3 candidates, 4 attempts" in execution.error.message
    # the outcome fits the response contract as it is
    event = ResponseEvent(
        query_id="q1",
        status="error",
        route=Route(reason_code="domain", fallback_reasons=list(execution.fallback_reasons)),
        attempts=list(execution.attempts),
        error=ErrorInfo(type=execution.error.type, message=execution.error.message),
    )
    assert len(event.attempts) == 4


async def test_no_candidates_and_no_adapter_are_typed_errors() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(clock, {})
    empty = await run([], provider, clock)
    assert empty.error is not None and empty.error.type == "no_candidates"
    missing = await run([candidate("g", provider="gemini")], provider, clock)
    assert missing.error is not None and missing.error.type == "all_providers_failed"
    assert statuses(missing) == [("g", "skipped")]


async def test_an_adapter_bug_is_an_attempt_not_a_crash() -> None:
    clock = FakeClock()
    answering = ScriptedProvider(clock, {"small": [ok()]})
    execution = await run(
        [candidate("big", provider="bedrock"), candidate("small")],
        answering,
        clock,
        providers={"bedrock": BrokenProvider(), "openai": answering},
    )
    assert statuses(execution) == [("big", "error"), ("small", "ok")]
    error = execution.attempts[0].error
    assert error == "invalid_response: adapter raised KeyError"
    assert API_KEY not in repr(execution)


async def test_costs_are_summed_from_usage_and_prices() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(
        clock,
        {"big": [fail("server_error", 500)], "small": [ok(input_tokens=2000, output_tokens=300)]},
    )
    chain = [candidate("big", max_attempts=1), candidate("small", price=Price(0.15, 0.6))]
    execution = await run(chain, provider, clock, max_cost_usd=1.0)
    assert [a.cost_usd for a in execution.attempts] == [0.0, pytest.approx(0.00048)]
    assert execution.cost_usd == pytest.approx(sum(a.cost_usd for a in execution.attempts))


async def test_secrets_stay_out_of_attempts() -> None:
    clock = FakeClock()
    leaky = ProviderError("auth", f"bad key {API_KEY}", http_status=401)
    provider = ScriptedProvider(clock, {"g": [leaky]})
    url = f"https://user:pw@generativelanguage.example/v1beta?key={API_KEY}#frag"
    execution = await run([candidate("g", base_url=url)], provider, clock)
    [attempt] = execution.attempts
    assert attempt.endpoint == "https://generativelanguage.example/v1beta"
    assert attempt.error is not None and API_KEY not in attempt.error and "***" in attempt.error
    assert API_KEY not in repr(execution)
    assert "pw" not in public_endpoint(candidate("g", base_url=url).target)


async def test_concurrency_slots_are_released_after_every_outcome() -> None:
    clock = FakeClock()
    board = board_for(clock, big=ModelLimits(max_in_flight=1))
    provider = ScriptedProvider(
        clock, {"big": [fail("server_error", 500), fail("bad_request", 400), ok()]}
    )
    for _ in range(2):
        await run([candidate("big", max_attempts=2)], provider, clock, board)
    assert board.concurrency.in_flight == 0 and not board.concurrency.saturated("big")
