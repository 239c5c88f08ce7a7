"""The sidecar against what it sits between, in one run on one machine.

    python -m benchmarks.compare [--runs 3] [--duration 10] [--concurrency 32]

Targets, each loaded with the same mix by the same load tool (``benchmarks.load``):
(1) the fake upstream called directly; (2) a bare aiohttp pass-through proxy
(``benchmarks.bare_proxy``); (3) the sidecar with full enforcement (proxy, key, user, team, end
user and key x model scopes; requests, tokens, parallel and budgets; ledger on; Redis with AOF);
(4) LiteLLM's proxy against the same upstream when ``litellm`` is installed (``pip install -e
'.[litellm]'`` or ``LITELLM_BIN``): one worker and no database, so it enforces nothing;
(5) with ``--baseline DIR``, the sidecar of another checkout (``git worktree add --detach
/tmp/before <rev>``), on a Redis of its own, under the same load: a change's effect measured
against the code before it in the same run.

Runs are interleaved (1 2 3 4 1 2 3 4 ...) so drift of a shared machine touches all alike; each
figure is the median of ``--runs``. Besides throughput and latency it reports the CPU time
each server process spent per request, and Redis's commands per request: where the time goes.
Writes JSON (``--out``, default benchmarks/results/compare.json).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from benchmarks import load, services

TARGETS = ("upstream", "bare_proxy", "sidecar", "baseline", "litellm")
TARGET_RATIO_TO_BARE = 0.60
TARGET_ADDED_P50_MS, TARGET_ADDED_P99_MS = 1.0, 3.0
TARGET_LITELLM_MULTIPLE = 30.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children that are still running."""
    pids = [str(pid)]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        pids += subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
        ).stdout.split()
    total = 0.0
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def redis_counters(redis_url: str) -> dict[str, float]:
    """Redis's own CPU seconds and its command calls, from INFO."""
    import redis as redis_sync

    client = redis_sync.Redis.from_url(redis_url)
    try:
        cpu = client.info("cpu")
        stats = client.info("commandstats")
    finally:
        client.close()
    calls = {name.removeprefix("cmdstat_"): float(v["calls"]) for name, v in stats.items()}
    return {"cpu": cpu["used_cpu_user"] + cpu["used_cpu_sys"], **calls}


def await_settlements(redis_url: str, quiet_s: float = 0.2, limit_s: float = 3.0) -> None:
    """Wait until the sidecar stops calling Redis: settlements run after the response, so the
    last requests' may still be on their way when the load tool returns."""
    deadline = time.monotonic() + limit_s
    calls = redis_counters(redis_url).get("evalsha", 0.0)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = redis_counters(redis_url).get("evalsha", 0.0)
        if now == calls:
            return
        calls = now


def await_idle(
    pids: Sequence[int], busy: float = 0.05, every_s: float = 0.5, limit_s: float = 15.0
) -> None:
    """Wait until ``pids`` use less than ``busy`` of a core: after a saturating run the sidecar
    still folds its ledger entries into rollups for a while, which a latency measured at a
    steady rate would otherwise pay for (and the faster sidecar, with more entries, more)."""
    deadline = time.monotonic() + limit_s
    used = sum(cpu_seconds(pid) for pid in pids)
    while time.monotonic() < deadline:
        time.sleep(every_s)
        now = sum(cpu_seconds(pid) for pid in pids)
        if now - used < busy * every_s:
            return
        used = now


