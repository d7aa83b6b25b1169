"""A real Apache Kafka (KRaft) broker for local runs and tests, fetched from Maven Central.

No Docker, no tarball: ``deploy/kafka/pom.xml`` names the broker jars, Maven copies them into one
folder, and this module formats storage, starts ``kafka.Kafka`` with the JDK, waits until it
serves, and stops it with SIGTERM (controlled shutdown). A node's state lives in its own folder
(``node.json`` there says its pid and ports), so two runs with different folders never collide.

A single node can also serve a SASL_SSL listener (SCRAM-SHA-512 and SCRAM-SHA-256) next to its
PLAINTEXT one: ``Cluster.create(..., scram_users=[ScramUser(...)])``. The JDK's ``keytool`` makes
a throwaway CA and a broker keystore in ``<node>/tls`` (the client trusts ``tls/ca.pem``); the
users are written into the metadata log when the storage is formatted. Inter-broker and
controller traffic stay PLAINTEXT on loopback. User passwords reach the storage tool through a
mode-0600 argument file that is deleted right after, never through argv or a log.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from base64 import urlsafe_b64encode
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from string import Template
from typing import Literal

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
    sasl_ssl_port: int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def sasl_ssl_bootstrap(self) -> str | None:
        return f"127.0.0.1:{self.sasl_ssl_port}" if self.sasl_ssl_port else None


@dataclass(frozen=True)
class ScramUser:
    """A user of the SASL_SSL listener, created when the node's storage is formatted."""

    name: str
    password: str = field(repr=False)
    mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"

    def __post_init__(self) -> None:
        # The storage tool splits "[name=..,password=..]" on commas and reads one argument a line.
        for value in (self.name, self.password):
            if not value or value != value.strip() or any(c in value for c in ',"[]=\n\r'):
                raise BrokerError(
                    f"SCRAM user {self.name!r}: name and password must be non-empty, without "
                    'surrounding spaces, and contain none of , " [ ] = or newlines'
                )

    @property
    def add_scram(self) -> str:
        return f"{self.mechanism}=[name={self.name},password={self.password}]"


