"""Kafka clients built from :class:`~pointsman.config.KafkaSettings`: one place for security.

Every service gets its producers, consumers and admin client here, so that PLAINTEXT, SSL and
SASL_SSL (SCRAM-SHA-256/512) work the same everywhere and credentials are handled once.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from pointsman.config import KafkaSettings

# Big enough for a dead letter that carries a ~1 MB original record in base64.
MAX_REQUEST_BYTES = 4 * 1024 * 1024 + 64 * 1024


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None)
    ctx.check_hostname = kafka.ssl_check_hostname
    if kafka.ssl_certfile:
        password = kafka.ssl_key_password.get_secret_value() if kafka.ssl_key_password else None
        ctx.load_cert_chain(
            str(kafka.ssl_certfile),
            str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None,
            password=password,
        )
    return ctx


def client_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """Connection and security arguments shared by aiokafka producers, consumers and admin."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers.split(","),
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
        "request_timeout_ms": kafka.request_timeout_ms,
    }
    if kafka.uses_tls:
        kwargs["ssl_context"] = ssl_context(kafka)
    if kafka.security_protocol.startswith("SASL"):
        assert kafka.sasl_password is not None  # checked by KafkaSettings
        kwargs["sasl_mechanism"] = kafka.sasl_mechanism
        kwargs["sasl_plain_username"] = kafka.sasl_username
        kwargs["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    return kwargs


def make_producer(
    kafka: KafkaSettings, *, transactional_id: str | None = None, **overrides: Any
) -> AIOKafkaProducer:
    """An idempotent ``acks=all`` producer; transactional when given a ``transactional_id``."""
    kwargs = client_kwargs(kafka) | {
        "acks": "all",
        "enable_idempotence": True,
        "max_request_size": MAX_REQUEST_BYTES,
        "linger_ms": 5,
    }
    if transactional_id:
        kwargs["transactional_id"] = transactional_id
    kwargs.update(overrides)
    return AIOKafkaProducer(**kwargs)


def make_consumer(
    kafka: KafkaSettings, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """A manual-commit consumer that reads only committed transactional data."""
    kwargs = client_kwargs(kafka) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
    }
    kwargs.update(overrides)
    return AIOKafkaConsumer(*topics, **kwargs)


def make_admin(kafka: KafkaSettings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**client_kwargs(kafka))
