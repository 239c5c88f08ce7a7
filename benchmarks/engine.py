"""Engine throughput and Redis memory, set against a trivial EVALSHA measured in the same run.

    python -m benchmarks.engine [--duration 3] [--runs 3] [--concurrency 64] [--quick]

Starts its own Redis on a free port and stops it at the end. Each throughput figure is the
median of ``--runs`` runs of ``--duration`` seconds, ``--concurrency`` asyncio tasks sharing
one redis-py client; the runs of all workloads are interleaved so that machine drift touches
them alike. The yardstick is a trivial script (``return 1``) from the same client: the most a
client of this kind gets out of one Redis. Memory per scope is measured at steady state: a
fake clock walks every scope through one and a half windows of traffic in a few seconds.
Writes a JSON report (``--out``, default benchmarks/results/engine.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ratelimiter import Budget, Concurrency, Decision, Engine, Reservation, SlidingWindow, connect
from ratelimiter.engine.connections import RedisClient
from ratelimiter.engine.embedded import RedisServer, free_port
from ratelimiter.engine.limits import DEFAULT_BUCKETS, DEFAULT_BUDGET_RETENTION_MS, Limit

SCOPES = ("proxy", "key", "user", "team", "end_user", "key_model")
# 6 scopes x (requests, tokens, budget) = 18 limits, plus a lease on two of them = 20.
LEASED_SCOPES = ("key", "user")
WINDOW = "1m"
HUGE = 10**15  # no capacity is ever reached: every call is an admission, never a refusal
ESTIMATE = {"tokens": 500, "spend": 2_000}  # spend in nano-dollars
ACTUALS = {"tokens": 300, "spend": 1_500}
HELD_LEASE_MS = 60_000
# Admissions that are never settled: their leases must lapse and be purged, or every lease
# set would grow for the whole run.
UNSETTLED_LEASE_MS = 2_000
TRIVIAL_SCRIPT = "return 1"
WARM_UP_S = 0.2
MEMORY_STEP_MS = 1_000
MEMORY_STEPS = 90  # 1.5 windows: old buckets have slid out and been purged, as in production
DAY_MS = 86_400_000
TARGET_RATIO = 0.25
TARGET_HOT_SCOPE_BLOCKS_RATIO = 3.0  # one hot scope with capacity blocks / trivial EVALSHA
BLOCK_REQUESTS = 1_000  # a block holds this many requests' worth of each hot limit
TARGET_BYTES_PER_SCOPE = 2_048
ENGINE_FIGURES = (
    "trivial_evalsha_per_s",
    "admissions_per_s_1_limit",
    "admissions_per_s_20_limits",
    "cycles_per_s_20_limits",
    "cycles_per_s_hot_scope",
    "cycles_per_s_hot_scope_blocks",
)
LIMITS_FIGURES = ("limits_moving_window_per_s", "limits_sliding_window_per_s")
MEMORY_KEY = re.compile(r"^mem:\{(?P<scope>\w+):\d+\}:(?P<kind>rpm|tpm|lease|budget)(:\d+)?$")

if TYPE_CHECKING:
    from ratelimiter.engine.blocks import Blocks

Work = Callable[[int], Awaitable[None]]
T = TypeVar("T")


# -- the workloads -------------------------------------------------------------------


def scope_limits(namespace: str, scope: str, scope_id: int, lease_ttl_ms: int) -> list[Limit]:
    """One scope's limits; its keys share a hash tag, as they must on a Cluster."""
    tag = f"{namespace}:{{{scope}:{scope_id}}}"
    limits: list[Limit] = [
        SlidingWindow(f"{tag}:rpm", HUGE, WINDOW),
        SlidingWindow(f"{tag}:tpm", HUGE, WINDOW, ESTIMATE["tokens"], measure="tokens"),
        Budget(f"{tag}:budget", HUGE, "daily", ESTIMATE["spend"]),
    ]
    if scope in LEASED_SCOPES:
        limits.append(Concurrency(f"{tag}:lease", HUGE, lease_ttl_ms))
    return limits


