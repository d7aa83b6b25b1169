"""Event contracts: the public API of Pointsman.

These pydantic models are the single source of truth for every event on every topic. The JSON
Schema files in ``schemas/`` are generated from them (``pointsman schemas export``) and a test fails
when the two drift apart. Upstream and downstream systems integrate against the schema files.

Conventions shared by all events:
- ``schema_version`` is the contract version of that event type (major.minor; a consumer accepts
  every minor of its major).
- ``event_id`` identifies this event; ``query_id`` is the idempotency key carried end to end, from
  the query to its tagged query, response, audit record, review request or dead letter.
- ``trace`` carries W3C trace context so that one query can be followed across services.
- ``tenant`` and ``conversation_id`` decide the partition key (see :func:`partition_key`).
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, ClassVar, Literal, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, model_validator
from pydantic.json_schema import JsonSchemaValue, SkipJsonSchema
from pydantic_core import CoreSchema

SCHEMA_BASE_URI = "https://pointsman.dev/schemas/"

# Identifiers: printable, no whitespace, bounded, so they are safe as Kafka keys and log fields.
Identifier = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@/+=-]+$")]
TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """A random, URL-safe event/query id (UUID4, canonical text form)."""
    return str(uuid.uuid4())


class Domain(StrEnum):
    medical = "medical"
    finance = "finance"
    legal = "legal"
    travel = "travel"
    code = "code"
    math = "math"
    creative = "creative"
    general = "general"


class Risk(StrEnum):
    none = "none"
    jailbreak = "jailbreak"
    self_harm = "self_harm"
    harmful = "harmful"


class Contract(BaseModel):
    """Base for every model in the contracts: strict about unknown keys, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TraceContext(Contract):
    """W3C Trace Context (https://www.w3.org/TR/trace-context/)."""

    traceparent: str = Field(pattern=TRACEPARENT_PATTERN, description="W3C traceparent header.")
    tracestate: str | None = Field(default=None, max_length=512)

    @classmethod
    def new(cls) -> TraceContext:
        return cls(traceparent=f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01")

    def child(self) -> TraceContext:
        """Same trace, new span id: what a service stamps on the event it emits."""
        version, trace_id, _parent, flags = self.traceparent.split("-")
        return TraceContext(
            traceparent=f"{version}-{trace_id}-{os.urandom(8).hex()}-{flags}",
            tracestate=self.tracestate,
        )


class Event(Contract):
    """Fields every event carries."""

    EVENT_TYPE: ClassVar[str]
    SCHEMA_VERSION: ClassVar[str] = "1.0"

    schema_version: str = Field(
        default="1.0", pattern=r"^1\.[0-9]+$", description="Contract version of this event type."
    )
    event_id: Identifier = Field(default_factory=new_id, description="Unique id of this event.")
    query_id: Identifier = Field(
        description="Idempotency key of the query, carried end to end through every topic."
    )
    created_at: datetime = Field(
        default_factory=utc_now, description="When this event was produced (RFC 3339, UTC)."
    )
    trace: TraceContext = Field(default_factory=TraceContext.new)
    tenant: Identifier | None = Field(default=None, description="Tenant that owns the query.")
    conversation_id: Identifier | None = Field(
        default=None, description="Conversation the query belongs to; keeps its turns in order."
    )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        """On the wire ``schema_version`` is required, so consumers can always dispatch on it."""
        schema = handler.resolve_ref_schema(handler(core_schema))
        required = schema.setdefault("required", [])
        if "schema_version" not in required:
            required.insert(0, "schema_version")
        return schema

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Self:
        return cls.model_validate(orjson.loads(raw))

    def partition_key(self) -> bytes:
        return partition_key(self.tenant, self.conversation_id, self.query_id)


def partition_key(tenant: str | None, conversation_id: str | None, query_id: str) -> bytes:
    """Kafka key: one conversation always lands in one partition, so its turns stay ordered.

    Without a conversation the query id is the key (spreads load, keeps retries together).
    """
    if conversation_id:
        return f"{tenant or ''}/{conversation_id}".encode()
    return query_id.encode()


# ---------------------------------------------------------------------------------------------
# query


class ChatMessage(Contract):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=200_000)


class QueryMetadata(Contract):
    """What the caller may ask of the route."""

    user_id: Identifier | None = None
    max_cost_usd: float | None = Field(
        default=None, ge=0, description="Upper bound on what this query may cost, in US dollars."
    )
    max_latency_ms: int | None = Field(
        default=None, gt=0, description="Latency budget from created_at, in milliseconds."
    )
    deadline: datetime | None = Field(
        default=None, description="Absolute time after which an answer is useless."
    )
    allowed_models: list[Identifier] | None = Field(
        default=None, description="If set, only these model ids may answer."
    )
    forbidden_models: list[Identifier] = Field(
        default_factory=list, description="These model ids must never answer."
    )
    tags: dict[str, str] = Field(
        default_factory=dict, description="Free caller tags, echoed to the response and audit."
    )


