"""Backoff, circuit breaker, token buckets and in-flight limits, on a fake clock."""

from __future__ import annotations

import asyncio
import random

import pytest

from pointsman_dispatcher.resilience import (
    BREAKER_STATE_CODES,
    BreakerBoard,
    BreakerSettings,
    CircuitBreaker,
    ConcurrencyLimits,
    ModelLimits,
    RateLimiter,
    TokenBucket,
    backoff_delay,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- backoff ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 8])
def test_backoff_full_jitter_stays_within_exponential_ceiling(attempt: int) -> None:
    rng = random.Random(7)
    ceiling = min(8.0, 0.5 * 2 ** (attempt - 1))
    delays = [
        backoff_delay(attempt, base_s=0.5, cap_s=8.0, retry_after_s=None, rng=rng)
        for _ in range(500)
    ]
    assert all(0.0 <= d <= ceiling for d in delays)
    assert max(delays) > 0.9 * ceiling  # jitter spans the whole range...
    assert min(delays) < 0.1 * ceiling  # ...down to (almost) zero


def test_backoff_is_capped_for_huge_attempt_numbers() -> None:
    rng = random.Random(1)
    for attempt in (60, 1_000, 10**6):
        assert backoff_delay(attempt, base_s=1.0, cap_s=5.0, retry_after_s=None, rng=rng) <= 5.0


def test_backoff_never_retries_before_retry_after() -> None:
    rng = random.Random(3)
    delays = [
        backoff_delay(1, base_s=0.25, cap_s=1.0, retry_after_s=12.0, rng=rng) for _ in range(200)
    ]
    # Retry-After beyond the cap still wins: the server said so.
    assert all(12.0 <= d <= 12.25 for d in delays)
    assert len(set(delays)) > 100  # a crowd told "12 s" is spread, not synchronised


def test_backoff_is_deterministic_for_a_seed() -> None:
    first = [
        backoff_delay(n, base_s=1, cap_s=30, retry_after_s=None, rng=random.Random(42))
        for n in range(1, 6)
    ]
    again = [
        backoff_delay(n, base_s=1, cap_s=30, retry_after_s=None, rng=random.Random(42))
        for n in range(1, 6)
    ]
    assert first == again


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError):
        backoff_delay(0, base_s=1, cap_s=2, retry_after_s=None, rng=random.Random(0))


# --- circuit breaker ----------------------------------------------------------------------------


def breaker(clock: FakeClock, **overrides: float) -> CircuitBreaker:
    settings = {
        "consecutive_failures": 3,
        "failure_rate": 0.5,
        "min_requests": 10,
        "window_s": 10.0,
        "cool_down_s": 5.0,
        "half_open_probes": 2,
    } | overrides
    return CircuitBreaker(BreakerSettings(**settings), clock)  # type: ignore[arg-type]


def test_breaker_opens_after_consecutive_failures() -> None:
    clock = FakeClock()
    b = breaker(clock)
    b.record("server_error")
    b.record("timeout")
    assert b.state == "closed" and b.allow()
    b.record("connection")
    assert b.state == "open"
    assert b.state_code == BREAKER_STATE_CODES["open"] == 2
    assert not b.allow()
    assert b.retry_in() == pytest.approx(5.0)
    assert b.opened_count == 1


def test_breaker_success_resets_the_consecutive_count() -> None:
    b = breaker(FakeClock(), min_requests=1000)
    for _ in range(5):
        b.record("overloaded")
        b.record("overloaded")
        b.record(None)
    assert b.state == "closed"


@pytest.mark.parametrize("kind", ["rate_limited", "bad_request", "auth", "content_filter"])
def test_breaker_ignores_kinds_that_say_nothing_about_the_endpoint(kind: str) -> None:
    b = breaker(FakeClock(), min_requests=1)
    for _ in range(20):
        b.record(kind)
    assert b.state == "closed"


@pytest.mark.parametrize(
    "kind",
    ["server_error", "overloaded", "timeout", "connection", "cut_stream", "invalid_response"],
)
def test_breaker_counts_endpoint_failures(kind: str) -> None:
    b = breaker(FakeClock())
    for _ in range(3):
        b.record(kind)
    assert b.state == "open"