@cache
def request_limits(namespace: str, scope_id: int, lease_ttl_ms: int) -> tuple[Limit, ...]:
    """The 20 limits of a request whose scopes have id ``scope_id``, but for the one proxy
    scope that every request shares. Built once per id, as a policy layer caches them: the
    figures are the engine's, not the cost of building limits."""
    limits: list[Limit] = []
    for scope in SCOPES:
        limits += scope_limits(namespace, scope, 0 if scope == "proxy" else scope_id, lease_ttl_ms)
    return tuple(limits)


def admitted(decision: Decision) -> Reservation:
    # A refusal is a cheaper path: one slipping in would flatter the figures.
    if decision.reservation is None:
        raise RuntimeError(f"benchmark request refused ({decision.reason}): raise the capacities")
    return decision.reservation


def engine_workloads(
    engine: Engine, trivial_sha: str, scopes: int, blocks: Blocks
) -> dict[str, Work]:
    redis = engine.redis
    one = [SlidingWindow("bench:{one}:rpm", HUGE, WINDOW)]

    async def trivial(_: int) -> None:
        await redis.evalsha(trivial_sha, 1, "bench:{trivial}")

    async def one_limit(_: int) -> None:
        admitted(await engine.acquire(None, one))

    async def twenty(n: int) -> None:
        limits = request_limits("bench", n % scopes, UNSETTLED_LEASE_MS)
        admitted(await engine.acquire(None, limits))

    async def cycle(n: int) -> None:
        limits = request_limits("bench", n % scopes, HELD_LEASE_MS)
        await engine.settle(admitted(await engine.acquire(None, limits)), ACTUALS)

    # Every request admitted and settled against one scope's keys, as the proxy-wide budget
    # (or one very large team) is: on a Cluster all of it lands on one slot, one master.
    hot = scope_limits("bench", "proxy", 0, HELD_LEASE_MS)

    async def hot_scope(_: int) -> None:
        await engine.settle(admitted(await engine.acquire(None, hot)), ACTUALS)

    # The same scope served from capacity blocks (ratelimiter.engine.blocks): Redis is asked
    # for a block when one is spent or its bucket ends, not on every request.
    async def hot_scope_blocks(_: int) -> None:
        grants = [await blocks.take(limit) for limit in hot]
        direct = [limit for limit, grant in zip(hot, grants, strict=True) if grant is None]
        if direct:
            await engine.settle(admitted(await engine.acquire(None, direct)), ACTUALS)
        for limit, grant in zip(hot, grants, strict=True):
            if grant is not None:
                await blocks.give_back(grant, ACTUALS.get(limit.measure or "", grant.amount))

    work = (trivial, one_limit, twenty, cycle, hot_scope, hot_scope_blocks)
    return dict(zip(ENGINE_FIGURES, work, strict=True))


async def limits_library(url: str) -> tuple[dict[str, Work], Any]:
    """The single-limit workload on the ``limits`` library, and the client to close."""
    from limits import RateLimitItemPerMinute
    from limits.aio.storage import RedisStorage
    from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

    storage = RedisStorage(f"async+{url}", implementation="redispy")
    item = RateLimitItemPerMinute(HUGE)
    moving = MovingWindowRateLimiter(storage)
    sliding = SlidingWindowCounterRateLimiter(storage)
    if not (await moving.hit(item, "probe") and await sliding.hit(item, "probe")):
        raise RuntimeError("a probe hit was refused")

    async def hit_moving(_: int) -> None:
        await moving.hit(item, "bench-moving")

    async def hit_sliding(_: int) -> None:
        await sliding.hit(item, "bench-sliding")

    jobs = dict(zip(LIMITS_FIGURES, (hit_moving, hit_sliding), strict=True))
    return jobs, storage.bridge.storage


