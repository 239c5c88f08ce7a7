"""Capacity blocks in the sidecar (ratelimiter_settings.capacity_blocks, issue 17 item 4): the
limits of the named scopes are admitted from blocks this sidecar took from Redis first. Across
sidecars nothing is over-admitted; once the blocks are settled, Redis counts exactly what was
admitted and charged; what a refused request took goes back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ratelimiter import Engine
from ratelimiter.gateway.config import ConfigError, Deployment, Settings, load_config
from ratelimiter.gateway.policy import Resolved, Scope, limits_for
from ratelimiter.testing import FakeUpstream

from ..conftest import MASTER_KEY, MESSAGES, Admin, running_sidecar, running_upstream


def settings_for(ns: str, upstream: str, **options: Any) -> Settings:
    deployment = Deployment(
        "m",
        "openai/m",
        api_base=upstream,
        rpm=options.pop("rpm", None),
        tpm=options.pop("tpm", None),
        input_cost_per_token=1e-6,
        output_cost_per_token=2e-6,
    )
    return Settings(master_key=MASTER_KEY, key_prefix=f"t:{ns}:", models=(deployment,), **options)


@contextlib.asynccontextmanager
async def sidecars(settings: Settings, redis_url: str, count: int) -> AsyncIterator[list[str]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(running_sidecar(settings, redis_url))
            for _ in range(count)
        ]


async def chat(
    session: aiohttp.ClientSession, base: str, key: str, max_tokens: int = 8
) -> aiohttp.ClientResponse:
    async with session.post(
        f"{base}/v1/chat/completions",
        json={"model": "m", "messages": MESSAGES, "max_tokens": max_tokens},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        await response.read()
        return response


async def block_units(session: aiohttp.ClientSession, base: str, limit: str) -> float:
    """``ratelimiter_capacity_block_units`` of ``limit`` on /metrics (0 when not listed)."""
    async with session.get(f"{base}/metrics") as response:
        text = await response.text()
    line = f'ratelimiter_capacity_block_units{{limit="{limit}"}} '
    found = [row for row in text.splitlines() if row.startswith(line)]
    return float(found[0].removeprefix(line)) if found else 0.0


async def used(redis_url: str, settings: Settings) -> dict[str, int]:
    """What Redis counts in the proxy's and the deployment's limits, by limit name."""
    deployment = settings.models[0]
    scopes = (
        Scope("proxy", "all", {"max_budget": settings.max_budget}),
        Scope(
            "deployment",
            deployment.deployment_id,
            {"rpm_limit": deployment.rpm, "tpm_limit": deployment.tpm},
        ),
    )
    limits = limits_for(Resolved(scopes, "m", 1, 1), settings.key_prefix)
    async with await Engine.connect(redis_url, prefix=settings.key_prefix) as engine:
        states = await engine.peek(limits)
    return {s.limit.name: s.limit.capacity - s.remaining for s in states}


async def test_blocks_never_over_admit_and_settle_to_exact_counts(redis_url: str, ns: str) -> None:
    """Two sidecars, 200 requests at once for a deployment of 64 a minute served from blocks
    of 8: at most 64 admitted. Once the blocks have settled Redis counts exactly those, and
    the rest of the minute's capacity is admitted to the last request, no more."""
    async with running_upstream() as upstream:
        settings = settings_for(ns, upstream, rpm=64, capacity_blocks={"deployment": 8})
        async with (
            sidecars(settings, redis_url, 2) as bases,
            aiohttp.ClientSession() as session,
        ):
            key = (await Admin(session, bases[0]).post("/key/generate", {}))["key"]
            burst = await asyncio.gather(*(chat(session, bases[i % 2], key) for i in range(200)))
            first = sum(r.status == 200 for r in burst)
            assert first <= 64
            assert {r.status for r in burst} <= {200, 429}
            served = next(r for r in burst if r.status == 200)
            assert "x-ratelimit-remaining-deployment-requests" in served.headers
            # the blocks close within their one-second bucket and give back what they did not use
            for _ in range(100):
                if (await used(redis_url, settings))["deployment:requests"] == first:
                    break
                await asyncio.sleep(0.05)
            assert (await used(redis_url, settings))["deployment:requests"] == first
            later = [(await chat(session, bases[0], key)).status for _ in range(80 - first)]
            assert first + later.count(200) == 64
            assert later[-1] == 429
    assert (await used(redis_url, settings))["deployment:requests"] == 64


