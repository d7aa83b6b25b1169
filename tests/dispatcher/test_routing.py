"""The routing policy as tables: one row per rule, constraint and health case."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pointsman.events import (
    ChatMessage,
    ModelHealthEvent,
    QueryEvent,
    QueryMetadata,
    TaggedQueryEvent,
    Tags,
)
from pointsman_dispatcher.cost import Price, cost_usd, estimate_prompt_tokens
from pointsman_dispatcher.policy import RoutingConfig, build_routing_config, load_routing_config
from pointsman_dispatcher.routing import (
    ModelHealth,
    RouteInput,
    decide,
    health_map,
    route_input_from_event,
)


def model(family: str, tier: str | int, inp: float, out: float, **extra: Any) -> dict[str, Any]:
    return {
        "provider": "openai",
        "endpoint": "http://127.0.0.1:9/v1",
        "model": "m",
        "family": family,
        "tier": tier,
        "domains": ["general"],
        "context_window": 8000,
        "max_output_tokens": 1000,
        "timeout_s": 10,
        "price": {"input_per_mtok": inp, "output_per_mtok": out},
        **extra,
    }


def routing_data() -> dict[str, Any]:
    return {
        "version": 1,
        "models": {
            "small": model("fam", "small", 1.0, 2.0),
            "medium": model("fam", "medium", 3.0, 6.0),
            "large": model("fam", "large", 10.0, 20.0),
            "med": model("med", "medium", 2.0, 4.0, domains=["medical"]),
            "tiny-ctx": model("tiny", "small", 0.5, 0.5, context_window=1100),
            "crisis": model("crisis", "large", 5.0, 5.0, capabilities=["crisis_safe"]),
            "guard": model("guard", "large", 5.0, 5.0, capabilities=["hardened"]),
            "other": model("other", "large", 4.0, 8.0),
        },
        "policy": {
            "default_model": "large",
            "expected_output_tokens": 100,
            "max_candidates": 3,
            "domains": {
                "general": ["large", "other"],
                "medical": ["med", "other"],
                "code": ["tiny-ctx", "other", "large"],
            },
            "ambiguous": {"candidates": ["other", "large"], "review": {"priority": "low"}},
            "risk": {
                "self_harm": {
                    "action": "route",
                    "candidates": ["crisis"],
                    "min_probability": 0.3,
                    "require_capability": "crisis_safe",
                    "review": {"priority": "urgent"},
                },
                "harmful": {"action": "refuse", "review": {"priority": "high"}},
                "jailbreak": {"action": "route", "candidates": ["guard"]},
            },
            "tiering": {"min_confidence": 0.8, "max_input_tokens": 200, "single_turn_only": True},
        },
    }


@pytest.fixture(scope="module")
def config() -> RoutingConfig:
    return build_routing_config(routing_data(), "test")


# A confident, short, single-turn general query: the base every row changes one thing of.
BASE = RouteInput(domain="general", confidence=0.95, input_tokens=50)
DOWN = ModelHealth("down")
DEGRADED = ModelHealth("degraded")

# (name, input, action, reason_code, candidates, fallback_reasons, review, error_type)
# fmt: off
CASES: list[tuple[str, RouteInput, str, str, tuple[str, ...], tuple[str, ...], Any, Any]] = [
    (
        "confident and simple -> small tier, larger listed models kept as fallbacks",
        BASE,
        "route", "tier.small", ("small", "other", "large"), (), None, None,
    ),
    (
        "low confidence -> large tier",
        replace(BASE, confidence=0.6),
        "route", "tier.large", ("large", "other"), (), None, None,
    ),
    (
        "long input -> large tier",
        replace(BASE, input_tokens=201),
        "route", "tier.large", ("large", "other"), (), None, None,
    ),
    (
        "multi-turn context -> large tier",
        replace(BASE, multi_turn=True),
        "route", "tier.large", ("large", "other"), (), None, None,
    ),
    (
        "sticky: a conversation at medium never drops to small",
        replace(BASE, conversation_tier=2),
        "route", "tier.sticky", ("medium", "other", "large"), (), None, None,
    ),
    (
        "sticky: a conversation at large stays large, small is not appended",
        replace(BASE, conversation_tier=3),
        "route", "tier.sticky", ("large", "other"), (), None, None,
    ),
    (
        "a family with one tier: domain reason, listed order",
        replace(BASE, domain="medical"),
        "route", "domain.medical", ("med", "other"), (), None, None,
    ),
    (
        "a domain without a route inherits general",
        replace(BASE, domain="travel", confidence=0.5),
        "route", "tier.large", ("large", "other"), (), None, None,
    ),
    (
        "self_harm tag -> crisis route and urgent review",
        replace(BASE, risk="self_harm"),
        "route", "risk.self_harm", ("crisis",), (), ("self_harm", "urgent"), None,
    ),
    (
        "self_harm probability over its threshold fires without the tag",
        replace(BASE, risk_probs={"self_harm": 0.35, "none": 0.65}),
        "route", "risk.self_harm", ("crisis",), (), ("self_harm", "urgent"), None,
    ),
    (
        "self_harm probability under its threshold does not fire",
        replace(BASE, risk_probs={"self_harm": 0.29, "none": 0.71}),
        "route", "tier.small", ("small", "other", "large"), (), None, None,
    ),
    (
        "harmful -> refusal plus review",
        replace(BASE, risk="harmful"),
        "refuse", "risk.harmful", (), (), ("harmful", "high"), None,
    ),
    (
        "jailbreak -> hardened model, no review configured",
        replace(BASE, risk="jailbreak"),
        "route", "risk.jailbreak", ("guard",), (), None, None,
    ),
    (
        "self_harm outranks jailbreak",
        replace(BASE, risk="jailbreak", risk_probs={"self_harm": 0.4, "jailbreak": 0.6}),
        "route", "risk.self_harm", ("crisis",), (), ("self_harm", "urgent"), None,
    ),
    (
        "risk outranks ambiguity",
        replace(BASE, risk="harmful", ambiguous=True),
        "refuse", "risk.harmful", (), (), ("harmful", "high"), None,
    ),
    (
        "ambiguous -> strong general fallback, not tiered, low-priority review",
        replace(BASE, domain="medical", ambiguous=True),
        "route", "ambiguous", ("other", "large"), (), ("ambiguous", "low"), None,
    ),
    (
        "forbidden model removed",
        replace(BASE, confidence=0.5, forbidden_models=frozenset({"large"})),
        "route", "constraint.forbidden_models", ("other",),
        ("constraint.forbidden_models:large",), None, None,
    ),
    (
        "allowed models filter the chain",
        replace(BASE, domain="medical", allowed_models=frozenset({"other"})),
        "route", "constraint.allowed_models", ("other",),
        ("constraint.allowed_models:med",), None, None,
    ),
    (
        "nothing allowed -> typed refusal",
        replace(BASE, allowed_models=frozenset({"nope"})),
        "refuse", "constraint.allowed_models", (),
        (
            "constraint.allowed_models:small",
            "constraint.allowed_models:other",
            "constraint.allowed_models:large",
        ),
        None, "no_candidate",
    ),
    (
        "context window: input + reserved output must fit",
        replace(BASE, domain="code", input_tokens=150),
        "route", "constraint.context_window", ("other", "small", "large"),
        ("constraint.context_window:tiny-ctx",), None, None,
    ),
    (
        "budget: too expensive candidates dropped, cheapest first pick kept",
        replace(BASE, confidence=0.5, max_cost_usd=0.0012),
        "route", "constraint.max_cost", ("other",), ("constraint.max_cost:large",), None, None,
    ),
    (
        "budget below every candidate -> typed refusal",
        replace(BASE, confidence=0.5, max_cost_usd=0.0000001),
        "refuse", "constraint.max_cost", (),
        ("constraint.max_cost:large", "constraint.max_cost:other"), None, "no_candidate",
    ),
    (
        "budget refusal of a self_harm query still asks for review",
        replace(BASE, risk="self_harm", max_cost_usd=0.0000001),
        "refuse", "constraint.max_cost", (),
        ("constraint.max_cost:crisis",), ("self_harm", "urgent"), "no_candidate",
    ),
    (
        "deadline passed -> deadline_exceeded",
        replace(BASE, remaining_ms=0.0),
        "refuse", "constraint.deadline", (), (), None, "deadline_exceeded",
    ),
    (
        "deadline: a model slower than the time left is dropped",
        replace(
            BASE,
            confidence=0.5,
            remaining_ms=500.0,
            health={"large": ModelHealth("healthy", p99_latency_ms=900.0)},
        ),
        "route", "constraint.deadline", ("other",), ("constraint.deadline:large",), None, None,
    ),
    (
        "degraded primary demoted to the end",
        replace(BASE, confidence=0.5, health={"large": DEGRADED}),
        "route", "health.degraded", ("other", "large"), ("health.degraded:large",), None, None,
    ),
    (
        "down model removed",
        replace(BASE, confidence=0.5, health={"large": DOWN}),
        "route", "health.down", ("other",), ("health.down:large",), None, None,
    ),
    (
        "down and degraded: degraded kept last, down removed",
        replace(BASE, confidence=0.5, health={"large": DOWN, "other": DEGRADED}),
        "route", "health.down", ("other",),
        ("health.degraded:other", "health.down:large"), None, None,
    ),
    (
        "everything down: kept, since nothing else remains",
        replace(BASE, confidence=0.5, health={"large": DOWN, "other": DOWN}),
        "route", "health.all_down", ("large", "other"),
        ("health.all_down:large", "health.all_down:other"), None, None,
    ),
    (
        "risk route keeps its reason code under health demotion",
        replace(BASE, risk="self_harm", health={"crisis": DEGRADED}),
        "route", "risk.self_harm", ("crisis",), ("health.degraded:crisis",),
        ("self_harm", "urgent"), None,
    ),
]
# fmt: on


@pytest.mark.parametrize(
    ("inp", "action", "reason", "candidates", "fallbacks", "review", "error_type"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_policy_table(
    config: RoutingConfig,
    inp: RouteInput,
    action: str,
    reason: str,
    candidates: tuple[str, ...],
    fallbacks: tuple[str, ...],
    review: tuple[str, str] | None,
    error_type: str | None,
) -> None:
    decision = decide(inp, config)
    assert decision.action == action
    assert decision.reason_code == reason
    assert decision.candidates == candidates
    assert decision.fallback_reasons == fallbacks
    got_review = (decision.review.reason, decision.review.priority) if decision.review else None
    assert got_review == review
    assert decision.error_type == error_type
    if action == "refuse":
        assert decision.primary is None and decision.expected_cost_usd == 0.0
        assert decision.tier is None


def expected(price_in: float, price_out: float, input_tokens: int, output_tokens: int) -> float:
    return cost_usd(Price(price_in, price_out), input_tokens, output_tokens)


def test_expected_and_counterfactual_cost(config: RoutingConfig) -> None:
    decision = decide(BASE, config)
    assert decision.primary == "small"
    assert decision.expected_cost_usd == pytest.approx(expected(1.0, 2.0, 50, 100))
    assert decision.counterfactual_cost_usd == pytest.approx(expected(10.0, 20.0, 50, 100))
    assert decision.expected_cost_usd < decision.counterfactual_cost_usd


def test_system_prompt_counts_toward_cost_and_output_is_capped() -> None:
    data = routing_data()
    data["models"]["large"]["system_prompt"] = "x" * 400  # 100 tokens + 4 overhead
    data["models"]["large"]["max_output_tokens"] = 60  # below expected_output_tokens 100
    config = build_routing_config(data, "test")
    decision = decide(replace(BASE, confidence=0.5), config)
    assert decision.primary == "large"
    assert decision.expected_cost_usd == pytest.approx(expected(10.0, 20.0, 50 + 104, 60))


def test_policy_budget_applies_without_a_query_budget() -> None:
    data = routing_data()
    data["policy"]["max_cost_usd"] = 0.0012
    config = build_routing_config(data, "test")
    decision = decide(replace(BASE, confidence=0.5), config)
    assert decision.candidates == ("other",)
    assert decision.reason_code == "constraint.max_cost"


def test_tier_is_returned_and_never_lowered(config: RoutingConfig) -> None:
    first = decide(BASE, config)
    assert (first.tier, first.sticky_tier) == (1, 1)
    second = decide(replace(BASE, multi_turn=True, conversation_tier=first.sticky_tier), config)
    assert (second.primary, second.tier, second.sticky_tier) == ("large", 3, 3)
    third = decide(replace(BASE, conversation_tier=second.sticky_tier), config)
    assert third.primary == "large" and third.sticky_tier == 3
    specialist = decide(replace(BASE, domain="medical", conversation_tier=3), config)
    assert specialist.tier == 2 and specialist.sticky_tier == 3


def test_tiering_disabled_keeps_the_listed_order() -> None:
    data = routing_data()
    data["policy"]["tiering"]["enabled"] = False
    config = build_routing_config(data, "test")
    decision = decide(BASE, config)
    assert decision.candidates == ("large", "other")
    assert decision.reason_code == "domain.general"


def test_chain_is_cut_at_max_candidates() -> None:
    data = routing_data()
    data["policy"]["max_candidates"] = 1
    config = build_routing_config(data, "test")
    assert decide(BASE, config).candidates == ("small",)


def test_jailbreak_refusal_variant() -> None:
    data = routing_data()
    data["policy"]["risk"]["jailbreak"] = {"action": "refuse", "review": {"priority": "normal"}}
    config = build_routing_config(data, "test")
    decision = decide(replace(BASE, risk="jailbreak"), config)
    assert (decision.action, decision.reason_code) == ("refuse", "risk.jailbreak")
    assert decision.review is not None and decision.review.priority == "normal"
    assert decision.error_type is None


# --- building the input from an event ------------------------------------------------------------

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def tagged(query: QueryEvent, **tags: Any) -> TaggedQueryEvent:
    fields: dict[str, Any] = {
        "domain": "code",
        "risk": "none",
        "domain_probs": {"code": 0.9, "general": 0.1},
        "risk_probs": {"none": 0.8, "self_harm": 0.2},
        "confidence": 0.9,
        "ambiguous": False,
        "model_version": "test",
        **tags,
    }
    return TaggedQueryEvent(query_id=query.query_id, query=query, tags=Tags(**fields))


def test_route_input_from_a_single_text() -> None:
    query = QueryEvent(
        query_id="q1",
        text="a" * 40,
        created_at=NOW,
        metadata=QueryMetadata(
            max_cost_usd=0.01,
            max_latency_ms=2000,
            deadline=NOW + timedelta(seconds=5),
            allowed_models=["x"],
            forbidden_models=["y"],
        ),
    )
    inp = route_input_from_event(tagged(query), now=NOW + timedelta(milliseconds=500))
    assert inp.domain == "code" and inp.risk == "none" and inp.confidence == 0.9
    assert inp.input_tokens == estimate_prompt_tokens(["a" * 40]) == 10 + 4 + 3
    assert not inp.multi_turn
    assert inp.remaining_ms == pytest.approx(1500.0)  # the latency budget is the nearer limit
    assert inp.max_cost_usd == 0.01
    assert inp.allowed_models == frozenset({"x"}) and inp.forbidden_models == frozenset({"y"})
    assert inp.risk_probs == {"none": 0.8, "self_harm": 0.2}


def test_route_input_from_a_chat_is_multi_turn_and_counts_every_message() -> None:
    messages = [
        ChatMessage(role="system", content="s" * 8),
        ChatMessage(role="user", content="u" * 8),
        ChatMessage(role="assistant", content="a" * 8),
        ChatMessage(role="user", content="v" * 8),
    ]
    query = QueryEvent(
        query_id="q2",
        messages=messages,
        metadata=QueryMetadata(deadline=datetime(2025, 1, 1, 11, 59, 59)),  # naive: UTC
    )
    inp = route_input_from_event(tagged(query), now=NOW, conversation_tier=2)
    assert inp.multi_turn and inp.conversation_tier == 2
    assert inp.input_tokens == 3 + 4 * (2 + 4)
    assert inp.remaining_ms == pytest.approx(-1000.0)


def test_one_user_turn_after_a_system_message_is_single_turn() -> None:
    messages = [ChatMessage(role="system", content="s"), ChatMessage(role="user", content="u")]
    query = QueryEvent(query_id="q3", messages=messages)
    assert not route_input_from_event(tagged(query), now=NOW).multi_turn


def test_health_map_keeps_the_newest_event_per_model() -> None:
    def event(model_id: str, status: str, minute: int) -> ModelHealthEvent:
        return ModelHealthEvent(
            model=model_id,
            status=status,  # type: ignore[arg-type]
            window_s=60,
            requests=10,
            error_rate=0.0,
            p99_latency_ms=100.0 * minute,
            created_at=NOW + timedelta(minutes=minute),
        )

    health = health_map([event("a", "down", 2), event("a", "degraded", 1), event("b", "down", 1)])
    assert health == {"a": ModelHealth("down", 200.0), "b": ModelHealth("down", 100.0)}


def test_demo_config_routes_every_domain_to_a_local_alias() -> None:
    config = load_routing_config(None, environ={})
    for domain in ("medical", "finance", "legal", "travel", "code", "math", "creative", "general"):
        decision = decide(RouteInput(domain=domain, confidence=0.5, input_tokens=40), config)
        assert decision.action == "route"
        assert all(m.startswith("local-") for m in decision.candidates)
    crisis = decide(RouteInput(domain="general", risk="self_harm"), config)
    assert crisis.candidates == ("local-crisis",)
    assert crisis.review is not None and crisis.review.priority == "urgent"


def test_decision_p99_is_under_one_millisecond(config: RoutingConfig) -> None:
    inputs = [
        BASE,
        replace(BASE, confidence=0.5, health={"large": DEGRADED}, max_cost_usd=1.0),
        replace(BASE, risk="self_harm"),
        replace(BASE, domain="code", input_tokens=150, forbidden_models=frozenset({"x"})),
    ]
    timings: list[float] = []
    for i in range(4000):
        inp = inputs[i % len(inputs)]
        started = time.perf_counter()
        decide(inp, config)
        timings.append(time.perf_counter() - started)
    timings.sort()
    p99_ms = timings[int(len(timings) * 0.99)] * 1000
    assert p99_ms < 1.0, f"decision p99 {p99_ms:.3f} ms"


def test_decision_serialises_to_plain_json_types(config: RoutingConfig) -> None:
    record = decide(replace(BASE, risk="self_harm"), config).to_dict()
    assert record["review"] == {"reason": "self_harm", "priority": "urgent"}
    assert record["candidates"] == ["crisis"] and isinstance(record["expected_cost_usd"], float)
    assert record["action"] == "route" and record["error_type"] is None