def render_properties(
    node: NodeInfo, voters: list[NodeInfo], data_dir: Path, keystore_password: str | None = None
) -> str:
    """server.properties for one node; one node → dynamic quorum, several → static voters.

    A node with a ``sasl_ssl_port`` also gets a SASL_SSL listener (needs ``keystore_password``).
    """
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
    extra = {"extra_listeners": "", "extra_protocols": "", "extra_listener_lines": ""}
    if node.sasl_ssl_port:
        if keystore_password is None:
            raise BrokerError("a SASL_SSL listener needs the keystore password")
        tls = Path(node.directory) / "tls"
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        extra = {
            "extra_listeners": f",SASL_SSL://127.0.0.1:{node.sasl_ssl_port}",
            "extra_protocols": ",SASL_SSL:SASL_SSL",
            "extra_listener_lines": (
                "sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256\n"
                f"listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={scram}\n"
                f"listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config={scram}\n"
                "ssl.keystore.type=PKCS12\n"
                f"ssl.keystore.location={tls / 'broker.p12'}\n"
                f"ssl.keystore.password={keystore_password}\n"
            ),
        }
    return template.substitute(
        node_id=node.node_id,
        quorum_line=quorum,
        broker_port=node.broker_port,
        controller_port=node.controller_port,
        data_dir=data_dir,
        nodes=len(voters),
        internal_rf=rf,
        internal_min_isr=max(1, rf - 1),
        **extra,
    )


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner may read or write (0600, also if it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def make_tls(tls: Path) -> str:
    """A throwaway CA (``ca.pem``) and a broker keystore it signed (``broker.p12``, SAN
    IP:127.0.0.1 and DNS:localhost), made with the JDK's keytool; returns the keystore password.

    Kept across restarts; the CA's private key is deleted once it has signed the broker key.
    """
    tls.mkdir(mode=0o700, parents=True, exist_ok=True)
    tls.chmod(0o700)
    pass_file = tls / "keystore.pass"
    if all((tls / f).is_file() for f in ("ca.pem", "broker.p12", "keystore.pass")):
        return pass_file.read_text().strip()
    if shutil.which("keytool") is None:
        raise BrokerError("the JDK's keytool is needed for a SASL_SSL listener")
    password = secrets.token_hex(16)
    for stale in tls.iterdir():
        stale.unlink()
    env = {**os.environ, "POINTSMAN_KEYSTORE_PASS": password}  # not in argv
    store = ["-storetype", "PKCS12", "-storepass:env", "POINTSMAN_KEYSTORE_PASS", "-keystore"]
    ca, broker = [*store, str(tls / "ca.p12")], [*store, str(tls / "broker.p12")]
    ec = ["-keyalg", "EC", "-groupname", "secp256r1", "-validity", "3650"]
    csr, crt, ca_pem = (str(tls / f) for f in ("broker.csr", "broker.crt", "ca.pem"))
    steps = [
        ["-genkeypair", "-alias", "ca", *ec, "-dname", "CN=pointsman local CA", *ca,
         "-ext", "bc:c=ca:true", "-ext", "ku:c=keyCertSign,cRLSign"],
        ["-exportcert", "-rfc", "-alias", "ca", "-file", ca_pem, *ca],
        ["-genkeypair", "-alias", "broker", *ec, "-dname", "CN=localhost", *broker],
        ["-certreq", "-alias", "broker", "-file", csr, *broker],
        ["-gencert", "-rfc", "-alias", "ca", "-infile", csr, "-outfile", crt, *ca,
         "-validity", "3650", "-ext", "SAN=IP:127.0.0.1,DNS:localhost",
         "-ext", "ku:c=digitalSignature", "-ext", "eku=serverAuth"],
        ["-importcert", "-noprompt", "-alias", "ca", "-file", ca_pem, *broker],
        ["-importcert", "-noprompt", "-alias", "broker", "-file", crt, *broker],
    ]  # fmt: skip
    for step in steps:
        result = subprocess.run(["keytool", *step], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise BrokerError(f"keytool {step[0]} failed:\n{result.stdout}{result.stderr}")
    for done in ("ca.p12", "broker.csr", "broker.crt"):
        (tls / done).unlink()
    (tls / "broker.p12").chmod(0o600)
    _write_private(pass_file, password)
    return password


class Node:
    """One KRaft node (broker + controller) living in ``directory``."""

    def __init__(self, info: NodeInfo, jars: Path, scram_users: Sequence[ScramUser] = ()) -> None:
        self.info = info
        self.jars = jars
        self.dir = Path(info.directory)
        self.scram_users = tuple(scram_users)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ca_file(self) -> Path:
        """The PEM certificate a client must trust to reach the SASL_SSL listener."""
        return self.dir / "tls" / "ca.pem"

    @property
    def log_path(self) -> Path:
        return self.dir / "logs" / "server.log"

    def prepare(self, voters: list[NodeInfo], cluster_id: str) -> None:
        data = self.dir / "data"
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        props = self.dir / "server.properties"
        if self.info.sasl_ssl_port:
            keystore_password = make_tls(self.dir / "tls")
            _write_private(props, render_properties(self.info, voters, data, keystore_password))
        else:
            props.write_text(render_properties(self.info, voters, data))
        if (data / "meta.properties").is_file():
            return
        cmd = [
            *self._java(),
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            f"--cluster-id={cluster_id}",  # '=' form: a base64 id may start with '-'
            f"--config={props}",
        ]
        if len(voters) == 1:
            cmd.append("--standalone")
        with self._scram_args() as args:
            result = subprocess.run([*cmd, *args], capture_output=True, text=True)
        if result.returncode != 0:
            output = result.stdout + result.stderr
            for user in self.scram_users:
                output = output.replace(user.password, "***")
            raise BrokerError(f"storage format failed:\n{output}")

    @contextmanager
    def _scram_args(self) -> Iterator[list[str]]:
        """``@file`` naming a 0600 file with the ``--add-scram`` options, removed afterwards."""
        if not self.scram_users:
            yield []
            return
        path = self.dir / "scram.args"
        lines = [f"--add-scram\n{u.add_scram}\n" for u in self.scram_users]
        _write_private(path, "".join(lines))
        try:
            yield [f"@{path}"]
        finally:
            path.unlink(missing_ok=True)

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
        scram_users: Sequence[ScramUser] = (),
    ) -> Cluster:
        """Lay out ``size`` nodes; reuses the ports of an earlier run in the same folder.

        With ``scram_users`` the (single) node also serves SASL_SSL; the users are created
        when its storage is first formatted (a node formatted earlier keeps its users).
        """
        if scram_users and size != 1:
            raise BrokerError("a SASL_SSL listener is only supported on a single node")
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
        if scram_users and infos[0].sasl_ssl_port is None:
            taken = {infos[0].broker_port, infos[0].controller_port}
            infos[0].sasl_ssl_port = next(p for p in free_ports(3) if p not in taken)
        return cls(state_dir, [Node(i, jars, scram_users) for i in infos])

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
            if n.info.sasl_ssl_port and not _port_free(n.info.sasl_ssl_port):
                raise BrokerError(f"SASL_SSL port {n.info.sasl_ssl_port} is in use")
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
