"""What a request costs Redis, counted in instructions: the same figure however busy the machine.

    python -m benchmarks.redis_cost [--requests 300] [--baseline DIR]

Runs ``redis-server`` (AOF on, as in production) under valgrind's callgrind, which counts the
instructions Redis executes instead of timing them: two runs of the same code give the same
figures within a fraction of a percent, with other work on the machine or not. For each
workload the counters are zeroed, ``--requests`` operations run one after another, and the
count is dumped; Redis's own timers (cron, AOF flushes) run meanwhile, so an idle stretch of
the same length is measured too and subtracted. Workloads:

- ``trivial_evalsha``: a script that returns 1, the yardstick;
- ``enforced_request``: a fully enforced request, acquired and settled with its ledger entry:
  six scopes (proxy, key, user, team, end user, key x model), each with requests and tokens
  per minute and a daily budget, leases on two (20 limits), six rollup dimensions;
- ``hot_scope``: the same cycle on the proxy scope alone, which every request passes through.

Each figure is also given as a multiple of the trivial EVALSHA's, so it survives a change of
Redis build. The enforced request's count is also split by where it goes (``callgrind_annotate``,
inclusive, by Redis function): the scripts in all, of which the ``redis.call``s with their
commands, their replies turned into Lua values and msgpack; what is left of the scripts is the
Lua interpreter running their own code. Propagating the writes to the AOF comes on top.
``--baseline DIR`` runs the same against the engine of another checkout (``git worktree add
--detach /tmp/before <rev>``) in a second Redis, for a before/after in one run.
Writes JSON (``--out``, default benchmarks/results/redis_cost.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

WORKLOADS = ("trivial_evalsha", "enforced_request", "hot_scope")
DIMENSIONS = ("key:k", "user:u", "team:t", "end_user:e", "model:m", "org:o")
META = b"m" * 300  # about what the sidecar's ledger metadata weighs
START_TIMEOUT_S = 60.0
TOTALS = re.compile(rb"^(?:totals|summary): (\d+)", re.MULTILINE)


# Where an enforced request's instructions go: Redis functions whose inclusive counts split it
# (Redis 7's names; a build without one leaves its part out).
PARTS = {
    "scripts": "evalGenericCommand",
    "redis_calls": "scriptCall",
    "replies_to_lua": "parseReply",
    "msgpack_unpack": "mp_unpack",
    "msgpack_pack": "mp_pack",
    "aof_propagation": "propagatePendingCommands",
}
ANNOTATED = re.compile(r"^\s*([\d,]+) .*?:(\w+) \[", re.MULTILINE)


def callgrind_available() -> bool:
    return bool(shutil.which("valgrind") and shutil.which("callgrind_control"))


@contextlib.contextmanager
def redis_under_callgrind(workdir: Path) -> Iterator[tuple[str, int]]:
    """``redis-server`` with AOF under callgrind, collecting from the start; yields its URL and
    pid. Counting is zeroed and dumped around each workload with ``callgrind_control``."""
    from ratelimiter.engine.embedded import find_server_binary, free_port

    port = free_port()
    args = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir}/callgrind.out"]
    args += [str(find_server_binary()), "--port", str(port), "--bind", "127.0.0.1"]
    args += ["--save", "", "--appendonly", "yes", "--dir", str(workdir)]
    log = (workdir / "redis.log").open("wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(port, process, workdir)
        yield f"redis://127.0.0.1:{port}/0", process.pid
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(30)
        if process.poll() is None:
            process.kill()
        log.close()


def _wait_for(port: int, process: subprocess.Popen[bytes], workdir: Path) -> None:
    import redis as redis_sync

    deadline = time.monotonic() + START_TIMEOUT_S
    client = redis_sync.Redis(port=port, socket_timeout=5)
    while True:
        with contextlib.suppress(redis_sync.RedisError):
            if client.ping():
                client.close()
                return
        if process.poll() is not None or time.monotonic() > deadline:
            log = (workdir / "redis.log").read_text(errors="replace")
            raise RuntimeError(f"redis-server under valgrind did not start:\n{log[-2000:]}")
        time.sleep(0.2)


def instructions(pid: int, workdir: Path, run: Callable[[], float]) -> tuple[int, float]:
    """Instructions Redis executed while ``run`` ran, and how long it took (s)."""
    before = set(workdir.glob("callgrind.out*"))
    subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
    seconds = run()
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    (dump,) = set(workdir.glob("callgrind.out*")) - before
    match = TOTALS.search(dump.read_bytes())
    if match is None:
        raise RuntimeError(f"no instruction total in {dump}")
    return int(match.group(1)), seconds


async def _workloads(url: str) -> tuple[dict[str, Callable[[], Awaitable[None]]], Any]:
    """The workloads, and the engine to close once they are done."""
    from benchmarks.engine import (
        ACTUALS,
        HELD_LEASE_MS,
        TRIVIAL_SCRIPT,
        admitted,
        request_limits,
        scope_limits,
    )
    from ratelimiter import Engine, connect

    redis = await connect(url)
    engine = Engine(redis, prefix="cost:")
    sha = await redis.script_load(TRIVIAL_SCRIPT)
    everything = request_limits("cost", 1, HELD_LEASE_MS)
    hot = scope_limits("cost", "proxy", 0, HELD_LEASE_MS)

    async def trivial() -> None:
        await redis.evalsha(sha, 1, "cost:{trivial}")

    async def cycle(limits: Sequence[Any]) -> None:
        decision = await engine.acquire(None, limits, meta=META, ledger=DIMENSIONS)
        await engine.settle(admitted(decision), ACTUALS)

    jobs = {
        "trivial_evalsha": trivial,
        "enforced_request": lambda: cycle(everything),
        "hot_scope": lambda: cycle(hot),
    }
    return jobs, engine


def measure(requests: int) -> dict[str, Any]:
    """Instructions per operation of each workload, on a fresh Redis under callgrind."""
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory(prefix="rl-cost-") as tmp, contextlib.closing(loop):
        workdir = Path(tmp)
        with redis_under_callgrind(workdir) as (url, pid):
            jobs, engine = loop.run_until_complete(_workloads(url))

            def timed(job: Callable[[], Awaitable[None]]) -> Callable[[], float]:
                async def many() -> None:
                    for _ in range(requests):
                        await job()

                def go() -> float:
                    start = time.monotonic()
                    loop.run_until_complete(many())
                    return time.monotonic() - start

                return go

            for job in jobs.values():  # scripts loaded, keys made: steady state from here
                timed(job)()
            counts: dict[str, tuple[int, float]] = {}
            parts: dict[str, int] = {}
            for name, job in jobs.items():
                counts[name] = instructions(pid, workdir, timed(job))
                if name == "enforced_request":
                    parts = where_it_goes(_newest_dump(workdir), requests)
            # Redis's timers tick whatever it serves; their rate, from an idle stretch.
            longest = max(seconds for _, seconds in counts.values())
            idle, idle_s = instructions(pid, workdir, lambda: _sleep(longest))
            loop.run_until_complete(engine.close())
    per_s = idle / idle_s
    per_op = {
        name: round(max(total - per_s * seconds, 0) / requests)
        for name, (total, seconds) in counts.items()
    }
    trivial = per_op["trivial_evalsha"]
    return {
        "instructions_per_op": per_op,
        "multiple_of_trivial_evalsha": {
            name: round(value / trivial, 1) for name, value in per_op.items()
        },
        "enforced_request_parts": parts,
        "idle_instructions_per_s": round(per_s),
        "requests": requests,
    }


def _newest_dump(workdir: Path) -> Path:
    return max(workdir.glob("callgrind.out*"), key=lambda path: path.stat().st_mtime_ns)


def where_it_goes(dump: Path, requests: int) -> dict[str, int]:
    """Instructions per request in each of PARTS, and the scripts' own Lua work (what is left
    of them), from one dump."""
    annotated = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(dump)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    inclusive: dict[str, int] = {}
    for count, function in ANNOTATED.findall(annotated):
        inclusive.setdefault(function, int(count.replace(",", "")))
    parts = {
        part: inclusive[function] // requests
        for part, function in PARTS.items()
        if function in inclusive
    }
    inside = ("redis_calls", "replies_to_lua", "msgpack_unpack", "msgpack_pack")
    if "scripts" in parts and all(part in parts for part in inside):
        parts["lua_own_work"] = parts["scripts"] - sum(parts[part] for part in inside)
    return parts


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def measure_checkout(source: Path, requests: int) -> dict[str, Any]:
    """The same measurement with the engine (and its scripts) of checkout ``source``."""
    args = [sys.executable, "-m", "benchmarks.redis_cost", "--worker", "--requests", str(requests)]
    args += ["--source", str(source.resolve())]
    done = subprocess.run(args, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {source} failed:\n{done.stderr.decode()[-3000:]}")
    return orjson.loads(done.stdout)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.redis_cost",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--requests", type=int, default=300, help="operations per workload")
    p.add_argument("--baseline", type=Path, help="a checkout of an earlier version to compare")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/redis_cost.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def print_result(name: str, result: dict[str, Any]) -> None:
    print(f"{name}: Redis instructions per operation ({result['requests']} each)")
    for workload, count in result["instructions_per_op"].items():
        multiple = result["multiple_of_trivial_evalsha"][workload]
        print(f"  {workload:17} {count:>12,}  ({multiple}x a trivial EVALSHA)")
    parts = result.get("enforced_request_parts", {})
    if parts:
        split = ", ".join(f"{part} {count:,}" for part, count in parts.items())
        print(f"  enforced_request, per request: {split}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        # this checkout's benchmarks, the other checkout's engine: it comes first on the path
        sys.path.insert(0, str(args.source))
        sys.stdout.buffer.write(orjson.dumps(measure(args.requests)))
        return
    if not callgrind_available():
        raise SystemExit("valgrind (with callgrind_control) is needed: apt-get install valgrind")
    result: dict[str, Any] = {"current": measure(args.requests)}
    print_result("this checkout", result["current"])
    if args.baseline:
        result["baseline"] = measure_checkout(args.baseline, args.requests)
        print_result(f"baseline {args.baseline}", result["baseline"])
        result["current_over_baseline"] = {
            name: round(count / result["baseline"]["instructions_per_op"][name], 3)
            for name, count in result["current"]["instructions_per_op"].items()
        }
        print(f"  this checkout / baseline: {result['current_over_baseline']}")
    result["command"] = "python -m benchmarks.redis_cost " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
