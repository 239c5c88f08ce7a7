"""Redis unreachable: deny answers 503 and recovers without a restart; allow admits and charges
the requests once Redis is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ratelimiter import Engine, RedisServer, SlidingWindow
from ratelimiter.config import Deployment, Settings
from ratelimiter.embedded import free_port
from ratelimiter.ledger import Ledger

from .conftest import MASTER_KEY, Admin, running_sidecar, running_upstream

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with running_upstream() as base:
        yield base


async def post(session: aiohttp.ClientSession, base: str, key: str) -> tuple[int, dict]:
    async with session.post(
        f"{base}/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        return response.status, await response.json()


@pytest.mark.parametrize("policy", ["deny", "allow"])
async def test_redis_down(tmp_path: Path, upstream: str, ns: str, policy: str) -> None:
    server = RedisServer(tmp_path, port=free_port(), appendonly=True).start()
    settings = Settings(
        master_key=MASTER_KEY,
        key_prefix=f"t:{ns}:",
        on_redis_error=policy,
        models=(Deployment("m", "openai/m", api_base=upstream, input_cost_per_token=1e-6),),
    )
    try:
        async with (
            running_sidecar(settings, server.url) as base,
            aiohttp.ClientSession() as session,
        ):
            admin = Admin(session, base)
            key_info = await admin.post("/key/generate", {"rpm_limit": 100})
            key = key_info["key"]
            assert (await post(session, base, key))[0] == 200  # the key is now cached
            server.stop()
            statuses = [await post(session, base, key) for _ in range(3)]
            if policy == "deny":
                assert {s for s, _ in statuses} == {503}
                assert "unreachable" in statuses[0][1]["error"]["message"]
            else:
                assert {s for s, _ in statuses} == {200}
            server.start()  # same port, same data; the sidecar is not restarted
            assert (await post(session, base, key))[0] == 200
            rpm = SlidingWindow(f"t:{ns}:{{key:{key_info['token']}}}:rpm", 100, "1m")
            expected = 100 - (2 if policy == "deny" else 5)
            async with await Engine.connect(server.url) as engine:
                deadline = time.monotonic() + 10
                while (await engine.peek([rpm]))[0].remaining != expected:
                    assert time.monotonic() < deadline, (await engine.peek([rpm]))[0]
                    await asyncio.sleep(0.1)
    finally:
        server.stop()


async def test_ledger_survives_a_redis_restart_under_load(
    tmp_path: Path, upstream: str, ns: str
) -> None:
    server = RedisServer(
        tmp_path, port=free_port(), appendonly=True, extra_args=("--appendfsync", "always")
    ).start()
    settings = Settings(
        master_key=MASTER_KEY,
        key_prefix=f"t:{ns}:",
        models=(Deployment("m", "openai/m", api_base=upstream, input_cost_per_token=1e-6),),
    )
    acknowledged: list[str] = []
    try:
        async with (
            running_sidecar(settings, server.url) as base,
            aiohttp.ClientSession() as session,
        ):
            key = (await Admin(session, base).post("/key/generate", {"max_budget": 10}))["key"]

            async def load() -> None:
                for _ in range(400):
                    async with session.post(
                        f"{base}/v1/chat/completions",
                        json=BODY,
                        headers={"Authorization": f"Bearer {key}"},
                    ) as r:
                        if r.status == 200:
                            acknowledged.append(r.headers["x-request-id"])

            running = asyncio.gather(*(load() for _ in range(4)))
            await asyncio.sleep(0.5)
            server.stop()  # mid-load
            server.start()
            await running
        async with await Engine.connect(server.url, prefix=settings.key_prefix) as engine:
            now = int(time.time() * 1000)
            recorded = {e.request_id async for e in Ledger(engine).entries(now - 600_000, now + 1)}
        assert len(acknowledged) > 100
        assert set(acknowledged) <= recorded  # every answered request is in the ledger
    finally:
        server.stop()
