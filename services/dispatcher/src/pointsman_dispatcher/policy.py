"""The routing file: load, validate (JSON Schema, then cross-references), precompute.

One YAML file holds ``models`` (profiles) and ``policy``. It is checked twice: against
``defaults/routing.schema.json`` (draft 2020-12) for shape and ranges, then for what a schema
cannot say (a policy naming an unknown model, a tier ladder with a gap, a route whose model does
not serve its domain...). Every problem is collected and raised at once as
:class:`RoutingConfigError`, each naming its key path. Messages never echo a value found under a
credential key, so a secret pasted in the wrong place does not end up in a terminal or a log.

Loading also precomputes what :func:`pointsman_dispatcher.routing.decide` needs per model (prompt
overhead, per-token prices, tier ladders per family and domain), so a decision is table look-ups.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from pointsman_dispatcher.cost import Price, estimate_text_tokens
from pointsman_dispatcher.profiles import (
    AwsCredentialRefs,
    CredentialRef,
    Limits,
    ModelProfile,
    ProviderOptions,
    tier_rank,
)

ROUTING_FILE_ENV = "POINTSMAN_ROUTING_FILE"
DOMAINS = ("medical", "finance", "legal", "travel", "code", "math", "creative", "general")
RISK_PRECEDENCE = ("self_harm", "harmful", "jailbreak")  # checked in this order
SENSITIVE_KEYS = frozenset({"credential", "aws_credentials"})
SECRET_KEY = re.compile(
    r"^(api[_-]?key|apikey|key|secret|secret[_-]?key|secret[_-]?access[_-]?key|token|"
    r"access[_-]?token|auth[_-]?token|session[_-]?token|password|passwd|authorization|bearer)$"
)

Priority = Literal["low", "normal", "high", "urgent"]
Problem = tuple[str, str]


class RoutingConfigError(Exception):
    """The routing file is invalid; ``problems`` lists every ``(key.path, reason)`` found."""

    def __init__(self, problems: list[Problem], source: str) -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  {key}: {why}" for key, why in problems)
        super().__init__(f"invalid routing file ({source}), {len(problems)} problem(s):\n{lines}")


@dataclass(frozen=True, slots=True)
class RiskRule:
    action: Literal["route", "refuse"]
    candidates: tuple[str, ...] = ()
    min_probability: float | None = None  # also fire when the class probability reaches this
    require_capability: str | None = None
    review_priority: Priority | None = None


@dataclass(frozen=True, slots=True)
class AmbiguousRule:
    candidates: tuple[str, ...]
    review_priority: Priority | None = None


@dataclass(frozen=True, slots=True)
class Tiering:
    enabled: bool = True
    min_confidence: float = 0.8
    max_input_tokens: int = 400
    single_turn_only: bool = True


@dataclass(frozen=True, slots=True)
class Policy:
    default_model: str
    domains: Mapping[str, tuple[str, ...]]  # every domain, missing ones inherit ``general``
    ambiguous: AmbiguousRule
    risk: Mapping[str, RiskRule]
    tiering: Tiering = Tiering()
    expected_output_tokens: int = 256
    max_candidates: int = 3
    max_cost_usd: float | None = None


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """Per-model numbers precomputed at load so a decision does no string work."""

    system_tokens: int
    expected_output_tokens: int  # the policy's estimate, capped at the model's max output
    reserved_tokens: int  # system prompt + max output: what the context window must also fit
    input_usd_per_token: float
    output_usd_per_token: float
    tier_rank: int
    family: str


@dataclass(frozen=True, slots=True)
class TierLadder:
    """Models of one family that serve one domain, by tier rank (first listed wins a tie)."""

    ranks: tuple[int, ...]
    models: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    source: str
    models: Mapping[str, ModelProfile]
    policy: Policy
    facts: Mapping[str, ModelFacts] = field(repr=False)
    ladders: Mapping[tuple[str, str], TierLadder] = field(repr=False)

    def summary(self) -> str:
        providers = sorted({m.provider for m in self.models.values()})
        families = {m.family for m in self.models.values()}
        routed = sum(1 for d in DOMAINS if d in self.policy.domains)
        return (
            f"{len(self.models)} models ({', '.join(providers)}), {len(families)} families, "
            f"{routed} domain routes, default model {self.policy.default_model}"
        )


# --- loading (I/O at the edge) -----------------------------------------------------------------


def embedded_routing_text() -> str:
    return (resources.files("pointsman_dispatcher") / "defaults" / "routing.yaml").read_text(
        encoding="utf-8"
    )


def load_routing_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> RoutingConfig:
    """The file given, else ``$POINTSMAN_ROUTING_FILE``, else the embedded demo file."""
    env = os.environ if environ is None else environ
    chosen = str(path) if path else env.get(ROUTING_FILE_ENV) or None
    if chosen is None:
        return parse_routing_config(embedded_routing_text(), "embedded routing.yaml")
    try:
        text = Path(chosen).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RoutingConfigError([("(file)", f"cannot read {chosen}: {reason}")], chosen) from None
    return parse_routing_config(text, chosen)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (a second ``gpt-4o:`` would silently win)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def parse_routing_config(text: str, source: str) -> RoutingConfig:
    """YAML text → validated :class:`RoutingConfig` (pure; raises RoutingConfigError)."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        # Not str(exc): it quotes the offending line, which may hold a pasted secret.
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise RoutingConfigError([("(yaml)", f"{exc.problem} at {where}")], source) from None
    except yaml.YAMLError as exc:
        raise RoutingConfigError([("(yaml)", type(exc).__name__)], source) from None
    return build_routing_config(data, source)