def test_breaker_opens_on_failure_rate_once_the_window_has_enough_requests() -> None:
    b = breaker(FakeClock(), consecutive_failures=100)
    # fail, fail, ok repeated: 2/3 failure rate, never 3 failures in a row
    outcomes = ["server_error", "server_error", None] * 3  # 9 requests: below min_requests
    for kind in outcomes:
        b.record(kind)
    assert b.state == "closed"
    b.record("server_error")  # 10th request, 7/10 failures > 0.5
    assert b.state == "open"


def test_breaker_rate_at_exactly_the_threshold_does_not_open() -> None:
    b = breaker(FakeClock(), consecutive_failures=100)
    for _ in range(10):
        b.record(None)
        b.record("server_error")
    assert b.state == "closed"  # 50% is not over 50%


def test_breaker_forgets_failures_older_than_the_window() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=100)
    for _ in range(9):
        b.record("server_error")  # 9 requests: below min_requests, so still closed
    assert b.state == "closed"
    clock.advance(30.0)  # all of that is outside the 10 s window now
    for _ in range(5):
        b.record(None)
        b.record("server_error")
    assert b.state == "closed"  # 5 failures in 10 recent requests; with the old ones: 14 in 19


def test_breaker_window_keeps_recent_failures() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=100)
    for _ in range(9):
        b.record("server_error")
    clock.advance(5.0)  # still inside the 10 s window
    b.record(None)
    assert b.state == "closed"  # only a failure can open the breaker
    b.record("server_error")
    assert b.state == "open"  # 10 failures in 11 requests


def test_breaker_half_open_lets_a_bounded_number_of_probes_through() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(3):
        b.record("server_error")
    clock.advance(4.9)
    assert b.state == "open" and not b.allow()
    clock.advance(0.1)
    assert b.state == "half_open"
    assert b.state_code == 1
    assert b.allow() and b.allow()
    assert not b.allow()  # two probes in flight, the third waits
    b.record("rate_limited")  # neutral: frees one probe slot, stays half-open
    assert b.state == "half_open"
    assert b.allow()


def test_breaker_probe_success_closes() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(3):
        b.record("timeout")
    clock.advance(5.0)
    assert b.allow()
    b.record(None)
    assert b.state == "closed" and b.state_code == 0
    b.record("timeout")
    b.record("timeout")
    assert b.state == "closed"  # the old failures were forgotten on closing


def test_breaker_probe_failure_reopens_and_restarts_the_cool_down() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(3):
        b.record("timeout")
    clock.advance(5.0)
    assert b.allow()
    clock.advance(1.0)
    b.record("connection")
    assert b.state == "open"
    assert b.opened_count == 2
    clock.advance(4.9)
    assert b.state == "open"
    clock.advance(0.1)
    assert b.state == "half_open"


def test_breaker_ignores_late_outcomes_while_open() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(3):
        b.record("server_error")
    b.record(None)  # a request started before the breaker opened
    assert b.state == "open"


def test_breaker_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        BreakerSettings(failure_rate=0)
    with pytest.raises(ValueError):
        BreakerSettings(consecutive_failures=0)


# --- token bucket -------------------------------------------------------------------------------


def test_token_bucket_grants_until_empty_then_says_how_long_to_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=2.0, capacity=3.0, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    assert bucket.take(2) == pytest.approx(1.0)  # a refusal takes nothing
    clock.advance(0.5)
    assert bucket.take() == 0.0
    assert bucket.tokens == pytest.approx(0.0)


def test_token_bucket_refills_only_up_to_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=10.0, capacity=5.0, clock=clock)
    bucket.take(5)
    clock.advance(100.0)
    assert bucket.tokens == pytest.approx(5.0)


def test_token_bucket_request_larger_than_capacity_waits_for_a_full_bucket() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=1.0, capacity=10.0, clock=clock)
    bucket.take(4)
    assert bucket.take(50) == pytest.approx(4.0)
    clock.advance(4.0)
    assert bucket.take(50) == 0.0
    assert bucket.tokens == pytest.approx(0.0)


