"""Fixtures for the dispatcher tests: a fake provider server and a pooled client.

The fake speaks the real wire formats of OpenAI, Azure OpenAI, Anthropic, Bedrock and Gemini
(``pointsman_dispatcher.fake_provider``); ``provider_target`` builds a target pointing at it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from pointsman_dispatcher.fake_provider import FakeProvider
from pointsman_dispatcher.providers import make_client
from pointsman_dispatcher.providers.base import AwsCredentials, ProviderTarget

API_KEY = "sk-test-SECRET-9f8e7d6c5b4a3210"
AWS_ACCESS_KEY_ID = "AKIDEXAMPLE7TEST"
AWS_SECRET = "aws-SECRET-wJalrXUtnFEMI-K7MDENG"
AWS_SESSION_TOKEN = "SESSION-TOKEN-SECRET-FwoGZXIvYXdz"
REGION = "eu-west-1"
MODELS = {
    "openai": "gpt-4o-mini",
    "azure_openai": "gpt-4o",
    "anthropic": "claude-3-5-haiku-20241022",
    "bedrock": "anthropic.claude-3-haiku-20240307-v1:0",
    "gemini": "gemini-2.0-flash",
}
PROVIDERS = tuple(MODELS)


@pytest.fixture
async def fake_provider() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(
        api_key=API_KEY,
        aws_access_key_id=AWS_ACCESS_KEY_ID,
        aws_secret_access_key=AWS_SECRET,
        region=REGION,
    ) as fake:
        yield fake


@pytest.fixture
async def provider_client() -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(trust_env=False) as client:
        yield client


TargetFactory = Callable[..., ProviderTarget]


@pytest.fixture
def provider_target(fake_provider: FakeProvider) -> TargetFactory:
    """``provider_target("anthropic", timeout_s=0.2)``: a target at the fake, right credentials
    unless overridden."""

    def build(provider: str, **overrides: Any) -> ProviderTarget:
        fields: dict[str, Any] = {
            "provider": provider,
            "base_url": fake_provider.url + ("/v1" if provider == "openai" else ""),
            "model": MODELS[provider],
            "timeout_s": 5.0,
        }
        if provider == "bedrock":
            fields["region"] = REGION
            fields["aws"] = AwsCredentials(
                AWS_ACCESS_KEY_ID, SecretStr(AWS_SECRET), SecretStr(AWS_SESSION_TOKEN)
            )
        else:
            fields["api_key"] = SecretStr(API_KEY)
        if provider == "azure_openai":
            fields["deployment"] = "prod-gpt4o"
            fields["api_version"] = "2024-10-21"
        fields.update(overrides)
        return ProviderTarget(**fields)

    return build
