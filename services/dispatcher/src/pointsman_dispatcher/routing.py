"""Routing decisions: a tag, the query's constraints and model health in; a decision out.

:func:`decide` is pure (no I/O, no clock: the remaining time to the deadline is an input), so the
whole policy is testable from tables and replayable (``pointsman route --dry-run``). Everything
that can be computed from the routing file alone is precomputed by the loader, which keeps a
decision well under the 1 ms budget. The order in which rules apply is documented in
docs/dispatcher-routing.md; the reason codes it emits are stable strings that the response,
audit and metrics carry.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pointsman.events import ModelHealthEvent, TaggedQueryEvent
from pointsman_dispatcher.cost import estimate_prompt_tokens
from pointsman_dispatcher.policy import RISK_PRECEDENCE, ModelFacts, Priority, RoutingConfig

HealthStatus = Literal["healthy", "degraded", "down"]
ReviewReason = Literal["self_harm", "harmful", "jailbreak", "ambiguous", "failure"]

# Stable reason codes (the filter codes double as fallback-reason prefixes: "code:model").
ALLOWED = "constraint.allowed_models"
FORBIDDEN = "constraint.forbidden_models"
CONTEXT = "constraint.context_window"
MAX_COST = "constraint.max_cost"
DEADLINE = "constraint.deadline"
DEGRADED = "health.degraded"
DOWN = "health.down"
ALL_DOWN = "health.all_down"
TIER_SMALL = "tier.small"
TIER_LARGE = "tier.large"
TIER_STICKY = "tier.sticky"
AMBIGUOUS = "ambiguous"


@dataclass(frozen=True, slots=True)
class ModelHealth:
    status: HealthStatus
    p99_latency_ms: float | None = None


@dataclass(frozen=True, slots=True)
class RouteInput:
    """Everything a decision depends on besides the routing file."""

    domain: str
    risk: str = "none"
    confidence: float = 1.0
    ambiguous: bool = False
    risk_probs: Mapping[str, float] = field(default_factory=dict)
    input_tokens: int = 0  # estimated tokens of the messages sent (without system prompts)
    multi_turn: bool = False
    remaining_ms: float | None = None  # time left to the deadline; None: no deadline
    max_cost_usd: float | None = None
    allowed_models: frozenset[str] | None = None
    forbidden_models: frozenset[str] = frozenset()
    conversation_tier: int | None = None  # highest tier rank this conversation has used
    health: Mapping[str, ModelHealth] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReviewSpec:
    reason: ReviewReason
    priority: Priority


@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["route", "refuse"]
    candidates: tuple[str, ...]  # primary first, then the fallback chain
    reason_code: str
    fallback_reasons: tuple[str, ...] = ()
    review: ReviewSpec | None = None
    tier: int | None = None  # tier rank of the primary
    sticky_tier: int | None = None  # what the conversation's tier becomes (never lower)
    input_tokens: int = 0
    expected_cost_usd: float = 0.0
    counterfactual_cost_usd: float = 0.0
    error_type: str | None = None  # set when no candidate is left: "no_candidate", ...

    @property
    def primary(self) -> str | None:
        return self.candidates[0] if self.candidates else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason_code": self.reason_code,
            "candidates": list(self.candidates),
            "fallback_reasons": list(self.fallback_reasons),
            "review": (
                {"reason": self.review.reason, "priority": self.review.priority}
                if self.review
                else None
            ),
            "tier": self.tier,
            "sticky_tier": self.sticky_tier,
            "input_tokens": self.input_tokens,
            "expected_cost_usd": round(self.expected_cost_usd, 8),
            "counterfactual_cost_usd": round(self.counterfactual_cost_usd, 8),
            "error_type": self.error_type,
        }


def expected_cost(facts: ModelFacts, input_tokens: int) -> float:
    """Cost of one call with the estimated input and the policy's expected output."""
    return (input_tokens + facts.system_tokens) * facts.input_usd_per_token + (
        facts.expected_output_tokens * facts.output_usd_per_token
    )


def is_simple(inp: RouteInput, config: RoutingConfig) -> bool:
    """Confident and simple enough for the small tier of a family."""
    tiering = config.policy.tiering
    return (
        not inp.ambiguous
        and inp.confidence >= tiering.min_confidence
        and inp.input_tokens <= tiering.max_input_tokens
        and not (tiering.single_turn_only and inp.multi_turn)
    )


