"""What settlement and the rollup consumer cost Redis, apart: commands per request (INFO
commandstats) and instructions (callgrind), for the requests and for folding their ledger
entries into the rollups afterwards, which ``benchmarks.redis_cost`` does not count.

    python -m benchmarks.settle_cost [--requests 1000]

Each request is the README's scale: six scopes (requests, tokens and a budget each, leases on
two: 20 limits), six rollup dimensions, the sidecar's ledger metadata, 50 distinct keys; it is
acquired and settled. Then the rollups are brought up to date (``Ledger.lifetime_spend``: the
consumer folds what the requests wrote; before it existed, a plain read). Redis runs under
callgrind with AOF on (``redis_cost.redis_under_callgrind``); the scripts' clock is a counter,
so windows slide alike however slowly Redis runs there, and Redis's own timers are subtracted
at their idle rate. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import msgpack

from ratelimiter import Engine
from ratelimiter.ledger import Ledger

from .engine import ACTUALS, request_limits
from .redis_cost import callgrind_available, instructions, redis_under_callgrind

DIMS = ("proxy:all", "key:{n:064x}", "user:u{n}", "team:t{n}", "customer:c{n}", "model:gpt-4o")
HELD_LEASE_MS = 60_000
SCOPE_IDS = 50  # distinct keys, users, teams, customers


class Clock:
    """One millisecond later at every call, from noon of a fixed day."""

    def __init__(self, start_ms: int = 1_800_000_000_000 + 12 * 3_600_000) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        self.now += 1
        return self.now


def meta(n: int) -> bytes:
    return msgpack.packb(
        {
            "key_hash": f"{n:064x}",
            "key_alias": "bench",
            "user_id": f"u{n}",
            "team_id": f"t{n}",
            "end_user": f"c{n}",
            "model": "gpt-4o",
            "deployment": "gpt-4o#0",
            "route": "/v1/chat/completions",
            "client_request_id": f"client-{n}",
        }
    )


async def requests(engine: Engine, count: int) -> None:
    for i in range(count):
        n = i % SCOPE_IDS
        decision = await engine.acquire(
            None,
            request_limits("cost", n, HELD_LEASE_MS),
            meta=meta(n),
            ledger=[d.format(n=n) for d in DIMS],
        )
        assert decision.reservation is not None, decision.reason
        await engine.settle(decision.reservation, ACTUALS, info=b"\x80")


def measure(count: int) -> dict[str, Any]:
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory(prefix="rl-settle-") as tmp, contextlib.closing(loop):
        workdir = Path(tmp)
        with redis_under_callgrind(workdir) as (url, pid):
            engine = loop.run_until_complete(Engine.connect(url, clock=Clock()))
            ledger = Ledger(engine)

            def timed(work: Awaitable[Any]) -> float:
                start = time.monotonic()
                loop.run_until_complete(work)
                return time.monotonic() - start

            timed(requests(engine, 2 * SCOPE_IDS))  # scripts loaded, keys made
            timed(ledger.lifetime_spend(["proxy:all"]))
            loop.run_until_complete(engine.redis.config_resetstat())
            settled = instructions(pid, workdir, lambda: timed(requests(engine, count)))
            folded = instructions(pid, workdir, lambda: timed(ledger.lifetime_spend(["x"])))
            stats = loop.run_until_complete(engine.redis.info("commandstats"))
            idle, idle_s = instructions(pid, workdir, lambda: _sleep(settled[1]))
            loop.run_until_complete(engine.close())
    calls = Counter({name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()})
    del calls["config|resetstat"]

    def per_request(total: int, seconds: float) -> int:
        return round(max(total - idle / idle_s * seconds, 0) / count)

    return {
        "requests": count,
        "commands_per_request": round(sum(calls.values()) / count, 2),
        "by_command": {name: round(n / count, 2) for name, n in calls.most_common()},
        "instructions_per_request": {
            "acquire_and_settle": per_request(*settled),
            "rollups": per_request(*folded),
        },
    }


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.settle_cost", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args(argv)
    if not callgrind_available():
        raise SystemExit("valgrind (with callgrind_control) is needed: apt-get install valgrind")
    print(json.dumps(measure(args.requests), indent=2))


if __name__ == "__main__":
    main()
