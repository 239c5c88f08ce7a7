"""Redis stops answering without going away (a paused process, a stalled network): every
request is answered within the configured timeout, the on_redis_error policy applies, and the
admissions that were stuck inside Redis change nothing once it resumes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ratelimiter import Concurrency, DuplicateRequest, Engine, RedisServer, SlidingWindow
from ratelimiter.engine.embedded import free_port
from ratelimiter.errors import RedisUnavailable

from .conftest import Admin, one_model, running_sidecar, running_upstream

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
REDIS_TIMEOUT_S = 0.3
# Three attempts (two retries) of REDIS_TIMEOUT_S each plus back-off, with room for a slow CI.
ANSWER_WITHIN_S = 3 * REDIS_TIMEOUT_S + 0.15 + 2.0


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with running_upstream() as base:
        yield base


async def post(session: aiohttp.ClientSession, base: str, key: str) -> tuple[int, float]:
    started = time.monotonic()
    async with session.post(
        f"{base}/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        await response.read()
        return response.status, time.monotonic() - started


async def wait_for(condition, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("policy", ["deny", "allow"])
async def test_a_paused_redis_answers_in_time_and_stuck_admissions_take_nothing(
    tmp_path: Path, upstream: str, ns: str, policy: str
) -> None:
    server = RedisServer(tmp_path, port=free_port(), appendonly=True).start()
    settings = one_model(ns, upstream, on_redis_error=policy)
    url = f"{server.url}?timeout={REDIS_TIMEOUT_S}"
    try:
        async with running_sidecar(settings, url) as base, aiohttp.ClientSession() as session:
            admin = Admin(session, base)
            key_info = await admin.post("/key/generate", {"rpm_limit": 100})
            key = key_info["key"]
            assert (await post(session, base, key))[0] == 200  # the key is now cached
            assert server.process is not None
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                answers = await asyncio.gather(*(post(session, base, key) for _ in range(3)))
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            statuses = {status for status, _ in answers}
            assert statuses == ({503} if policy == "deny" else {200})
            assert max(elapsed for _, elapsed in answers) < ANSWER_WITHIN_S, answers

            # The three acquires sat in Redis's socket buffer and ran when it resumed. Denied
            # requests must end up taking nothing; admitted-unchecked ones are charged once.
            expected = 99 if policy == "deny" else 96
            rpm = SlidingWindow(f"t:{ns}:{{key:{key_info['token']}}}:rpm", 100, "1m")
            async with await Engine.connect(server.url) as engine:

                async def settled() -> bool:
                    pending = await engine.redis.zcard(f"t:{ns}:{{rl}}:pending")
                    remaining = (await engine.peek([rpm]))[0].remaining
                    return remaining == expected and pending == 0

                await wait_for(settled, f"the rpm window never came back to {expected}")
                await asyncio.sleep(0.5)  # and stays there: nothing late takes more
                assert (await engine.peek([rpm]))[0].remaining == expected
            assert (await post(session, base, key))[0] == 200  # no restart was needed
    finally:
        server.stop()


async def test_one_admission_deadline_whatever_the_redis_timeout(
    tmp_path: Path, upstream: str, ns: str
) -> None:
    """A patient Redis URL (10 s per call, retried twice) must not keep a client waiting:
    every Redis call of an admission shares ratelimiter_settings.redis_timeout."""
    server = RedisServer(tmp_path, port=free_port(), appendonly=False).start()
    settings = one_model(ns, upstream, redis_timeout_s=REDIS_TIMEOUT_S)
    try:
        async with (
            running_sidecar(settings, f"{server.url}?timeout=10") as base,
            aiohttp.ClientSession() as session,
        ):
            key = (await Admin(session, base).post("/key/generate", {"rpm_limit": 100}))["key"]
            assert (await post(session, base, key))[0] == 200  # the key is now cached
            assert server.process is not None
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                status, elapsed = await post(session, base, key)
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            # Without the deadline: 10 s at least. With it: REDIS_TIMEOUT_S, plus a slow CI.
            assert status == 503 and elapsed < 5, elapsed
    finally:
        server.stop()


async def test_abandon_before_or_after_the_acquire_leaves_nothing_taken(
    engine: Engine, ns: str
) -> None:
    await abandon_either_way(engine, ns)


async def test_abandon_either_way_on_a_cluster(cluster_engine: Engine, ns: str) -> None:
    await abandon_either_way(cluster_engine, ns)


async def abandon_either_way(engine: Engine, ns: str) -> None:
    limits = [
        SlidingWindow(f"{{a:{ns}}}:rpm", 5, "1m"),
        Concurrency(f"{{b:{ns}}}:parallel", 1),
    ]
    # The abandon reaches Redis first: the late acquire finds the tombstone.
    await engine.abandon("late", limits)
    with pytest.raises(DuplicateRequest):
        await engine.acquire("late", limits)
    # The acquire ran first: the abandon releases it.
    assert (await engine.acquire("early", limits)).allowed
    released = await engine.abandon("early", limits)
    assert released.status == "released"
    states = await engine.peek(limits)
    assert [s.remaining for s in states] == [5, 1]


async def test_the_shared_connection_times_out_a_paused_redis_and_comes_back(
    tmp_path: Path, ns: str
) -> None:
    """The multiplexer's connection has no per-reply timer: its watchdog fails the commands
    in flight once no reply came for the socket timeout, and the next command connects again."""
    server = RedisServer(tmp_path, port=free_port(), appendonly=False).start()
    window = [SlidingWindow(f"t:{ns}:w", 100, "1m")]
    try:
        url = f"{server.url}?timeout={REDIS_TIMEOUT_S}"
        async with await Engine.connect(url, prefix=f"t:{ns}:") as engine:
            assert (await engine.peek(window))[0].remaining == 100
            os.kill(server.process.pid, signal.SIGSTOP)
            started = time.monotonic()
            try:
                with pytest.raises(RedisUnavailable):
                    await engine.peek(window)
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert REDIS_TIMEOUT_S <= time.monotonic() - started < ANSWER_WITHIN_S
            assert (await engine.peek(window))[0].remaining == 100
    finally:
        server.stop()