class QueryEvent(Event):
    """A question from an upstream system: one text, or a chat (multi-turn)."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["text"]}, {"required": ["messages"]}]}
    )
    EVENT_TYPE: ClassVar[str] = "query"
    event_type: Literal["query"] = "query"
    text: Annotated[str, Field(pattern=r"\S")] | SkipJsonSchema[None] = Field(
        default=None, description="A single-turn query (give text or messages, not both)."
    )
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | SkipJsonSchema[None] = Field(
        default=None, description="A chat; the latest user turn is the query."
    )
    metadata: QueryMetadata = Field(default_factory=QueryMetadata)
    reply_to: Identifier | None = Field(
        default=None, description="Optional correlation tag for request/reply clients."
    )

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        if (self.text is None) == (self.messages is None):
            raise ValueError("exactly one of 'text' or 'messages' must be given")
        if self.text is not None and not self.text.strip():
            raise ValueError("'text' is empty")
        if self.messages is not None and not any(
            m.role == "user" and m.content.strip() for m in self.messages
        ):
            raise ValueError("'messages' has no non-empty user turn")
        return self

    def query_text(self) -> str:
        """The text to classify: the text, or the latest non-empty user turn of the chat."""
        if self.text is not None:
            return self.text
        assert self.messages is not None
        return next(m.content for m in reversed(self.messages) if m.role == "user" and m.content)


# ---------------------------------------------------------------------------------------------
# tagged query


class Tags(Contract):
    """What the classifier says about a query."""

    domain: Domain
    risk: Risk
    domain_probs: dict[Domain, float] = Field(description="Calibrated probability per domain.")
    risk_probs: dict[Risk, float] = Field(description="Calibrated probability per risk class.")
    confidence: float = Field(ge=0, le=1, description="Calibrated confidence of the domain.")
    ambiguous: bool = Field(description="Confidence inside the calibrated ambiguity band.")
    model_version: str = Field(min_length=1, max_length=200)
    truncated: bool = Field(default=False, description="The input was cut to the max length.")


class TaggedQueryEvent(Event):
    """A query with the classifier's tags; what the dispatcher routes on."""

    EVENT_TYPE: ClassVar[str] = "tagged_query"
    event_type: Literal["tagged_query"] = "tagged_query"
    query: QueryEvent = Field(description="The query as received.")
    tags: Tags
    classified_at: datetime = Field(default_factory=utc_now)


# ---------------------------------------------------------------------------------------------
# response


class Usage(Contract):
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)


class Attempt(Contract):
    """One call to one model, successful or not."""

    model: Identifier
    provider: str = Field(max_length=100)
    endpoint: str = Field(max_length=500, description="Endpoint URL without credentials.")
    status: Literal["ok", "error", "timeout", "rate_limited", "circuit_open", "skipped"]
    http_status: int | None = None
    latency_ms: float = Field(ge=0)
    usage: Usage | None = None
    cost_usd: float = Field(default=0.0, ge=0)
    error: str | None = Field(default=None, max_length=2000)


class Route(Contract):
    """Why the query went where it went."""

    reason_code: str = Field(min_length=1, max_length=100)
    fallback: bool = Field(default=False, description="Answered by a fallback, not the first pick.")
    fallback_reasons: list[str] = Field(default_factory=list)
    candidates: list[Identifier] = Field(default_factory=list)


class ErrorInfo(Contract):
    type: str = Field(min_length=1, max_length=100, description="Stable, typed error code.")
    message: str = Field(max_length=2000)


class ResponseEvent(Event):
    """The answer to a query (or a typed error), with the route taken and every attempt."""

    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"status": {"const": "error"}}},
            "then": {"required": ["error"]},
        }
    )
    EVENT_TYPE: ClassVar[str] = "response"
    event_type: Literal["response"] = "response"
    status: Literal["ok", "error", "refused"]
    model: Identifier | None = Field(default=None, description="Model that answered.")
    output: str | None = Field(default=None, description="The answer text.")
    finish_reason: str | None = Field(default=None, max_length=100)
    route: Route
    attempts: list[Attempt] = Field(default_factory=list)
    usage: Usage | None = None
    cost_usd: float = Field(default=0.0, ge=0)
    counterfactual_cost_usd: float | None = Field(
        default=None, ge=0, description="What the default big model would have cost."
    )
    latency_ms: float | None = Field(default=None, ge=0, description="From query to response.")
    error: ErrorInfo | None = None
    caller_tags: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _error_has_info(self) -> Self:
        if self.status == "error" and self.error is None:
            raise ValueError("a response with status 'error' must carry 'error'")
        return self