def decide(inp: RouteInput, config: RoutingConfig) -> Decision:
    """The route for one query (pure). See docs/dispatcher-routing.md for the order of rules."""
    policy = config.policy
    facts = config.facts
    counterfactual = expected_cost(facts[policy.default_model], inp.input_tokens)

    def refuse(reason_code: str, error_type: str | None, reasons: Iterable[str] = ()) -> Decision:
        return Decision(
            action="refuse",
            candidates=(),
            reason_code=reason_code,
            fallback_reasons=tuple(reasons),
            review=review,
            sticky_tier=inp.conversation_tier,
            input_tokens=inp.input_tokens,
            counterfactual_cost_usd=counterfactual,
            error_type=error_type,
        )

    # 1. Which rule: a risk class (in precedence order), else ambiguity, else the domain.
    review: ReviewSpec | None = None
    tiered = False
    for risk in RISK_PRECEDENCE:
        rule = policy.risk[risk]
        threshold = rule.min_probability
        if inp.risk == risk or (
            threshold is not None and inp.risk_probs.get(risk, 0.0) >= threshold
        ):
            reason_code = f"risk.{risk}"
            if rule.review_priority is not None:
                review = ReviewSpec(reason=risk, priority=rule.review_priority)  # type: ignore[arg-type]
            if rule.action == "refuse":
                return refuse(reason_code, None)
            base = rule.candidates
            break
    else:
        if inp.ambiguous:
            reason_code = AMBIGUOUS
            base = policy.ambiguous.candidates
            if policy.ambiguous.review_priority is not None:
                review = ReviewSpec(reason="ambiguous", priority=policy.ambiguous.review_priority)
        else:
            reason_code = f"domain.{inp.domain}"
            base = policy.domains.get(inp.domain) or policy.domains["general"]
            tiered = policy.tiering.enabled

    # 2. A deadline already passed: nothing can answer in time.
    if inp.remaining_ms is not None and inp.remaining_ms <= 0:
        return refuse(DEADLINE, "deadline_exceeded")

    # 3. Tiering inside a family (domain routes only), never below the conversation's tier.
    if tiered:
        base, tier_code = _apply_tiering(base, inp, config)
        if tier_code is not None:
            reason_code = tier_code
    first_pick = base[0]

    # 4. Hard constraints: each filter drops candidates; an empty chain is a typed refusal.
    dropped: dict[str, str] = {}
    candidates = list(base)
    budget = _budget(inp.max_cost_usd, policy.max_cost_usd)
    filters: tuple[tuple[str, Callable[[str], bool]], ...] = (
        (ALLOWED, lambda m: inp.allowed_models is None or m in inp.allowed_models),
        (FORBIDDEN, lambda m: m not in inp.forbidden_models),
        (
            CONTEXT,
            lambda m: (
                inp.input_tokens + facts[m].reserved_tokens <= config.models[m].context_window
            ),
        ),
        (MAX_COST, lambda m: budget is None or expected_cost(facts[m], inp.input_tokens) <= budget),
        (DEADLINE, lambda m: _fits_deadline(inp, m)),
    )
    for code, keep in filters:
        kept = []
        for model_id in candidates:
            if keep(model_id):
                kept.append(model_id)
            else:
                dropped[model_id] = code
        candidates = kept
        if not candidates:
            return refuse(code, "no_candidate", _reasons(dropped))

    # 5. Health: degraded models go last, down models go unless nothing else is left.
    if inp.health:
        candidates = _by_health(candidates, inp.health, dropped)

    candidates = candidates[: policy.max_candidates]
    primary = candidates[0]
    if first_pick in dropped and reason_code.startswith(("domain.", "tier.")):
        reason_code = dropped[first_pick]  # the route's own pick was filtered or demoted
    tier = facts[primary].tier_rank
    return Decision(
        action="route",
        candidates=tuple(candidates),
        reason_code=reason_code,
        fallback_reasons=_reasons(dropped),
        review=review,
        tier=tier,
        sticky_tier=max(tier, inp.conversation_tier or 0),
        input_tokens=inp.input_tokens,
        expected_cost_usd=expected_cost(facts[primary], inp.input_tokens),
        counterfactual_cost_usd=counterfactual,
    )


