"""The ledger sink under load: how fast it ships, and whether Redis's memory stays flat.

    python -m benchmarks.sink [--rate 200] [--duration 30] [--collect-interval 1]

Two runs, each on a fresh Redis (AOF on) with the fake upstream and a fully enforcing sidecar
(the same scopes as ``benchmarks.compare``) driven at a steady ``--rate``: one with the ledger
sink shipping to a private PostgreSQL (``initdb``/``postgres`` of this machine), down for the
first ``--outage`` seconds, one without.
Every second it samples Redis's ``used_memory``, the memory and length of the ledger's streams
in Redis, and the rows in PostgreSQL. Reports per run: entries shipped per second against the
request rate, the most entries that waited in Redis, and the ledger's Redis memory per request
served (bounded by lag x rate with a sink; the size of an entry without one, for as long as
nobody runs ``ledger export --ack``). Writes JSON (``--out``, default
benchmarks/results/sink.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import redis as redis_sync

from benchmarks import load, services

LEDGER_PATTERN = "bench:*ledger:*"  # the sidecar's key prefix, then each slot group's streams


def ledger_in_redis(client: redis_sync.Redis) -> tuple[int, int]:
    """(entries, bytes) of every ledger stream in Redis."""
    entries = size = 0
    for key in client.scan_iter(match=LEDGER_PATTERN, _type="stream", count=1000):
        entries += int(client.xlen(key))
        size += int(client.memory_usage(key, samples=0) or 0)
    return entries, size


def rows_in(url: str | None, schema: str) -> int | None:
    if url is None:
        return None
    import asyncpg

    async def count() -> int:
        conn = await asyncpg.connect(url)
        try:
            return int(await conn.fetchval(f'SELECT count(*) FROM {schema}."LiteLLM_SpendLogs"'))
        except asyncpg.UndefinedTableError:
            return 0
        finally:
            await conn.close()

    return asyncio.run(count())


class Sampler(threading.Thread):
    """Samples Redis and PostgreSQL every ``every_s`` until stopped."""

    def __init__(self, redis_url: str, sink_url: str | None, every_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.client = redis_sync.Redis.from_url(redis_url)
        self.sink_url, self.every_s = sink_url, every_s
        self.samples: list[dict[str, Any]] = []
        self.done = threading.Event()
        self.started = time.monotonic()

    def sample(self) -> dict[str, Any]:
        entries, size = ledger_in_redis(self.client)
        return {
            "t": round(time.monotonic() - self.started, 2),
            "used_memory": int(self.client.info("memory")["used_memory"]),
            "ledger_entries": entries,
            "ledger_bytes": size,
            "rows": rows_in(self.sink_url, "ratelimiter"),
        }

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            with contextlib.suppress(Exception):  # a slow sample is skipped, not fatal
                self.samples.append(self.sample())


@contextlib.contextmanager
def database(with_sink: bool, outage_s: float) -> Iterator[str | None]:
    """A private PostgreSQL's URL, the server started ``outage_s`` seconds late (a backlog
    builds up in Redis meanwhile, and shipping it shows what the sink can do)."""
    if not with_sink:
        yield None
        return
    from ratelimiter.testing.postgres import PostgresServer

    server = PostgresServer()
    late = threading.Timer(outage_s, server.start)
    late.start()
    try:
        yield server.url
    finally:
        late.cancel()
        late.join()
        server.remove()


def one_run(args: argparse.Namespace, with_sink: bool) -> dict[str, Any]:
    models = ("bench-model",)
    with (
        services.workdir() as root,
        database(with_sink, args.outage) as sink_url,
        services.redis_server(root, appendonly=True) as redis,
        services.fake_upstream(root) as upstream,
    ):
        extra: dict[str, object] = {"collect_interval": args.collect_interval}
        if sink_url:
            extra["ledger_sink"] = sink_url
        setup = services.SidecarSetup(models, extra_settings=extra)
        with services.sidecar(root, upstream.url, redis.url, setup) as sidecar:
            keys = services.full_enforcement_keys(sidecar.url, sidecar.master_key, 10, models)
            plan = load.Plan(
                url=sidecar.url,
                mix=load.Mix(keys=tuple(keys), end_users=100),
                duration_s=args.duration,
                concurrency=64,
                rate=args.rate,
                warmup_s=0,
            )
            sampler = Sampler(redis.url, sink_url)
            sampler.start()
            report, _ = load.run(plan, 1, progress=False)
            time.sleep(args.collect_interval * 3)  # the last rounds ship what is left
            sampler.done.set()
            sampler.join()
            final = sampler.sample()
    return summarise(report, [*sampler.samples, final], with_sink)


def summarise(report: dict[str, Any], samples: list[dict[str, Any]], with_sink: bool) -> dict:
    served = report["answered"] + report["refused"]
    first, last = samples[0], samples[-1]
    shipped_per_s = peak_per_s = None
    if with_sink and last["rows"]:
        busy = [s for s in samples if s["rows"] is not None]
        span = max(busy[-1]["t"] - busy[0]["t"], 1e-9)
        shipped_per_s = round((busy[-1]["rows"] - busy[0]["rows"]) / span, 1)
        peak_per_s = round(
            max((b["rows"] - a["rows"]) / (b["t"] - a["t"]) for a, b in itertools.pairwise(busy)), 1
        )
    return {
        "sink": with_sink,
        "requests": served,
        "request_rate": round(report["answered_rps"], 1),
        "shipped_per_s": shipped_per_s,
        "peak_shipped_per_s": peak_per_s,
        "rows": last["rows"],
        "most_waiting": max(s["ledger_entries"] for s in samples),
        "waiting_at_end": last["ledger_entries"],
        "ledger_bytes_at_end": last["ledger_bytes"],
        "ledger_bytes_per_request": round(last["ledger_bytes"] / max(served, 1), 1),
        "most_ledger_bytes": max(s["ledger_bytes"] for s in samples),
        "used_memory_growth_per_request": round(
            (last["used_memory"] - first["used_memory"]) / max(served, 1), 1
        ),
        "median_ledger_entries": statistics.median(s["ledger_entries"] for s in samples),
        "samples": samples,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sink",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rate", type=float, default=200.0, help="requests per second, steady")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per run")
    p.add_argument(
        "--collect-interval", type=float, default=1.0, help="seconds between shipping rounds"
    )
    p.add_argument(
        "--outage",
        type=float,
        default=10.0,
        help="seconds PostgreSQL is down at the start: the backlog it leaves shows the most the "
        "sink ships a second, and that shipping resumes by itself",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sink.json"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    runs = [one_run(args, with_sink=True), one_run(args, with_sink=False)]
    for run in runs:
        label = "with the sink   " if run["sink"] else "without a sink  "
        shipped = (
            f"{run['shipped_per_s']}/s shipped (at most {run['peak_shipped_per_s']}/s)"
            if run["sink"]
            else "nothing shipped"
        )
        print(
            f"{label} {run['requests']} requests at {run['request_rate']}/s, {shipped}; "
            f"ledger in Redis at the end: {run['waiting_at_end']} entries, "
            f"{run['ledger_bytes_at_end']:,} bytes ({run['ledger_bytes_per_request']} B/request),"
            f" at most {run['most_waiting']} entries waiting"
        )
    result = {
        "command": "python -m benchmarks.sink " + " ".join(sys.argv[1:] if argv is None else argv),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
