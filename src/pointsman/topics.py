"""Topics from one declarative config, provisioned idempotently.

:func:`topic_specs` turns ``Settings.topics`` into concrete specs (prefix and defaults applied);
:func:`plan` compares them with what the cluster has and says what to do (pure, tested without
Kafka); :func:`provision` carries the plan out through the admin client. Running it twice is a
no-op the second time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from pointsman.config import TOPIC_ROLES, Settings

TOPIC_ALREADY_EXISTS = 36


@dataclass(frozen=True)
class TopicSpec:
    role: str
    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str]


@dataclass(frozen=True)
class ExistingTopic:
    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str]


@dataclass
class Plan:
    create: list[TopicSpec] = field(default_factory=list)
    add_partitions: dict[str, int] = field(default_factory=dict)
    alter_configs: dict[str, dict[str, str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def is_noop(self) -> bool:
        return not (self.create or self.add_partitions or self.alter_configs)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    topics = settings.topics
    d = topics.defaults
    specs = []
    for role in TOPIC_ROLES:
        t = getattr(topics, role)
        rf = t.replication_factor or d.replication_factor
        configs = {
            "cleanup.policy": t.cleanup_policy or d.cleanup_policy,
            "retention.ms": str(t.retention_ms if t.retention_ms is not None else d.retention_ms),
            "min.insync.replicas": str(min(t.min_insync_replicas or d.min_insync_replicas, rf)),
            "max.message.bytes": str(t.max_message_bytes or d.max_message_bytes),
        }
        specs.append(
            TopicSpec(
                role=role,
                name=topics.name(role),
                partitions=t.partitions or d.partitions,
                replication_factor=rf,
                configs=configs,
            )
        )
    return specs


def plan(specs: list[TopicSpec], existing: dict[str, ExistingTopic]) -> Plan:
    """What must change so that the cluster matches the specs. Never deletes or shrinks."""
    result = Plan()
    for spec in specs:
        have = existing.get(spec.name)
        if have is None:
            result.create.append(spec)
            continue
        changed = False
        if have.partitions < spec.partitions:
            result.add_partitions[spec.name] = spec.partitions
            changed = True
        elif have.partitions > spec.partitions:
            result.problems.append(
                f"{spec.name}: has {have.partitions} partitions, config says {spec.partitions}; "
                "Kafka cannot remove partitions, left as is"
            )
        if have.replication_factor != spec.replication_factor:
            result.problems.append(
                f"{spec.name}: replication factor is {have.replication_factor}, config says "
                f"{spec.replication_factor}; change it with a partition reassignment"
            )
        diff = {k: v for k, v in spec.configs.items() if have.configs.get(k) != v}
        if diff:
            result.alter_configs[spec.name] = dict(spec.configs)
            changed = True
        if not changed:
            result.unchanged.append(spec.name)
    return result


async def describe_existing(
    admin: AIOKafkaAdminClient, names: list[str]
) -> dict[str, ExistingTopic]:
    present = set(await admin.list_topics())
    wanted = [n for n in names if n in present]
    if not wanted:
        return {}
    described = await admin.describe_topics(wanted)
    resources = [ConfigResource(ConfigResourceType.TOPIC, n) for n in wanted]
    configs: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.resources:
            name = resource[3]
            configs[name] = {entry[0]: entry[1] for entry in resource[4]}
    out = {}
    for topic in described:
        name = topic["topic"]
        partitions = topic["partitions"]
        rf = len(partitions[0]["replicas"]) if partitions else 0
        out[name] = ExistingTopic(name, len(partitions), rf, configs.get(name, {}))
    return out


async def provision(admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> Plan:
    """Create missing topics, grow partitions, align configs. Safe to run any number of times."""
    existing = await describe_existing(admin, [s.name for s in specs])
    todo = plan(specs, existing)
    if todo.create:
        response = await admin.create_topics(
            [
                NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=s.configs)
                for s in todo.create
            ],
            timeout_ms=30_000,
        )
        _raise_on_errors(response.topic_errors, ignore={TOPIC_ALREADY_EXISTS})
    if todo.add_partitions:
        response = await admin.create_partitions(
            {name: NewPartitions(total) for name, total in todo.add_partitions.items()}
        )
        _raise_on_errors(response.topic_errors)
    if todo.alter_configs:
        # AlterConfigs replaces the topic's dynamic configs with exactly the managed set.
        resources = [
            ConfigResource(ConfigResourceType.TOPIC, name, configs)
            for name, configs in todo.alter_configs.items()
        ]
        for response in await admin.alter_configs(resources):
            _raise_on_errors([(r[3], r[0], r[1]) for r in response.resources])
    if not todo.is_noop:
        await _await_metadata(admin, specs)
    return todo


async def _await_metadata(
    admin: AIOKafkaAdminClient, specs: list[TopicSpec], timeout_s: float = 30.0
) -> None:
    """Wait until the cluster's metadata shows every topic with at least its partitions and its
    managed configs, so the next run (or a producer started right after) sees the result, not
    stale metadata: under KRaft a broker applies the controller's changes asynchronously."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        existing = await describe_existing(admin, [s.name for s in specs])
        lagging = [
            s.name
            for s in specs
            if s.name not in existing
            or existing[s.name].partitions < s.partitions
            or any(existing[s.name].configs.get(k) != v for k, v in s.configs.items())
        ]
        if not lagging:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise ProvisioningError(f"metadata did not show {lagging} within {timeout_s}s")
        await asyncio.sleep(0.2)


class ProvisioningError(RuntimeError):
    pass


def _raise_on_errors(errors: Any, ignore: frozenset[int] | set[int] = frozenset()) -> None:
    bad = []
    for item in errors:
        name, code, message = item[0], item[1], item[2] if len(item) > 2 else ""
        if code and code not in ignore:
            bad.append(f"{name}: error {code} {message or ''}".strip())
    if bad:
        raise ProvisioningError("; ".join(bad))