@contextlib.asynccontextmanager
async def limits_workloads(url: str) -> AsyncIterator[tuple[dict[str, Work], str | None]]:
    """The ``limits`` library's workloads, or none and the reason they cannot run."""
    jobs: dict[str, Work] = {}
    client, error = None, None
    try:
        jobs, client = await limits_library(url)
    except Exception as exc:  # not installed, another API, refused: a null figure, not a crash
        error = f"{type(exc).__name__}: {exc}"
    try:
        yield jobs, error
    finally:
        if client is not None:
            await client.aclose()


# -- timing --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One timed run of one workload, with what it cost the client and the server."""

    ops: int
    elapsed_s: float
    client_cpu_s: float
    evalsha_calls: int
    evalsha_usec: float

    @property
    def rate(self) -> float:
        return self.ops / self.elapsed_s


async def run_for(work: Work, concurrency: int, seconds: float) -> tuple[int, float]:
    """Operations done by ``concurrency`` tasks looping on ``work`` for ``seconds``."""
    counter = itertools.count()
    stop = time.perf_counter() + seconds

    async def loop() -> int:
        done = 0
        while time.perf_counter() < stop:
            await work(next(counter))
            done += 1
        return done

    start = time.perf_counter()
    ops = sum(await asyncio.gather(*(loop() for _ in range(concurrency))))
    return ops, time.perf_counter() - start


async def sample(redis: RedisClient, work: Work, concurrency: int, seconds: float) -> Sample:
    # Zeroed per run so that each workload's server-side EVALSHA time is its own.
    await redis.config_resetstat()
    cpu = time.process_time()
    ops, elapsed = await run_for(work, concurrency, seconds)
    cpu = time.process_time() - cpu
    stats = (await redis.info("commandstats")).get("cmdstat_evalsha", {})
    return Sample(ops, elapsed, cpu, int(stats.get("calls", 0)), float(stats.get("usec", 0)))


async def interleaved(
    redis: RedisClient, jobs: dict[str, Work], runs: int, seconds: float, concurrency: int
) -> dict[str, list[Sample]]:
    # Warming up opens the pool's connections and loads the scripts outside the timed runs.
    for work in jobs.values():
        await run_for(work, concurrency, WARM_UP_S)
    samples: dict[str, list[Sample]] = {name: [] for name in jobs}
    for _ in range(runs):
        for name, work in jobs.items():
            samples[name].append(await sample(redis, work, concurrency, seconds))
    return samples


def summarise(samples: Sequence[Sample]) -> dict[str, Any]:
    rates = [s.rate for s in samples]
    ops = sum(s.ops for s in samples)
    elapsed = sum(s.elapsed_s for s in samples)
    calls = sum(s.evalsha_calls for s in samples)
    usec = sum(s.evalsha_usec for s in samples)
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "runs": rates,
        # Time Redis's one thread spent inside EVALSHA, per call and as a share of the run:
        # near 1.0 the server is the bottleneck, well below it the client is.
        "evalsha_usec_per_call": usec / calls if calls else None,
        "evalsha_calls_per_op": calls / ops if ops else None,
        "redis_busy": usec / 1e6 / elapsed,
        "client_cpu": sum(s.client_cpu_s for s in samples) / elapsed,
    }


# -- memory --------------------------------------------------------------------------


