"""Building blocks that keep the dispatcher standing when providers fail or push back.

Backoff, circuit breakers, token buckets and in-flight limits. Everything time-dependent takes an
injected clock (monotonic seconds), so each block is a deterministic state machine under test and
none of them sleeps: callers get "how long to wait" back and decide what to do with it.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Clock = Callable[[], float]
BreakerState = Literal["closed", "open", "half_open"]

#: Gauge values for ``pointsman_dispatcher_breaker_state``: higher is worse.
BREAKER_STATE_CODES: Mapping[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}

#: Failure kinds that say the endpoint is unhealthy. Excluded on purpose: ``rate_limited`` (the
#: endpoint is up and pacing us; Retry-After and the token buckets handle it), ``bad_request``
#: and ``content_filter`` (about this request, not the endpoint) and ``auth`` (a configuration
#: error a cool-down cannot fix). ``invalid_response`` counts: a 2xx body in the wrong format
#: usually means a broken proxy or gateway in front of the model.
BREAKER_KINDS: frozenset[str] = frozenset(
    {"server_error", "overloaded", "timeout", "connection", "cut_stream", "invalid_response"}
)

_MAX_EXPONENT = 62


def backoff_delay(
    attempt: int,
    *,
    base_s: float,
    cap_s: float,
    retry_after_s: float | None,
    rng: random.Random,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 = first retry).

    Without Retry-After: "full jitter", uniform in [0, min(cap, base * 2^(attempt-1))], which
    spreads a crowd of clients better than fixed exponential steps. With Retry-After: never
    earlier than the server asked, plus up to ``base_s`` of jitter so the crowd told "2 s" does
    not return in the same millisecond. Retry-After is not capped: the caller decides whether the
    wait fits its deadline.
    """
    if attempt < 1:
        raise ValueError("attempt counts retries from 1")
    if retry_after_s is not None and retry_after_s >= 0:
        return retry_after_s + rng.uniform(0.0, base_s)
    ceiling = min(cap_s, base_s * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    return rng.uniform(0.0, ceiling)


@dataclass(frozen=True)
class BreakerSettings:
    """When a breaker opens and how it recovers."""

    consecutive_failures: int = 5  # open after this many failures in a row
    failure_rate: float = 0.5  # ... or when failures / requests in the window exceed this
    min_requests: int = 20  # ... provided the window holds at least this many requests
    window_s: float = 30.0
    window_buckets: int = 10  # the rolling window is kept as this many time slices
    cool_down_s: float = 30.0  # time spent open before probes are let through
    half_open_probes: int = 1  # concurrent probes allowed while half-open

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1 or self.min_requests < 1 or self.half_open_probes < 1:
            raise ValueError("breaker counts must be at least 1")
        if not 0.0 < self.failure_rate <= 1.0:
            raise ValueError("failure_rate must be in (0, 1]")
        if self.window_s <= 0 or self.cool_down_s < 0 or self.window_buckets < 1:
            raise ValueError("breaker windows must be positive")


@dataclass
class _Slice:
    start: float
    requests: int = 0
    failures: int = 0


class _RollingWindow:
    """Request and failure counts over the last ``window_s`` seconds, in fixed time slices, so
    memory stays constant whatever the request rate."""

    def __init__(self, window_s: float, buckets: int) -> None:
        self._window_s = window_s
        self._slice_s = window_s / buckets
        self._slices: deque[_Slice] = deque()

    def add(self, now: float, failed: bool) -> None:
        self._expire(now)
        start = math.floor(now / self._slice_s) * self._slice_s
        if not self._slices or self._slices[-1].start != start:
            self._slices.append(_Slice(start))
        current = self._slices[-1]
        current.requests += 1
        current.failures += int(failed)

    def counts(self, now: float) -> tuple[int, int]:
        self._expire(now)
        return (sum(s.requests for s in self._slices), sum(s.failures for s in self._slices))

    def clear(self) -> None:
        self._slices.clear()

    def _expire(self, now: float) -> None:
        while self._slices and self._slices[0].start + self._slice_s <= now - self._window_s:
            self._slices.popleft()


class CircuitBreaker:
    """Per (model, endpoint): stop sending traffic to an endpoint that is failing, then test it
    with a few probes before trusting it again.

    closed --(N consecutive failures, or failure rate over the window)--> open
    open --(cool-down elapsed)--> half_open --(probe succeeds)--> closed
                                            --(probe fails)--> open (cool-down restarts)

    :meth:`allow` reserves the right to send one request (a probe slot when half-open); every
    ``allow() == True`` must be followed by exactly one ``record_*`` call, which releases it.
    """

    def __init__(self, settings: BreakerSettings, clock: Clock) -> None:
        self.settings = settings
        self._clock = clock
        self._state: BreakerState = "closed"
        self._opened_at = 0.0
        self._consecutive = 0
        self._probes = 0
        self._window = _RollingWindow(settings.window_s, settings.window_buckets)
        self.opened_count = 0  # how often it tripped, for metrics

    @property
    def state(self) -> BreakerState:
        self._refresh()
        return self._state

    @property
    def state_code(self) -> int:
        return BREAKER_STATE_CODES[self.state]

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self._opened_at + self.settings.cool_down_s - self._clock())

    def allow(self) -> bool:
        """May one request go to this endpoint now? Reserves a probe slot when half-open."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and self._probes < self.settings.half_open_probes:
            self._probes += 1
            return True
        return False

    def record(self, failure_kind: str | None) -> None:
        """Record an outcome: ``None`` for success, else the :class:`ProviderError` kind."""
        if failure_kind is None:
            self.record_success()
        elif failure_kind in BREAKER_KINDS:
            self.record_failure()
        else:
            self.record_neutral()

    def record_success(self) -> None:
        if self._state == "half_open":
            self._close()
            return
        if self._state == "open":
            return  # a request that started before the breaker opened
        self._consecutive = 0
        self._window.add(self._clock(), failed=False)

    def record_failure(self) -> None:
        now = self._clock()
        if self._state == "half_open":
            self._open(now)
            return
        if self._state == "open":
            return  # a request that started before the breaker opened
        self._consecutive += 1
        self._window.add(now, failed=True)
        if self._consecutive >= self.settings.consecutive_failures or self._rate_exceeded(now):
            self._open(now)

    def record_neutral(self) -> None:
        """An outcome that says nothing about the endpoint's health (or a reservation given
        back unused): frees a probe slot, changes nothing else."""
        if self._state == "half_open" and self._probes > 0:
            self._probes -= 1

    def _rate_exceeded(self, now: float) -> bool:
        requests, failures = self._window.counts(now)
        return (
            requests >= self.settings.min_requests
            and failures / requests > self.settings.failure_rate
        )

    def _refresh(self) -> None:
        if self._state == "open" and self._clock() >= self._opened_at + self.settings.cool_down_s:
            self._state = "half_open"
            self._probes = 0

    def _open(self, now: float) -> None:
        self._state = "open"
        self._opened_at = now
        self._probes = 0
        self.opened_count += 1

    def _close(self) -> None:
        self._state = "closed"
        self._consecutive = 0
        self._probes = 0
        self._window.clear()


class TokenBucket:
    """A rate limit as a bucket refilled at ``rate_per_s`` up to ``capacity``.

    Used per model for requests per minute (n = 1 per request) and tokens per minute (n = the
    request's estimated tokens, corrected with :meth:`adjust` once usage is known).
    """

    def __init__(self, rate_per_s: float, capacity: float, clock: Clock) -> None:
        if rate_per_s <= 0 or capacity <= 0:
            raise ValueError("a token bucket needs a positive rate and capacity")
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._updated = clock()

    @classmethod
    def per_minute(cls, limit: float, clock: Clock) -> TokenBucket:
        """A provider's "N per minute" limit: a minute's worth of burst, refilled evenly."""
        return cls(limit / 60.0, limit, clock)

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def wait_time(self, n: float) -> float:
        """Seconds until ``n`` tokens are available; takes nothing. A request larger than the
        whole bucket is treated as needing a full bucket, else it could never go through."""
        self._refill()
        need = min(n, self.capacity)
        return 0.0 if self._tokens >= need else (need - self._tokens) / self.rate_per_s

    def take(self, n: float = 1.0) -> float:
        """Take ``n`` tokens: returns 0 when granted, else the wait needed (nothing taken)."""
        wait = self.wait_time(n)
        if wait == 0.0:
            self._tokens -= min(n, self.capacity)
        return wait

    def adjust(self, delta: float) -> None:
        """Charge (positive) or refund (negative) tokens after the fact; may leave a debt."""
        self._refill()
        self._tokens = min(self.capacity, self._tokens - delta)

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(self.capacity, self._tokens + elapsed * self.rate_per_s)
        self._updated = now


@dataclass
class RateLimiter:
    """One model's request and token buckets, plus any Retry-After its provider announced."""

    clock: Clock
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    blocked_until: float = 0.0

    def acquire(self, estimated_tokens: int) -> float:
        """Take one request and ``estimated_tokens`` if all are available now (returns 0);
        otherwise take nothing and return the seconds to wait."""
        wait = max(0.0, self.blocked_until - self.clock())
        if self.requests is not None:
            wait = max(wait, self.requests.wait_time(1))
        if self.tokens is not None:
            wait = max(wait, self.tokens.wait_time(estimated_tokens))
        if wait > 0:
            return wait
        if self.requests is not None:
            self.requests.take(1)
        if self.tokens is not None:
            self.tokens.take(estimated_tokens)
        return 0.0

    def settle(self, estimated_tokens: int, actual_tokens: int) -> None:
        """Correct the token bucket with the usage the provider reported."""
        if self.tokens is not None:
            self.tokens.adjust(actual_tokens - estimated_tokens)

    def block_for(self, seconds: float) -> None:
        """The provider said Retry-After: hold every request to this model until then."""
        self.blocked_until = max(self.blocked_until, self.clock() + seconds)


class ConcurrencyLimits:
    """Bounded in-flight requests per model and in total, so load waits at the Kafka consumer
    (paused partitions) rather than in an unbounded queue of coroutines."""

    def __init__(
        self,
        global_max: int,
        per_model: Mapping[str, int] | None = None,
        *,
        default_per_model: int | None = None,
    ) -> None:
        if global_max < 1:
            raise ValueError("global_max must be at least 1")
        self.global_max = global_max
        self._global = asyncio.Semaphore(global_max)
        self._limits = dict(per_model or {})
        self._default = default_per_model
        self._models: dict[str, asyncio.Semaphore] = {}
        self._in_flight: dict[str, int] = {}
        self.in_flight = 0

    def limit_for(self, model: str) -> int | None:
        return self._limits.get(model, self._default)

    def in_flight_for(self, model: str) -> int:
        return self._in_flight.get(model, 0)

    def saturated(self, model: str | None = None) -> bool:
        """True when no request could start now (globally, or for ``model``): the signal to
        pause consuming."""
        if self.in_flight >= self.global_max:
            return True
        if model is None:
            return False
        limit = self.limit_for(model)
        return limit is not None and self.in_flight_for(model) >= limit

    async def acquire(self, model: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a slot for ``model`` (its own first, then a global one,
        so a request blocked on a busy model never holds a global slot). False on timeout."""
        model_sem = self._semaphore(model)
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                if model_sem is not None:
                    await model_sem.acquire()
                try:
                    await self._global.acquire()
                except BaseException:
                    if model_sem is not None:
                        model_sem.release()
                    raise
        except TimeoutError:
            return False
        self.in_flight += 1
        self._in_flight[model] = self._in_flight.get(model, 0) + 1
        return True

    def release(self, model: str) -> None:
        self.in_flight -= 1
        self._in_flight[model] -= 1
        self._global.release()
        model_sem = self._models.get(model)
        if model_sem is not None:
            model_sem.release()

    def _semaphore(self, model: str) -> asyncio.Semaphore | None:
        sem = self._models.get(model)
        if sem is None:
            limit = self.limit_for(model)
            if limit is None:
                return None
            sem = self._models[model] = asyncio.Semaphore(limit)
        return sem


@dataclass(frozen=True)
class ModelLimits:
    """The per-model settings the board is built from (from the model profiles)."""

    rpm: int | None = None
    tpm: int | None = None
    max_in_flight: int | None = None
    breaker: BreakerSettings = field(default_factory=BreakerSettings)


class BreakerBoard:
    """Every model's breakers (one per endpoint), rate limiter and in-flight limit, in one place
    the executor and the metrics exporter share."""

    def __init__(
        self,
        models: Mapping[str, ModelLimits],
        *,
        global_max_in_flight: int,
        clock: Clock,
        default: ModelLimits | None = None,
    ) -> None:
        self._settings = dict(models)
        self._default = default or ModelLimits()
        self._clock = clock
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self._rates: dict[str, RateLimiter] = {}
        self.concurrency = ConcurrencyLimits(
            global_max_in_flight,
            {m: s.max_in_flight for m, s in self._settings.items() if s.max_in_flight},
            default_per_model=self._default.max_in_flight,
        )

    def settings_for(self, model: str) -> ModelLimits:
        return self._settings.get(model, self._default)

    def breaker(self, model: str, endpoint: str) -> CircuitBreaker:
        key = (model, endpoint)
        found = self._breakers.get(key)
        if found is None:
            found = self._breakers[key] = CircuitBreaker(
                self.settings_for(model).breaker, self._clock
            )
        return found

    def rate(self, model: str) -> RateLimiter:
        found = self._rates.get(model)
        if found is None:
            rpm, tpm = self.settings_for(model).rpm, self.settings_for(model).tpm
            found = self._rates[model] = RateLimiter(
                self._clock,
                requests=TokenBucket.per_minute(rpm, self._clock) if rpm else None,
                tokens=TokenBucket.per_minute(tpm, self._clock) if tpm else None,
            )
        return found

    def breaker_states(self) -> dict[tuple[str, str], BreakerState]:
        """(model, endpoint) → state, for the breaker-state gauge and the ops endpoint."""
        return {key: breaker.state for key, breaker in self._breakers.items()}
