"""Engine throughput and memory, against a trivial EVALSHA measured in the same run.

    python -m benchmarks.engine [--duration 3] [--runs 3] [--concurrency 64] [--quick]

Starts its own Redis on a free port. Each figure is the median of several runs, the runs of
all workloads interleaved so that machine drift touches them alike; ratios are taken against
the trivial script (the most a client of this kind can get from one Redis connection pool).
Writes a JSON report (``--out``, default benchmarks/results/engine.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ratelimiter import Budget, Concurrency, Engine, RedisServer, SlidingWindow
from ratelimiter.embedded import free_port

SCOPES = ("proxy", "key", "user", "team", "end_user", "key_model")
HUGE = 10**15
TARGET_RATIO = 0.25
TARGET_BYTES_PER_SCOPE = 2048

Workload = Callable[[int], Awaitable[Any]]


def scope_limits(ids: dict[str, int], lease_ttl_ms: int) -> list[Any]:
    """A realistic request: 6 scopes x requests, tokens, budget, and 2 leases = 20 limits."""
    limits: list[Any] = []
    for scope in SCOPES:
        tag = f"bench:{{{scope}:{ids[scope]}}}"
        limits += [
            SlidingWindow(f"{tag}:rpm", HUGE, "1m"),
            SlidingWindow(f"{tag}:tpm", HUGE, "1m", 1, measure="tokens"),
            Budget(f"{tag}:spend", HUGE, "daily", 1),
        ]
        if scope in ("key", "end_user"):
            limits.append(Concurrency(f"{tag}:par", HUGE, lease_ttl_ms))
    return limits


@functools.lru_cache(maxsize=4096)
def _cached_scope_limits(key: tuple[tuple[str, int], ...], lease_ttl_ms: int) -> list[Any]:
    return scope_limits(dict(key), lease_ttl_ms)


def request_limits(ids: dict[str, int], *, lease_ttl_ms: int = 60_000) -> list[Any]:
    """As a policy layer would: each scope's limits are cached, each request sets its own
    token estimate and cost."""
    return [
        limit.with_amount(500 if limit.measure == "tokens" else 2_000) if limit.measure else limit
        for limit in _cached_scope_limits(tuple(sorted(ids.items())), lease_ttl_ms)
    ]


async def rate(work: Workload, concurrency: int, seconds: float) -> float:
    """Calls per second of ``work`` from ``concurrency`` tasks looping for ``seconds``."""
    counter = itertools.count()
    stop = time.perf_counter() + seconds

    async def loop() -> int:
        done = 0
        while time.perf_counter() < stop:
            await work(next(counter))
            done += 1
        return done

    start = time.perf_counter()
    total = sum(await asyncio.gather(*(loop() for _ in range(concurrency))))
    return total / (time.perf_counter() - start)


def workloads(engine: Engine, scopes: int) -> dict[str, Workload]:
    redis = engine.redis
    trivial_sha: list[str] = []

    async def trivial(_: int) -> None:
        if not trivial_sha:
            trivial_sha.append(await redis.script_load("return 1"))
        await redis.evalsha(trivial_sha[0], 1, "bench:trivial")

    one = [SlidingWindow("bench:{one}:rpm", HUGE, "1m")]

    async def one_limit(_: int) -> None:
        await engine.acquire(None, one)

    def ids(n: int) -> dict[str, int]:
        return {scope: (0 if scope == "proxy" else n % scopes) for scope in SCOPES}

    async def twenty(n: int) -> None:
        await engine.acquire(None, request_limits(ids(n), lease_ttl_ms=2_000))

    async def cycle(n: int) -> None:
        decision = await engine.acquire(None, request_limits(ids(n)))
        await engine.settle(decision.reservation, {"tokens": 300, "spend": 1_500})

    return {
        "trivial_evalsha_per_s": trivial,
        "admissions_per_s_1_limit": one_limit,
        "admissions_per_s_20_limits": twenty,
        "cycles_per_s_20_limits": cycle,
    }


async def limits_library(url: str) -> dict[str, Workload]:
    """The same single-limit workload on the ``limits`` library, when it is installed."""
    try:
        from limits import RateLimitItemPerMinute
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import (
            MovingWindowRateLimiter,
            SlidingWindowCounterRateLimiter,
        )
    except ImportError:
        return {}
    storage = RedisStorage(url.replace("redis://", "async+redis://"), implementation="redispy")
    item = RateLimitItemPerMinute(10**9)
    moving, counter = MovingWindowRateLimiter(storage), SlidingWindowCounterRateLimiter(storage)

    async def hit_moving(_: int) -> None:
        await moving.hit(item, "bench-moving")

    async def hit_counter(_: int) -> None:
        await counter.hit(item, "bench-counter")

    return {"limits_moving_window_per_s": hit_moving, "limits_sliding_window_per_s": hit_counter}


async def bytes_per_scope(url: str, scopes: int = 100) -> dict[str, float]:
    """Redis memory of one key scope (requests and tokens windows, lease set, budget period)
    at steady state: a fake clock spreads two minutes of traffic, every 0.5 s, over all 60
    buckets of the one-minute windows; all but the last round of requests are settled."""
    now = [1_800_000_000_000]
    async with await Engine.connect(url, clock=lambda: now[0], prefix="mem:") as engine:

        async def one(n: int, settle: bool) -> None:
            ids = dict.fromkeys(SCOPES, 10**6 + n)  # ids no throughput run has touched
            decision = await engine.acquire(None, request_limits(ids))
            if settle:
                await engine.settle(decision.reservation, {"tokens": 300, "spend": 1_500})

        for step in range(240):
            now[0] += 500
            await asyncio.gather(*(one(n, step < 239) for n in range(scopes)))
        per_kind: dict[str, int] = {}
        for n in range(scopes):
            async for key in engine.redis.scan_iter(match=f"bench:{{key:{10**6 + n}}}:*"):
                kind = key.decode().split("}:")[1].split(":")[0]
                size = await engine.redis.memory_usage(key, samples=0) or 0
                per_kind[kind] = per_kind.get(kind, 0) + size
        report = {f"bytes_{kind}": size / scopes for kind, size in sorted(per_kind.items())}
        report["bytes_per_scope"] = sum(per_kind.values()) / scopes
        return report


def summarise(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
        for name, v in samples.items()
    }


async def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    # Memory first, on the empty server: the fake clock's keys expire on Redis's real clock,
    # so the phase must finish well inside a window's length.
    memory = await bytes_per_scope(url, scopes=10 if args.quick else 100)
    async with await Engine.connect(url, prefix="bench:") as engine:
        jobs = workloads(engine, args.scopes) | await limits_library(url)
        samples: dict[str, list[float]] = {name: [] for name in jobs}
        for _ in range(args.runs):
            for name, work in jobs.items():
                samples[name].append(await rate(work, args.concurrency, args.duration))
        stats = await engine.redis.info("commandstats")
    figures = summarise(samples)
    report: dict[str, Any] = {name: f["median"] for name, f in figures.items()}
    trivial = report["trivial_evalsha_per_s"]
    report["ratio_to_trivial_evalsha"] = report["admissions_per_s_20_limits"] / trivial
    report["evalsha_usec_per_call_all_workloads"] = stats.get("cmdstat_evalsha", {}).get(
        "usec_per_call"
    )
    report |= memory
    report["spread"] = figures
    return report


def print_table(report: dict[str, Any]) -> None:
    trivial = report["trivial_evalsha_per_s"]
    print(f"\n{'figure':34} {'median':>12} {'min':>12} {'max':>12} {'/trivial':>9}")
    for name, f in report["spread"].items():
        print(
            f"{name:34} {f['median']:12,.0f} {f['min']:12,.0f} {f['max']:12,.0f} "
            f"{f['median'] / trivial:9.2f}"
        )
    ratio, size = report["ratio_to_trivial_evalsha"], report["bytes_per_scope"]
    print(f"\n20-limit admission / trivial EVALSHA: {ratio:.2f} (target >= {TARGET_RATIO})")
    print(f"Redis memory per scope: {size:,.0f} bytes (target <= {TARGET_BYTES_PER_SCOPE})")
    for name, value in report.items():
        if name.startswith("bytes_") and name != "bytes_per_scope":
            print(f"  {name[6:]:>8}: {value:,.0f} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median taken)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent tasks")
    parser.add_argument("--scopes", type=int, default=1_000, help="distinct ids per scope")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine.json"))
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.runs = 0.3, 1
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    with tempfile.TemporaryDirectory() as data:
        server = RedisServer(data, port=free_port(), appendonly=False).start()
        try:
            report = asyncio.run(measure(args, server.url))
            version = subprocess.run(
                [str(server.binary), "--version"], capture_output=True, text=True
            ).stdout.strip()
        finally:
            server.stop()
    report["params"] = {
        "duration_s": args.duration,
        "runs": args.runs,
        "concurrency": args.concurrency,
        "scopes": args.scopes,
        "redis": version,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
    }
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
