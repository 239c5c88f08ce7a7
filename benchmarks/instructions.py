"""Instructions the sidecar executes per request, counted by valgrind's callgrind: a measure of
its CPU work per request that the load of a shared machine does not move (CPU seconds per
request moved by 30 % between runs of ``benchmarks.compare`` on a busy 2-core machine).

    python -m benchmarks.instructions [--requests 300] [--baseline DIR]

The sidecar runs under callgrind with the benchmark's full set of limits (``services``); after
a warm-up the counters are zeroed, ``--requests`` requests are sent one at a time (a fifth of
them streamed, each from one of 32 end users), and the count is read back. With ``--baseline``
the sidecar of another checkout (``git worktree add --detach /tmp/before <rev>``) is measured
the same way afterwards. Under callgrind the sidecar runs some 50 times slower: it takes
minutes, and needs ``valgrind`` on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import re
import secrets
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import orjson
import yaml

from benchmarks import services
from ratelimiter.engine.embedded import free_port

END_USERS = 32
STREAM_SHARE = 0.2


@contextlib.contextmanager
def counted_sidecar(
    root: Path, upstream: str, redis_url: str, source: Path | None, name: str
) -> Iterator[services.Service]:
    """``ratelimiter serve`` under callgrind, with counting on from the start."""
    config = root / f"{name}.yaml"
    setup = services.SidecarSetup()
    config.write_text(yaml.safe_dump(services.sidecar_config(setup, upstream, redis_url)))
    key, port = "sk-" + secrets.token_hex(24), free_port()
    args = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={root / name}.%p.out"]
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


def send(base: str, keys: Sequence[str], count: int, rng: random.Random) -> None:
    """``count`` chat requests one at a time, as benchmarks.load draws them."""
    content = "lorem " * 100
    for _ in range(count):
        body = {
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
            if response.status != 200:
                raise services.ServiceError(f"the sidecar answered {response.status}")


def counted(pid: int, root: Path, name: str) -> int:
    """Instructions counted since the last zeroing (a dump is written and read)."""
    before = set(root.glob(f"{name}.*.out*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    dumps = sorted(set(root.glob(f"{name}.*.out*")) - before, key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise services.ServiceError("callgrind wrote no dump")
    found = re.search(r"^(?:summary|totals): (\d+)", dumps[-1].read_text(), re.MULTILINE)
    if found is None:
        raise services.ServiceError(f"no instruction total in {dumps[-1]}")
    return int(found.group(1))


def measure(source: Path | None, name: str, requests: int, warmup: int) -> float:
    with contextlib.ExitStack() as ctx:
        root = ctx.enter_context(services.workdir())
        upstream = ctx.enter_context(services.fake_upstream(root))
        redis = ctx.enter_context(services.redis_server(root))
        sidecar = ctx.enter_context(counted_sidecar(root, upstream.url, redis.url, source, name))
        keys = services.full_enforcement_keys(sidecar.url, sidecar.master_key, 4, ("bench-model",))
        rng = random.Random(7)
        send(sidecar.url, keys, warmup, rng)
        pid = sidecar.process.pid
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
        send(sidecar.url, keys, requests, rng)
        return counted(pid, root, name) / requests


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--baseline", type=Path, help="a checkout to measure the same way")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not on PATH")
    ours = measure(None, "sidecar", args.requests, args.warmup)
    print(f"sidecar   {ours / 1e6:8.3f} M instructions per request")
    if args.baseline is not None:
        before = measure(args.baseline, "baseline", args.requests, args.warmup)
        print(f"baseline  {before / 1e6:8.3f} M instructions per request")
        print(f"sidecar / baseline: {ours / before:.3f}")


if __name__ == "__main__":
    main()
