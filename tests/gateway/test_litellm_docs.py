"""LiteLLM's budget documentation (shared/reference/001_…), as tests.

Entities are made through our admin API over HTTP exactly as the documentation's curl calls
make them; each request is then authenticated, resolved and admitted as the proxy will do it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from ratelimiter import Decision, Engine
from ratelimiter.gateway.config import Deployment, Settings
from ratelimiter.gateway.policy import limits_for
from ratelimiter.gateway.resolver import authenticate, resolve
from ratelimiter.gateway.store import EntityError, Store
from ratelimiter.ledger import ledger_dims
from ratelimiter.pricing import nano

from ..conftest import Admin, ManualClock, running_sidecar

MODELS = (
    Deployment("gpt-4o", "openai/gpt-4o", index=0),
    Deployment(
        "text-embedding-ada-002",
        "azure/azure-embedding-model",
        access_groups=("beta-models",),
        index=1,
    ),
)


@pytest.fixture
def settings(ns: str) -> Settings:
    return Settings(master_key="sk-docs-master-5e8c2a9f1b", key_prefix=f"t:{ns}:", models=MODELS)


class Proxy:
    """Authenticate, resolve and admit one request, as the proxy route does."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine, self.settings = engine, settings
        self.store = Store(engine.redis, prefix=settings.key_prefix)

    async def admit(
        self,
        key: str,
        model: str = "gpt-4o",
        end_user: str | None = None,
        cost: float = 0.02,
        tokens: int = 10,
    ) -> Decision:
        caller = await authenticate(self.store, self.settings, key)
        deployment = next(d for d in self.settings.models if d.model_name == model)
        request = await resolve(
            self.store, self.settings, caller, deployment, end_user, tokens, nano(cost)
        )
        fields = {"key_hash": caller.token, "end_user": end_user, "model": model}
        return await self.engine.acquire(
            None, limits_for(request, self.settings.key_prefix), ledger=ledger_dims(fields)
        )


@pytest.fixture
async def docs(
    settings: Settings, redis_url: str, clock: ManualClock
) -> AsyncIterator[tuple[Admin, Proxy, ManualClock]]:
    async with (
        running_sidecar(settings, redis_url) as base,
        aiohttp.ClientSession() as session,
        await Engine.connect(redis_url, prefix=settings.key_prefix, clock=clock) as engine,
    ):
        yield Admin(session, base, settings.master_key), Proxy(engine, settings), clock


async def test_a_budget_for_the_whole_proxy(docs: tuple[Admin, Proxy, ManualClock]) -> None:
    admin, proxy, _ = docs
    proxy.settings = dataclasses.replace(proxy.settings, max_budget=0.05, budget_duration=None)
    key = (await admin.post("/key/generate", {}))["key"]
    results = [await proxy.admit(key) for _ in range(3)]
    assert [d.allowed for d in results] == [True, True, False]
    assert results[2].refused is not None and results[2].refused.name == "proxy:budget"


async def test_a_key_budget_with_a_ten_second_duration_resets(
    docs: tuple[Admin, Proxy, ManualClock],
) -> None:
    admin, proxy, clock = docs
    clock.now = 1_800_000_000_000  # on a 10 s boundary
    key = (await admin.post("/key/generate", {"max_budget": 0.03, "budget_duration": "10s"}))["key"]
    assert (await proxy.admit(key)).allowed
    refused = await proxy.admit(key)
    assert (refused.reason, refused.retry_after_ms) == ("budget_exhausted", 10_000)
    clock.advance(10_000)
    assert (await proxy.admit(key)).allowed


