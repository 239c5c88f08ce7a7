"""Exactness under contention: several sidecar processes on one Redis, every limit asked for
ten times what it allows.

    python -m benchmarks.accuracy [--sidecars 4] [--oversubscribe 10] [--concurrency 64]

Four limits, each on its own key, each hit through all sidecars round-robin at once:
requests per minute, tokens per minute, parallel requests (against an upstream that takes
``--slow-ms`` to answer, so every request of the burst overlaps) and a dollar budget.
Reported per limit: what it allows, what was asked, what was admitted or used, the
over-admission (must be 0), and the under-admission share (capacity left unused although
demand was ten times higher). Exit status 1 when anything was over-admitted.

``--capacity-blocks SHARE`` puts the key's windows and budget on capacity blocks of 1/SHARE
(``ratelimiter_settings.capacity_blocks: {key: SHARE}``): each row then also gives the stated
bound of its under-admission, sidecars / SHARE of the limit (leases are never blocks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from benchmarks import services

# 360 characters: 90 prompt tokens by the sidecar's chars/4 estimate and by the fake upstream's
# count. Text completions, not chat: a chat estimate adds OpenAI's per-message framing, which
# the fake does not bill, and a token window could then not be filled to the last unit.
PROMPT = "lorem " * 60
MAX_TOKENS = 16


async def burst(
    urls: Sequence[str], key: str, model: str, count: int, concurrency: int
) -> list[dict[str, Any]]:
    """``count`` text completions spread round-robin over ``urls``; each one's status and usage."""
    targets = itertools.cycle(urls)
    plan = [next(targets) for _ in range(count)]
    results: list[dict[str, Any]] = []
    gate = asyncio.Semaphore(concurrency)
    body = orjson.dumps(
        {
            "model": model,
            "prompt": PROMPT,
            "max_tokens": MAX_TOKENS,
        }
    )
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(url: str) -> None:
            async with (
                gate,
                session.post(f"{url}/completions", data=body, headers=headers) as r,
            ):
                payload = orjson.loads(await r.read())
                results.append({"status": r.status, "usage": payload.get("usage")})

        await asyncio.gather(*(one(url) for url in plan))
    return results


def _row(limit: str, allowed: float, asked: float, used: float, unit: str) -> dict[str, Any]:
    over = max(0.0, used - allowed)
    return {
        "limit": limit,
        "unit": unit,
        "allowed": allowed,
        "asked": asked,
        "used": round(used, 9),
        "over_admitted": round(over, 9),
        "under_admission_share": round(max(0.0, allowed - used) / allowed, 4),
    }


async def measure(args: argparse.Namespace, urls: list[str], master_key: str) -> list[dict]:
    admin = urls[0]
    x = args.oversubscribe

    def key(**fields: Any) -> str:
        return services.admin_call(admin, master_key, "/key/generate", fields)["key"]

    def admitted(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in results if r["status"] == 200]

    rows = []
    rpm = args.rpm
    results = await burst(urls, key(rpm_limit=rpm), "bench-model", rpm * x, args.concurrency)
    rows.append(_row("requests per minute", rpm, rpm * x, len(admitted(results)), "requests"))

    # A token window fills with each request's estimate and is settled to its real usage.
    per_request = len(PROMPT) // 4 + MAX_TOKENS
    tpm = per_request * args.rpm
    results = await burst(urls, key(tpm_limit=tpm), "bench-model", args.rpm * x, args.concurrency)
    used = sum(r["usage"]["total_tokens"] for r in admitted(results))
    rows.append(_row("tokens per minute", tpm, tpm * x, used, "tokens"))

    parallel = args.parallel
    results = await burst(
        urls, key(max_parallel_requests=parallel), "slow-model", parallel * x, parallel * x
    )
    rows.append(
        _row("parallel requests", parallel, parallel * x, len(admitted(results)), "requests")
    )

    # The budget: about --rpm requests' worth of dollars.
    cost = (len(PROMPT) // 4) * services.PRICE_IN + MAX_TOKENS * services.PRICE_OUT
    budget = round(cost * args.rpm, 9)
    budget_key = key(max_budget=budget)
    await burst(urls, budget_key, "bench-model", args.rpm * x, args.concurrency)
    info = await asyncio.to_thread(_key_info, admin, master_key, budget_key)
    rows.append(_row("budget", budget, budget * x, info["info"]["spend"], "dollars"))
    return rows


def _key_info(base: str, master_key: str, key: str) -> dict[str, Any]:
    import urllib.parse
    import urllib.request

    url = base.removesuffix("/v1") + "/key/info?" + urllib.parse.urlencode({"key": key})
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {master_key}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return orjson.loads(response.read())


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    with contextlib.ExitStack() as ctx:
        root = ctx.enter_context(services.workdir())
        redis = ctx.enter_context(services.redis_server(root, appendonly=True))
        fast = ctx.enter_context(services.fake_upstream(root))
        slow = ctx.enter_context(services.fake_upstream(root, latency_ms=args.slow_ms))
        setup = services.SidecarSetup(
            models=("bench-model",),
            proxy_budget=None,
            end_user_budget=False,
            model_upstreams={"slow-model": slow.url},
        )
        if args.capacity_blocks:
            setup.extra_settings = {"capacity_blocks": {"key": args.capacity_blocks}}
        master_key = None
        urls = []
        for n in range(args.sidecars):
            sidecar = ctx.enter_context(
                services.sidecar(
                    root, fast.url, redis.url, setup, master_key=master_key, name=f"sidecar-{n}"
                )
            )
            master_key = sidecar.master_key
            urls.append(sidecar.url)
        assert master_key is not None
        return asyncio.run(measure(args, urls, master_key))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sidecars", type=int, default=4, help="sidecar processes on one Redis")
    p.add_argument("--oversubscribe", type=int, default=10, help="demand as a multiple of limit")
    p.add_argument("--rpm", type=int, default=200, help="the requests-per-minute limit")
    p.add_argument("--parallel", type=int, default=20, help="the parallel-requests limit")
    p.add_argument("--slow-ms", type=float, default=1000.0, help="the slow model's latency")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument(
        "--capacity-blocks",
        type=int,
        metavar="SHARE",
        help="admit the key's windows and budget from capacity blocks of 1/SHARE",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy.json"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    if args.capacity_blocks:
        for r in rows:
            if r["limit"] != "parallel requests":
                r["under_admission_bound"] = round(min(args.sidecars / args.capacity_blocks, 1), 4)
    print(f"{args.sidecars} sidecars on one Redis, demand {args.oversubscribe}x each limit:")
    for r in rows:
        bound = r.get("under_admission_bound")
        print(
            f"  {r['limit']:20} allowed {r['allowed']:>10g} {r['unit']:8} "
            f"used {r['used']:>10g}  over-admitted {r['over_admitted']:g}  "
            f"under-admission {r['under_admission_share']:.2%}"
            + ("" if bound is None else f" (blocks: at most {bound:.2%})")
        )
    report = {
        "sidecars": args.sidecars,
        "oversubscribe": args.oversubscribe,
        "capacity_blocks": args.capacity_blocks,
        "limits": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    over = [r["limit"] for r in rows if r["over_admitted"] > 0]
    if over:
        print(f"OVER-ADMITTED: {', '.join(over)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
