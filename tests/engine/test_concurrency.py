"""Several processes, many tasks each, one limit: exactly its capacity is admitted.
Also a process killed with SIGKILL while holding leases."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from ratelimiter import Budget, Concurrency, Engine, SlidingWindow

PROCESSES, TASKS = 4, 50


def make_limits(ns: str, spec: list[tuple[Any, ...]]) -> list[Any]:
    kinds = {"window": SlidingWindow, "lease": Concurrency, "budget": Budget}
    return [kinds[kind](key.format(ns=ns), *args) for kind, key, *args in spec]


async def _hammer(url: str, ns: str, spec: list[tuple[Any, ...]], barrier: Any) -> list[str]:
    async with await Engine.connect(url, prefix=f"t:{ns}:") as engine:
        limits = make_limits(ns, spec)
        await engine.redis.ping()
        barrier.wait()  # every process connected: start together
        decisions = await asyncio.gather(*(engine.acquire(None, limits) for _ in range(TASKS)))
        return [d.request_id for d in decisions if d.allowed]


def _worker(url: str, ns: str, spec: list[tuple[Any, ...]], barrier: Any, out: Any) -> None:
    out.put(asyncio.run(_hammer(url, ns, spec, barrier)))


def run_processes(url: str, ns: str, spec: list[tuple[Any, ...]]) -> list[str]:
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(url, ns, spec, barrier, out)) for _ in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    admitted = [rid for _ in procs for rid in out.get(timeout=60)]
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0
    return admitted


SPECS = {
    "window": ([("window", "{ns}:rpm", 60, "1m")], 60),
    "weighted window": ([("window", "{ns}:tpm", 1_000, "1m", 7, "tokens")], 142),
    "lease": ([("lease", "{ns}:par", 37)], 37),
    "budget": ([("budget", "{{{ns}}}:b", 1_000, "daily", 9)], 111),
    "all kinds": (
        [
            ("window", "{ns}:rpm", 150, "1m"),
            ("window", "{ns}:tpm", 10_000, "1m", 100, "tokens"),
            ("lease", "{ns}:par", 120),
            ("budget", "{{{ns}}}:b", 4_500, "monthly", 50),
        ],
        90,
    ),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_processes_admit_exactly_the_capacity(redis_url: str, ns: str, name: str) -> None:
    spec, expected = SPECS[name]
    admitted = run_processes(redis_url, ns, spec)
    assert len(admitted) == expected
    assert len(set(admitted)) == expected


async def _peek(url: str, ns: str, spec: list[tuple[Any, ...]]) -> list[int]:
    async with await Engine.connect(url) as engine:
        return [s.remaining for s in await engine.peek(make_limits(ns, spec))]


def test_cluster_processes_admit_exactly_and_refusals_are_compensated(
    redis_cluster: Any, ns: str
) -> None:
    """One request meets limits in three slots; only the first can refuse. Every refused
    request was admitted by the other two slots and then released there."""
    spec = [
        ("window", "{{a{ns}}}:rpm", 55, "1m"),
        ("window", "{{b{ns}}}:tpm", 100_000, "1m", 10, "tokens"),
        ("budget", "{{c{ns}}}:b", 1_000_000, "daily", 100),
    ]
    admitted = run_processes(redis_cluster.url, ns, spec)
    assert len(admitted) == 55
    remaining = asyncio.run(_peek(redis_cluster.url, ns, spec))
    assert remaining == [0, 100_000 - 55 * 10, 1_000_000 - 55 * 100]


HOLDER = """
import asyncio, sys
from ratelimiter import Concurrency, Engine

async def main(url, key):
    engine = await Engine.connect(url)
    for _ in range(3):
        assert (await engine.acquire(None, [Concurrency(key, 3, ttl_ms=1000)])).allowed
    print("held", flush=True)
    await asyncio.sleep(60)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_killed_holder_frees_its_leases_within_the_ttl(redis_url: str, ns: str) -> None:
    lease = Concurrency(f"{ns}:par", 3, ttl_ms=1000)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_url, lease.key], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        async with await Engine.connect(redis_url) as engine:
            assert not (await engine.acquire(None, [lease])).allowed
            while (await engine.peek([lease]))[0].remaining < 3:
                assert time.monotonic() - killed_at < 1.0 + 0.5, "leases outlived their ttl"
                await asyncio.sleep(0.02)
            assert (await engine.acquire(None, [lease])).allowed
    finally:
        holder.kill()
        holder.wait()
