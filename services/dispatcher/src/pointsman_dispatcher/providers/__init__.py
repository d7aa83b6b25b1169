"""Provider adapters: one wire format per family over a shared, pooled httpx client.

``make_client`` builds the pooled client (HTTP/2 negotiated by ALPN with every hosted provider:
OpenAI, Azure OpenAI, Anthropic, Bedrock and Gemini all offer it; plain-HTTP local servers stay
on HTTP/1.1), ``provider_for`` picks the adapter for a provider name.
"""

from __future__ import annotations

import httpx

from pointsman_dispatcher.providers.anthropic import AnthropicProvider
from pointsman_dispatcher.providers.base import (
    ChatMessage,
    ChatRequest,
    ChatResult,
    Provider,
    ProviderError,
    ProviderName,
    ProviderTarget,
)
from pointsman_dispatcher.providers.bedrock import BedrockProvider
from pointsman_dispatcher.providers.gemini import GeminiProvider
from pointsman_dispatcher.providers.openai import OpenAIProvider
from pointsman_dispatcher.providers.pool import ClientPool, ClientSource

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "ChatResult",
    "ClientPool",
    "ClientSource",
    "Provider",
    "ProviderError",
    "ProviderTarget",
    "make_client",
    "provider_for",
]


def make_client(
    *,
    http2: bool = True,
    max_connections: int = 200,
    max_keepalive_connections: int = 100,
    keepalive_expiry_s: float = 30.0,
    connect_timeout_s: float = 5.0,
    trust_env: bool = True,
) -> httpx.AsyncClient:
    """One pooled client for all providers. The adapters pass each target's ``timeout_s`` per
    request; ``connect_timeout_s`` applies to other uses of the client. Redirects are not
    followed: an API answering 3xx is misconfigured, not something to chase."""
    return httpx.AsyncClient(
        http2=http2,
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive_connections,
            keepalive_expiry=keepalive_expiry_s,
        ),
        timeout=httpx.Timeout(30.0, connect=connect_timeout_s),
        follow_redirects=False,
        trust_env=trust_env,
    )


def provider_for(name: ProviderName | str, client: ClientSource) -> Provider:
    """The adapter for ``name`` (a ProviderTarget.provider value) over ``client``."""
    if name in ("openai", "azure_openai"):
        return OpenAIProvider(client)
    if name == "anthropic":
        return AnthropicProvider(client)
    if name == "bedrock":
        return BedrockProvider(client)
    if name == "gemini":
        return GeminiProvider(client)
    raise ValueError(f"unknown provider {name!r}")
