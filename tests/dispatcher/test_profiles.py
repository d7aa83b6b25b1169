"""The routing file: schema and cross-reference errors name the key and the reason; credentials
are references resolved at call time, and no secret value ever reaches a message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pointsman_dispatcher.policy import (
    ROUTING_FILE_ENV,
    RoutingConfigError,
    build_routing_config,
    embedded_routing_text,
    load_routing_config,
    parse_routing_config,
)
from pointsman_dispatcher.profiles import (
    CredentialError,
    CredentialRef,
    provider_target,
    resolve_credential,
)

ROOT = Path(__file__).resolve().parents[2]
PROVIDERS_FILE = ROOT / "deploy" / "dispatcher" / "routing.providers.yaml"
SECRET = "sk-live-DO-NOT-PRINT-0123456789"


def providers_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(PROVIDERS_FILE.read_text(encoding="utf-8"))
    return data


def problems_of(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(RoutingConfigError) as info:
        build_routing_config(data, "test")
    return info.value.problems


def test_embedded_demo_file_is_valid_and_local() -> None:
    config = parse_routing_config(embedded_routing_text(), "embedded")
    assert len(config.models) == 12
    assert {m.endpoint for m in config.models.values()} == {"http://127.0.0.1:8090/v1"}
    assert {m.model for m in config.models.values()} == set(config.models)
    assert all(m.credential is None for m in config.models.values())
    assert config.policy.default_model == "local-large"


def test_provider_example_covers_five_providers_with_env_credentials() -> None:
    config = load_routing_config(PROVIDERS_FILE)
    providers = {m.provider for m in config.models.values()}
    assert providers == {"openai", "azure_openai", "anthropic", "bedrock", "gemini"}
    for profile in config.models.values():
        refs = [profile.credential]
        if profile.aws_credentials:
            refs += [
                profile.aws_credentials.access_key_id,
                profile.aws_credentials.secret_access_key,
            ]
        assert any(refs), profile.id
        assert all(ref.env for ref in refs if ref is not None), profile.id
    azure = config.models["azure-gpt-4o"].options
    assert azure.deployment and azure.api_version
    assert config.models["llama-70b"].options.region == "us-west-2"
    assert (
        config.models["gpt-4o"].price.output_per_mtok
        > config.models["gpt-4o-mini"].price.output_per_mtok
    )


Mutation = Callable[[dict[str, Any]], None]


def set_path(path: str, value: Any) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


def delete_path(path: str) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = data
        for key in parents:
            node = node[key]
        del node[last]

    return mutate


SCHEMA_CASES: list[tuple[str, Mutation, str, str]] = [
    (
        "negative price",
        set_path("models/gpt-4o/price/input_per_mtok", -1),
        "models.gpt-4o.price.input_per_mtok",
        "-1 is less than the minimum of 0",
    ),
    (
        "unknown provider",
        set_path("models/gpt-4o/provider", "cohere"),
        "models.gpt-4o.provider",
        "'cohere' is not one of",
    ),
    (
        "bad tier",
        set_path("models/gpt-4o/tier", "huge"),
        "models.gpt-4o.tier",
        "must be small, medium, large or an integer rank >= 1",
    ),
    (
        "missing context window",
        delete_path("models/gpt-4o/context_window"),
        "models.gpt-4o.context_window",
        "required key is missing",
    ),
    (
        "unknown key",
        set_path("models/gpt-4o/colour", "blue"),
        "models.gpt-4o.colour",
        "unknown key",
    ),
    (
        "azure without deployment",
        delete_path("models/azure-gpt-4o/options/deployment"),
        "models.azure-gpt-4o.options.deployment",
        "required key is missing",
    ),
    (
        "bedrock without region",
        delete_path("models/llama-8b/options"),
        "models.llama-8b.options",
        "required key is missing",
    ),
    (
        "aws credentials outside bedrock",
        set_path(
            "models/gpt-4o/aws_credentials",
            {"access_key_id": {"env": "A"}, "secret_access_key": {"env": "B"}},
        ),
        "models.gpt-4o",
        "aws_credentials is only for provider bedrock",
    ),
    (
        "unknown domain route",
        set_path("policy/domains/cooking", ["gpt-4o"]),
        "policy.domains.cooking",
        "unknown key",
    ),
    (
        "missing default model",
        delete_path("policy/default_model"),
        "policy.default_model",
        "required key is missing",
    ),
    (
        "route rule without candidates",
        set_path("policy/risk/jailbreak", {"action": "route"}),
        "policy.risk.jailbreak.candidates",
        "required key is missing",
    ),
    (
        "refusal with candidates",
        set_path("policy/risk/harmful", {"action": "refuse", "candidates": ["gpt-4o"]}),
        "policy.risk.harmful",
        "a refusal has no candidates",
    ),
    (
        "review priority",
        set_path("policy/risk/harmful/review", {"priority": "asap"}),
        "policy.risk.harmful.review.priority",
        "'asap' is not one of",
    ),
    (
        "endpoint with user info",
        set_path("models/gpt-4o/endpoint", "https://user:pw@api.openai.com/v1"),
        "models.gpt-4o.endpoint",
        "without user info",
    ),
    (
        "candidate list item",
        set_path("policy/domains/code", ["claude-sonnet", "claude-sonnet"]),
        "policy.domains.code",
        "non-unique",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "key", "reason"),
    [case[1:] for case in SCHEMA_CASES],
    ids=[case[0] for case in SCHEMA_CASES],
)
def test_schema_errors_name_the_key_and_the_reason(mutate: Mutation, key: str, reason: str) -> None:
    data = providers_data()
    mutate(data)
    problems = problems_of(data)
    assert any(k == key and reason in why for k, why in problems), problems


CROSS_CASES: list[tuple[str, Mutation, str, str]] = [
    (
        "unknown default model",
        set_path("policy/default_model", "gpt-5"),
        "policy.default_model",
        "unknown model 'gpt-5'",
    ),
    (
        "unknown candidate",
        set_path("policy/domains/math", ["gemini-pro", "gpt-5"]),
        "policy.domains.math[1]",
        "unknown model 'gpt-5'",
    ),
    (
        "unknown ambiguous candidate",
        set_path("policy/ambiguous/candidates", ["nope"]),
        "policy.ambiguous.candidates[0]",
        "unknown model 'nope'",
    ),
    (
        "model that does not serve the domain",
        set_path("models/gpt-4o/domains", ["code"]),
        "policy.domains.finance[0]",
        "does not serve finance",
    ),
    (
        "crisis route without the crisis-safe capability",
        set_path("policy/risk/self_harm/candidates", ["gpt-4o"]),
        "policy.risk.self_harm.candidates[0]",
        "lacks the required capability 'crisis_safe'",
    ),
    (
        "tier ladder with a gap",
        set_path("models/llama-70b/tier", 3),
        "models.llama-8b.tier",
        "has a gap: ranks 1, 3 (missing 2)",
    ),
    (
        "named tiers mixed with ranks",
        set_path("models/gpt-4o/tier", 2),
        "models.gpt-4o-mini.tier",
        "mixes named tiers and integer ranks",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "key", "reason"),
    [case[1:] for case in CROSS_CASES],
    ids=[case[0] for case in CROSS_CASES],
)
def test_cross_reference_errors(mutate: Mutation, key: str, reason: str) -> None:
    data = providers_data()
    mutate(data)
    problems = problems_of(data)
    assert any(k == key and reason in why for k, why in problems), problems


def test_every_problem_is_listed_at_once() -> None:
    data = providers_data()
    data["models"]["gpt-4o"]["price"]["input_per_mtok"] = -1
    data["models"]["claude-haiku"]["timeout_s"] = 0
    del data["policy"]["risk"]["harmful"]
    with pytest.raises(RoutingConfigError) as info:
        build_routing_config(data, "mine.yaml")
    keys = {key for key, _ in info.value.problems}
    assert {
        "models.gpt-4o.price.input_per_mtok",
        "models.claude-haiku.timeout_s",
        "policy.risk.harmful",
    } <= keys
    assert "mine.yaml" in str(info.value) and "3 problem(s)" in str(info.value)


@pytest.mark.parametrize(
    "mutate",
    [
        set_path("models/gpt-4o/api_key", SECRET),
        set_path("models/gpt-4o/credential", SECRET),
        set_path("models/gpt-4o/credential", {"value": SECRET}),
        set_path("models/gpt-4o/credential", {"env": SECRET}),
        set_path("models/azure-gpt-4o/options/token", SECRET),
        set_path("models/llama-8b/aws_credentials/secret_access_key", SECRET),
    ],
    ids=["api_key", "credential string", "credential value", "bad env name", "option", "aws"],
)
def test_inline_secrets_are_rejected_without_echoing_them(mutate: Mutation) -> None:
    data = providers_data()
    mutate(data)
    with pytest.raises(RoutingConfigError) as info:
        build_routing_config(data, "test")
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value.problems)
    assert info.value.problems


def test_inline_secret_key_gets_a_specific_reason() -> None:
    data = providers_data()
    data["models"]["gpt-4o"]["api_key"] = SECRET
    problems = problems_of(data)
    assert ("models.gpt-4o.api_key", problems[0][1]) in problems
    assert "inline secrets are not accepted" in dict(problems)["models.gpt-4o.api_key"]


def test_yaml_errors_give_the_position_not_the_line() -> None:
    text = f"version: 1\nmodels: [\n  api_key: {SECRET}\n"
    with pytest.raises(RoutingConfigError) as info:
        parse_routing_config(text, "x.yaml")
    assert SECRET not in str(info.value)
    assert "line" in info.value.problems[0][1]


def test_duplicate_keys_are_an_error() -> None:
    text = PROVIDERS_FILE.read_text(encoding="utf-8").replace(
        "  gpt-4o:\n", "  gpt-4o:\n    model: a\n    model: b\n", 1
    )
    with pytest.raises(RoutingConfigError) as info:
        parse_routing_config(text, "dup.yaml")
    assert "duplicate key 'model'" in info.value.problems[0][1]


def test_file_choice_argument_then_env_then_embedded(tmp_path: Path) -> None:
    data = providers_data()
    data["policy"]["default_model"] = "gpt-4o-mini"
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert load_routing_config(None, {}).source == "embedded routing.yaml"
    from_env = load_routing_config(None, {ROUTING_FILE_ENV: str(mine)})
    assert from_env.policy.default_model == "gpt-4o-mini"
    explicit = load_routing_config(PROVIDERS_FILE, {ROUTING_FILE_ENV: str(mine)})
    assert explicit.policy.default_model == "gpt-4o"
    with pytest.raises(RoutingConfigError) as info:
        load_routing_config(tmp_path / "missing.yaml", {})
    assert "cannot read" in info.value.problems[0][1]


def test_resolve_credential_from_env_and_file(tmp_path: Path) -> None:
    assert resolve_credential(CredentialRef(env="K"), {"K": SECRET}).get_secret_value() == SECRET
    secret_file = tmp_path / "key"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    value = resolve_credential(CredentialRef(file=secret_file), {})
    assert value.get_secret_value() == SECRET
    assert SECRET not in repr(value) and SECRET not in str(value)


def test_credential_errors_name_the_source_never_the_value(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="environment variable OPENAI_API_KEY"):
        resolve_credential(CredentialRef(env="OPENAI_API_KEY"), {})
    with pytest.raises(CredentialError, match="cannot be read"):
        resolve_credential(CredentialRef(file=tmp_path / "absent"), {})
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(CredentialError, match="is empty"):
        resolve_credential(CredentialRef(file=empty), {})


def test_provider_target_resolves_at_call_time() -> None:
    config = load_routing_config(PROVIDERS_FILE)
    env = {
        "AZURE_OPENAI_API_KEY": SECRET,
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": SECRET,
    }
    azure = provider_target(config.models["azure-gpt-4o"], env)
    assert azure.provider == "azure_openai" and azure.deployment == "gpt-4o-prod"
    assert azure.api_version == "2024-10-21" and azure.api_key is not None
    assert azure.api_key.get_secret_value() == SECRET
    assert SECRET not in repr(azure)
    bedrock = provider_target(config.models["llama-8b"], env)
    assert bedrock.region == "us-west-2" and bedrock.aws is not None
    assert bedrock.aws.access_key_id == "AKIDEXAMPLE" and bedrock.api_key is None
    assert SECRET not in repr(bedrock)
    with pytest.raises(CredentialError) as info:
        provider_target(config.models["gpt-4o"], env)
    assert "OPENAI_API_KEY" in str(info.value)