async def test_block_served_tokens_and_spend_are_charged_at_their_actuals(
    redis_url: str, ns: str
) -> None:
    """The proxy's budget and the deployment's tokens come from blocks: each request holds its
    estimate (17 prompt tokens + max_tokens) and is charged what the upstream reports (10 +
    max_tokens); after shutdown settles the blocks, Redis has exactly the actual tokens and the
    ledger's spend."""
    async with running_upstream(FakeUpstream()) as upstream:
        settings = settings_for(
            ns,
            upstream,
            tpm=1_000_000,
            max_budget=10.0,
            capacity_blocks={"proxy": 16, "deployment": 16},
        )
        async with sidecars(settings, redis_url, 2) as bases, aiohttp.ClientSession() as session:
            admin = Admin(session, bases[0])
            key = (await admin.post("/key/generate", {}))["key"]
            answers = await asyncio.gather(
                *(chat(session, bases[i % 2], key, max_tokens=50) for i in range(40))
            )
            assert [r.status for r in answers] == [200] * 40
            assert "x-ratelimit-remaining-proxy-budget" in answers[0].headers
    counted = await used(redis_url, settings)
    assert counted["deployment:tokens"] == 40 * (10 + 50)
    async with running_sidecar(settings, redis_url) as base, aiohttp.ClientSession() as session:
        logs = await Admin(session, base).get("/spend/logs")
    assert len(logs) == 40
    spent = sum(round(entry["spend"] * 1e9) for entry in logs)
    assert spent == 40 * (10 * 1_000 + 50 * 2_000)
    assert counted["proxy:budget"] == spent


async def test_a_refused_request_gives_its_block_share_back(redis_url: str, ns: str) -> None:
    """The key allows 3 a minute; the deployment's rpm comes from blocks: the 7 the key refuses
    leave nothing in the deployment's count."""
    async with running_upstream() as upstream:
        settings = settings_for(ns, upstream, rpm=640, capacity_blocks={"deployment": 8})
        async with sidecars(settings, redis_url, 1) as (base,), aiohttp.ClientSession() as session:
            key = (await Admin(session, base).post("/key/generate", {"rpm_limit": 3}))["key"]
            statuses = [(await chat(session, base, key)).status for _ in range(10)]
            assert statuses == [200] * 3 + [429] * 7
    assert (await used(redis_url, settings))["deployment:requests"] == 3


async def test_the_deployment_is_counted_a_block_at_a_time(redis_url: str, ns: str) -> None:
    """While a block is open Redis counts all of it (80 of 640), not the requests served from
    it; on shutdown what they did not use goes back."""
    async with running_upstream() as upstream:
        settings = settings_for(ns, upstream, rpm=640, capacity_blocks={"deployment": 8})
        async with sidecars(settings, redis_url, 1) as (base,), aiohttp.ClientSession() as session:
            key = (await Admin(session, base).post("/key/generate", {}))["key"]
            counted, reported = [], []
            for sent in range(1, 21):  # a block is not taken in a bucket's last moments
                assert (await chat(session, base, key)).status == 200
                counted.append((await used(redis_url, settings))["deployment:requests"] - sent)
                reported.append(await block_units(session, base, "deployment:requests"))
                await asyncio.sleep(0.05)
            assert max(counted) >= 80 - 20
            # /metrics says what the blocks hold unused: Redis's count less what was served
            assert max(reported) >= 80 - 20
    assert (await used(redis_url, settings))["deployment:requests"] == 20


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("[deployment, keys]", "capacity_blocks.keys: is not a scope kind"),
        ("{deployment: 1}", "capacity_blocks.deployment: must be how many blocks"),
        ("{proxy: true}", "capacity_blocks.proxy: must be how many blocks"),
        ("64", "capacity_blocks: must name scope kinds"),
    ],
)
def test_capacity_blocks_config_errors(tmp_path: Path, value: str, problem: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"general_settings: {{master_key: {MASTER_KEY}}}\n"
        f"ratelimiter_settings:\n  capacity_blocks: {value}\n"
    )
    with pytest.raises(ConfigError, match=problem):
        load_config(path, env={})


def test_capacity_blocks_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"general_settings: {{master_key: {MASTER_KEY}}}\n"
        "ratelimiter_settings:\n  capacity_blocks: [proxy, deployment]\n"
    )
    assert load_config(path, env={}).capacity_blocks == {"proxy": 64, "deployment": 64}