def build_routing_config(data: Any, source: str) -> RoutingConfig:
    """Validated, precomputed config from parsed YAML/JSON data (pure)."""
    problems = schema_problems(data)
    if problems:
        raise RoutingConfigError(problems, source)
    models = {model_id: _profile(model_id, spec) for model_id, spec in data["models"].items()}
    policy = _policy(data["policy"])
    problems = cross_reference_problems(models, policy, data["policy"])
    if problems:
        raise RoutingConfigError(problems, source)
    return RoutingConfig(
        source=source,
        models=models,
        policy=policy,
        facts={m.id: _facts(m, policy) for m in models.values()},
        ladders=_ladders(models.values()),
    )


# --- schema validation and its messages --------------------------------------------------------


@cache
def routing_schema() -> dict[str, Any]:
    text = (resources.files("pointsman_dispatcher") / "defaults" / "routing.schema.json").read_text(
        encoding="utf-8"
    )
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator() -> Draft202012Validator:
    schema = routing_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def key_path(parts: Iterable[str | int]) -> str:
    """``['models', 'gpt-4o', 'price']`` → ``models.gpt-4o.price``; list items as ``[i]``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def schema_problems(data: Any) -> list[Problem]:
    """Every schema violation as ``(key.path, reason)``, sorted and de-duplicated."""
    found: set[Problem] = set()
    for error in _validator().iter_errors(data):
        found.update(_describe(error))
    return sorted(found)


def _describe(error: ValidationError) -> list[Problem]:
    path = list(error.absolute_path)
    sensitive = any(p in SENSITIVE_KEYS for p in path if isinstance(p, str)) or (
        bool(path) and isinstance(path[-1], str) and SECRET_KEY.match(path[-1]) is not None
    )
    if "propertyNames" in error.absolute_schema_path:
        name = str(error.instance)
        if SECRET_KEY.match(name):
            return [(key_path([*path, name]), error.schema.get("x-message", "not allowed"))]
        return [(key_path(path), f"{name!r} is not a valid model id")]
    if error.validator == "required":
        present = error.instance if isinstance(error.instance, dict) else {}
        return [
            (key_path([*path, name]), "required key is missing")
            for name in error.validator_value
            if name not in present
        ]
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = set(error.schema.get("properties", {}))
        problems = []
        for name in error.instance:
            if name in known:
                continue
            if isinstance(name, str) and SECRET_KEY.match(name):
                why = "inline secrets are not accepted: use credential: {env: NAME} or {file: PATH}"
            else:
                allowed = ", ".join(sorted(known)) or "none"
                why = f"unknown key (allowed: {allowed})"
            problems.append((key_path([*path, str(name)]), why))
        return problems
    custom = error.schema.get("x-message") if isinstance(error.schema, dict) else None
    if custom:
        return [(key_path(path), str(custom))]
    if sensitive:  # never echo the value: it may be a secret in the wrong place
        return [(key_path(path), f"invalid ({error.validator}: {error.validator_value!r})")]
    return [(key_path(path), error.message)]


# --- cross-reference checks --------------------------------------------------------------------


def cross_reference_problems(
    models: Mapping[str, ModelProfile], policy: Policy, raw_policy: Mapping[str, Any]
) -> list[Problem]:
    """What the schema cannot check: names, ladders, domain coverage, required capabilities."""
    problems: list[Problem] = []

    def check_known(key: str, ids: Iterable[str]) -> None:
        for i, model_id in enumerate(ids):
            if model_id not in models:
                problems.append((f"{key}[{i}]", f"unknown model {model_id!r}"))

    if policy.default_model not in models:
        problems.append(("policy.default_model", f"unknown model {policy.default_model!r}"))
    for domain, ids in raw_policy["domains"].items():
        check_known(f"policy.domains.{domain}", ids)
        for i, model_id in enumerate(ids):
            profile = models.get(model_id)
            if profile is not None and not profile.serves(domain):
                problems.append(
                    (
                        f"policy.domains.{domain}[{i}]",
                        f"model {model_id!r} does not serve {domain} "
                        f"(its domains: {', '.join(sorted(profile.domains))})",
                    )
                )
    check_known("policy.ambiguous.candidates", policy.ambiguous.candidates)
    for risk, rule in policy.risk.items():
        check_known(f"policy.risk.{risk}.candidates", rule.candidates)
        if rule.require_capability is None:
            continue
        for i, model_id in enumerate(rule.candidates):
            profile = models.get(model_id)
            if profile is not None and rule.require_capability not in profile.capabilities:
                problems.append(
                    (
                        f"policy.risk.{risk}.candidates[{i}]",
                        f"model {model_id!r} lacks the required capability "
                        f"{rule.require_capability!r}",
                    )
                )
    problems.extend(tier_ladder_problems(models.values()))
    return problems


def tier_ladder_problems(models: Iterable[ModelProfile]) -> list[Problem]:
    """A family uses named tiers or integer ranks, not both; integer ranks run 1, 2, 3... ."""
    by_family: dict[str, list[ModelProfile]] = {}
    for profile in models:
        by_family.setdefault(profile.family, []).append(profile)
    problems: list[Problem] = []
    for family, members in sorted(by_family.items()):
        kinds = {isinstance(m.tier, int) for m in members}
        names = ", ".join(m.id for m in members)
        if len(kinds) > 1:
            problems.append(
                (
                    f"models.{members[0].id}.tier",
                    f"family {family!r} mixes named tiers and integer ranks ({names})",
                )
            )
            continue
        if kinds == {True}:
            ranks = sorted({m.tier_rank for m in members})
            missing = sorted(set(range(1, ranks[-1] + 1)) - set(ranks))
            if missing:
                problems.append(
                    (
                        f"models.{members[0].id}.tier",
                        f"tier ladder of family {family!r} has a gap: ranks "
                        f"{', '.join(map(str, ranks))} (missing {', '.join(map(str, missing))})",
                    )
                )
    return problems


# --- building the typed config -----------------------------------------------------------------


def _ref(spec: Mapping[str, str]) -> CredentialRef:
    return (
        CredentialRef(env=spec["env"]) if "env" in spec else CredentialRef(file=Path(spec["file"]))
    )


def _profile(model_id: str, spec: Mapping[str, Any]) -> ModelProfile:
    aws = spec.get("aws_credentials")
    options = spec.get("options", {})
    limits = spec.get("limits", {})
    return ModelProfile(
        id=model_id,
        provider=spec["provider"],
        endpoint=spec["endpoint"].rstrip("/"),
        model=spec["model"],
        family=spec["family"],
        tier=spec["tier"],
        tier_rank=tier_rank(spec["tier"]),
        domains=frozenset(spec["domains"]),
        capabilities=frozenset(spec.get("capabilities", ())),
        context_window=spec["context_window"],
        price=Price(
            input_per_mtok=float(spec["price"]["input_per_mtok"]),
            output_per_mtok=float(spec["price"]["output_per_mtok"]),
        ),
        timeout_s=float(spec["timeout_s"]),
        max_output_tokens=spec["max_output_tokens"],
        limits=Limits(
            rpm=limits.get("rpm"), tpm=limits.get("tpm"), max_in_flight=limits.get("max_in_flight")
        ),
        options=ProviderOptions(
            api_version=options.get("api_version"),
            deployment=options.get("deployment"),
            region=options.get("region"),
        ),
        credential=_ref(spec["credential"]) if "credential" in spec else None,
        aws_credentials=(
            AwsCredentialRefs(
                access_key_id=_ref(aws["access_key_id"]),
                secret_access_key=_ref(aws["secret_access_key"]),
                session_token=_ref(aws["session_token"]) if "session_token" in aws else None,
            )
            if aws
            else None
        ),
        system_prompt=spec.get("system_prompt"),
    )


def _policy(spec: Mapping[str, Any]) -> Policy:
    general = tuple(spec["domains"]["general"])
    tiering = spec.get("tiering", {})
    defaults = Tiering()
    return Policy(
        default_model=spec["default_model"],
        domains={d: tuple(spec["domains"].get(d, general)) for d in DOMAINS},
        ambiguous=AmbiguousRule(
            candidates=tuple(spec["ambiguous"]["candidates"]),
            review_priority=spec["ambiguous"].get("review", {}).get("priority"),
        ),
        risk={
            name: RiskRule(
                action=rule["action"],
                candidates=tuple(rule.get("candidates", ())),
                min_probability=rule.get("min_probability"),
                require_capability=rule.get("require_capability"),
                review_priority=rule.get("review", {}).get("priority"),
            )
            for name, rule in spec["risk"].items()
        },
        tiering=Tiering(
            enabled=tiering.get("enabled", defaults.enabled),
            min_confidence=tiering.get("min_confidence", defaults.min_confidence),
            max_input_tokens=tiering.get("max_input_tokens", defaults.max_input_tokens),
            single_turn_only=tiering.get("single_turn_only", defaults.single_turn_only),
        ),
        expected_output_tokens=spec.get("expected_output_tokens", 256),
        max_candidates=spec.get("max_candidates", 3),
        max_cost_usd=spec.get("max_cost_usd"),
    )


def _facts(profile: ModelProfile, policy: Policy) -> ModelFacts:
    system_tokens = estimate_text_tokens(profile.system_prompt or "")
    if system_tokens:
        system_tokens += 4  # message overhead, as in cost.estimate_prompt_tokens
    return ModelFacts(
        system_tokens=system_tokens,
        expected_output_tokens=min(policy.expected_output_tokens, profile.max_output_tokens),
        reserved_tokens=system_tokens + profile.max_output_tokens,
        input_usd_per_token=profile.price.input_per_mtok / 1_000_000,
        output_usd_per_token=profile.price.output_per_mtok / 1_000_000,
        tier_rank=profile.tier_rank,
        family=profile.family,
    )


def _ladders(models: Iterable[ModelProfile]) -> dict[tuple[str, str], TierLadder]:
    members: dict[tuple[str, str], dict[int, str]] = {}
    for profile in models:  # file order: the first model at a rank represents it
        for domain in DOMAINS:
            if profile.serves(domain):
                members.setdefault((profile.family, domain), {}).setdefault(
                    profile.tier_rank, profile.id
                )
    return {
        key: TierLadder(
            ranks=tuple(sorted(by_rank)), models=tuple(by_rank[r] for r in sorted(by_rank))
        )
        for key, by_rank in members.items()
    }
