"""The lent one-connection clients the dispatcher calls providers with."""

from __future__ import annotations

import asyncio

from pydantic import SecretStr

from pointsman_dispatcher.fake_provider import FakeProvider
from pointsman_dispatcher.providers import ClientPool, provider_for
from pointsman_dispatcher.providers.base import ChatMessage, ChatRequest, ProviderTarget
from tests.dispatcher.conftest import API_KEY


async def test_a_released_client_is_lent_again_and_concurrent_leases_differ() -> None:
    async with ClientPool(max_idle=2, trust_env=False) as pool:
        async with pool.lease() as first:
            pass
        async with pool.lease() as again:
            assert again is first
        async with pool.lease() as a, pool.lease() as b, pool.lease() as c:
            assert len({id(a), id(b), id(c)}) == 3
        assert pool.idle == 2  # the third went over max_idle and was closed
        assert pool.created == 3
        assert pool.ssl_context is not None


async def test_calls_through_the_pool_reuse_connections(fake_provider: FakeProvider) -> None:
    target = ProviderTarget(
        provider="openai",
        base_url=f"{fake_provider.url}/v1",
        model="gpt-4o-mini",
        api_key=SecretStr(API_KEY),
    )
    request = ChatRequest(messages=(ChatMessage("user", "hello there"),), max_tokens=16)
    async with ClientPool(trust_env=False) as pool:
        provider = provider_for("openai", pool)
        results = await asyncio.gather(*(provider.complete(target, request) for _ in range(8)))
        for _ in range(4):
            await provider.complete(target, request)
        streamed: list[str] = []
        stream = await provider.complete(
            target,
            ChatRequest(request.messages, max_tokens=16, stream=True),
            on_delta=streamed.append,
        )
        assert pool.created == 8  # 8 at once; the later calls reused them
    assert {r.text for r in results} == {"fake answer from gpt-4o-mini"}
    assert "".join(streamed) == stream.text == "fake answer from gpt-4o-mini"
    assert len(fake_provider.requests) == 13
