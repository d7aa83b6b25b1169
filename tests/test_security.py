"""Security settings against a real broker: SASL_SSL with SCRAM-SHA-512/256 and a private CA.

One node with a PLAINTEXT and a SASL_SSL listener is started for this module. Every client is
built the way services build theirs: environment → ``load_settings`` → ``pointsman.kafka``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.admin import NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

from pointsman.broker import Cluster, ScramUser, fetch_jars
from pointsman.config import Settings, load_settings
from pointsman.kafka import client_kwargs, make_admin, make_consumer, make_producer

pytestmark = pytest.mark.kafka

WRONG_PASSWORD = f"wrong-{secrets.token_hex(8)}"


@dataclass
class SecureNode:
    cluster: Cluster
    bootstrap: str
    ca_file: Path
    alice: ScramUser
    bob: ScramUser
    secrets_dir: Path

    @property
    def passwords(self) -> list[str]:
        return [self.alice.password, self.bob.password, WRONG_PASSWORD]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureNode]:
    alice = ScramUser("alice", f"alice-{secrets.token_hex(12)}", "SCRAM-SHA-512")
    bob = ScramUser("bob", f"bob-{secrets.token_hex(12)}", "SCRAM-SHA-256")
    cluster = Cluster.create(
        tmp_path_factory.mktemp("secure-kafka"), 1, jars=fetch_jars(), scram_users=[alice, bob]
    )
    node = cluster.nodes[0]
    bootstrap = node.info.sasl_ssl_bootstrap
    assert bootstrap is not None
    secrets_dir = tmp_path_factory.mktemp("secrets")
    secrets_dir.chmod(0o700)
    started = time.monotonic()
    try:
        cluster.start(timeout_s=60)
        print(f"secure node started in {time.monotonic() - started:.1f}s")
        yield SecureNode(cluster, bootstrap, node.ca_file, alice, bob, secrets_dir)
    finally:
        cluster.stop()
    # After the broker has stopped: neither its files nor its logs hold a user password.
    for path in node.dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for user in (alice, bob):
                leaked = user.password.encode() in data  # (a bare `in` would print it)
                assert not leaked, f"{user.name}'s password is in {path}"


def settings_for(
    node: SecureNode,
    user: str,
    password: str,
    mechanism: str = "SCRAM-SHA-512",
    *,
    trust_ca: bool = True,
) -> Settings:
    """Settings exactly as a service would load them, the password coming from a 0600 file."""
    password_file = node.secrets_dir / f"{user}-{uuid.uuid4().hex[:8]}.password"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    environ = {
        "POINTSMAN_BOOTSTRAP_SERVERS": node.bootstrap,
        "POINTSMAN_SECURITY_PROTOCOL": "SASL_SSL",
        "POINTSMAN_SASL_MECHANISM": mechanism,
        "POINTSMAN_SASL_USERNAME": user,
        "POINTSMAN_SASL_PASSWORD_FILE": str(password_file),
        "POINTSMAN_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
    }
    if trust_ca:
        environ["POINTSMAN_SSL_CAFILE"] = str(node.ca_file)
    settings = load_settings(environ=environ)
    leaked = password in repr(settings) or password in settings.model_dump_json()
    assert not leaked, "the settings show the password"
    return settings


@pytest.fixture
def no_password_in_logs(
    secure: SecureNode, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> Iterator[pytest.LogCaptureFixture]:
    """Capture the client loggers at DEBUG; afterwards no password may be in what they said."""
    caplog.set_level(logging.DEBUG, logger="aiokafka")
    caplog.set_level(logging.DEBUG, logger="pointsman")
    yield caplog
    # In teardown caplog.records/.text only hold the teardown phase: ask for the others.
    records = caplog.get_records("setup") + caplog.get_records("call")
    captured = capsys.readouterr()
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    said = [captured.out, captured.err, *(formatter.format(r) for r in records)]
    for password in secure.passwords:
        assert not any(password in text for text in said), "a password was logged"
    assert records, "nothing was captured, so nothing would have been caught"


async def round_trip(settings: Settings, role: str = "queries") -> None:
    """Create a topic, produce one record and consume it back in a consumer group."""
    topic = settings.topics.name(role)
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"over SASL_SSL", key=b"k")
    finally:
        await producer.stop()
    consumer = make_consumer(settings.kafka, topic, group_id=f"{topic}.group")
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), 20)
        await consumer.commit()
    finally:
        await consumer.stop()
    assert (record.key, record.value) == (b"k", b"over SASL_SSL")


async def test_scram_sha_512_user_creates_produces_and_consumes_over_tls(
    secure: SecureNode, no_password_in_logs: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(secure, "alice", secure.alice.password, "SCRAM-SHA-512")
    assert settings.kafka.ssl_check_hostname  # the broker certificate names 127.0.0.1
    await round_trip(settings)
    # The capture is not vacuous: aiokafka did report the login, at DEBUG and at INFO.
    assert "Authenticated as alice via SCRAM-SHA-512" in no_password_in_logs.text
    assert any(r.levelno == logging.DEBUG for r in no_password_in_logs.records)


async def test_scram_sha_256_user_works_too(
    secure: SecureNode, no_password_in_logs: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(secure, "bob", secure.bob.password, "SCRAM-SHA-256")
    await round_trip(settings, "audit")
    assert "Authenticated as bob via SCRAM-SHA-256" in no_password_in_logs.text


def _connection_args(settings: Settings) -> tuple[str, int, dict[str, object]]:
    kwargs = client_kwargs(settings.kafka)
    host, port = kwargs.pop("bootstrap_servers")[0].rsplit(":", 1)
    return host, int(port), kwargs


async def test_a_wrong_password_is_an_authentication_error(
    secure: SecureNode, no_password_in_logs: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(secure, "alice", WRONG_PASSWORD, "SCRAM-SHA-512")
    host, port, kwargs = _connection_args(settings)
    started = time.monotonic()
    with pytest.raises(SaslAuthenticationFailed, match="invalid credentials"):
        await asyncio.wait_for(create_conn(host, port, **kwargs), 15)
    # A service's client gives up at bootstrap instead of retrying forever.
    producer = make_producer(settings.kafka)
    try:
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(producer.start(), 15)
    finally:
        await producer.stop()
    assert time.monotonic() - started < 15
    assert "SaslAuthenticationFailed" in no_password_in_logs.text
    # The right user with the other user's mechanism is refused as well.
    host, port, kwargs = _connection_args(
        settings_for(secure, "alice", secure.alice.password, "SCRAM-SHA-256")
    )
    with pytest.raises(SaslAuthenticationFailed):
        await asyncio.wait_for(create_conn(host, port, **kwargs), 15)


async def test_a_client_without_the_ca_fails_tls_verification(
    secure: SecureNode, no_password_in_logs: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(secure, "alice", secure.alice.password, trust_ca=False)
    host, port, kwargs = _connection_args(settings)
    started = time.monotonic()
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.wait_for(create_conn(host, port, **kwargs), 15)
    admin = make_admin(settings.kafka)
    try:
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(admin.start(), 15)
    finally:
        await admin.close()
    assert time.monotonic() - started < 15
    assert "CERTIFICATE_VERIFY_FAILED" in no_password_in_logs.text


def test_secrets_on_disk_are_private(secure: SecureNode) -> None:
    """The keystore password lives only in 0600 files; the CA key is gone; the PEM is public."""
    node = secure.cluster.nodes[0]
    keystore_password = (node.dir / "tls" / "keystore.pass").read_text().strip()
    files = [p for p in node.dir.rglob("*") if p.is_file()]
    holders = [p for p in files if keystore_password.encode() in p.read_bytes()]
    assert sorted(p.name for p in holders) == ["keystore.pass", "server.properties"]
    for path in [*holders, node.dir / "tls" / "broker.p12"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert sorted(p.name for p in (node.dir / "tls").iterdir()) == [
        "broker.p12",
        "ca.pem",
        "keystore.pass",
    ]
    assert not (node.dir / "scram.args").exists()
