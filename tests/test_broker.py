"""The local Kafka: rendered configs (pure) and a 3-node cluster that survives losing a node."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pointsman.broker import Cluster, NodeInfo, fetch_jars, free_ports, render_properties


def props(text: str) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )


def test_single_node_uses_a_dynamic_quorum(tmp_path: Path) -> None:
    node = NodeInfo(1, 19092, 19093, str(tmp_path))
    p = props(render_properties(node, [node], tmp_path / "data"))
    assert p["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert "controller.quorum.voters" not in p
    assert p["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert p["offsets.topic.replication.factor"] == "1"
    assert p["auto.create.topics.enable"] == "false"
    assert p["log.dirs"] == str(tmp_path / "data")


def test_three_nodes_use_static_voters_and_rf_3(tmp_path: Path) -> None:
    nodes = [NodeInfo(i, 20000 + 2 * i, 20001 + 2 * i, str(tmp_path / str(i))) for i in (1, 2, 3)]
    p = props(render_properties(nodes[1], nodes, tmp_path))
    assert p["controller.quorum.voters"] == "1@127.0.0.1:20003,2@127.0.0.1:20005,3@127.0.0.1:20007"
    assert p["node.id"] == "2"
    assert p["transaction.state.log.replication.factor"] == "3"
    assert p["min.insync.replicas"] == "2"
    assert p["unclean.leader.election.enable"] == "false"


def test_free_ports_are_distinct() -> None:
    ports = free_ports(6)
    assert len(set(ports)) == 6


@pytest.mark.cluster
async def test_three_node_cluster_survives_a_sigkilled_node(tmp_path: Path) -> None:
    cluster = Cluster.create(tmp_path / "cluster", 3, jars=fetch_jars())
    started = time.monotonic()
    cluster.start()
    print(f"3-node cluster started in {time.monotonic() - started:.1f}s")
    try:
        bootstrap = cluster.bootstrap.split(",")
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        await admin.create_topics(
            [NewTopic("failover", 3, 3, topic_configs={"min.insync.replicas": "2"})]
        )
        await admin.close()
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=15000,
        )
        await producer.start()
        try:
            for i in range(50):
                await producer.send_and_wait(
                    "failover", f"before-{i}".encode(), key=str(i).encode()
                )
            victim = cluster.nodes[0]
            victim.kill()
            for i in range(50):
                await asyncio.wait_for(
                    producer.send_and_wait("failover", f"after-{i}".encode(), key=str(i).encode()),
                    60,
                )
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            "failover", bootstrap_servers=bootstrap[1:], auto_offset_reset="earliest", group_id=None
        )
        await consumer.start()
        got: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(got) < 100 and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(r.value for r in records)
        await consumer.stop()
        assert sorted(got) == sorted(
            [f"before-{i}".encode() for i in range(50)] + [f"after-{i}".encode() for i in range(50)]
        )
        cluster.restart_node(victim)
        assert all(s["serving"] for s in cluster.status())
    finally:
        cluster.stop()
