"""Test fixtures: a real Kafka broker, started once per session on free ports.

Set POINTSMAN_TEST_BOOTSTRAP to use a broker that is already running instead. Every test that
touches Kafka gets its own topic prefix, so tests never see each other's records.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pointsman.broker import Cluster, fetch_jars
from pointsman.config import Settings, load_settings
from pointsman.kafka import make_admin
from pointsman.topics import provision, topic_specs

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="also run the long soak/chaos tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with `make test-soak`")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    existing = os.environ.get("POINTSMAN_TEST_BOOTSTRAP")
    if existing:
        yield existing
        return
    cluster = Cluster.create(tmp_path_factory.mktemp("kafka"), 1, jars=fetch_jars())
    cluster.start()
    try:
        yield cluster.bootstrap
    finally:
        cluster.stop()


def settings_for(bootstrap: str, prefix: str | None = None) -> Settings:
    prefix = prefix or f"t{uuid.uuid4().hex[:10]}."
    return load_settings(
        environ={"POINTSMAN_BOOTSTRAP_SERVERS": bootstrap, "POINTSMAN_TOPIC_PREFIX": prefix}
    )


@pytest.fixture
async def kafka_settings(kafka_bootstrap: str) -> AsyncIterator[Settings]:
    """Settings with a fresh topic prefix; the topics exist (2 partitions each, to be quick)."""
    settings = settings_for(kafka_bootstrap)
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        specs = [
            s.__class__(s.role, s.name, 2, s.replication_factor, s.configs)
            for s in topic_specs(settings)
        ]
        await provision(admin, specs)
    finally:
        await admin.close()
    yield settings


@pytest.fixture(scope="session")
def tiny_train_config() -> Callable[..., Any]:
    """TrainConfig for a tiny random DistilBERT on the real data, one quick epoch; keyword
    arguments override any field (e.g. ``layers=1, teacher=...``)."""
    from pointsman_classifier.modeling import RANDOM_DISTILBERT
    from pointsman_classifier.train import TrainConfig

    def make(out: Path, **overrides: Any) -> TrainConfig:
        fields: dict[str, Any] = {
            "base": RANDOM_DISTILBERT,
            "epochs": 1,
            "max_rows": 200,
            "agreement_rows": 300,
            "calibration_cap": 50,
            "threads": 1,
        }
        return TrainConfig(
            shared_dir=ROOT.parent / "shared" / "datasets",
            natural_dir=ROOT / "data" / "natural",
            out_dir=out,
            **{**fields, **overrides},
        )

    return make


@pytest.fixture(scope="session")
def tiny_artifact(
    tmp_path_factory: pytest.TempPathFactory, tiny_train_config: Callable[..., Any]
) -> Path:
    """A classifier artifact from a tiny random DistilBERT, through the real training path:
    train → ONNX export → int8 quantization → calibration (about 10 s)."""
    from pointsman_classifier.train import train

    out = tmp_path_factory.mktemp("tiny-artifact")
    train(tiny_train_config(out))
    return out
