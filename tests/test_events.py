"""Event models: inputs, keys and trace context (pure, no Kafka)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pointsman.events import (
    ChatMessage,
    QueryEvent,
    ResponseEvent,
    Route,
    TraceContext,
    partition_key,
)


def test_query_needs_exactly_one_of_text_or_messages() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        QueryEvent(query_id="q1")
    with pytest.raises(ValidationError, match="exactly one"):
        QueryEvent(query_id="q1", text="hi", messages=[ChatMessage(role="user", content="hi")])
    assert QueryEvent(query_id="q1", text="hi").query_text() == "hi"


def test_chat_query_text_is_the_latest_user_turn() -> None:
    q = QueryEvent(
        query_id="q1",
        messages=[
            ChatMessage(role="system", content="be brief"),
            ChatMessage(role="user", content="first question"),
            ChatMessage(role="assistant", content="an answer"),
            ChatMessage(role="user", content="the follow-up"),
            ChatMessage(role="assistant", content=""),
        ],
    )
    assert q.query_text() == "the follow-up"


def test_chat_without_a_user_turn_is_rejected() -> None:
    with pytest.raises(ValidationError, match="no non-empty user turn"):
        QueryEvent(query_id="q1", messages=[ChatMessage(role="system", content="x")])


def test_unknown_fields_and_bad_ids_are_rejected() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        QueryEvent.model_validate({"query_id": "q1", "text": "x", "prompt": "y"})
    with pytest.raises(ValidationError, match="query_id"):
        QueryEvent(query_id="has space", text="x")


def test_conversation_keeps_one_partition_key() -> None:
    a = QueryEvent(query_id="q1", text="x", tenant="acme", conversation_id="c9")
    b = QueryEvent(query_id="q2", text="y", tenant="acme", conversation_id="c9")
    assert a.partition_key() == b.partition_key() == b"acme/c9"
    assert partition_key(None, None, "q3") == b"q3"
    assert partition_key("other", "c9", "q1") != a.partition_key()


def test_trace_child_keeps_the_trace_and_changes_the_span() -> None:
    parent = TraceContext.new()
    child = parent.child()
    assert child.traceparent.split("-")[1] == parent.traceparent.split("-")[1]
    assert child.traceparent.split("-")[2] != parent.traceparent.split("-")[2]


def test_schema_version_is_filled_and_checked() -> None:
    assert QueryEvent(query_id="q", text="x").schema_version == "1.0"
    assert QueryEvent.model_validate({"query_id": "q", "text": "x", "schema_version": "1.3"})
    with pytest.raises(ValidationError, match="schema_version"):
        QueryEvent.model_validate({"query_id": "q", "text": "x", "schema_version": "2.0"})


def test_error_response_must_say_what_went_wrong() -> None:
    with pytest.raises(ValidationError, match="must carry 'error'"):
        ResponseEvent(query_id="q", status="error", route=Route(reason_code="x"))


def test_json_round_trip_is_lossless() -> None:
    q = QueryEvent(query_id="q", text="héllo ✓", tenant="t", conversation_id="c")
    assert QueryEvent.from_json(q.to_json()) == q
