"""`pointsman`: one command line for every service and operation.

Operations of the core live here; each service adds its own subcommand through the
``pointsman.commands`` entry-point group (see services/*/pyproject.toml), so a host that installs
only the auditor has only the auditor's command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import orjson

from pointsman import broker, contracts
from pointsman.config import ConfigError, Settings, load_settings
from pointsman.events import ChatMessage, QueryEvent, QueryMetadata, new_id

SERVICES = {
    "classifier": "pointsman-classifier (pip install ./services/classifier)",
    "dispatcher": "pointsman-dispatcher (pip install ./services/dispatcher)",
    "auditor": "pointsman-auditor (pip install ./services/auditor)",
}


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


# --- kafka ---------------------------------------------------------------------------------


def _cluster(args: argparse.Namespace) -> broker.Cluster:
    name = "single" if args.nodes == 1 else f"cluster-{args.nodes}"
    state = Path(args.state_dir) if args.state_dir else broker.default_state_dir() / "kafka" / name
    port = getattr(args, "port", None)
    return broker.Cluster.create(state, args.nodes, broker_port=port if args.nodes == 1 else None)


def cmd_kafka_fetch(args: argparse.Namespace) -> int:
    path = broker.fetch_jars(Path(args.dir) if args.dir else None, quiet=not args.verbose)
    print(f"Kafka jars in {path} ({len(list(path.glob('*.jar')))} jars)")
    return 0


def cmd_kafka_start(args: argparse.Namespace) -> int:
    import time

    cluster = _cluster(args)
    started = time.monotonic()
    cluster.start()
    print(f"Kafka started in {time.monotonic() - started:.1f}s: bootstrap {cluster.bootstrap}")
    print(
        f"state: {cluster.state_dir}  (stop with `pointsman kafka stop"
        f"{' --nodes ' + str(args.nodes) if args.nodes != 1 else ''}`)"
    )
    return 0


def cmd_kafka_stop(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    cluster.stop()
    print(f"Kafka stopped ({cluster.state_dir})")
    return 0


def cmd_kafka_status(args: argparse.Namespace) -> int:
    status = _cluster(args).status()
    print(json.dumps(status, indent=2))
    return 0 if all(s["serving"] for s in status) else 1


# --- topics --------------------------------------------------------------------------------


def cmd_topics_create(args: argparse.Namespace) -> int:
    from pointsman.kafka import make_admin
    from pointsman.topics import describe_existing, plan, provision, topic_specs

    settings = _settings(args)
    specs = topic_specs(settings)

    async def go() -> int:
        admin = make_admin(settings.kafka)
        await admin.start()
        try:
            if args.dry_run:
                todo = plan(specs, await describe_existing(admin, [s.name for s in specs]))
            else:
                todo = await provision(admin, specs)
        finally:
            await admin.close()
        verb = "would " if args.dry_run else ""
        for s in todo.create:
            print(
                f"{verb}create  {s.name} partitions={s.partitions} rf={s.replication_factor} "
                + " ".join(f"{k}={v}" for k, v in s.configs.items())
            )
        for name, n in todo.add_partitions.items():
            print(f"{verb}grow    {name} to {n} partitions")
        for name in todo.alter_configs:
            print(f"{verb}alter   {name} configs")
        for name in todo.unchanged:
            print(f"ok      {name}")
        for p in todo.problems:
            print(f"warning {p}", file=sys.stderr)
        return 0

    return asyncio.run(go())


def cmd_topics_list(args: argparse.Namespace) -> int:
    from pointsman.topics import topic_specs

    for s in topic_specs(_settings(args)):
        print(
            f"{s.role:13} {s.name:40} partitions={s.partitions} rf={s.replication_factor} "
            f"cleanup={s.configs['cleanup.policy']} retention.ms={s.configs['retention.ms']}"
        )
    return 0


# --- schemas and config --------------------------------------------------------------------


def cmd_schemas_export(args: argparse.Namespace) -> int:
    written = contracts.export(Path(args.dir))
    print(f"{len(written)} file(s) written" + "".join(f"\n  {p}" for p in written))
    return 0


def cmd_schemas_check(args: argparse.Namespace) -> int:
    stale = contracts.check(Path(args.dir))
    if stale:
        print("out of date (run `pointsman schemas export`): " + ", ".join(stale), file=sys.stderr)
        return 1
    print("schemas are up to date")
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    _settings(args)
    print(f"configuration OK ({args.config or 'embedded defaults + environment'})")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(_settings(args).model_dump(mode="json"), sort_keys=False), end="")
    return 0


# --- publish and read ----------------------------------------------------------------------


def _queries_from(args: argparse.Namespace) -> list[QueryEvent]:
    meta: dict[str, Any] = {}
    if args.user:
        meta["user_id"] = args.user
    if args.max_cost is not None:
        meta["max_cost_usd"] = args.max_cost
    if args.max_latency_ms is not None:
        meta["max_latency_ms"] = args.max_latency_ms
    common: dict[str, Any] = {
        "tenant": args.tenant,
        "conversation_id": args.conversation,
        "metadata": QueryMetadata(**meta),
    }
    if args.text is not None:
        return [QueryEvent(query_id=args.query_id or new_id(), text=args.text, **common)]
    queries = []
    stream = open(args.file, encoding="utf-8") if args.file else sys.stdin  # noqa: SIM115
    with stream:
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError:
                item = {"text": line.rstrip("\n")}
            if not isinstance(item, dict):
                raise SystemExit(f"line {n}: expected a JSON object or plain text")
            item.setdefault("query_id", new_id())
            for key, value in common.items():
                if value is not None and key != "metadata":
                    item.setdefault(key, value)
            if "messages" in item:
                item["messages"] = [ChatMessage(**m) for m in item["messages"]]
            try:
                queries.append(QueryEvent.model_validate(item))
            except ValueError as exc:
                raise SystemExit(f"line {n}: {exc}") from None
    return queries


def cmd_send(args: argparse.Namespace) -> int:
    from pointsman.client import Client

    settings = _settings(args)
    queries = _queries_from(args)

    async def go() -> None:
        async with Client(settings) as client:
            for q in queries:
                await client.send(q)
                print(
                    orjson.dumps(
                        {"query_id": q.query_id, "topic": settings.topics.name("queries")}
                    ).decode()
                )

    asyncio.run(go())
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from pointsman.client import Client, ResponseTimeout

    settings = _settings(args)
    queries = _queries_from(args)

    async def go() -> int:
        code = 0
        async with Client(settings) as client:
            for q in queries:
                try:
                    response = await client.ask(q, timeout_s=args.timeout)
                except ResponseTimeout as exc:
                    print(str(exc), file=sys.stderr)
                    code = 1
                    continue
                if args.json:
                    print(response.to_json().decode(), flush=True)
                    continue
                route = response.route
                print(
                    f"[{response.status}] model={response.model} route={route.reason_code}"
                    f"{' (fallback)' if route.fallback else ''} cost=${response.cost_usd:.6f}",
                    file=sys.stderr,
                )
                if response.error is not None:
                    print(f"{response.error.type}: {response.error.message}", flush=True)
                    code = 1
                else:
                    print(response.output or "", flush=True)
        return code

    return asyncio.run(go())


def cmd_tail(args: argparse.Namespace) -> int:
    from pointsman.client import read_topic

    settings = _settings(args)

    async def go() -> int:
        n = 0
        async for event in read_topic(
            settings,
            args.role,
            from_beginning=not args.latest,
            max_messages=args.max,
            timeout_s=args.timeout,
            query_id=args.query_id,
        ):
            print(orjson.dumps(event).decode(), flush=True)
            n += 1
        print(f"({n} event(s) from {settings.topics.name(args.role)})", file=sys.stderr)
        return 0

    return asyncio.run(go())


def cmd_demo(args: argparse.Namespace) -> int:
    from pointsman.demo import run_demo

    return asyncio.run(run_demo(_settings(args)))


# --- parser --------------------------------------------------------------------------------


def _query_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", help="the query (else JSONL or plain lines from --file or stdin)")
    p.add_argument("--file")
    p.add_argument("--query-id")
    p.add_argument("--tenant")
    p.add_argument("--conversation")
    p.add_argument("--user")
    p.add_argument("--max-cost", type=float, help="cost budget in USD")
    p.add_argument("--max-latency-ms", type=int, help="deadline from now, in milliseconds")


def _add(sub: Any, name: str, func: Callable[[argparse.Namespace], int], help: str) -> Any:
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    from pointsman.config import TOPIC_ROLES

    parser = argparse.ArgumentParser(
        prog="pointsman",
        description="Pointsman: an LLM router on Apache Kafka. Every service and operation is a "
        "subcommand; `pointsman <command> --help` tells more.",
    )
    parser.add_argument(
        "--config",
        help="YAML config file (default: $POINTSMAN_CONFIG, else the "
        "embedded defaults); POINTSMAN_* variables override it",
    )
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    kafka = sub.add_parser(
        "kafka",
        help="fetch, start and stop a local Apache Kafka (KRaft)",
        description="A real Kafka broker from Maven Central, run with the JDK.",
    )
    ksub = kafka.add_subparsers(dest="kafka_command", metavar="action", required=True)
    p = _add(ksub, "fetch", cmd_kafka_fetch, "download the broker jars with Maven (cached)")
    p.add_argument("--dir", help="target folder (default .state/kafka-lib)")
    p.add_argument("--verbose", action="store_true")
    for name, func, help in (
        ("start", cmd_kafka_start, "format storage if needed, start, wait until serving"),
        ("stop", cmd_kafka_stop, "controlled shutdown (SIGTERM)"),
        ("status", cmd_kafka_status, "pid, ports and whether each node serves"),
    ):
        p = _add(ksub, name, func, help)
        p.add_argument(
            "--nodes",
            type=int,
            default=1,
            choices=(1, 3),
            help="1 (default) or a 3-node cluster for failover tests",
        )
        p.add_argument("--state-dir", help="node folders (default .state/kafka/<single|cluster-3>)")
        if name == "start":
            p.add_argument(
                "--port",
                type=int,
                default=9092,
                help="client port of a single node (default 9092; controller = port+1)",
            )

    topics = sub.add_parser(
        "topics",
        help="provision the topics of the config",
        description="Topics from the declarative config, created idempotently.",
    )
    tsub = topics.add_subparsers(dest="topics_command", metavar="action", required=True)
    p = _add(tsub, "create", cmd_topics_create, "create/grow/align topics (idempotent)")
    p.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    _add(tsub, "list", cmd_topics_list, "the topics the config declares")

    schemas = sub.add_parser(
        "schemas",
        help="generate or check the contract files",
        description="JSON Schemas and AsyncAPI in schemas/, from the models.",
    )
    ssub = schemas.add_subparsers(dest="schemas_command", metavar="action", required=True)
    for name, func, help in (
        ("export", cmd_schemas_export, "write schemas/*.schema.json and schemas/asyncapi.yaml"),
        ("check", cmd_schemas_check, "fail if the committed files differ from the models"),
    ):
        p = _add(ssub, name, func, help)
        p.add_argument("--dir", default="schemas")

    config = sub.add_parser(
        "config",
        help="validate or show the configuration",
        description="The merged configuration (file + environment).",
    )
    csub = config.add_subparsers(dest="config_command", metavar="action", required=True)
    _add(csub, "validate", cmd_config_validate, "check the config; errors name the key and why")
    _add(csub, "show", cmd_config_show, "print the merged config (secrets left out)")

    p = _add(
        sub, "send", cmd_send, "publish queries: --text, or JSONL/plain lines from --file or stdin"
    )
    _query_options(p)
    p = _add(
        sub,
        "ask",
        cmd_ask,
        "publish queries and wait for their responses (request/reply over Kafka)",
    )
    _query_options(p)
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait per query (default 60)"
    )
    p.add_argument("--json", action="store_true", help="print the whole response event")

    p = _add(sub, "tail", cmd_tail, "print the events of a topic as JSON lines")
    p.add_argument("role", choices=TOPIC_ROLES)
    p.add_argument("--max", type=int, help="stop after this many events")
    p.add_argument("--timeout", type=float, default=5.0, help="stop after this long without one")
    p.add_argument("--latest", action="store_true", help="only events from now on")
    p.add_argument("--query-id", help="only events of this query")

    _add(sub, "demo", cmd_demo, "publish sample queries (good and bad) and show where they went")

    registered = {ep.name: ep for ep in entry_points(group="pointsman.commands")}
    for name, package in SERVICES.items():
        if name in registered:
            _register_plugin(sub, registered.pop(name))
        else:
            p = sub.add_parser(name, help=f"[not available here: {package}]")
            p.set_defaults(func=_not_installed(name, package))
    for ep in registered.values():
        _register_plugin(sub, ep)
    return parser


def _register_plugin(sub: Any, ep: EntryPoint) -> None:
    """Add a service's commands. A plugin that fails to import gets a command that says why,
    instead of taking every other command down with it."""
    try:
        register = ep.load()
    except Exception as exc:  # any import error of a plugin is reported the same way
        error = f"{type(exc).__name__}: {exc}"
        p = sub.add_parser(ep.name, help=f"[failed to load: {error}]")
        p.set_defaults(func=_failed_plugin(ep.value, error))
        return
    register(sub)


def _failed_plugin(target: str, error: str) -> Callable[[argparse.Namespace], int]:
    def failed(_args: argparse.Namespace) -> int:
        print(f"the command plugin {target} failed to load: {error}", file=sys.stderr)
        return 2

    return failed


def _not_installed(name: str, package: str) -> Callable[[argparse.Namespace], int]:
    def unavailable(_args: argparse.Namespace) -> int:
        from importlib.util import find_spec

        if find_spec(f"pointsman_{name}") is None:
            print(
                f"the {name} service is not installed here; it comes with {package}",
                file=sys.stderr,
            )
        else:
            print(
                f"the installed {name} package provides no command yet "
                f"(see services/{name}/README.md)",
                file=sys.stderr,
            )
        return 2

    return unavailable


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except broker.BrokerError as exc:
        print(f"kafka: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