async def memory_report(url: str, scopes: int) -> dict[str, Any]:
    """Redis memory of one scope at steady state.

    Scope ids here are their own (``mem:`` keys), each sent one request a second for
    ``MEMORY_STEPS`` seconds of a fake clock, so every bucket of both one-minute windows
    is written and the oldest have slid out. Every request is settled except the last
    round, left in flight so that leases, holds and records are as under live traffic.
    """
    now = [int(time.time() * 1000)]
    async with Engine(await connect(url), prefix="mem:", clock=lambda: now[0]) as engine:
        held: list[Reservation] = []
        finished: list[Reservation] = []
        for step in range(MEMORY_STEPS):
            now[0] += MEMORY_STEP_MS
            decisions = await asyncio.gather(
                *(
                    engine.acquire(None, request_limits("mem", n, HELD_LEASE_MS))
                    for n in range(scopes)
                )
            )
            held = [admitted(d) for d in decisions]
            if step < MEMORY_STEPS - 1:
                await asyncio.gather(*(engine.settle(r, ACTUALS) for r in held))
                finished = held
        # Measured at once: the keys' TTLs run on Redis's own clock, from the fake clock's.
        report = await scope_sizes(engine.redis, scopes)
        report |= await record_sizes(engine.redis, engine, held, finished)
    return report


async def pipelined(redis: RedisClient, calls: Sequence[Callable[[Any], Any]]) -> list[Any]:
    pipe = redis.pipeline(transaction=False)
    for call in calls:
        call(pipe)
    return list(await pipe.execute())


async def memory_usage(redis: RedisClient, keys: Sequence[str]) -> list[int]:
    # samples=0: every element of a hash or sorted set counted, not estimated from 5.
    sizes = await pipelined(redis, [lambda p, k=k: p.memory_usage(k, samples=0) for k in keys])
    return [size or 0 for size in sizes]


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


async def scope_sizes(redis: RedisClient, scopes: int) -> dict[str, Any]:
    by_kind: dict[str, list[str]] = {}
    busiest: list[str] = []
    async for raw in redis.scan_iter(match="mem:{*", count=1_000):
        key = raw.decode()
        match = MEMORY_KEY.match(key)
        if match is None:
            continue  # reservation records, measured per request below
        if match["scope"] == "proxy":
            busiest.append(key)
        else:
            by_kind.setdefault(match["kind"], []).append(key)
    kinds = {kind: mean(await memory_usage(redis, keys)) for kind, keys in sorted(by_kind.items())}
    windows = by_kind["rpm"] + by_kind["tpm"]
    fields = await pipelined(redis, [lambda p, k=k: p.hlen(k) for k in windows])
    leases = await pipelined(redis, [lambda p, k=k: p.zcard(k) for k in by_kind["lease"]])
    per_scope = sum(kinds.values())
    retained = DEFAULT_BUDGET_RETENTION_MS // DAY_MS
    return {
        "bytes_per_scope": per_scope,
        "bytes_by_kind": kinds,
        "keys_by_kind": {kind: len(keys) for kind, keys in sorted(by_kind.items())},
        # A daily budget keeps each past period's hash for the retention time.
        "retained_budget_periods": retained,
        "bytes_per_scope_with_retained_budget_periods": per_scope + retained * kinds["budget"],
        "bytes_busiest_scope": sum(await memory_usage(redis, busiest)),
        "busiest_scope_requests_per_bucket": scopes,
        # Each window hash holds one field per live bucket plus the sum 's' and oldest id 'o'.
        "window_bucket_fields": mean([n - 2 for n in fields]),
        "window_bucket_fields_full": DEFAULT_BUCKETS + 1,
        "lease_members": mean(leases),
        "scopes": scopes,
        "fake_clock_seconds": MEMORY_STEPS * MEMORY_STEP_MS / 1000,
    }


async def record_sizes(
    redis: RedisClient, engine: Engine, held: Sequence[Reservation], finished: Sequence[Reservation]
) -> dict[str, Any]:
    """Per-request memory: the record of a held reservation, and a finished one's, which is
    kept ``result_ttl_ms`` so that repeated settles answer with the first outcome."""

    def record(r: Reservation) -> str:
        return f"{engine.prefix}{{{r.anchors[0]}}}:res:{r.request_id}"

    pending = f"{engine.prefix}{{{engine.anchors()[0]}}}:pending"
    held_sizes = await memory_usage(redis, [record(r) for r in held])
    finished_sizes = await memory_usage(redis, [record(r) for r in finished])
    pending_size, pending_members = await pipelined(
        redis, [lambda p: p.memory_usage(pending, samples=0), lambda p: p.zcard(pending)]
    )
    return {
        "bytes_per_held_record": mean(held_sizes),
        "bytes_per_finished_record": mean(finished_sizes),
        "bytes_per_pending_entry": (pending_size or 0) / max(pending_members, 1),
        "finished_record_ttl_s": engine.result_ttl_ms / 1000,
    }


