"""How the sidecar scales: throughput against the number of sidecar worker processes and
against the number of distinct keys, with Redis's cost per admitted request.

    python -m benchmarks.scaling [--workers 1 2 4] [--keys 1 100 10000 100000] [--duration 10]

Each point is a fresh sidecar stack (Redis with AOF, the fake upstream, the sidecar with every
scope enforced) loaded by ``benchmarks.load`` at ``--concurrency``. Reported per point: answered
requests/s, p50/p99 latency, Redis CPU microseconds per admitted request (INFO cpu), and Redis
round trips per request: commands the sidecar sent, counted with MONITOR during a separate
short run at a low rate (MONITOR slows Redis, so it never runs during the measured run);
commands that Lua scripts issue inside Redis are not round trips and are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from benchmarks import compare, load, services

MONITOR_RATE = 50.0  # requests per second while counting round trips
MONITOR_SECONDS = 3.0


class RoundTrips:
    """Counts the commands clients send to Redis (not those Lua runs inside it) via MONITOR."""

    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.commands: Counter[str] = Counter()
        self.stop = threading.Event()

    def _run(self, sock: socket.socket) -> None:
        buffer = b""
        sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            *lines, buffer = (buffer + data).split(b"\r\n")
            for line in lines:
                # +1700000000.123456 [0 127.0.0.1:5555] "EVALSHA" ... ; Lua: [0 lua] "HGET"
                head, _, rest = line.partition(b"] ")
                if not rest or head.endswith(b" lua"):
                    continue
                self.commands[rest.split(b'"')[1].decode().lower()] += 1

    @contextlib.contextmanager
    def counting(self) -> Iterator[Counter[str]]:
        with socket.create_connection(self.address) as sock:
            sock.sendall(b"MONITOR\r\n")
            thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
            thread.start()
            try:
                yield self.commands
            finally:
                time.sleep(0.3)  # the last replies' commands are on their way
                self.stop.set()
                thread.join()


async def create_keys(base: str, master_key: str, count: int, fields: dict[str, Any]) -> list[str]:
    """``count`` keys through the admin API, 32 at a time."""
    headers = {"Authorization": f"Bearer {master_key}"}
    gate = asyncio.Semaphore(32)
    async with aiohttp.ClientSession(headers=headers) as session:

        async def one() -> str:
            async with gate, session.post(f"{base}/key/generate", json=fields) as response:
                payload = await response.json()
                if response.status != 200:
                    raise services.ServiceError(f"/key/generate answered {payload}")
                return payload["key"]

        return list(await asyncio.gather(*(one() for _ in range(count))))


def point(args: argparse.Namespace, workers: int, keys: int, scoped: bool) -> dict[str, Any]:
    """One measurement. ``scoped``: keys also belong to users and teams (six scopes); else
    each key has its own limits only (proxy, key, key x model and end-user scopes), which is
    what creating 100k keys in reasonable time allows."""
    models = ("bench-model",)
    with (
        services.workdir() as root,
        services.redis_server(root, appendonly=True) as redis,
        services.fake_upstream(root) as upstream,
        services.sidecar(
            root, upstream.url, redis.url, services.SidecarSetup(models), workers=workers
        ) as sidecar,
    ):
        admin = sidecar.url.removesuffix("/v1")
        if scoped:
            tokens = services.full_enforcement_keys(sidecar.url, sidecar.master_key, keys, models)
        else:
            limits = {
                **services.UNREACHED,
                "max_budget": services.UNREACHED_BUDGET,
                "model_rpm_limit": dict.fromkeys(models, services.UNREACHED["rpm_limit"]),
                "model_tpm_limit": dict.fromkeys(models, services.UNREACHED["tpm_limit"]),
            }
            tokens = asyncio.run(create_keys(admin, sidecar.master_key, keys, limits))
        mix = load.Mix(
            keys=tuple(tokens),
            models=models,
            end_users=args.end_users,
            stream_share=args.stream_share,
        )
        plan = load.Plan(
            url=sidecar.url,
            mix=mix,
            duration_s=args.duration,
            concurrency=args.concurrency,
            warmup_s=args.warmup,
        )
        before = compare.redis_counters(redis.url)
        report, _ = load.run(plan, args.processes, progress=not args.quiet)
        after = compare.redis_counters(redis.url)
        sent = report["requests"] * (args.warmup + args.duration) / args.duration
        monitored = load.Plan(
            url=sidecar.url, mix=mix, duration_s=MONITOR_SECONDS, rate=MONITOR_RATE, warmup_s=0
        )
        with RoundTrips(redis.url).counting() as commands:
            counted, _ = load.run(monitored, 1, progress=False)
    per_request = {k: round(v / max(1, counted["requests"]), 2) for k, v in commands.items()}
    return {
        "workers": workers,
        "keys": keys,
        "answered_rps": report["answered_rps"],
        "latency_ms": report["latency_ms"],
        "refused": report["refused"],
        "errors": report["errors"],
        "redis_cpu_us_per_request": round((after["cpu"] - before["cpu"]) / sent * 1e6),
        "redis_round_trips_per_request": round(sum(per_request.values()), 2),
        "round_trips_by_command": per_request,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--keys", type=int, nargs="+", default=[1, 100, 10_000, 100_000])
    p.add_argument("--workers-keys", type=int, default=10, help="keys for the workers series")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--processes", type=int, default=1, help="load-generating processes")
    p.add_argument("--end-users", type=int, default=100)
    p.add_argument("--stream-share", type=float, default=0.2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling.json"))
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def _print(title: str, rows: list[dict[str, Any]], column: str) -> None:
    print(title)
    for r in rows:
        print(
            f"  {column} {r[column]:>7,}  {r['answered_rps']:>8,.0f} answered/s  "
            f"p50 {r['latency_ms']['p50']:7.2f} ms  p99 {r['latency_ms']['p99']:7.2f} ms  "
            f"Redis {r['redis_cpu_us_per_request']} us/request, "
            f"{r['redis_round_trips_per_request']} round trips/request"
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    by_workers = [point(args, w, args.workers_keys, scoped=True) for w in args.workers]
    _print("throughput against sidecar worker processes:", by_workers, "workers")
    by_keys = [point(args, 1, k, scoped=False) for k in args.keys]
    _print("throughput against distinct keys (1 worker, key-own limits):", by_keys, "keys")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"by_workers": by_workers, "by_keys": by_keys}
    args.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