def _apply_tiering(
    base: tuple[str, ...], inp: RouteInput, config: RoutingConfig
) -> tuple[tuple[str, ...], str | None]:
    """Each candidate becomes the member of its family at the tier this query needs.

    The listed models a substitution displaced stay in the chain as later fallbacks (so a
    failure of the chosen tier still has somewhere to go), except below the conversation's tier.
    """
    simple = is_simple(inp, config)
    floor = inp.conversation_tier or 0
    out: list[str] = []
    displaced: list[str] = []
    code: str | None = None
    for position, model_id in enumerate(base):
        fact = config.facts[model_id]
        ladder = config.ladders.get((fact.family, inp.domain))
        chosen = model_id
        if ladder is not None and len(ladder.ranks) > 1:
            if simple:
                index = min(bisect_left(ladder.ranks, floor), len(ladder.ranks) - 1)
            else:
                index = len(ladder.ranks) - 1
            if ladder.ranks[index] != fact.tier_rank:
                chosen = ladder.models[index]
                if fact.tier_rank >= floor:
                    displaced.append(model_id)
            if position == 0:
                code = TIER_LARGE if not simple else TIER_STICKY if index > 0 else TIER_SMALL
        if chosen not in out:
            out.append(chosen)
    out.extend(m for m in displaced if m not in out)
    return tuple(out), code


def _budget(query_budget: float | None, policy_budget: float | None) -> float | None:
    if query_budget is None:
        return policy_budget
    return query_budget if policy_budget is None else min(query_budget, policy_budget)


def _fits_deadline(inp: RouteInput, model_id: str) -> bool:
    """A model whose recent p99 latency exceeds the time left would answer too late."""
    if inp.remaining_ms is None:
        return True
    health = inp.health.get(model_id)
    return (
        health is None or health.p99_latency_ms is None or health.p99_latency_ms <= inp.remaining_ms
    )


def _by_health(
    candidates: list[str], health: Mapping[str, ModelHealth], dropped: dict[str, str]
) -> list[str]:
    healthy: list[str] = []
    degraded: list[str] = []
    down: list[str] = []
    for model_id in candidates:
        state = health.get(model_id)
        status = state.status if state is not None else "healthy"
        (healthy if status == "healthy" else degraded if status == "degraded" else down).append(
            model_id
        )
    if not healthy and not degraded:
        for model_id in down:
            dropped[model_id] = ALL_DOWN
        return down
    for model_id in degraded:
        dropped[model_id] = DEGRADED
    for model_id in down:
        dropped[model_id] = DOWN
    return healthy + degraded


def _reasons(dropped: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(f"{code}:{model_id}" for model_id, code in dropped.items())


# --- inputs from events (edges) ----------------------------------------------------------------


def route_input_from_event(
    event: TaggedQueryEvent,
    *,
    now: datetime,
    conversation_tier: int | None = None,
    health: Mapping[str, ModelHealth] | None = None,
) -> RouteInput:
    """The routing input of a tagged query at time ``now`` (the caller owns the clock)."""
    query = event.query
    tags = event.tags
    metadata = query.metadata
    if query.messages is not None:
        contents = [m.content for m in query.messages]
        multi_turn = sum(1 for m in query.messages if m.role != "system") > 1
    else:
        contents = [query.text or ""]
        multi_turn = False
    deadlines = []
    if metadata.deadline is not None:
        deadlines.append(as_utc(metadata.deadline))
    if metadata.max_latency_ms is not None:
        deadlines.append(as_utc(query.created_at) + timedelta(milliseconds=metadata.max_latency_ms))
    now = as_utc(now)
    remaining_ms = min((d - now).total_seconds() * 1000 for d in deadlines) if deadlines else None
    allowed = metadata.allowed_models
    return RouteInput(
        domain=str(tags.domain),
        risk=str(tags.risk),
        confidence=tags.confidence,
        ambiguous=tags.ambiguous,
        risk_probs={str(k): v for k, v in tags.risk_probs.items()},
        input_tokens=estimate_prompt_tokens(contents),
        multi_turn=multi_turn,
        remaining_ms=remaining_ms,
        max_cost_usd=metadata.max_cost_usd,
        allowed_models=frozenset(allowed) if allowed is not None else None,
        forbidden_models=frozenset(metadata.forbidden_models),
        conversation_tier=conversation_tier,
        health=health or {},
    )


def health_map(events: Iterable[ModelHealthEvent]) -> dict[str, ModelHealth]:
    """Latest health per model from model-health events (newest ``created_at`` wins)."""
    latest: dict[str, ModelHealthEvent] = {}
    for event in events:
        seen = latest.get(event.model)
        if seen is None or event.created_at >= seen.created_at:
            latest[event.model] = event
    return {
        model: ModelHealth(status=e.status, p99_latency_ms=e.p99_latency_ms)
        for model, e in latest.items()
    }


def as_utc(moment: datetime) -> datetime:
    """Naive datetimes in events are taken as UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
