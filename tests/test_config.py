"""Configuration: defaults, overrides, errors that name the key, secrets kept out of sight."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jsonschema
import pytest
import yaml

from pointsman.config import ConfigError, defaults_dict, load_settings

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pointsman.yaml"
    path.write_text(text)
    return path


def test_embedded_defaults_are_valid() -> None:
    s = load_settings(environ={})
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert s.topics.name("queries") == "pointsman.queries"
    assert s.topics.model_health.cleanup_policy == "compact"


def test_file_is_deep_merged_over_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "topics:\n  prefix: staging.\n  queries: {name: q, partitions: 12}\n")
    s = load_settings(path, environ={})
    assert s.topics.name("queries") == "staging.q"
    assert s.topics.queries.partitions == 12
    assert s.topics.name("responses") == "staging.pointsman.responses"


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "kafka: {bootstrap_servers: 'a:1'}\n")
    s = load_settings(
        path, environ={"POINTSMAN_BOOTSTRAP_SERVERS": "b:2,c:3", "POINTSMAN_TOPIC_PREFIX": "dev."}
    )
    assert s.kafka.bootstrap_servers == "b:2,c:3"
    assert s.topics.prefix == "dev."


def test_config_env_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "topics: {prefix: fromfile.}\n")
    assert load_settings(environ={"POINTSMAN_CONFIG": str(path)}).topics.prefix == "fromfile."


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        (
            "topics: {queries: {name: q, partitions: 0}}",
            "topics.queries.partitions",
            "greater than or equal to 1",
        ),
        ("kafka: {bootstrap_servrs: x}", "kafka.bootstrap_servrs", "unknown key"),
        ("kafka: {security_protocol: TLS}", "kafka.security_protocol", "PLAINTEXT"),
        ("topics: {prefix: 'has space'}", "topics.prefix", "pattern"),
        ("limits: {max_text_chars: -5}", "limits.max_text_chars", "greater than or equal to 1"),
        ("topics: {audit: {cleanup_policy: shred}}", "topics.audit.cleanup_policy", "'compact'"),
        ("topics: {extra_topic: {name: x}}", "topics.extra_topic", "unknown key"),
    ],
)
def test_errors_name_the_key_and_say_why(tmp_path: Path, text: str, key: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ={})
    keys = [k for k, _ in info.value.problems]
    assert key in keys, info.value.problems
    assert why in str(info.value)


def test_error_from_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"POINTSMAN_SECURITY_PROTOCOL": "bogus"})
    assert "kafka.security_protocol" in str(info.value)
    assert "POINTSMAN_SECURITY_PROTOCOL" in str(info.value)


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"), environ={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "kafka: [unclosed\n"), environ={})
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "missing.yaml", environ={})


SASL_ENV = {
    "POINTSMAN_SECURITY_PROTOCOL": "SASL_SSL",
    "POINTSMAN_SASL_MECHANISM": "SCRAM-SHA-512",
    "POINTSMAN_SASL_USERNAME": "router",
}


def test_sasl_needs_mechanism_and_credentials() -> None:
    with pytest.raises(ConfigError, match="sasl_mechanism"):
        load_settings(environ={"POINTSMAN_SECURITY_PROTOCOL": "SASL_SSL"})
    with pytest.raises(ConfigError, match="password"):
        load_settings(environ=SASL_ENV)


def test_password_from_env_is_secret(caplog: pytest.LogCaptureFixture) -> None:
    s = load_settings(environ={**SASL_ENV, "POINTSMAN_SASL_PASSWORD": "hunter2-very-secret"})
    assert s.kafka.sasl_password is not None
    assert s.kafka.sasl_password.get_secret_value() == "hunter2-very-secret"
    for text in (repr(s), str(s), json.dumps(s.model_dump(mode="json")), repr(s.kafka)):
        assert "hunter2-very-secret" not in text


def test_password_from_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-a-file\n")
    s = load_settings(environ={**SASL_ENV, "POINTSMAN_SASL_PASSWORD_FILE": str(secret)})
    assert s.kafka.sasl_password is not None
    assert s.kafka.sasl_password.get_secret_value() == "from-a-file"


def test_unreadable_password_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"kafka\.sasl_password_file"):
        load_settings(environ={**SASL_ENV, "POINTSMAN_SASL_PASSWORD_FILE": str(tmp_path / "none")})


def test_inline_secret_in_yaml_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "kafka: {sasl_password: oops}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert "kafka.sasl_password" in str(info.value)
    assert "oops" not in str(info.value)


def test_the_schema_file_accepts_and_rejects_like_the_loader(tmp_path: Path) -> None:
    schema = json.loads((ROOT / "schemas" / "config.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(defaults_dict())
    for path in (ROOT / "deploy" / "config").glob("*.yaml"):
        merged = load_settings(path, environ={"POINTSMAN_SASL_PASSWORD": "test-only"}).model_dump(
            mode="json"
        )
        validator.validate(merged)
    bad = defaults_dict()
    bad["topics"]["queries"]["partitions"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)
    with pytest.raises(ConfigError):
        load_settings(write(tmp_path, yaml.safe_dump(bad)), environ={})


def test_no_secret_reaches_the_log(caplog: pytest.LogCaptureFixture) -> None:
    from pointsman.logs import RedactingFilter, register_secret

    register_secret("s3cr3t-value")
    handler_filter = RedactingFilter()
    record = logging.makeLogRecord(
        {
            "msg": "connecting with %s and password=abc123 Authorization: Bearer xyz",
            "args": ("s3cr3t-value",),
            "detail": "token=tok-999",
        }
    )
    handler_filter.filter(record)
    text = record.getMessage() + str(vars(record))
    for secret in ("s3cr3t-value", "abc123", "xyz", "tok-999"):
        assert secret not in text
