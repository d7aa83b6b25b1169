"""What every provider adapter takes and returns, independent of any wire format.

The dispatcher maps a model profile to a :class:`ProviderTarget`, builds one :class:`ChatRequest`
and asks the adapter for that provider family to run it. Adapters turn every failure into a
:class:`ProviderError` with a stable ``kind``, so retry, circuit-breaker and fallback decisions are
plain functions of that kind (never of exception classes or message text).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import SecretStr

ProviderName = Literal["openai", "azure_openai", "anthropic", "bedrock", "gemini"]
Role = Literal["system", "user", "assistant"]

ErrorKind = Literal[
    "rate_limited",  # 429 (or a provider's throttling error): retry after Retry-After
    "overloaded",  # 503/529 style overload: retryable, counts against the breaker
    "server_error",  # other 5xx: retryable, counts against the breaker
    "timeout",  # connect/read timeout or the request's deadline
    "connection",  # refused, reset, DNS, TLS
    "cut_stream",  # a streamed response ended before its final frame
    "bad_request",  # 400/404/413/422: not retryable on the same model (another may work)
    "auth",  # 401/403: not retryable, configuration problem
    "content_filter",  # the provider refused on policy grounds
    "invalid_response",  # 2xx body that does not parse as the provider's format
]

RETRYABLE: frozenset[str] = frozenset(
    {"rate_limited", "overloaded", "server_error", "timeout", "connection", "cut_stream"}
)


@dataclass(frozen=True)
class AwsCredentials:
    access_key_id: str
    secret_access_key: SecretStr
    session_token: SecretStr | None = None


@dataclass(frozen=True)
class ProviderTarget:
    """Where and how to call one model. Credentials are resolved values, never logged."""

    provider: ProviderName
    base_url: str  # e.g. https://api.openai.com/v1, https://{resource}.openai.azure.com
    model: str  # the provider's model id (Azure: ignored, the deployment names the model)
    api_key: SecretStr | None = None
    timeout_s: float = 30.0
    api_version: str | None = None  # Azure OpenAI (e.g. 2024-10-21), Anthropic version header
    deployment: str | None = None  # Azure OpenAI deployment name
    region: str | None = None  # AWS Bedrock region
    aws: AwsCredentials | None = None  # AWS Bedrock (SigV4)
    extra_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[ChatMessage, ...]
    system: str | None = None  # adapters place it where their format wants it
    max_tokens: int = 512
    temperature: float | None = None
    stream: bool = False


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: str | None
    input_tokens: int
    output_tokens: int
    http_status: int
    latency_ms: float
    streamed: bool = False
    provider_model: str | None = None  # the model the provider says answered


@dataclass
class ProviderError(Exception):
    """A typed failure. ``message`` must never contain credentials."""

    kind: ErrorKind
    message: str
    http_status: int | None = None
    retry_after_s: float | None = None
    committed: bool = False  # streamed text already reached the caller: no model switch
    latency_ms: float = 0.0
    partial_text: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        super().__init__(f"{self.kind}: {self.message}")

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE


DeltaCallback = Callable[[str], None]


class Provider(Protocol):
    """One provider family's wire format over a shared, pooled ``httpx.AsyncClient``."""

    async def complete(
        self,
        target: ProviderTarget,
        request: ChatRequest,
        *,
        on_delta: DeltaCallback | None = None,
    ) -> ChatResult:
        """Run one request. ``on_delta`` receives streamed text as it arrives (stream=True);
        raises :class:`ProviderError` on any failure."""
        ...
