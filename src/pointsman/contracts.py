"""The catalogue of channels, and the generated contract files in ``schemas/``.

The pydantic models in :mod:`pointsman.events` are the source of truth. This module renders them
as JSON Schema (draft 2020-12) files and renders the channel catalogue below as an AsyncAPI 3.0
document. ``pointsman schemas export`` writes them; ``pointsman schemas check`` (and a test) fails
when the committed files differ from what the code would write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import BaseModel

from pointsman import events
from pointsman.config import Settings, defaults_dict, settings_json_schema
from pointsman.topics import topic_specs

DIALECT = "https://json-schema.org/draft/2020-12/schema"


@dataclass(frozen=True)
class Channel:
    role: str
    message: type[BaseModel]
    key: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    description: str


CHANNELS: tuple[Channel, ...] = (
    Channel(
        "queries",
        events.QueryEvent,
        "conversation_id (tenant/conversation) or query_id",
        ("upstream systems", "pointsman send"),
        ("classifier",),
        "Queries from upstream systems: one text or a chat.",
    ),
    Channel(
        "tagged",
        events.TaggedQueryEvent,
        "same key as the query",
        ("classifier",),
        ("dispatcher",),
        "Queries with domain, risk and calibrated confidences.",
    ),
    Channel(
        "responses",
        events.ResponseEvent,
        "same key as the query",
        ("dispatcher",),
        ("downstream systems", "auditor", "pointsman ask"),
        "Answers (or typed errors), with the route taken and every attempt.",
    ),
    Channel(
        "audit",
        events.AuditRecord,
        "same key as the query",
        ("auditor",),
        ("audit store", "analytics"),
        "One record per query: route, cost, latency, fallbacks, errors; no query text.",
    ),
    Channel(
        "dead_letters",
        events.DeadLetterEvent,
        "same key as the rejected record, else query_id",
        ("classifier", "dispatcher", "auditor"),
        ("operators", "auditor"),
        "Records a service could not process, with a typed reason and the original bytes.",
    ),
    Channel(
        "review",
        events.ReviewRequestEvent,
        "same key as the query",
        ("dispatcher",),
        ("human review tools",),
        "Queries a person should look at (self-harm, harmful, repeated failure).",
    ),
    Channel(
        "model_health",
        events.ModelHealthEvent,
        "model id (compacted: latest per model)",
        ("auditor",),
        ("dispatcher",),
        "Latest health per model, read by the dispatcher to demote degraded models.",
    ),
)


def event_type_of(model: type[BaseModel]) -> str:
    """The wire name of an event model: the default of its ``event_type`` field."""
    return str(model.model_fields["event_type"].default)


def schema_file_name(model: type[BaseModel]) -> str:
    return f"{event_type_of(model)}.schema.json"


def event_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    return {
        "$schema": DIALECT,
        "$id": events.SCHEMA_BASE_URI + schema_file_name(model),
        **schema,
    }


def rendered_files() -> dict[str, bytes]:
    """Every generated file in ``schemas/``, by file name (from the embedded defaults only, so
    the output never depends on the environment it is generated in)."""
    settings = Settings.model_validate(defaults_dict())
    files = {schema_file_name(c.message): _json(event_schema(c.message)) for c in CHANNELS}
    files["config.schema.json"] = _json(settings_json_schema())
    files["asyncapi.yaml"] = yaml.safe_dump(
        asyncapi_document(settings), sort_keys=False, allow_unicode=True, width=100
    ).encode()
    return files


def _json(data: Any) -> bytes:
    return orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n"


def asyncapi_document(settings: Settings) -> dict[str, Any]:
    specs = {s.role: s for s in topic_specs(settings)}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for c in CHANNELS:
        spec = specs[c.role]
        name = event_type_of(c.message)
        messages[name] = {
            "name": name,
            "title": c.message.__name__,
            "summary": (c.message.__doc__ or "").strip().splitlines()[0],
            "contentType": "application/json",
            "payload": {"$ref": f"./{schema_file_name(c.message)}"},
            "headers": {
                "type": "object",
                "properties": {
                    "event_type": {"type": "string", "const": name},
                    "schema_version": {"type": "string"},
                    "query_id": {"type": "string"},
                    "traceparent": {"type": "string", "description": "W3C trace context"},
                },
            },
            "bindings": {
                "kafka": {
                    "key": {"type": "string", "description": c.key},
                    "bindingVersion": "0.5.0",
                }
            },
        }
        channels[c.role] = {
            "address": spec.name,
            "description": c.description,
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": {
                "kafka": {
                    "topic": spec.name,
                    "partitions": spec.partitions,
                    "replicas": spec.replication_factor,
                    "topicConfiguration": {
                        "cleanup.policy": spec.configs["cleanup.policy"].split(","),
                        "retention.ms": int(spec.configs["retention.ms"]),
                        "max.message.bytes": int(spec.configs["max.message.bytes"]),
                    },
                    "bindingVersion": "0.5.0",
                }
            },
        }
        for who in c.producers:
            operations[_op_id("send", c.role, who)] = _operation("send", c, who, name)
        for who in c.consumers:
            operations[_op_id("receive", c.role, who)] = _operation("receive", c, who, name)
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Pointsman",
            "version": "1.0.0",
            "description": (
                "Pointsman routes LLM queries through Kafka: upstream systems publish queries, "
                "the classifier tags them, the dispatcher answers them with the fitting model, "
                "the auditor keeps the record. Generated by `pointsman schemas export` from the "
                "event models and the default topic configuration (names take the configured "
                "topic prefix)."
            ),
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": settings.kafka.bootstrap_servers.split(",")[0],
                "protocol": "kafka",
                "description": "The single-node broker that `make run` starts.",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def _op_id(action: str, role: str, who: str) -> str:
    slug = "".join(w.capitalize() for w in who.replace("pointsman ", "cli ").split())
    return f"{action}{''.join(p.capitalize() for p in role.split('_'))}By{slug}"


def _operation(action: str, c: Channel, who: str, message: str) -> dict[str, Any]:
    verb = "publishes to" if action == "send" else "reads"
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{c.role}"},
        "summary": f"{who} {verb} {c.role}",
        "messages": [{"$ref": f"#/channels/{c.role}/messages/{message}"}],
        "tags": [{"name": who}],
    }


def export(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in rendered_files().items():
        path = directory / name
        if not path.exists() or path.read_bytes() != content:
            path.write_bytes(content)
            written.append(path)
    return written


def check(directory: Path) -> list[str]:
    """File names whose committed content differs from the generated content."""
    stale = []
    for name, content in rendered_files().items():
        path = directory / name
        if not path.exists() or path.read_bytes() != content:
            stale.append(name)
    return stale
