"""Decoding: every bad input gets its own typed reason; the original bytes are kept (pure)."""

from __future__ import annotations

import base64

import orjson
import pytest

from pointsman.deadletter import Limits, Rejected, dead_letter_for, decode
from pointsman.events import DeadLetterEvent, DeadLetterReason, QueryEvent

LIMITS = Limits(max_message_bytes=2000, max_text_chars=100)
GOOD = {"schema_version": "1.0", "query_id": "q-1", "text": "hello"}


def j(obj: object) -> bytes:
    return orjson.dumps(obj)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, DeadLetterReason.empty),
        (b"", DeadLetterReason.empty),
        (b"   \n", DeadLetterReason.empty),
        (b"x" * 2001, DeadLetterReason.oversized),
        (b'{"text": "caf\xe9"}', DeadLetterReason.bad_encoding),
        (b"\xff\xfe{}", DeadLetterReason.bad_encoding),
        (b"{not json", DeadLetterReason.invalid_json),
        (b'{"query_id": "q", "text": "x"', DeadLetterReason.invalid_json),
        (b"[1, 2]", DeadLetterReason.schema_violation),
        (j({**GOOD, "text": "   "}), DeadLetterReason.empty),
        (
            j({"query_id": "q", "messages": [{"role": "user", "content": " "}]}),
            DeadLetterReason.empty,
        ),
        (j({**GOOD, "text": "y" * 101}), DeadLetterReason.oversized),
        (j({"query_id": "q", "text": 5}), DeadLetterReason.schema_violation),
        (j({"text": "no id"}), DeadLetterReason.schema_violation),
        (j({**GOOD, "metadata": {"max_cost_usd": -1}}), DeadLetterReason.schema_violation),
    ],
)
def test_each_bad_input_has_its_reason(value: bytes | None, reason: DeadLetterReason) -> None:
    result = decode(value, QueryEvent, LIMITS)
    assert isinstance(result, Rejected)
    assert result.reason is reason
    assert result.detail


def test_good_input_decodes() -> None:
    result = decode(j(GOOD), QueryEvent, LIMITS)
    assert isinstance(result, QueryEvent)
    assert result.query_text() == "hello"


def test_schema_violation_names_the_field_and_keeps_the_query_id() -> None:
    result = decode(j({**GOOD, "metadata": {"max_cost_usd": -1}}), QueryEvent, LIMITS)
    assert isinstance(result, Rejected)
    assert "metadata.max_cost_usd" in result.detail
    assert result.query_id == "q-1"


def test_dead_letter_carries_source_and_original_bytes() -> None:
    raw = b'{"text": "caf\xe9"}'
    rejected = decode(raw, QueryEvent, LIMITS)
    assert isinstance(rejected, Rejected)
    dl = dead_letter_for(
        rejected,
        service="classifier",
        topic="t.queries",
        partition=3,
        offset=41,
        value=raw,
        key=b"k",
        timestamp_ms=1700000000000,
        headers=[("app", b"web")],
    )
    assert dl.reason is DeadLetterReason.bad_encoding
    assert base64.b64decode(dl.original_b64) == raw
    assert (dl.source.topic, dl.source.partition, dl.source.offset) == ("t.queries", 3, 41)
    assert base64.b64decode(dl.source.key_b64 or "") == b"k"
    assert base64.b64decode(dl.original_headers["app"]) == b"web"
    assert dl.query_id == "unknown:t.queries:3:41"
    assert DeadLetterEvent.from_json(dl.to_json()) == dl


def test_dead_letter_never_uses_an_unsafe_query_id() -> None:
    rejected = Rejected(DeadLetterReason.schema_violation, "x", query_id="has spaces in it")
    dl = dead_letter_for(rejected, service="s", topic="t", partition=0, offset=1, value=b"{}")
    assert dl.query_id == "unknown:t:0:1"
