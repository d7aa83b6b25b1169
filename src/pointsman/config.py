"""Configuration: one YAML file, validated, with environment overrides, in one place.

Load order: the embedded ``defaults.yaml`` → the file named by ``--config`` or ``POINTSMAN_CONFIG``
(deep-merged over the defaults) → environment overrides (:data:`ENV_OVERRIDES`). The merged result
is validated against :class:`Settings`, whose JSON Schema is ``schemas/config.schema.json``;
errors name the bad key and say why.

Secrets (SASL password, TLS key password) are never written in the YAML: they come from an
environment variable or a file, are held as :class:`pydantic.SecretStr` and never logged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

CONFIG_ENV = "POINTSMAN_CONFIG"

# environment variable -> dotted config key
ENV_OVERRIDES: dict[str, str] = {
    "POINTSMAN_BOOTSTRAP_SERVERS": "kafka.bootstrap_servers",
    "POINTSMAN_SECURITY_PROTOCOL": "kafka.security_protocol",
    "POINTSMAN_SASL_MECHANISM": "kafka.sasl_mechanism",
    "POINTSMAN_SASL_USERNAME": "kafka.sasl_username",
    "POINTSMAN_SASL_PASSWORD_FILE": "kafka.sasl_password_file",
    "POINTSMAN_SSL_CAFILE": "kafka.ssl_cafile",
    "POINTSMAN_SSL_CERTFILE": "kafka.ssl_certfile",
    "POINTSMAN_SSL_KEYFILE": "kafka.ssl_keyfile",
    "POINTSMAN_SSL_KEY_PASSWORD_FILE": "kafka.ssl_key_password_file",
    "POINTSMAN_TOPIC_PREFIX": "topics.prefix",
    "POINTSMAN_LOG_LEVEL": "logging.level",
}
# Secrets given directly in the environment (never from the YAML).
SECRET_ENV: dict[str, str] = {
    "POINTSMAN_SASL_PASSWORD": "sasl_password",
    "POINTSMAN_SSL_KEY_PASSWORD": "ssl_key_password",
}


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists ``(dotted.key, why)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str) -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  {key}: {why}" for key, why in problems)
        super().__init__(f"invalid configuration ({source}):\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    bootstrap_servers: str = Field(
        min_length=1, pattern=r"^[^,\s]+(,[^,\s]+)*$", description="host:port[,host:port...]"
    )
    client_id: str = Field(default="pointsman", min_length=1)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] | None = None
    sasl_username: str | None = None
    sasl_password_file: Path | None = Field(
        default=None, description="File holding the SASL password (or POINTSMAN_SASL_PASSWORD)."
    )
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password_file: Path | None = None
    ssl_check_hostname: bool = True
    request_timeout_ms: int = Field(default=30_000, gt=0)
    # Secrets, filled from env or the *_file keys; excluded from dumps and the schema.
    sasl_password: SecretStr | None = Field(default=None, exclude=True)
    ssl_key_password: SecretStr | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _security_is_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism is None:
                raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism")
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError(
                    "SASL needs sasl_username and a password from POINTSMAN_SASL_PASSWORD "
                    "or sasl_password_file"
                )
        return self

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")


CleanupPolicy = Literal["delete", "compact", "compact,delete"]


class TopicSettings(_Section):
    """One topic. Unset fields fall back to ``topics.defaults``."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$")
    partitions: int | None = Field(default=None, ge=1, le=10_000)
    replication_factor: int | None = Field(default=None, ge=1, le=32)
    min_insync_replicas: int | None = Field(default=None, ge=1, le=32)
    retention_ms: int | None = Field(default=None, ge=-1)
    cleanup_policy: CleanupPolicy | None = None
    max_message_bytes: int | None = Field(default=None, ge=1024)


class TopicDefaults(_Section):
    partitions: int = Field(ge=1, le=10_000)
    replication_factor: int = Field(ge=1, le=32)
    min_insync_replicas: int = Field(ge=1, le=32)
    retention_ms: int = Field(ge=-1)
    cleanup_policy: CleanupPolicy = "delete"
    max_message_bytes: int = Field(default=1_048_588, ge=1024)


