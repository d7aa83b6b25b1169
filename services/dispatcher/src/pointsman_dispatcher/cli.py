"""`pointsman policy validate` and `pointsman route --dry-run`: the routing file, offline.

Both commands run the same loader and the same :func:`~pointsman_dispatcher.routing.decide` as
the dispatcher service, without Kafka or providers, so a policy change can be checked and replayed
against recorded tagged queries before it is deployed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
from pydantic import ValidationError

from pointsman.events import TaggedQueryEvent
from pointsman_dispatcher.policy import (
    ROUTING_FILE_ENV,
    RoutingConfig,
    RoutingConfigError,
    load_routing_config,
)
from pointsman_dispatcher.routing import ModelHealth, decide, route_input_from_event

EXIT_OK = 0
EXIT_BAD_LINES = 1
EXIT_USAGE = 2


def register(sub: Any) -> None:
    policy = sub.add_parser(
        "policy",
        help="check the dispatcher's routing file (model profiles and policy)",
        description="Tools for the routing file: model profiles and routing policy.",
    )
    actions = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    validate = actions.add_parser(
        "validate",
        help="validate a routing file (schema and cross-references)",
        description="Exit 0 with a one-line summary, or exit 2 listing every problem with its "
        f"key path. FILE defaults to ${ROUTING_FILE_ENV}, else the embedded demo file.",
    )
    validate.add_argument("file", nargs="?", metavar="FILE")
    validate.set_defaults(func=cmd_policy_validate)

    route = sub.add_parser(
        "route",
        help="replay routing decisions for tagged queries (JSONL in, decisions out)",
        description="Reads TaggedQueryEvent JSON lines from INPUT (or stdin) and writes one JSON "
        "line per input line: the decision (action, reason code, candidates, expected and "
        "counterfactual cost) or the line's error. A summary goes to stderr. Exit 1 if any "
        "line was bad, 2 on a bad routing file.",
    )
    route.add_argument(
        "--dry-run", action="store_true", help="decide only (required: no model is called)"
    )
    route.add_argument(
        "--policy",
        metavar="FILE",
        help=f"routing file (default ${ROUTING_FILE_ENV}, else the embedded demo file)",
    )
    route.add_argument(
        "--health",
        metavar="FILE",
        help='JSON object of model health, e.g. {"gpt-4o": "degraded", "m": {"status": "down"}}',
    )
    route.add_argument(
        "--now", help="evaluate deadlines at this RFC 3339 time (default: the clock)"
    )
    route.add_argument("input", nargs="?", default="-", metavar="INPUT|-")
    route.set_defaults(func=cmd_route)


def cmd_policy_validate(args: argparse.Namespace) -> int:
    try:
        config = load_routing_config(args.file)
    except RoutingConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    print(f"ok: {config.source}: {config.summary()}")
    return EXIT_OK


def cmd_route(args: argparse.Namespace) -> int:
    if not args.dry_run:
        print(
            "pointsman route only decides offline: add --dry-run "
            "(the live router is `pointsman dispatcher`)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        config = load_routing_config(args.policy)
        health = read_health(Path(args.health)) if args.health else {}
        now = _parse_now(args.now) if args.now else None
    except RoutingConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"route: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        print(f"route: cannot read {args.input}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    with source:
        stats = route_lines(source, sys.stdout.buffer, config, health=health, now=now)
    print(stats.summary(), file=sys.stderr)
    return EXIT_BAD_LINES if stats.bad_lines else EXIT_OK


class RouteStats:
    """Counts and totals of one dry run, for the stderr summary."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.decisions = 0
        self.refusals = 0
        self.bad_lines = 0
        self.expected_cost_usd = 0.0
        self.counterfactual_cost_usd = 0.0

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.started
        per = elapsed / self.decisions * 1e6 if self.decisions else 0.0
        return (
            f"route --dry-run: {self.decisions} decisions ({self.refusals} refused), "
            f"{self.bad_lines} bad lines in {elapsed:.3f} s ({per:.0f} µs per decision "
            f"end to end); expected cost ${self.expected_cost_usd:.6f}, counterfactual "
            f"${self.counterfactual_cost_usd:.6f}"
        )


def route_lines(
    lines: IO[str],
    out: IO[bytes],
    config: RoutingConfig,
    *,
    health: Mapping[str, ModelHealth],
    now: datetime | None,
) -> RouteStats:
    """Decide each line; a bad line yields an error line, never an exception."""
    stats = RouteStats()
    conversation_tiers: dict[tuple[str | None, str], int] = {}
    for number, line in _numbered(lines):
        try:
            raw = orjson.loads(line)
            if isinstance(raw, dict):
                raw.pop("_kafka", None)  # the annotation `pointsman tail` adds
            event = TaggedQueryEvent.model_validate(raw)
        except orjson.JSONDecodeError as exc:
            stats.bad_lines += 1
            out.write(_error_line(number, "invalid_json", str(exc)))
            continue
        except ValidationError as exc:
            stats.bad_lines += 1
            out.write(_error_line(number, "schema_violation", _validation_summary(exc)))
            continue
        query = event.query
        conversation = (query.tenant, query.conversation_id) if query.conversation_id else None
        inp = route_input_from_event(
            event,
            now=now or datetime.now(UTC),
            conversation_tier=conversation_tiers.get(conversation) if conversation else None,
            health=health,
        )
        try:
            decision = decide(inp, config)
        except Exception as exc:  # a dry run reports a failing line and goes on
            stats.bad_lines += 1
            out.write(_error_line(number, "processing_error", f"{type(exc).__name__}: {exc}"))
            continue
        if conversation and decision.sticky_tier is not None:
            conversation_tiers[conversation] = decision.sticky_tier
        stats.decisions += 1
        stats.refusals += decision.action == "refuse"
        stats.expected_cost_usd += decision.expected_cost_usd
        stats.counterfactual_cost_usd += decision.counterfactual_cost_usd
        record = {
            "line": number,
            "query_id": event.query_id,
            "domain": inp.domain,
            "risk": inp.risk,
            **decision.to_dict(),
        }
        out.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
    out.flush()
    return stats


def read_health(path: Path) -> dict[str, ModelHealth]:
    """``{"model": "degraded"}`` or ``{"model": {"status": ..., "p99_latency_ms": ...}}``."""
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"cannot read health file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"health file {path}: expected a JSON object of model -> status")
    health: dict[str, ModelHealth] = {}
    for model, value in data.items():
        spec = {"status": value} if isinstance(value, str) else value
        status = spec.get("status") if isinstance(spec, dict) else None
        if status not in ("healthy", "degraded", "down"):
            raise ValueError(f"health file {path}: {model}: status must be healthy|degraded|down")
        latency = spec.get("p99_latency_ms")
        health[str(model)] = ModelHealth(
            status=status, p99_latency_ms=float(latency) if latency is not None else None
        )
    return health


def _numbered(lines: IO[str]) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(lines, start=1):
        if line.strip():
            yield number, line


def _parse_now(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _error_line(number: int, kind: str, message: str) -> bytes:
    record = {"line": number, "error": {"type": kind, "message": message[:500]}}
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def _validation_summary(exc: ValidationError) -> str:
    """Where and why, without echoing input values."""
    parts = [
        f"{'.'.join(str(p) for p in error['loc']) or '(root)'}: {error['msg']}"
        for error in exc.errors()[:3]
    ]
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
