"""Pure mapping from what a provider said (status, headers, error body) to a typed failure.

Every adapter funnels its failures through these functions, so the retry, breaker and fallback
code only ever sees :class:`ProviderError` kinds. Provider free text is scrubbed of credentials
before it reaches a message; authentication failures carry no provider text at all, because
providers echo (partly masked) keys in those.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from pointsman_dispatcher.providers.base import ErrorKind, ProviderError, ProviderTarget

MAX_MESSAGE_CHARS = 300
REDACTED = "***"

# Shapes of common credentials, masked even when we were not told the exact value.
_KEY_SHAPES = re.compile(
    r"(sk-[A-Za-z0-9_\-*.]{6,}|AIza[0-9A-Za-z_\-]{10,}|(?:AKIA|ASIA)[0-9A-Z]{12,}"
    r"|(?i:bearer)\s+[A-Za-z0-9_\-.~+/=*]{8,})"
)


def kind_for_status(status: int) -> ErrorKind:
    """The kind an HTTP status means when the body names nothing more specific."""
    if status in (401, 403):
        return "auth"
    if status == 429:
        return "rate_limited"
    if status in (408, 504):
        return "timeout"
    if status in (503, 529):
        return "overloaded"
    if status >= 500:
        return "server_error"
    return "bad_request"


def parse_retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` (OpenAI, Azure) or ``Retry-After`` (seconds or an
    HTTP date). ``headers`` must be case-insensitive (``httpx.Headers``) or lower-cased."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(float(millis) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


def parse_duration(text: str) -> float | None:
    """A protobuf JSON duration such as ``"13s"`` or ``"1.5s"`` (Gemini's RetryInfo)."""
    if not text.endswith("s"):
        return None
    try:
        return max(float(text[:-1]), 0.0)
    except ValueError:
        return None


def target_secrets(target: ProviderTarget) -> tuple[str, ...]:
    """Every credential value a target carries, for scrubbing."""
    values: list[str] = []
    if target.api_key is not None:
        values.append(target.api_key.get_secret_value())
    if target.aws is not None:
        values.append(target.aws.secret_access_key.get_secret_value())
        values.append(target.aws.access_key_id)
        if target.aws.session_token is not None:
            values.append(target.aws.session_token.get_secret_value())
    return tuple(v for v in values if len(v) >= 4)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` without the given secrets or anything shaped like a key, cut to a sane length."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    text = _KEY_SHAPES.sub(REDACTED, text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS] + "..."
    return text


def http_error(
    *,
    provider: str,
    status: int,
    kind: ErrorKind | None,
    error_type: str | None,
    detail: str | None,
    retry_after_s: float | None,
) -> ProviderError:
    """One ProviderError for an HTTP failure; provider text is dropped for ``auth``."""
    final_kind = kind or kind_for_status(status)
    label = f"{provider} HTTP {status}" + (f" {error_type}" if error_type else "")
    message = label if final_kind == "auth" or not detail else f"{label}: {detail}"
    return ProviderError(
        kind=final_kind, message=message, http_status=status, retry_after_s=retry_after_s
    )


def stream_error(
    provider: str, kind: ErrorKind, error_type: str | None, detail: str | None
) -> ProviderError:
    """A failure reported inside a 2xx stream (an error event or exception frame)."""
    label = f"{provider} stream error" + (f" {error_type}" if error_type else "")
    message = label if kind == "auth" or not detail else f"{label}: {detail}"
    return ProviderError(kind=kind, message=message, http_status=200)