# ---------------------------------------------------------------------------------------------
# audit


class AuditRecord(Event):
    """One line per answered (or failed) query: what routing did, at what cost. No query text."""

    EVENT_TYPE: ClassVar[str] = "audit"
    event_type: Literal["audit"] = "audit"
    status: Literal["ok", "error", "refused"]
    domain: Domain | None = None
    risk: Risk | None = None
    confidence: float | None = Field(default=None, ge=0, le=1)
    ambiguous: bool | None = None
    model: Identifier | None = None
    reason_code: str | None = Field(default=None, max_length=100)
    fallback: bool = False
    attempts: int = Field(default=0, ge=0)
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    cost_usd: float = Field(default=0.0, ge=0)
    counterfactual_cost_usd: float | None = Field(default=None, ge=0)
    latency_ms: float | None = Field(default=None, ge=0)
    error_type: str | None = Field(default=None, max_length=100)
    text_sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$", description="Hash of the query text, not the text."
    )


# ---------------------------------------------------------------------------------------------
# dead letter


class DeadLetterReason(StrEnum):
    invalid_json = "invalid_json"
    schema_violation = "schema_violation"
    empty = "empty"
    oversized = "oversized"
    bad_encoding = "bad_encoding"
    processing_error = "processing_error"
    delivery_failed = "delivery_failed"


class SourceRecord(Contract):
    """Where the bad record came from, so it can be found and replayed."""

    topic: str = Field(min_length=1, max_length=249)
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)
    timestamp_ms: int | None = None
    key_b64: str | None = Field(default=None, description="The record key, base64.")


class DeadLetterEvent(Event):
    """A record a service could not process. Nothing is dropped: the original bytes are here."""

    EVENT_TYPE: ClassVar[str] = "dead_letter"
    event_type: Literal["dead_letter"] = "dead_letter"
    query_id: Identifier = Field(
        description="The record's query id if readable, else 'unknown:<topic>:<p>:<offset>'."
    )
    reason: DeadLetterReason
    detail: str = Field(max_length=4000, description="Human-readable why.")
    service: str = Field(min_length=1, max_length=100, description="Service that rejected it.")
    source: SourceRecord
    original_b64: str = Field(description="The original record value, base64.")
    original_headers: dict[str, str] = Field(
        default_factory=dict, description="Original headers, values base64."
    )


# ---------------------------------------------------------------------------------------------
# human review


class ReviewRequestEvent(Event):
    """A query a person should look at (self-harm, harmful, repeated failures)."""

    EVENT_TYPE: ClassVar[str] = "review_request"
    event_type: Literal["review_request"] = "review_request"
    reason: Literal["self_harm", "harmful", "jailbreak", "ambiguous", "failure"]
    priority: Literal["low", "normal", "high", "urgent"]
    risk: Risk
    domain: Domain | None = None
    confidence: float | None = Field(default=None, ge=0, le=1)
    text: str = Field(description="The query text (a reviewer must read it).")
    route_reason_code: str | None = Field(default=None, max_length=100)


# ---------------------------------------------------------------------------------------------
# model health (compacted, keyed by model id)


class ModelHealthEvent(Contract):
    """Latest health of one model; the topic is compacted on the model id."""

    EVENT_TYPE: ClassVar[str] = "model_health"
    SCHEMA_VERSION: ClassVar[str] = "1.0"
    schema_version: str = Field(default="1.0", pattern=r"^1\.[0-9]+$")
    event_type: Literal["model_health"] = "model_health"
    event_id: Identifier = Field(default_factory=new_id)
    created_at: datetime = Field(default_factory=utc_now)
    model: Identifier
    status: Literal["healthy", "degraded", "down"]
    window_s: int = Field(gt=0, description="Length of the window the figures are over.")
    requests: int = Field(ge=0)
    error_rate: float = Field(ge=0, le=1)
    p99_latency_ms: float | None = Field(default=None, ge=0)

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True))

    def partition_key(self) -> bytes:
        return self.model.encode()


EVENT_TYPES: dict[str, type[BaseModel]] = {
    m.EVENT_TYPE: m
    for m in (
        QueryEvent,
        TaggedQueryEvent,
        ResponseEvent,
        AuditRecord,
        DeadLetterEvent,
        ReviewRequestEvent,
        ModelHealthEvent,
    )
}
