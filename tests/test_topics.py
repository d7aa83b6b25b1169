"""Topic provisioning: the plan (pure) and the real thing against the broker (idempotent)."""

from __future__ import annotations

import pytest

from pointsman.config import TOPIC_ROLES, load_settings
from pointsman.kafka import make_admin
from pointsman.topics import ExistingTopic, describe_existing, plan, provision, topic_specs
from tests.conftest import settings_for


def test_specs_apply_prefix_defaults_and_overrides() -> None:
    specs = {
        s.role: s for s in topic_specs(load_settings(environ={"POINTSMAN_TOPIC_PREFIX": "p."}))
    }
    assert set(specs) == set(TOPIC_ROLES)
    assert specs["queries"].name == "p.pointsman.queries"
    assert specs["queries"].partitions == 6
    assert specs["model_health"].configs["cleanup.policy"] == "compact"
    assert specs["model_health"].partitions == 1
    assert specs["audit"].configs["retention.ms"] == "2592000000"
    assert specs["dead_letters"].configs["max.message.bytes"] == "4194304"


def test_plan_creates_grows_aligns_and_never_shrinks() -> None:
    specs = topic_specs(load_settings(environ={}))
    q = next(s for s in specs if s.role == "queries")
    r = next(s for s in specs if s.role == "responses")
    a = next(s for s in specs if s.role == "audit")
    existing = {
        q.name: ExistingTopic(q.name, 3, 1, dict(q.configs)),
        r.name: ExistingTopic(r.name, 9, 1, {**r.configs, "retention.ms": "1"}),
        a.name: ExistingTopic(a.name, a.partitions, 1, dict(a.configs)),
    }
    todo = plan(specs, existing)
    assert q.name in todo.add_partitions and todo.add_partitions[q.name] == 6
    assert r.name in todo.alter_configs and r.name not in todo.add_partitions
    assert any("cannot remove partitions" in p for p in todo.problems)
    assert todo.unchanged == [a.name]
    assert {s.role for s in todo.create} == set(TOPIC_ROLES) - {"queries", "responses", "audit"}


@pytest.mark.kafka
async def test_provisioning_is_idempotent_against_the_broker(kafka_bootstrap: str) -> None:
    settings = settings_for(kafka_bootstrap)
    specs = topic_specs(settings)
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        first = await provision(admin, specs)
        assert len(first.create) == len(TOPIC_ROLES)
        second = await provision(admin, specs)
        assert second.is_noop and len(second.unchanged) == len(TOPIC_ROLES)
        existing = await describe_existing(admin, [s.name for s in specs])
        for spec in specs:
            have = existing[spec.name]
            assert have.partitions == spec.partitions
            for key, value in spec.configs.items():
                assert have.configs[key] == value, (spec.name, key)
        # drift on the broker is put back, growth is applied
        grown = [
            s.__class__(
                s.role,
                s.name,
                s.partitions + 2,
                s.replication_factor,
                {**s.configs, "retention.ms": "3600000"},
            )
            if s.role == "queries"
            else s
            for s in specs
        ]
        third = await provision(admin, grown)
        assert list(third.add_partitions.values()) == [8]
        after = await describe_existing(admin, [s.name for s in specs])
        q = next(s for s in grown if s.role == "queries")
        assert after[q.name].partitions == 8
        assert after[q.name].configs["retention.ms"] == "3600000"
        assert (await provision(admin, grown)).is_noop
    finally:
        await admin.close()
