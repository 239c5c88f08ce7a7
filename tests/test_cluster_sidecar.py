"""The whole sidecar on a three-master Redis Cluster: proxy, admin API, entity-cache
invalidation between sidecars, the spend ledger and its check. Several sidecar processes on
one Cluster enforcing one limit: test_sidecars.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from ratelimiter.gateway.reconcile import check
from ratelimiter.testing.fake_upstream import FakeUpstream

from .conftest import Admin, Cluster, Stack, _stack, running_sidecar, running_upstream

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
async def cluster_stack(ns: str, redis_cluster: Cluster) -> AsyncIterator[Stack]:
    fake = FakeUpstream(seed=11)
    async with running_upstream(fake) as upstream:
        async for stack in _stack(ns, redis_cluster.url, fake, upstream):
            assert stack.engine.cluster
            yield stack


async def chat(stack: Stack, key: str, **extra: object) -> tuple[int, dict]:
    async with stack.admin.session.post(
        f"{stack.base}/v1/chat/completions",
        json={**CHAT, "max_tokens": 4, **extra},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        return response.status, await response.json(content_type=None)


async def test_proxy_admin_and_ledger_on_a_cluster(cluster_stack: Stack) -> None:
    stack, admin = cluster_stack, cluster_stack.admin
    await admin.post("/team/new", {"team_id": "t1", "max_budget": 10, "rpm_limit": 1000})
    await admin.post("/user/new", {"user_id": "u1", "max_budget": 10, "tpm_limit": 10**6})
    await admin.post("/customer/new", {"user_id": "c1", "max_budget": 10})
    key = (
        await admin.post(
            "/key/generate",
            {
                "user_id": "u1",
                "team_id": "t1",
                "rpm_limit": 6,
                "max_parallel_requests": 10,
                "max_budget": 5,
                "model_rpm_limit": {"gpt-4o": 100},
            },
        )
    )["key"]
    statuses = await asyncio.gather(*(chat(stack, key, user="c1") for _ in range(10)))
    assert sorted(s for s, _ in statuses) == [200] * 6 + [429] * 4  # exact across slots
    refused = next(body for status, body in statuses if status == 429)
    assert refused["error"]["type"] == "requests"
    assert "Limit type: requests." in refused["error"]["message"]

    logs = await admin.get("/spend/logs", api_key=key)
    assert len(logs) == 6 and {e["status"] for e in logs} == {"success"}
    spent = sum(e["spend"] for e in logs)
    info = (await admin.get("/key/info", key=key))["info"]
    assert info["spend"] == pytest.approx(spent)
    for kind, params in (("team", {"team_id": "t1"}), ("user", {"user_id": "u1"})):
        answer = await admin.get(f"/{kind}/info", **params)
        assert answer[f"{kind}_info"]["spend"] == pytest.approx(spent)
    report = await admin.get("/global/spend/report", group_by="team")
    assert report  # rollups were written in every slot group's day hash
    problems = await check(stack.engine, stack.settings)
    assert problems == []
    # A reset clears the lifetime spend in every slot group and the budget periods' spend.
    await admin.post("/user/update", {"user_id": "u1", "spend": 0})
    assert (await admin.get("/user/info", user_id="u1"))["user_info"]["spend"] == 0.0
    assert (await admin.get("/key/info", key=key))["info"]["spend"] == pytest.approx(spent)
    assert await check(stack.engine, stack.settings) == []
    # Listings read a kind's entities with MGET: one kind is one slot.
    assert [c["user_id"] for c in await admin.get("/customer/list")] == ["c1"]
    await admin.post("/budget/new", {"budget_id": "b1", "max_budget": 1})
    assert [b["budget_id"] for b in await admin.get("/budget/list")] == ["b1"]

    await admin.post("/key/block", {"key": key})
    status, body = await chat(stack, key)
    assert status in (401, 403), body


async def test_cache_invalidation_reaches_another_sidecar_on_a_cluster(
    cluster_stack: Stack, redis_cluster: Cluster
) -> None:
    settings = cluster_stack.settings
    async with (
        running_sidecar(settings, redis_cluster.url) as other,
        aiohttp.ClientSession() as session,
    ):
        one, two = cluster_stack.admin, Admin(session, other)
        key = (await one.post("/key/generate", {"rpm_limit": 1}))["key"]
        assert (await two.get("/key/info", key=key))["info"]["rpm_limit"] == 1  # cached on two
        await asyncio.sleep(0.3)  # its listener is subscribed
        await one.post("/key/update", {"key": key, "rpm_limit": 99})
        started = time.monotonic()
        # Well inside the 5 s cache TTL, so only pub/sub can have done it; not tighter: on a
        # Cluster each /key/info reads lifetime spend from every slot group (seconds on a
        # loaded machine), which is what this loop waits on.
        while (await two.get("/key/info", key=key))["info"]["rpm_limit"] != 99:
            assert time.monotonic() - started < 3.5, "no invalidation through Cluster pub/sub"
            await asyncio.sleep(0.02)


async def test_a_full_deployment_hands_over_to_the_next_on_a_cluster(
    ns: str, redis_cluster: Cluster
) -> None:
    """Each attempt is its own reservation: the refused attempt's released record in the
    key's slot once made the next deployment's acquire a reused id (a 500)."""
    from ratelimiter.gateway.config import Deployment, Settings

    from .conftest import MASTER_KEY

    async with running_upstream() as upstream:
        pool = tuple(
            Deployment("pool", f"openai/{n}", api_base=upstream, rpm=1, index=n) for n in range(2)
        )
        settings = Settings(master_key=MASTER_KEY, key_prefix=f"t:{ns}:", models=pool)
        async with (
            running_sidecar(settings, redis_cluster.url) as base,
            aiohttp.ClientSession() as session,
        ):
            key = (await Admin(session, base).post("/key/generate", {"max_budget": 1}))["key"]
            statuses, ids = [], []
            for _ in range(3):
                async with session.post(
                    f"{base}/v1/chat/completions",
                    json={"model": "pool", "messages": CHAT["messages"], "max_tokens": 2},
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    statuses.append(response.status)
                    ids.append(response.headers["x-request-id"])
            assert statuses == [200, 200, 429]
            logs = await Admin(session, base).get("/spend/logs", api_key=key)
            assert sorted(e["sidecar_request_id"] for e in logs) == sorted(ids[:2])