TOPIC_ROLES = (
    "queries",
    "tagged",
    "responses",
    "audit",
    "dead_letters",
    "review",
    "model_health",
)


class TopicsSettings(_Section):
    prefix: str = Field(
        default="",
        max_length=50,
        pattern=r"^[A-Za-z0-9._-]*$",
        description="Prepended to every topic name (environment, tenant).",
    )
    defaults: TopicDefaults
    queries: TopicSettings
    tagged: TopicSettings
    responses: TopicSettings
    audit: TopicSettings
    dead_letters: TopicSettings
    review: TopicSettings
    model_health: TopicSettings

    def name(self, role: str) -> str:
        """Full topic name of a role, prefix included."""
        topic: TopicSettings = getattr(self, role)
        return f"{self.prefix}{topic.name}"


class LimitsSettings(_Section):
    max_message_bytes: int = Field(
        ge=1024, description="Records larger than this are dead-lettered as oversized."
    )
    max_text_chars: int = Field(ge=1, description="Query texts longer than this are oversized.")


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


class Settings(_Section):
    """The whole configuration of a Pointsman deployment."""

    kafka: KafkaSettings
    topics: TopicsSettings
    limits: LimitsSettings
    logging: LoggingSettings = LoggingSettings()


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def defaults_dict() -> dict[str, Any]:
    text = resources.files("pointsman").joinpath("defaults.yaml").read_text(encoding="utf-8")
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([("<file>", "no such file")], str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError([("<file>", f"not valid YAML: {exc}")], str(path)) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError([("<file>", "the top level must be a mapping")], str(path))
    return loaded


def _read_secret_file(path: Path, key: str, source: str) -> SecretStr:
    try:
        return SecretStr(path.read_text(encoding="utf-8").strip())
    except OSError as exc:
        raise ConfigError([(key, f"cannot read secret file: {exc.strerror}")], source) from None


def _describe(error: Any, env_keys: dict[str, str]) -> tuple[str, str]:
    key = ".".join(str(p) for p in error["loc"]) or "<root>"
    why = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        why = "unknown key"
    if error["type"] == "missing":
        why = "required key is missing"
    for env, dotted in env_keys.items():
        if key == dotted:
            why += f" (set by {env})"
    return key, why


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Load, merge, override and validate the configuration.

    ``path`` defaults to ``$POINTSMAN_CONFIG``; without either, the embedded defaults are used.
    """
    env = os.environ if environ is None else environ
    chosen = path if path is not None else env.get(CONFIG_ENV)
    source = str(chosen) if chosen else "embedded defaults"
    data = defaults_dict()
    if chosen:
        user = _read_yaml(Path(chosen))
        for secret in ("sasl_password", "ssl_key_password"):
            if secret in user.get("kafka", {}):
                raise ConfigError(
                    [
                        (
                            f"kafka.{secret}",
                            "secrets are not read from the YAML; use the "
                            f"{secret}_file key or the POINTSMAN_{secret.upper()} variable",
                        )
                    ],
                    source,
                )
        data = _deep_merge(data, user)
    used_env: dict[str, str] = {}
    for var, dotted in ENV_OVERRIDES.items():
        if env.get(var):
            _set_dotted(data, dotted, env[var])
            used_env[var] = dotted
    kafka = data.setdefault("kafka", {})
    for var, key in SECRET_ENV.items():
        if env.get(var):
            kafka[key] = env[var]
    for key in ("sasl_password", "ssl_key_password"):
        file_key = f"{key}_file"
        if kafka.get(key) is None and kafka.get(file_key):
            kafka[key] = _read_secret_file(Path(kafka[file_key]), f"kafka.{file_key}", source)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(e, used_env) for e in exc.errors()]
        raise ConfigError(problems, source) from None


def settings_json_schema() -> dict[str, Any]:
    schema = Settings.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Pointsman configuration"
    return schema
