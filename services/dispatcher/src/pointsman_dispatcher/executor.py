"""Runs one query's candidate chain: retries, fallback and typed failure, within a deadline and a
cost budget.

The routing policy decides the ordered candidates; this module only carries them out. It never
raises for a provider failure (only cancellation propagates): every outcome is an
:class:`Execution` that records each attempt, so the response event can show what happened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pointsman.events import Attempt, Usage
from pointsman.logs import REDACTED, redact
from pointsman_dispatcher.cost import Price, cost_usd, estimate_prompt_tokens
from pointsman_dispatcher.providers.base import (
    ChatRequest,
    ChatResult,
    DeltaCallback,
    Provider,
    ProviderError,
    ProviderTarget,
)
from pointsman_dispatcher.resilience import BreakerBoard, CircuitBreaker, Clock, backoff_delay

Sleep = Callable[[float], Awaitable[None]]
AttemptStatus = Literal["ok", "error", "timeout", "rate_limited", "circuit_open", "skipped"]
ExecutionErrorType = Literal[
    "no_candidates",  # the policy left nothing to try
    "all_providers_failed",  # every candidate failed or was unavailable
    "deadline_exceeded",  # the query's deadline ran out before an answer
    "budget_exhausted",  # a candidate that might have answered was over the cost budget
    "stream_interrupted",  # streamed text reached the caller, then the stream broke
]

_MAX_ERROR_CHARS = 2000
_MAX_ENDPOINT_CHARS = 500


@dataclass(frozen=True)
class Candidate:
    """One model the policy is willing to use, with what it costs."""

    model: str  # the profile's model id (what attempts and responses name)
    target: ProviderTarget
    price: Price  # USD per 1M input and output tokens
    max_attempts: int = 2  # calls on this model before moving on (1 = no retry)
    system: str | None = None  # the profile's system prompt, placed before the query's own


@dataclass(frozen=True)
class Budget:
    """Limits for the whole chain: an absolute deadline on the executor's clock (monotonic
    seconds) and a cost ceiling in USD (None = unlimited), minus what was spent already."""

    deadline: float
    max_cost_usd: float | None = None
    spent_usd: float = 0.0


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 0.25
    cap_s: float = 8.0


@dataclass(frozen=True)
class ExecutionError:
    type: ExecutionErrorType
    message: str


@dataclass(frozen=True)
class Execution:
    """What running the chain produced: an answer or a typed error, and every attempt."""

    attempts: tuple[Attempt, ...]
    result: ChatResult | None = None
    model: str | None = None  # the model that answered (or streamed the partial answer)
    fallback: bool = False  # answered by a candidate other than the first
    fallback_reasons: tuple[str, ...] = ()  # "<model>:<why it was left>" in chain order
    error: ExecutionError | None = None
    cost_usd: float = 0.0
    partial_text: str = field(default="", repr=False)  # what reached the caller before a cut

    @property
    def ok(self) -> bool:
        return self.result is not None


def request_for(candidate: Candidate, request: ChatRequest) -> ChatRequest:
    """The request as this candidate gets it: its profile's system prompt first."""
    if not candidate.system:
        return request
    system = candidate.system if not request.system else f"{candidate.system}\n\n{request.system}"
    return dataclasses.replace(request, system=system)


def estimate_input_tokens(request: ChatRequest) -> int:
    """The prompt's tokens before the provider has counted them (for budgets and TPM)."""
    return estimate_prompt_tokens((m.content for m in request.messages), request.system)


def attempt_cost_usd(candidate: Candidate, input_tokens: int, output_tokens: int) -> float:
    return cost_usd(candidate.price, input_tokens, output_tokens)


def expected_cost_usd(candidate: Candidate, request: ChatRequest) -> float:
    """The most this candidate can cost for this request: estimated input plus max_tokens of
    output, so a budget check that passes cannot be overspent by the answer."""
    return attempt_cost_usd(candidate, estimate_input_tokens(request), request.max_tokens)