@contextlib.contextmanager
def stack(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Every target, started once and kept up for all runs."""
    models = ("bench-model",)
    anthropic = (load.ANTHROPIC_MODEL,) if "messages" in dict(args.surfaces) else ()
    setup = services.SidecarSetup(models, anthropic_models=anthropic)
    ours = setup
    if args.capacity_blocks:  # the sidecar's own setting: a baseline before it has none
        blocks = {"capacity_blocks": args.capacity_blocks.split(",")}
        ours = dataclasses.replace(setup, extra_settings=blocks)
    with contextlib.ExitStack() as ctx:
        root = ctx.enter_context(services.workdir())
        upstream = ctx.enter_context(services.fake_upstream(root))
        bare = ctx.enter_context(services.bare_proxy(root, upstream.url))
        redis = ctx.enter_context(services.redis_server(root, appendonly=True))
        sidecar = ctx.enter_context(services.sidecar(root, upstream.url, redis.url, ours))
        keys = services.full_enforcement_keys(
            sidecar.url, sidecar.master_key, args.keys, models + anthropic
        )
        targets: dict[str, Any] = {
            "upstream": (upstream, ("unused",)),
            "bare_proxy": (bare, ("unused",)),
            "sidecar": (sidecar, tuple(keys)),
        }
        redises = {"sidecar": redis}
        if args.baseline:
            redises["baseline"] = ctx.enter_context(
                services.redis_server(root, appendonly=True, name="redis-baseline")
            )
            before = ctx.enter_context(
                services.sidecar(
                    root,
                    upstream.url,
                    redises["baseline"].url,
                    setup,
                    name="baseline",
                    source=args.baseline,
                )
            )
            before_keys = services.full_enforcement_keys(
                before.url, before.master_key, args.keys, models + anthropic
            )
            targets["baseline"] = (before, tuple(before_keys))
        binary = None if args.no_litellm else services.litellm_binary()
        if binary and anthropic:
            print("LiteLLM skipped: its config here has no Anthropic-format deployment")
        elif binary:
            litellm = ctx.enter_context(services.litellm_proxy(root, binary, upstream.url, models))
            targets["litellm"] = (litellm, (litellm.master_key,))
        elif not args.no_litellm:
            print("LiteLLM not installed: its row stays empty (pip install -e '.[litellm]')")
        yield {"targets": targets, "redis": redises, "upstream": upstream}


def one_run(
    name: str,
    target: Any,
    keys: Sequence[str],
    up: Any,
    args: argparse.Namespace,
    redis: Any | None,
) -> dict[str, Any]:
    """One load run against one target; ``redis``: the target's own Redis, if it has one."""
    plan = load.Plan(
        url=target.url,
        mix=load.Mix(
            keys=tuple(keys),
            end_users=args.end_users,
            stream_share=args.stream_share,
            prompt_tokens=args.prompt_tokens,
            completion_tokens=args.completion_tokens,
            surfaces=args.surfaces,
        ),
        duration_s=args.duration,
        concurrency=args.concurrency,
        warmup_s=args.warmup,
    )
    watched = {"server": target.process.pid}
    if target is not up:
        watched["upstream"] = up.process.pid
    before = {k: cpu_seconds(pid) for k, pid in watched.items()}
    redis_before = redis_counters(redis.url) if redis is not None else None
    report, _ = load.run(plan, args.processes, progress=not args.quiet)
    if redis is not None:
        await_settlements(redis.url)
    after = {k: cpu_seconds(pid) for k, pid in watched.items()}
    # Warm-up requests use CPU too: charge per request over every request sent.
    sent = max(1, report["sent_with_warmup"])
    report["cpu_us_per_request"] = {k: round((after[k] - before[k]) / sent * 1e6) for k in watched}
    if redis_before is not None:
        redis_after = redis_counters(redis.url)
        report["cpu_us_per_request"]["redis"] = round(
            (redis_after["cpu"] - redis_before["cpu"]) / sent * 1e6
        )
        report["redis_calls_per_request"] = {
            k: round((v - redis_before.get(k, 0.0)) / sent, 2)
            for k, v in redis_after.items()
            if k in ("evalsha", "eval") and v > redis_before.get(k, 0.0)
        }
    if args.rate:
        # Latency with the machine not saturated: what a request costs, without queueing.
        paced = dataclasses.replace(plan, rate=args.rate, duration_s=args.rate_duration)
        quiet = [*watched.values(), *([redis.process.pid] if redis is not None else [])]
        await_idle(quiet)
        at_rate, _ = load.run(paced, 1, progress=False)
        report["at_rate"] = {"rate": args.rate, "latency_ms": at_rate["latency_ms"]}
    return report


def median_of(reports: Sequence[dict[str, Any]], *path: str) -> float | None:
    values = []
    for report in reports:
        value: Any = report
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            values.append(value)
    return round(statistics.median(values), 3) if values else None


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rps = {name: median_of(reports, "answered_rps") for name, reports in runs.items()}
    p50 = {name: median_of(reports, "latency_ms", "p50") for name, reports in runs.items()}
    p99 = {name: median_of(reports, "latency_ms", "p99") for name, reports in runs.items()}
    sidecar, bare, litellm = rps.get("sidecar"), rps.get("bare_proxy"), rps.get("litellm")
    # Added latency per run pair, then the median: pairs share the machine's state.
    added50 = [
        s["latency_ms"]["p50"] - b["latency_ms"]["p50"]
        for s, b in zip(runs.get("sidecar", []), runs.get("bare_proxy", []), strict=False)
    ]
    added99 = [
        s["latency_ms"]["p99"] - b["latency_ms"]["p99"]
        for s, b in zip(runs.get("sidecar", []), runs.get("bare_proxy", []), strict=False)
    ]
    ratio = round(sidecar / bare, 3) if sidecar and bare else None
    paced = _paced(runs, "sidecar")
    multiple = round(sidecar / litellm, 1) if sidecar and litellm else None
    # Per run pair, then the median, like the added latency: pairs share the machine's state.
    against_baseline = [
        s["answered_rps"] / b["answered_rps"]
        for s, b in zip(runs.get("sidecar", []), runs.get("baseline", []), strict=False)
        if s.get("answered_rps") and b.get("answered_rps")
    ]
    out = {
        "sidecar_rps": sidecar,
        "bare_proxy_rps": bare,
        "upstream_rps": rps.get("upstream"),
        "litellm_rps": litellm,
        "baseline_rps": rps.get("baseline"),
        "ratio_to_baseline": (
            round(statistics.median(against_baseline), 3) if against_baseline else None
        ),
        "ratio_to_bare_proxy": ratio,
        "ratio_to_litellm": multiple,
        "added_p50_ms": round(statistics.median(added50), 3) if added50 else None,
        "added_p99_ms": round(statistics.median(added99), 3) if added99 else None,
        "added_p50_ms_at_rate": _median_gap(paced, "p50"),
        "added_p99_ms_at_rate": _median_gap(paced, "p99"),
        "baseline_added_p50_ms_at_rate": _median_gap(_paced(runs, "baseline"), "p50"),
        "baseline_added_p99_ms_at_rate": _median_gap(_paced(runs, "baseline"), "p99"),
        "p50_ms": p50,
        "p99_ms": p99,
        "cpu_us_per_request": {
            name: {
                k: median_of(reports, "cpu_us_per_request", k)
                for k in reports[0].get("cpu_us_per_request", {})
            }
            for name, reports in runs.items()
            if reports
        },
        "redis_calls_per_request": {
            k: median_of(runs.get("sidecar", []), "redis_calls_per_request", k)
            for k in (runs.get("sidecar") or [{}])[0].get("redis_calls_per_request", {})
        },
    }
    # The latency targets are for a machine that is not saturated (DESIGN: "at a steady 200
    # requests/s"); under full load the added latency is queueing behind the sidecar's CPU.
    out["targets"] = {
        "ratio_to_bare_proxy": _verdict(ratio, TARGET_RATIO_TO_BARE, at_least=True),
        "added_p50_ms_at_rate": _verdict(
            out["added_p50_ms_at_rate"], TARGET_ADDED_P50_MS, at_least=False
        ),
        "added_p99_ms_at_rate": _verdict(
            out["added_p99_ms_at_rate"], TARGET_ADDED_P99_MS, at_least=False
        ),
        "ratio_to_litellm": _verdict(multiple, TARGET_LITELLM_MULTIPLE, at_least=True),
    }
    return out


def _paced(runs: dict[str, list[dict[str, Any]]], name: str) -> list[tuple[dict, dict]]:
    """Per run pair, the latencies at the steady rate of ``name`` and of the bare proxy."""
    return [
        (s["at_rate"]["latency_ms"], b["at_rate"]["latency_ms"])
        for s, b in zip(runs.get(name, []), runs.get("bare_proxy", []), strict=False)
        if "at_rate" in s and "at_rate" in b
    ]


def _median_gap(pairs: Sequence[tuple[dict, dict]], q: str) -> float | None:
    gaps = [a[q] - b[q] for a, b in pairs if a[q] is not None and b[q] is not None]
    return round(statistics.median(gaps), 3) if gaps else None


def _verdict(value: float | None, target: float, at_least: bool) -> str:
    if value is None:
        return "not measured"
    met = value >= target if at_least else value <= target
    return f"{'met' if met else 'MISSED'} ({value} vs {'>=' if at_least else '<='} {target})"


def print_summary(summary: dict[str, Any]) -> None:
    print("\nmedians over the runs (answered requests/s, latency ms):")
    for name in TARGETS:
        if summary["p50_ms"].get(name) is None:
            continue
        rps = summary[f"{name}_rps"]
        cpu = summary["cpu_us_per_request"].get(name, {})
        cost = ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if v is not None)
        print(
            f"  {name:11} {rps:>9,.0f}/s  p50 {summary['p50_ms'][name]:8.2f}  "
            f"p99 {summary['p99_ms'][name]:8.2f}  CPU us/request: {cost}"
        )
    print(f"  Redis calls per request: {summary['redis_calls_per_request']}")
    if summary["ratio_to_baseline"] is not None:
        print(f"  sidecar / baseline sidecar: {summary['ratio_to_baseline']}x requests/s")
    if summary["added_p50_ms_at_rate"] is not None:
        print(
            f"  added latency at a steady {summary['rate']}/s: "
            f"p50 {summary['added_p50_ms_at_rate']} ms, p99 {summary['added_p99_ms_at_rate']} ms"
        )
    if summary["baseline_added_p50_ms_at_rate"] is not None:
        print(
            f"  the baseline's at that rate: p50 {summary['baseline_added_p50_ms_at_rate']} ms, "
            f"p99 {summary['baseline_added_p99_ms_at_rate']} ms"
        )
    for name, verdict in summary["targets"].items():
        print(f"  {name:22} {verdict}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--processes", type=int, default=1, help="load-generating processes")
    p.add_argument("--keys", type=int, default=10)
    p.add_argument("--end-users", type=int, default=100)
    p.add_argument("--stream-share", type=float, default=0.2)
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--completion-tokens", type=int, default=16)
    p.add_argument(
        "--surfaces",
        type=load.parse_surfaces,
        default=(("chat", 1.0),),
        help="the API surfaces to mix, with weights, as benchmarks.load takes them: "
        "chat=2,responses=1,messages=1",
    )
    p.add_argument(
        "--rate", type=float, default=200.0, help="also measure latency at this steady rate (0: no)"
    )
    p.add_argument("--rate-duration", type=float, default=5.0)
    p.add_argument("--no-litellm", action="store_true", help="skip LiteLLM even if installed")
    p.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of an earlier version: its sidecar is measured too, on its own Redis",
    )
    p.add_argument(
        "--capacity-blocks",
        metavar="SCOPES",
        help="the sidecar admits these scopes' limits from capacity blocks "
        "(ratelimiter_settings.capacity_blocks), e.g. proxy,deployment",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/compare.json"))
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {}
    with stack(args) as started:
        for run in range(args.runs):
            for name, (target, keys) in started["targets"].items():
                redis = started["redis"].get(name)
                report = one_run(name, target, keys, started["upstream"], args, redis)
                runs.setdefault(name, []).append(report)
                print(load.format_report(report, f"run {run + 1}/{args.runs}: {name}"))
    summary = summarise(runs) | {"rate": args.rate or None}
    print_summary(summary)
    result = {
        "command": "python -m benchmarks.compare "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