# -- the run -------------------------------------------------------------------------


async def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    redis = await connect(url)
    # Closing the engine closes its client too, after the connection its scripts share.
    async with Engine(redis, prefix="bench:") as engine:
        # Memory first: its fake-clock keys then age out on Redis's clock during the rest.
        memory = await memory_report(url, args.scopes)
        sha = await redis.script_load(TRIVIAL_SCRIPT)
        from ratelimiter.engine.blocks import Blocks  # here: redis_cost runs older engines too

        blocks = Blocks(engine, size=lambda limit: limit.amount * BLOCK_REQUESTS)
        async with limits_workloads(url) as (library_jobs, library_error):
            jobs = engine_workloads(engine, sha, args.scopes, blocks) | library_jobs
            samples = await interleaved(redis, jobs, args.runs, args.duration, args.concurrency)
        await blocks.close()
        server = await redis.info("server")
    figures = {name: summarise(runs) for name, runs in samples.items()}
    report: dict[str, Any] = {name: figures[name]["median"] for name in ENGINE_FIGURES}
    for name in LIMITS_FIGURES:
        report[name] = figures[name]["median"] if name in figures else None
    report["limits_error"] = library_error
    report["ratio_to_trivial_evalsha"] = (
        report["admissions_per_s_20_limits"] / report["trivial_evalsha_per_s"]
    )
    report["hot_scope_blocks_ratio"] = (
        report["cycles_per_s_hot_scope_blocks"] / report["trivial_evalsha_per_s"]
    )
    report["bytes_per_scope"] = memory["bytes_per_scope"]
    # The most one Redis core can serve of one hot scope, however many clients it has: the
    # Redis time a request costs that scope's slot, not the client-bound rate measured here.
    hot = figures["cycles_per_s_hot_scope"]
    report["hot_scope_ceiling_per_s"] = 1e6 / (
        hot["evalsha_usec_per_call"] * hot["evalsha_calls_per_op"]
    )
    # Finished records outlive their request by the result ttl: at full throughput they,
    # not the scopes, are most of Redis's memory.
    memory["finished_records_bytes_at_cycle_rate"] = (
        report["cycles_per_s_20_limits"]
        * memory["finished_record_ttl_s"]
        * memory["bytes_per_finished_record"]
    )
    report["targets"] = {
        "ratio_to_trivial_evalsha_min": TARGET_RATIO,
        "hot_scope_blocks_ratio_min": TARGET_HOT_SCOPE_BLOCKS_RATIO,
        "bytes_per_scope_max": TARGET_BYTES_PER_SCOPE,
    }
    report["figures"] = figures
    report["memory"] = memory
    report["redis_version"] = server["redis_version"]
    return report