def test_token_bucket_adjust_refunds_and_charges_debt() -> None:
    clock = FakeClock()
    bucket = TokenBucket.per_minute(600, clock)  # 10 per second, burst 600
    assert bucket.rate_per_s == pytest.approx(10.0)
    bucket.take(600)
    bucket.adjust(-100)  # estimate was 100 too high
    assert bucket.tokens == pytest.approx(100.0)
    bucket.adjust(300)  # usage was above the estimate: a debt
    assert bucket.tokens == pytest.approx(-200.0)
    assert bucket.take(1) == pytest.approx(20.1)


def test_rate_limiter_takes_all_or_nothing() -> None:
    clock = FakeClock()
    limiter = RateLimiter(
        clock,
        requests=TokenBucket.per_minute(60, clock),
        tokens=TokenBucket.per_minute(1200, clock),
    )
    assert limiter.acquire(1000) == 0.0
    wait = limiter.acquire(1000)  # 200 tokens left, 800 more needed at 20/s
    assert wait == pytest.approx(40.0)
    assert limiter.requests is not None and limiter.requests.tokens == pytest.approx(59.0)
    limiter.settle(1000, 100)  # real usage was 100 tokens
    assert limiter.acquire(1000) == 0.0


def test_rate_limiter_honours_retry_after_for_everyone() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    limiter.block_for(3.0)
    assert limiter.acquire(10) == pytest.approx(3.0)
    clock.advance(3.0)
    assert limiter.acquire(10) == 0.0


# --- concurrency --------------------------------------------------------------------------------


async def test_concurrency_limits_per_model_and_globally() -> None:
    limits = ConcurrencyLimits(3, {"a": 2})
    assert await limits.acquire("a", 1.0)
    assert await limits.acquire("a", 1.0)
    assert limits.in_flight_for("a") == 2 and limits.in_flight == 2
    assert limits.saturated("a") and not limits.saturated("b") and not limits.saturated()
    assert not await limits.acquire("a", 0.01)  # model full: times out
    assert limits.in_flight == 2  # a failed wait holds nothing
    assert await limits.acquire("b", 1.0)  # b has no own limit
    assert limits.saturated() and limits.saturated("b")
    assert not await limits.acquire("c", 0.01)  # global full
    limits.release("a")
    assert limits.in_flight == 2 and not limits.saturated()
    assert await limits.acquire("c", 0.01)


async def test_concurrency_waiter_gets_the_released_slot() -> None:
    limits = ConcurrencyLimits(1)
    assert await limits.acquire("a", 1.0)
    waiter = asyncio.ensure_future(limits.acquire("b", 5.0))
    await asyncio.sleep(0)
    assert not waiter.done()
    limits.release("a")
    assert await waiter
    assert limits.in_flight_for("b") == 1 and limits.in_flight_for("a") == 0


async def test_concurrency_wait_on_global_gives_back_the_model_slot() -> None:
    limits = ConcurrencyLimits(1, {"a": 1})
    assert await limits.acquire("b", 1.0)
    assert not await limits.acquire("a", 0.01)  # got a's slot, then timed out on the global one
    limits.release("b")
    assert await limits.acquire("a", 0.01)  # a's slot was returned


# --- board --------------------------------------------------------------------------------------


def test_board_holds_one_breaker_per_model_and_endpoint() -> None:
    clock = FakeClock()
    board = BreakerBoard(
        {
            "a": ModelLimits(
                rpm=60, max_in_flight=4, breaker=BreakerSettings(consecutive_failures=1)
            )
        },
        global_max_in_flight=10,
        clock=clock,
    )
    east = board.breaker("a", "https://east.example/v1")
    assert board.breaker("a", "https://east.example/v1") is east
    west = board.breaker("a", "https://west.example/v1")
    east.record("server_error")
    assert east.state == "open" and west.state == "closed"
    assert board.breaker("b", "https://east.example/v1").settings == BreakerSettings()
    assert board.breaker_states() == {
        ("a", "https://east.example/v1"): "open",
        ("a", "https://west.example/v1"): "closed",
        ("b", "https://east.example/v1"): "closed",
    }
    rate = board.rate("a")
    assert board.rate("a") is rate and rate.requests is not None and rate.tokens is None
    assert board.rate("b").requests is None
    assert board.concurrency.limit_for("a") == 4 and board.concurrency.limit_for("b") is None