async def test_user_limits_are_shared_by_all_the_users_keys(
    docs: tuple[Admin, Proxy, ManualClock],
) -> None:
    admin, proxy, _ = docs
    user = await admin.post(
        "/user/new",
        {"user_id": "krrish", "max_parallel_requests": 10, "tpm_limit": 20, "rpm_limit": 4},
    )
    second = (await admin.post("/key/generate", {"user_id": "krrish"}))["key"]
    decisions = [await proxy.admit(k, tokens=1) for k in (user["key"], second) * 3]
    assert [d.allowed for d in decisions] == [True] * 4 + [False] * 2
    assert decisions[4].refused is not None and decisions[4].refused.name == "user:requests"


async def test_a_key_limited_to_an_access_group(docs: tuple[Admin, Proxy, ManualClock]) -> None:
    admin, proxy, _ = docs
    key = (await admin.post("/key/generate", {"models": ["beta-models"], "max_budget": 10}))["key"]
    assert (await proxy.admit(key, model="text-embedding-ada-002")).allowed
    with pytest.raises(
        EntityError, match=r"key can only access models=\['beta-models'\]\. Tried to access gpt-4o "
    ):
        await proxy.admit(key, model="gpt-4o")
    wildcard = (await admin.post("/key/generate", {"models": ["openai/*"]}))["key"]
    assert (await proxy.admit(wildcard, model="gpt-4o")).allowed
    with pytest.raises(EntityError, match="not allowed to access model"):
        await proxy.admit(wildcard, model="text-embedding-ada-002")


async def test_the_default_budget_applies_to_every_new_end_user(
    docs: tuple[Admin, Proxy, ManualClock],
) -> None:
    admin, proxy, _ = docs
    key = (await admin.post("/key/generate", {}))["key"]
    await admin.post("/budget/new", {"budget_id": "default", "max_budget": 0.03})
    assert (await proxy.admit(key, end_user="alice")).allowed
    refused = await proxy.admit(key, end_user="alice")
    assert refused.refused is not None and refused.refused.name == "end_user:budget"
    assert (await admin.get("/customer/info", end_user_id="alice"))["budget_id"] == "default"
    assert (await proxy.admit(key, end_user="bob")).allowed  # a budget of his own


async def test_a_block_holds_from_the_moment_the_call_returns(
    docs: tuple[Admin, Proxy, ManualClock],
) -> None:
    admin, proxy, _ = docs
    proxy.store.cache_ttl_s = 3600  # this proxy hears no invalidations: its cache goes stale
    key = (await admin.post("/key/generate", {}))["key"]
    assert (await proxy.admit(key)).allowed
    await admin.post("/key/block", {"key": key})
    caller = await authenticate(proxy.store, proxy.settings, key)
    assert caller.key is not None and caller.key["blocked"] is False  # stale, as intended
    refused = await proxy.admit(key)  # yet it cannot admit: the gate is in the admission
    assert (refused.allowed, refused.reason) == (False, "closed")
    await admin.post("/key/unblock", {"key": key})
    assert (await proxy.admit(key)).allowed


async def test_info_shows_spend_and_reset_of_every_window(
    docs: tuple[Admin, Proxy, ManualClock],
) -> None:
    admin, proxy, clock = docs
    clock.now = int(time.time() * 1000)  # the admin sidecar reads the real clock
    body = {
        "max_budget": 1,
        "budget_duration": "monthly",
        "budget_limits": [{"max_budget": 0.5, "budget_duration": "daily"}],
    }
    key = (await admin.post("/key/generate", body))["key"]
    decision = await proxy.admit(key, cost=0.25)
    assert decision.reservation is not None
    await proxy.engine.settle(decision.reservation, {"spend": nano(0.1)})
    info = (await admin.get("/key/info", key=key))["info"]
    windows = {w["budget_duration"]: w for w in info["budget_windows"]}
    assert (windows["1mo"]["spend"], windows["1mo"]["remaining"]) == (0.1, 0.9)
    assert (windows["1d"]["spend"], windows["1d"]["remaining"]) == (0.1, 0.4)
    assert info["spend"] == 0.1 and windows["1d"]["budget_reset_at"].endswith("+00:00")