def run(main: Coroutine[Any, Any, T]) -> tuple[T, str]:
    """Runs on uvloop when it is installed, as the sidecar does."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main), "asyncio"
    return uvloop.run(main), "uvloop"


# -- output --------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    trivial = report["trivial_evalsha_per_s"]
    print(
        f"\n{'figure':29} {'median/s':>9} {'min':>8} {'max':>8} {'/trivial':>8}"
        f" {'EVALSHA/op':>10} {'Redis µs/call':>13} {'Redis busy':>10} {'client CPU':>10}"
    )
    for name, f in report["figures"].items():
        usec = f["evalsha_usec_per_call"]
        print(
            f"{name:29} {f['median']:9,.0f} {f['min']:8,.0f} {f['max']:8,.0f}"
            f" {f['median'] / trivial:8.2f} {f['evalsha_calls_per_op'] or 0:10.1f}"
            f" {usec or 0:13.1f} {f['redis_busy']:10.0%} {f['client_cpu']:10.0%}"
        )
    if report["limits_error"]:
        print(f"limits library: not measured ({report['limits_error']})")
    ratio = report["ratio_to_trivial_evalsha"]
    print(f"\n20-limit admissions / trivial EVALSHA: {ratio:.2f} (target >= {TARGET_RATIO})")
    blocks = report["hot_scope_blocks_ratio"]
    print(
        f"one hot scope from capacity blocks / trivial EVALSHA: {blocks:.2f} "
        f"(target >= {TARGET_HOT_SCOPE_BLOCKS_RATIO})"
    )
    print(
        "one hot scope (proxy-wide budget, a very large team): at most "
        f"{report['hot_scope_ceiling_per_s']:,.0f} requests/s per Redis core (its slot's master)"
    )
    print_memory(report["memory"])


def print_memory(m: dict[str, Any]) -> None:
    kinds = m["bytes_by_kind"]
    print(
        f"\nRedis memory per scope, {m['scopes']} scopes after {m['fake_clock_seconds']:.0f} s"
        f" of fake-clock traffic, one request a second each:\n"
        f"  window buckets written: {m['window_bucket_fields']:.1f} of"
        f" {m['window_bucket_fields_full']} bucket fields per window hash;"
        f" {m['lease_members']:.1f} lease(s) held per lease set\n"
        f"  requests window {kinds['rpm']:6,.0f} B   tokens window {kinds['tpm']:6,.0f} B"
        f"   lease set {kinds['lease']:6,.0f} B   budget period {kinds['budget']:6,.0f} B\n"
        f"  total           {m['bytes_per_scope']:6,.0f} B   (target <= {TARGET_BYTES_PER_SCOPE})"
        f"; with the {m['retained_budget_periods']} retained past budget periods:"
        f" {m['bytes_per_scope_with_retained_budget_periods']:,.0f} B\n"
        f"  the proxy scope (no lease), {m['busiest_scope_requests_per_bucket']} requests a bucket"
        f" (larger counts): {m['bytes_busiest_scope']:,.0f} B\n"
        f"  per request: held record {m['bytes_per_held_record']:,.0f} B"
        f" + pending entry {m['bytes_per_pending_entry']:,.0f} B;"
        f" finished record {m['bytes_per_finished_record']:,.0f} B,"
        f" kept {m['finished_record_ttl_s']:.0f} s\n"
        f"  finished records at the measured cycle rate:"
        f" {m['finished_records_bytes_at_cycle_rate'] / 1e6:,.0f} MB"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median taken)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent tasks")
    parser.add_argument("--scopes", type=int, default=200, help="distinct ids per scope")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine.json"))
    parser.add_argument("--quick", action="store_true", help="a smoke test: 0.5 s x 1 run")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.runs, args.scopes = 0.5, 1, 20
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ratelimiter-bench-") as data:
        server = RedisServer(data, port=free_port(), appendonly=False).start()
        try:
            report, loop = run(measure(args, server.url))
        finally:
            server.stop()
    report["params"] = {
        "duration_s": args.duration,
        "runs": args.runs,
        "concurrency": args.concurrency,
        "scopes": args.scopes,
        "limits_per_request": len(request_limits("bench", 0, HELD_LEASE_MS)),
        "event_loop": loop,
        "redis_server": str(server.binary),
        "redis_version": report.pop("redis_version"),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "runtime_s": round(time.perf_counter() - started, 1),
        # Other work on the machine takes cores from the client and from Redis alike.
        "load_average_1min": [load_before, os.getloadavg()[0]],
    }
    print_report(report)
    print(f"\ntotal runtime {report['params']['runtime_s']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
