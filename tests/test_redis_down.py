"""Redis unreachable: deny answers 503 and recovers without a restart; allow admits and charges
the requests once Redis is back; a request already admitted is answered and settled later."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ratelimiter import Engine, RedisServer, SlidingWindow
from ratelimiter.engine.embedded import free_port
from ratelimiter.gateway.config import Deployment, Settings
from ratelimiter.ledger import Ledger
from ratelimiter.testing.fake_upstream import FakeUpstream

from .conftest import MASTER_KEY, Admin, one_model, running_sidecar, running_upstream

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
    settings = one_model(ns, upstream, on_redis_error=policy)
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


async def _charged(engine: Engine) -> list[str]:
    """The request ids the ledger holds charged (not refunded) entries of."""
    now = int(time.time() * 1000)
    entries = Ledger(engine).entries(now - 600_000, now + 1)
    return [e.request_id async for e in entries if e.status != "released"]


@pytest.mark.parametrize("policy", ["deny", "allow"])
async def test_a_redis_restart_under_load_loses_no_answered_request(
    tmp_path: Path, upstream: str, ns: str, policy: str
) -> None:
    """Four clients keep sending while Redis stops for a moment and comes back on the same data:
    under deny the outage is 503s, under allow the requests go through; either way the sidecar
    recovers by itself and every request it answered 200 ends up in the ledger, once."""
    server = RedisServer(
        tmp_path, port=free_port(), appendonly=True, extra_args=("--appendfsync", "always")
    ).start()
    settings = one_model(ns, upstream, on_redis_error=policy)
    acknowledged: list[str] = []
    statuses: list[tuple[float, int]] = []
    try:
        async with (
            running_sidecar(settings, server.url) as base,
            aiohttp.ClientSession() as session,
        ):
            admin = Admin(session, base)
            key = (await admin.post("/key/generate", {"max_budget": 10}))["key"]

            stop = asyncio.Event()

            async def load() -> None:
                while not stop.is_set():
                    async with session.post(
                        f"{base}/v1/chat/completions",
                        json=BODY,
                        headers={"Authorization": f"Bearer {key}"},
                    ) as r:
                        statuses.append((time.monotonic(), r.status))
                        if r.status == 200:
                            acknowledged.append(r.headers["x-request-id"])

            running = asyncio.gather(*(load() for _ in range(4)))
            await asyncio.sleep(0.5)
            server.stop()  # mid-load
            # Longer than the sidecar's own retries (about 1 s), which ride out a shorter blip.
            await asyncio.sleep(2.5)
            restarted = time.monotonic()
            server.start()
            await asyncio.sleep(2)
            stop.set()
            await running
            during = {status for at, status in statuses if at < restarted}
            after = [status for at, status in statuses if at > restarted + 1]
            assert during == ({200, 503} if policy == "deny" else {200}), during
            assert after and set(after) == {200}, "the sidecar did not recover by itself"
            # Under allow, what went through unchecked is charged once Redis is back; either
            # way settlements the outage deferred are made then.
            async with await Engine.connect(server.url, prefix=settings.key_prefix) as engine:
                deadline = time.monotonic() + 10
                while len(await _charged(engine)) < len(acknowledged):
                    assert time.monotonic() < deadline, "requests answered 200 were never charged"
                    await asyncio.sleep(0.2)
        async with await Engine.connect(server.url, prefix=settings.key_prefix) as engine:
            charged = await _charged(engine)  # the sidecar has stopped: nothing comes later
        assert len(acknowledged) > 100
        # each answered request, exactly once (an acquire that ran as Redis stopped, its reply
        # lost, was answered 503 and abandoned: its entry is a refund, not a charge)
        assert sorted(charged) == sorted(acknowledged)
    finally:
        server.stop()


@pytest.mark.parametrize("stream", [False, True])
async def test_redis_lost_while_the_upstream_answers_still_answers_and_settles_later(
    tmp_path: Path, ns: str, stream: bool
) -> None:
    """The upstream was called, so the tokens are spent: the client gets its answer, and the
    real usage is settled (not the estimate) once Redis is back."""
    server = RedisServer(tmp_path, port=free_port(), appendonly=True).start()
    fake = FakeUpstream(chunk_delay_ms=150) if stream else FakeUpstream(latency_ms=600)
    try:
        async with running_upstream(fake) as slow_upstream:
            settings = Settings(
                master_key=MASTER_KEY,
                key_prefix=f"t:{ns}:",
                models=(
                    Deployment(
                        "m",
                        "openai/m",
                        api_base=slow_upstream,
                        input_cost_per_token=1e-6,
                        output_cost_per_token=1e-6,
                    ),
                ),
            )
            async with (
                running_sidecar(settings, server.url) as base,
                aiohttp.ClientSession() as session,
            ):
                admin = Admin(session, base)
                key = (await admin.post("/key/generate", {"max_budget": 10}))["key"]
                # No max_tokens: the hold is for the default 4,096, the answer is 16 words.
                body = {"model": "m", "messages": BODY["messages"], "stream": stream}
                sent = asyncio.ensure_future(
                    session.post(
                        f"{base}/v1/chat/completions",
                        json=body,
                        headers={"Authorization": f"Bearer {key}"},
                    )
                )
                await asyncio.sleep(0.3)  # admitted, and waiting on the upstream
                server.stop()
                async with await sent as response:
                    text = await response.text()
                    assert response.status == 200, text
                    if stream:
                        assert text.rstrip().endswith("data: [DONE]")
                server.start()
                deadline = time.monotonic() + 10
                while not (logs := await admin.get("/spend/logs", api_key=key)):
                    assert time.monotonic() < deadline, "the settlement never reached Redis"
                    await asyncio.sleep(0.2)
                (entry,) = logs
                assert entry["status"] == "success"
                assert entry["spend"] < entry["estimated_spend"]  # the real usage, not the hold
    finally:
        server.stop()


async def test_allow_stops_letting_requests_through_unchecked_past_its_bound(
    tmp_path: Path, upstream: str, ns: str
) -> None:
    """What goes through unchecked waits in memory to be charged: past
    max_unchecked_requests the sidecar refuses instead of growing without bound."""
    server = RedisServer(tmp_path, port=free_port(), appendonly=True).start()
    settings = one_model(ns, upstream, on_redis_error="allow", max_unchecked_requests=2)
    try:
        async with (
            running_sidecar(settings, server.url) as base,
            aiohttp.ClientSession() as session,
        ):
            admin = Admin(session, base)
            key = (await admin.post("/key/generate", {"rpm_limit": 100}))["key"]
            assert (await post(session, base, key))[0] == 200  # the key is now cached
            # settled after its response: a read waits for it, so none waits to be charged
            assert len(await admin.get("/spend/logs", api_key=key)) == 1
            server.stop()
            statuses = [await post(session, base, key) for _ in range(3)]
            assert [s for s, _ in statuses] == [200, 200, 503]
            assert "max_unchecked_requests" in statuses[2][1]["error"]["message"]
            server.start()
            deadline = time.monotonic() + 10
            while len(await admin.get("/spend/logs", api_key=key)) != 3:
                assert time.monotonic() < deadline, "the unchecked requests were not charged"
                await asyncio.sleep(0.2)
            assert (await post(session, base, key))[0] == 200
    finally:
        server.stop()