def public_endpoint(target: ProviderTarget) -> str:
    """The endpoint as it may appear in events and logs: no user-info, query or fragment
    (Gemini-style ``?key=`` never leaves the process)."""
    parts = urlsplit(target.base_url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    clean = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return (clean or target.provider)[:_MAX_ENDPOINT_CHARS]


def _safe_message(error: ProviderError, target: ProviderTarget) -> str:
    text = f"{error.kind}: {error.message}"
    for secret in _secrets_of(target):
        text = text.replace(secret, REDACTED)
    return redact(text)[:_MAX_ERROR_CHARS]


def _secrets_of(target: ProviderTarget) -> list[str]:
    found = []
    if target.api_key is not None:
        found.append(target.api_key.get_secret_value())
    if target.aws is not None:
        found.append(target.aws.secret_access_key.get_secret_value())
        if target.aws.session_token is not None:
            found.append(target.aws.session_token.get_secret_value())
    return [s for s in found if s]


def _status_of(error: ProviderError) -> AttemptStatus:
    if error.kind == "timeout":
        return "timeout"
    if error.kind == "rate_limited":
        return "rate_limited"
    return "error"


@dataclass
class _Left:
    """A candidate given up on, and why (a short code for fallback reasons)."""

    reason: str


@dataclass
class _Interrupted:
    """A committed stream broke: the chain stops here."""

    error: ProviderError


@dataclass
class _Run:
    """Mutable state of one execution."""

    request: ChatRequest
    budget: Budget
    board: BreakerBoard
    providers: Mapping[str, Provider]
    clock: Clock
    sleep: Sleep
    rng: random.Random
    retry: RetryPolicy
    on_delta: DeltaCallback | None
    attempts: list[Attempt] = field(default_factory=list)
    spent_usd: float = 0.0
    delivered: bool = False
    sent: list[str] = field(default_factory=list)  # the text on_delta received, in order
    deadline_hit: bool = False
    budget_hit: bool = False
    input_tokens: int = field(init=False)  # the prompt's estimate, once per execution

    def __post_init__(self) -> None:
        self.input_tokens = estimate_input_tokens(self.request)

    def time_left(self) -> float:
        return self.budget.deadline - self.clock()

    def remaining_usd(self) -> float | None:
        if self.budget.max_cost_usd is None:
            return None
        return self.budget.max_cost_usd - self.budget.spent_usd - self.spent_usd

    def deliver(self, delta: str) -> None:
        self.delivered = True
        self.sent.append(delta)
        if self.on_delta is not None:
            self.on_delta(delta)

    def skip(self, candidate: Candidate, status: AttemptStatus, why: str) -> None:
        self.attempts.append(
            Attempt(
                model=candidate.model,
                provider=candidate.target.provider,
                endpoint=public_endpoint(candidate.target),
                status=status,
                latency_ms=0.0,
                error=why[:_MAX_ERROR_CHARS],
            )
        )

    async def try_candidate(self, candidate: Candidate) -> ChatResult | _Left | _Interrupted:
        """Call one candidate, retrying on the same model while that can still pay off."""
        target = candidate.target
        provider = self.providers.get(target.provider)
        if provider is None:
            self.skip(candidate, "skipped", f"no adapter for provider {target.provider!r}")
            return _Left("no_adapter")
        breaker = self.board.breaker(candidate.model, public_endpoint(target))
        calls = 0
        while True:
            blocked = await self._admit(candidate, breaker)
            if blocked is not None:
                return blocked
            calls += 1
            outcome = await self._call(candidate, provider, breaker)
            if not isinstance(outcome, ProviderError):
                return outcome
            if outcome.committed or self.delivered:
                return _Interrupted(outcome)
            if not outcome.retryable or calls >= candidate.max_attempts:
                return _Left(outcome.kind)
            delay = backoff_delay(
                calls,
                base_s=self.retry.base_s,
                cap_s=self.retry.cap_s,
                retry_after_s=outcome.retry_after_s,
                rng=self.rng,
            )
            if delay >= self.time_left():
                late = outcome.retry_after_s is not None
                return _Left("retry_after_past_deadline" if late else outcome.kind)
            await self.sleep(delay)

    async def _admit(self, candidate: Candidate, breaker: CircuitBreaker) -> _Left | None:
        """Deadline, budget, breaker, rate limit and in-flight slot, in that order. On success
        the caller holds a breaker reservation and a concurrency slot."""
        if self.time_left() <= 0:
            self.deadline_hit = True
            self.skip(candidate, "skipped", "deadline passed before this candidate could run")
            return _Left("deadline")
        expected = attempt_cost_usd(candidate, self.input_tokens, self.request.max_tokens)
        remaining = self.remaining_usd()
        if remaining is not None and expected > remaining:
            self.budget_hit = True
            self.skip(
                candidate,
                "skipped",
                f"over budget: up to ${expected:.6f} expected, ${max(remaining, 0):.6f} left",
            )
            return _Left("over_budget")
        if not breaker.allow():
            self.skip(
                candidate, "circuit_open", f"circuit open, next probe in {breaker.retry_in():.1f}s"
            )
            return _Left("circuit_open")
        try:
            return await self._take_capacity(candidate, breaker)
        except asyncio.CancelledError:
            breaker.record_neutral()
            raise

    async def _take_capacity(self, candidate: Candidate, breaker: CircuitBreaker) -> _Left | None:
        """Rate-limit tokens (waiting if that fits the deadline), then an in-flight slot."""
        rate = self.board.rate(candidate.model)
        tokens = self._estimated_tokens()
        wait = rate.acquire(tokens)
        while wait > 0:
            if wait >= self.time_left():
                breaker.record_neutral()
                self.skip(candidate, "skipped", f"rate limit needs {wait:.2f}s, past the deadline")
                return _Left("rate_limit_past_deadline")
            await self.sleep(wait)
            wait = rate.acquire(tokens)
        if not await self.board.concurrency.acquire(candidate.model, self.time_left()):
            breaker.record_neutral()
            rate.settle(tokens, 0)
            self.deadline_hit = self.time_left() <= 0
            self.skip(candidate, "skipped", "no in-flight slot free before the deadline")
            return _Left("concurrency_limit")
        return None

    async def _call(
        self, candidate: Candidate, provider: Provider, breaker: CircuitBreaker
    ) -> ChatResult | ProviderError:
        """One call under the per-attempt timeout; updates breaker, buckets and attempts."""
        target = candidate.target
        timeout_s = min(target.timeout_s, self.time_left())
        started = self.clock()
        try:
            async with asyncio.timeout(timeout_s):
                result: ChatResult | ProviderError = await provider.complete(
                    dataclasses.replace(target, timeout_s=timeout_s),
                    request_for(candidate, self.request),
                    on_delta=self.deliver if self.on_delta is not None else None,
                )
        except ProviderError as error:
            result = error
        except TimeoutError:
            result = ProviderError("timeout", f"no answer within {timeout_s:.2f}s")
        except asyncio.CancelledError:
            breaker.record_neutral()
            raise
        except Exception as exc:  # an adapter bug must not take the dispatcher down
            result = ProviderError("invalid_response", f"adapter raised {type(exc).__name__}")
        finally:
            self.board.concurrency.release(candidate.model)
        measured_ms = max(0.0, (self.clock() - started) * 1000)
        if isinstance(result, ProviderError):
            self._record_error(candidate, breaker, result, measured_ms)
            if result.kind == "timeout" and timeout_s < target.timeout_s:
                self.deadline_hit = True
        else:
            self._record_success(candidate, breaker, result, measured_ms)
        return result

    def _record_success(
        self, candidate: Candidate, breaker: CircuitBreaker, result: ChatResult, measured_ms: float
    ) -> None:
        breaker.record(None)
        used = result.input_tokens + result.output_tokens
        self.board.rate(candidate.model).settle(self._estimated_tokens(), used)
        cost = attempt_cost_usd(candidate, result.input_tokens, result.output_tokens)
        self.spent_usd += cost
        self.attempts.append(
            Attempt(
                model=candidate.model,
                provider=candidate.target.provider,
                endpoint=public_endpoint(candidate.target),
                status="ok",
                http_status=result.http_status,
                latency_ms=result.latency_ms if result.latency_ms > 0 else measured_ms,
                usage=Usage(input_tokens=result.input_tokens, output_tokens=result.output_tokens),
                cost_usd=cost,
            )
        )

    def _record_error(
        self, candidate: Candidate, breaker: CircuitBreaker, error: ProviderError, measured: float
    ) -> None:
        breaker.record(error.kind)
        rate = self.board.rate(candidate.model)
        # Nothing was generated: give back the output part of the token estimate.
        rate.settle(self._estimated_tokens(), self.input_tokens)
        if error.kind == "rate_limited" and error.retry_after_s:
            rate.block_for(error.retry_after_s)
        self.attempts.append(
            Attempt(
                model=candidate.model,
                provider=candidate.target.provider,
                endpoint=public_endpoint(candidate.target),
                status=_status_of(error),
                http_status=error.http_status,
                latency_ms=error.latency_ms if error.latency_ms > 0 else measured,
                error=_safe_message(error, candidate.target),
            )
        )

    def _estimated_tokens(self) -> int:
        return self.input_tokens + self.request.max_tokens

    def finish(
        self,
        chain: Sequence[Candidate],
        reasons: list[str],
        *,
        answered: tuple[int, ChatResult] | None = None,
        interrupted: tuple[Candidate, ProviderError] | None = None,
    ) -> Execution:
        attempts = tuple(self.attempts)
        total = sum(a.cost_usd for a in attempts)
        if answered is not None:
            index, result = answered
            return Execution(
                attempts=attempts,
                result=result,
                model=chain[index].model,
                fallback=index > 0,
                fallback_reasons=tuple(reasons),
                cost_usd=total,
            )
        if interrupted is not None:
            candidate, error = interrupted
            message = "the stream broke after text reached the caller; no model switch: "
            return Execution(
                attempts=attempts,
                model=candidate.model,
                fallback_reasons=tuple(reasons),
                error=ExecutionError(
                    "stream_interrupted", message + _safe_message(error, candidate.target)
                ),
                cost_usd=total,
                # What reached the caller: the executor's own timeout cancels the adapter
                # mid-stream with an error that never saw the text.
                partial_text="".join(self.sent) or error.partial_text,
            )
        kind: ExecutionErrorType
        if not chain:
            kind = "no_candidates"
        elif self.deadline_hit:
            kind = "deadline_exceeded"
        elif self.budget_hit:
            kind = "budget_exhausted"
        else:
            kind = "all_providers_failed"
        summary = f"{len(chain)} candidates, {len(attempts)} attempts: " + "; ".join(reasons)
        return Execution(
            attempts=attempts,
            fallback_reasons=tuple(reasons),
            error=ExecutionError(kind, summary[:_MAX_ERROR_CHARS]),
            cost_usd=total,
        )


async def execute(
    chain: Sequence[Candidate],
    request: ChatRequest,
    budget: Budget,
    providers: Mapping[str, Provider],
    board: BreakerBoard,
    *,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    rng: random.Random | None = None,
    retry: RetryPolicy | None = None,
    on_delta: DeltaCallback | None = None,
) -> Execution:
    """Try ``chain`` in order until one candidate answers.

    ``providers`` maps a provider family (``ProviderTarget.provider``) to its adapter. ``clock``
    must be the same clock the ``board`` was built with. ``on_delta`` receives streamed text;
    once any has been delivered, a failure ends the chain with ``stream_interrupted``.
    """
    run = _Run(
        request=request,
        budget=budget,
        board=board,
        providers=providers,
        clock=clock,
        sleep=sleep,
        rng=rng or random.Random(),
        retry=retry or RetryPolicy(),
        on_delta=on_delta,
    )
    reasons: list[str] = []
    for index, candidate in enumerate(chain):
        outcome = await run.try_candidate(candidate)
        if isinstance(outcome, ChatResult):
            return run.finish(chain, reasons, answered=(index, outcome))
        if isinstance(outcome, _Interrupted):
            reasons.append(f"{candidate.model}:stream_interrupted")
            return run.finish(chain, reasons, interrupted=(candidate, outcome.error))
        reasons.append(f"{candidate.model}:{outcome.reason}")
    return run.finish(chain, reasons)
