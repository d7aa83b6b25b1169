"""Decoding with dead letters: every record becomes an event or a typed rejection, never nothing.

:func:`decode` is pure: bytes in, a validated event or a :class:`Rejected` out, checked in this
order so the reason is the most specific one: empty → oversized → bad_encoding → invalid_json →
empty text → oversized text → schema_violation. :func:`dead_letter_for` wraps a rejection with
the source topic/partition/offset and the original bytes, ready for the dead-letter topic.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from pydantic import TypeAdapter, ValidationError

from pointsman.events import (
    DeadLetterEvent,
    DeadLetterReason,
    Event,
    Identifier,
    QueryEvent,
    SourceRecord,
    TraceContext,
)

E = TypeVar("E", bound=Event)


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int
    max_text_chars: int


@dataclass(frozen=True)
class Rejected:
    reason: DeadLetterReason
    detail: str
    query_id: str | None = None
    trace: TraceContext | None = None


def decode(value: bytes | None, model: type[E], limits: Limits) -> E | Rejected:
    if not value or not value.strip():
        return Rejected(DeadLetterReason.empty, "the record has no value")
    if len(value) > limits.max_message_bytes:
        return Rejected(
            DeadLetterReason.oversized,
            f"the record is {len(value)} bytes; the limit is {limits.max_message_bytes}",
        )
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected(
            DeadLetterReason.bad_encoding, f"not UTF-8: {exc.reason} at byte {exc.start}"
        )
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return Rejected(DeadLetterReason.invalid_json, f"not valid JSON: {exc}")
    if not isinstance(data, dict):
        return Rejected(
            DeadLetterReason.schema_violation,
            f"expected a JSON object, got {type(data).__name__}",
        )
    query_id = _str_or_none(data.get("query_id"))
    trace = _trace_or_none(data.get("trace"))
    if model is QueryEvent:
        problem = _query_text_problem(data, limits)
        if problem is not None:
            return Rejected(problem[0], problem[1], query_id, trace)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        return Rejected(DeadLetterReason.schema_violation, _summarise(exc), query_id, trace)


def _query_text_problem(
    data: dict[str, Any], limits: Limits
) -> tuple[DeadLetterReason, str] | None:
    """Empty or over-long query text gets its own reason rather than a schema violation."""
    if isinstance(data.get("text"), str):
        texts = [data["text"]]
    elif isinstance(data.get("messages"), list):
        texts = [
            m["content"]
            for m in data["messages"]
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
        ]
    else:
        return None
    if texts and not any(t.strip() for t in texts):
        return DeadLetterReason.empty, "the query text is empty"
    longest = max((len(t) for t in texts), default=0)
    if longest > limits.max_text_chars:
        return (
            DeadLetterReason.oversized,
            f"the query text has {longest} characters; the limit is {limits.max_text_chars}",
        )
    return None


def _summarise(exc: ValidationError, most: int = 5) -> str:
    parts = []
    for err in exc.errors()[:most]:
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - most
    if more > 0:
        parts.append(f"(+{more} more)")
    return "schema violation: " + "; ".join(parts)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= 200 else None


def _trace_or_none(value: Any) -> TraceContext | None:
    try:
        return TraceContext.model_validate(value) if isinstance(value, dict) else None
    except ValidationError:
        return None


def dead_letter_for(
    rejected: Rejected,
    *,
    service: str,
    topic: str,
    partition: int,
    offset: int,
    value: bytes | None,
    key: bytes | None = None,
    timestamp_ms: int | None = None,
    headers: Sequence[tuple[str, bytes]] = (),
) -> DeadLetterEvent:
    query_id = rejected.query_id or f"unknown:{topic}:{partition}:{offset}"
    safe_query_id = (
        query_id if _is_identifier(query_id) else f"unknown:{topic}:{partition}:{offset}"
    )
    return DeadLetterEvent(
        query_id=safe_query_id,
        trace=rejected.trace.child() if rejected.trace else TraceContext.new(),
        reason=rejected.reason,
        detail=rejected.detail[:4000],
        service=service,
        source=SourceRecord(
            topic=topic,
            partition=partition,
            offset=offset,
            timestamp_ms=timestamp_ms,
            key_b64=base64.b64encode(key).decode() if key is not None else None,
        ),
        original_b64=base64.b64encode(value or b"").decode(),
        original_headers={k: base64.b64encode(v or b"").decode() for k, v in headers},
    )


_IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)


def _is_identifier(value: str) -> bool:
    """The same rule as the events' ``Identifier`` type (one definition, in events.py)."""
    try:
        _IDENTIFIER.validate_python(value)
    except ValidationError:
        return False
    return True
