"""Instructions the sidecar executes per request, counted by valgrind's callgrind: a measure of
its CPU work per request that the load of a shared machine does not move (CPU seconds per
request moved by 30 % between runs of ``benchmarks.compare`` on a busy 2-core machine).

    python -m benchmarks.instructions [--requests 300] [--baseline DIR] [--out FILE]

The sidecar runs under callgrind with the benchmark's full set of limits (``services``); after
a warm-up the counters are zeroed, ``--requests`` requests are sent one at a time (a fifth of
them streamed, each from one of 32 end users), and the count is read back. The bare proxy
(``benchmarks.bare_proxy``, what any aiohttp proxy has to do) is then counted the same way
with the same requests, so "sidecar / bare proxy" is a measured ratio, the deterministic
counterpart of ``benchmarks.compare``'s requests/s ratio. With ``--baseline`` the sidecar of
another checkout (``git worktree add --detach /tmp/before <rev>``) is measured the same way,
at the same time as this one. Under callgrind a process runs some 50 times slower: a run
takes a few minutes, and needs valgrind.

The count is not wholly free of the machine's load: the sidecar's timed background work
(rollup folds, lease renewals, hold collection: about 1.2 M instructions a second idle) and
the event loop's turns per request grow as a busy machine slows the run down. Two runs of
the same code on a quiet machine agreed within 1 %; the same code counted 6 % more on a
2-core machine busy with other work. Hence the baseline runs alongside, under the same load;
the bare proxy, which runs nothing in the background, moved by 0.6 %.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import random
import secrets
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import yaml

from benchmarks import services
from benchmarks.redis_cost import callgrind_available, instructions
from ratelimiter.engine.embedded import free_port

END_USERS = 32
STREAM_SHARE = 0.2


def callgrind(root: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={root}/callgrind.out"]


@contextlib.contextmanager
def counted_sidecar(
    root: Path, upstream: str, redis_url: str, source: Path | None, name: str
) -> Iterator[services.Service]:
    """``ratelimiter serve`` under callgrind, with counting on from the start."""
    config = root / f"{name}.yaml"
    setup = services.SidecarSetup()
    config.write_text(yaml.safe_dump(services.sidecar_config(setup, upstream, redis_url)))
    key, port = "sk-" + secrets.token_hex(24), free_port()
    args = callgrind(root)
    args += [sys.executable, "-m", "ratelimiter.cli", "serve", "--config", str(config)]
    args += ["--port", str(port), "--workers", "1"]
    env = {"RATELIMITER_MASTER_KEY": key}
    if source is not None:
        env["PYTHONPATH"] = str(source.resolve())
    url = f"http://127.0.0.1:{port}"
    ready = "/health/readiness"
    with services.service(name, args, url, ready, root, env=env, timeout=900) as running:
        running.url, running.master_key = f"{url}/v1", key
        yield running


@contextlib.contextmanager
def counted_bare_proxy(root: Path, upstream: str) -> Iterator[services.Service]:
    """``benchmarks.bare_proxy`` under callgrind."""
    port = free_port()
    args = [*callgrind(root), sys.executable, "-m", "benchmarks.bare_proxy", "--port", str(port)]
    args += ["--upstream", upstream]
    url = f"http://127.0.0.1:{port}"
    with services.service("bare-proxy", args, url, "/v1/models", root, timeout=900) as running:
        running.url = f"{url}/v1"
        yield running


def send(base: str, keys: Sequence[str], count: int, rng: random.Random) -> float:
    """``count`` chat requests one at a time, as benchmarks.load draws them; the seconds
    they took."""
    started = time.perf_counter()
    content = "lorem " * 100
    for _ in range(count):
        body: dict[str, Any] = {
            "model": "bench-model",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 50,
            "user": f"bench-end-user-{rng.randrange(END_USERS)}",
        }
        if rng.random() < STREAM_SHARE:
            body["stream"] = True
        request = urllib.request.Request(
            f"{base}/chat/completions",
            data=orjson.dumps(body),
            headers={
                "Authorization": f"Bearer {rng.choice(keys)}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
    return time.perf_counter() - started


def count(
    proxy: services.Service, root: Path, keys: Sequence[str], requests: int, warmup: int
) -> float:
    """Instructions per request of ``proxy``: the same draw of requests for every proxy."""
    rng = random.Random(7)
    send(proxy.url, keys, warmup, rng)
    pid = proxy.process.pid
    counted, _ = instructions(pid, root, lambda: send(proxy.url, keys, requests, rng))
    return counted / requests


def measure(source: Path | None, requests: int, warmup: int) -> float:
    """Instructions per request of the sidecar of ``source`` (None: this checkout)."""
    with contextlib.ExitStack() as ctx:
        root = ctx.enter_context(services.workdir())
        upstream = ctx.enter_context(services.fake_upstream(root))
        redis = ctx.enter_context(services.redis_server(root))
        name = "sidecar" if source is None else "baseline"
        sidecar = ctx.enter_context(counted_sidecar(root, upstream.url, redis.url, source, name))
        keys = services.full_enforcement_keys(sidecar.url, sidecar.master_key, 4, ("bench-model",))
        return count(sidecar, root, keys, requests, warmup)


def measure_bare_proxy(requests: int, warmup: int) -> float:
    """Instructions per request of the bare proxy, for the requests the sidecar was sent (the
    keys are passed on unchecked, so any will do)."""
    with contextlib.ExitStack() as ctx:
        root = ctx.enter_context(services.workdir())
        upstream = ctx.enter_context(services.fake_upstream(root))
        bare = ctx.enter_context(counted_bare_proxy(root, upstream.url))
        keys = ["sk-" + secrets.token_hex(24) for _ in range(4)]
        return count(bare, root, keys, requests, warmup)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.instructions",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--requests", type=int, default=300, help="requests counted")
    p.add_argument("--warmup", type=int, default=50, help="requests sent before counting")
    p.add_argument("--baseline", type=Path, help="a checkout of an earlier version to compare")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/instructions.json"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not callgrind_available():
        raise SystemExit("valgrind (with callgrind_control) is needed: apt-get install valgrind")
    result: dict[str, Any] = {"requests": args.requests}
    # The baseline is counted at the same time as the sidecar: both meet the same load
    with concurrent.futures.ThreadPoolExecutor() as pool:
        sidecar = pool.submit(measure, None, args.requests, args.warmup)
        if args.baseline is not None:
            baseline = pool.submit(measure, args.baseline, args.requests, args.warmup)
            result["baseline"] = round(baseline.result())
        result["sidecar"] = round(sidecar.result())
    print(f"sidecar     {result['sidecar']:>12,} instructions per request")
    result["bare_proxy"] = round(measure_bare_proxy(args.requests, args.warmup))
    result["sidecar_over_bare_proxy"] = round(result["sidecar"] / result["bare_proxy"], 3)
    print(f"bare proxy  {result['bare_proxy']:>12,} instructions per request")
    print(f"sidecar / bare proxy: {result['sidecar_over_bare_proxy']}")
    if args.baseline is not None:
        result["sidecar_over_baseline"] = round(result["sidecar"] / result["baseline"], 3)
        print(f"baseline    {result['baseline']:>12,} instructions per request")
        print(f"sidecar / baseline: {result['sidecar_over_baseline']}")
    result["command"] = "python -m benchmarks.instructions " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
