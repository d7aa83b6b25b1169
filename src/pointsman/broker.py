"""A real Apache Kafka (KRaft) broker for local runs and tests, fetched from Maven Central.

No Docker, no tarball: ``deploy/kafka/pom.xml`` names the broker jars, Maven copies them into one
folder, and this module formats storage, starts ``kafka.Kafka`` with the JDK, waits until it
serves, and stops it with SIGTERM (controlled shutdown). A node's state lives in its own folder
(``node.json`` there says its pid and ports), so two runs with different folders never collide.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from base64 import urlsafe_b64encode
from dataclasses import asdict, dataclass
from pathlib import Path
from string import Template

READY_LINE = "Kafka Server started"
HEAP_SINGLE = ["-Xms256m", "-Xmx512m"]
HEAP_CLUSTER = ["-Xms192m", "-Xmx384m"]
GC_FLAGS = [
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
]


class BrokerError(RuntimeError):
    pass


def project_root() -> Path:
    """The checkout that holds ``deploy/kafka`` ($POINTSMAN_HOME, else found upwards from cwd)."""
    env = os.environ.get("POINTSMAN_HOME")
    candidates = [Path(env)] if env else [Path.cwd(), *Path.cwd().parents]
    candidates.append(Path(__file__).resolve().parents[2])  # editable install: src/pointsman
    for base in candidates:
        if (base / "deploy" / "kafka" / "pom.xml").is_file():
            return base
    raise BrokerError(
        "cannot find deploy/kafka/pom.xml: run from the checkout or set POINTSMAN_HOME"
    )


def default_state_dir() -> Path:
    return Path(os.environ.get("POINTSMAN_STATE_DIR", project_root() / ".state"))


def lib_dir(state_dir: Path | None = None) -> Path:
    return (state_dir or default_state_dir()) / "kafka-lib"


def fetch_jars(target: Path | None = None, *, quiet: bool = True) -> Path:
    """Copy the broker's runtime jars from Maven Central into ``target`` (cached in ~/.m2)."""
    target = target or lib_dir()
    marker = target / ".complete"
    pom = project_root() / "deploy" / "kafka" / "pom.xml"
    if marker.is_file() and marker.read_text() == _pom_digest(pom):
        return target
    if shutil.which("mvn") is None:
        raise BrokerError(
            "Maven (mvn) is needed to fetch Kafka; install it (apt-get install maven)"
        )
    target.mkdir(parents=True, exist_ok=True)
    cmd = [
        "mvn",
        "-B",
        *(["-q"] if quiet else []),
        "-f",
        str(pom),
        "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={target}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BrokerError(
            f"mvn failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    if not any(p.name.startswith("kafka_2.13-") for p in target.glob("*.jar")):
        raise BrokerError(f"mvn finished but no kafka_2.13 jar is in {target}")
    marker.write_text(_pom_digest(pom))
    return target


def _pom_digest(pom: Path) -> str:
    import hashlib

    return hashlib.sha256(pom.read_bytes()).hexdigest()


def free_ports(count: int) -> list[int]:
    """Ports the OS says are free now (held open together so they are distinct)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def new_cluster_id() -> str:
    return urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


@dataclass
class NodeInfo:
    """What ``node.json`` records about a running node."""

    node_id: int
    broker_port: int
    controller_port: int
    directory: str
    pid: int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"


def render_properties(node: NodeInfo, voters: list[NodeInfo], data_dir: Path) -> str:
    """server.properties for one node; one node → dynamic quorum, several → static voters."""
    template = Template(
        (project_root() / "deploy" / "kafka" / "server.properties.template").read_text()
    )
    if len(voters) == 1:
        quorum = f"controller.quorum.bootstrap.servers=127.0.0.1:{node.controller_port}"
    else:
        quorum = "controller.quorum.voters=" + ",".join(
            f"{v.node_id}@127.0.0.1:{v.controller_port}" for v in voters
        )
    rf = min(3, len(voters))
    return template.substitute(
        node_id=node.node_id,
        quorum_line=quorum,
        broker_port=node.broker_port,
        controller_port=node.controller_port,
        data_dir=data_dir,
        nodes=len(voters),
        internal_rf=rf,
        internal_min_isr=max(1, rf - 1),
    )


class Node:
    """One KRaft node (broker + controller) living in ``directory``."""

    def __init__(self, info: NodeInfo, jars: Path) -> None:
        self.info = info
        self.jars = jars
        self.dir = Path(info.directory)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.dir / "logs" / "server.log"

    def prepare(self, voters: list[NodeInfo], cluster_id: str) -> None:
        data = self.dir / "data"
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        props = self.dir / "server.properties"
        props.write_text(render_properties(self.info, voters, data))
        if (data / "meta.properties").is_file():
            return
        cmd = [
            *self._java(),
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            "-t",
            cluster_id,
            "-c",
            str(props),
        ]
        if len(voters) == 1:
            cmd.insert(-4, "--standalone")
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BrokerError(f"storage format failed:\n{result.stdout}{result.stderr}")

    def _java(self, heap: list[str] | None = None) -> list[str]:
        log4j = project_root() / "deploy" / "kafka" / "log4j2.yaml"
        return [
            "java",
            *(heap or []),
            f"-Dlog4j2.configurationFile={log4j}",
            f"-Dkafka.logs.dir={self.dir / 'logs'}",
            "-cp",
            f"{self.jars}/*",
        ]

    def start(self, heap: list[str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.process = subprocess.Popen(
            [*self._java(heap + GC_FLAGS), "kafka.Kafka", str(self.dir / "server.properties")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.info.pid = self.process.pid
        (self.dir / "node.json").write_text(json.dumps(asdict(self.info)))

    def wait_ready(self, timeout_s: float = 90.0, log_offset: int = 0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BrokerError(f"node {self.info.node_id} exited:\n{self.log_tail()}")
            if self._log_has_ready(log_offset) and _port_open(self.info.broker_port):
                return
            time.sleep(0.1)
        raise BrokerError(
            f"node {self.info.node_id} not ready after {timeout_s}s:\n{self.log_tail()}"
        )

    def _log_has_ready(self, offset: int) -> bool:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return READY_LINE.encode() in f.read()
        except FileNotFoundError:
            return False

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        stop_pid(self.info.pid, timeout_s)
        if self.process is not None:
            self.process.wait(timeout=5)
        self.info.pid = None
        (self.dir / "node.json").write_text(json.dumps(asdict(self.info)))

    def kill(self) -> None:
        """SIGKILL: a crash, for failover tests."""
        if self.info.pid:
            os.kill(self.info.pid, signal.SIGKILL)
            if self.process is not None:
                self.process.wait(timeout=10)
            self.info.pid = None


def stop_pid(pid: int | None, timeout_s: float = 30.0) -> None:
    """SIGTERM (controlled shutdown), then SIGKILL if it does not exit in time."""
    if not pid or not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        waited, _status = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Cluster:
    """One node or several, in ``state_dir/<name>/node-<id>``."""

    def __init__(self, state_dir: Path, nodes: list[Node]) -> None:
        self.state_dir = state_dir
        self.nodes = nodes

    @property
    def bootstrap(self) -> str:
        return ",".join(n.info.bootstrap for n in self.nodes)

    @classmethod
    def create(
        cls,
        state_dir: Path,
        size: int = 1,
        *,
        jars: Path | None = None,
        broker_port: int | None = None,
        controller_port: int | None = None,
    ) -> Cluster:
        """Lay out ``size`` nodes; reuses the ports of an earlier run in the same folder."""
        jars = jars or fetch_jars()
        state_dir.mkdir(parents=True, exist_ok=True)
        infos = [i for i in (_read_info(state_dir / f"node-{n}") for n in range(1, size + 1)) if i]
        if len(infos) != size:
            ports = free_ports(2 * size)
            if size == 1 and broker_port:
                ports = [broker_port, controller_port or broker_port + 1]
            infos = [
                NodeInfo(
                    n, ports[2 * (n - 1)], ports[2 * (n - 1) + 1], str(state_dir / f"node-{n}")
                )
                for n in range(1, size + 1)
            ]
        return cls(state_dir, [Node(i, jars) for i in infos])

    def start(self, timeout_s: float = 90.0) -> None:
        running = [n for n in self.nodes if n.info.pid and _alive(n.info.pid)]
        if running:
            raise BrokerError(
                f"already running (pid {running[0].info.pid}) at {self.bootstrap}; "
                "stop it first with `pointsman kafka stop`"
            )
        for n in self.nodes:
            if not _port_free(n.info.broker_port) or not _port_free(n.info.controller_port):
                raise BrokerError(
                    f"port {n.info.broker_port} or {n.info.controller_port} is in use; "
                    "stop whatever holds it or choose another with --port"
                )
        id_file = self.state_dir / "cluster.id"
        if not id_file.is_file():
            id_file.write_text(new_cluster_id())
        cluster_id = id_file.read_text().strip()
        voters = [n.info for n in self.nodes]
        heap = HEAP_SINGLE if len(self.nodes) == 1 else HEAP_CLUSTER
        offsets = {}
        for n in self.nodes:
            n.prepare(voters, cluster_id)
            offsets[n.info.node_id] = n.log_size()
            n.start(heap)
        try:
            for n in self.nodes:
                n.wait_ready(timeout_s, offsets[n.info.node_id])
        except BrokerError:
            self.stop()
            raise

    def restart_node(self, node: Node, timeout_s: float = 90.0) -> None:
        offset = node.log_size()
        node.start(HEAP_SINGLE if len(self.nodes) == 1 else HEAP_CLUSTER)
        node.wait_ready(timeout_s, offset)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def status(self) -> list[dict[str, object]]:
        return [
            {
                "node": n.info.node_id,
                "bootstrap": n.info.bootstrap,
                "pid": n.info.pid,
                "running": bool(n.info.pid and _alive(n.info.pid)),
                "serving": _port_open(n.info.broker_port),
                "directory": n.info.directory,
            }
            for n in self.nodes
        ]


def _read_info(directory: Path) -> NodeInfo | None:
    try:
        return NodeInfo(**json.loads((directory / "node.json").read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
