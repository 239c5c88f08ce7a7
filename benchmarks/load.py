"""The load tool: OpenAI-style traffic against a sidecar (or any OpenAI-compatible base URL).

    python -m benchmarks.load --duration 10 --concurrency 32
    python -m benchmarks.load --url http://gateway:4000/v1 --key sk-... --rate 500 --plot out/

With no ``--url`` it starts its own stack first: Redis, the fake upstream and a sidecar
enforcing every scope (proxy, key, user, team, end user, key x model: requests, tokens, parallel
and budgets, ledger on), with ``--keys`` virtual keys. The mix is set by ``--models``,
``--end-users``, ``--stream-share``, ``--prompt-tokens`` and ``--completion-tokens``; the load by
``--concurrency`` (closed loop) or ``--rate`` (open loop: latency counts from the moment a
request was due, so a stalled server cannot hide its queue). ``--processes`` spreads the
clients over several processes when one Python process cannot generate enough load.

The report: throughput, latency p50/p90/p99/p99.9 of answered requests, time to first byte of
streams, 429s by reason, errors; ``--json`` writes it, ``--plot DIR`` draws latency over time
and its histogram (needs matplotlib: ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
    uvloop = None

PROGRESS_EVERY_S = 1.0
# warm-up requests, then measured ones: done, answered 2xx, refused 429, errors. One row per
# client process, written only by it; the measured four are exactly what the report counts.
COUNTERS = 5
MODELS_TIMEOUT_S = 10.0
REFUSAL_LABEL = re.compile(r" for (\S+?): ")
BUDGET_LABEL = re.compile(r"exceeded! ([\w ]+?)=")
LIMIT_TYPE = re.compile(r"Limit type: (\w+)")


ANTHROPIC_MODEL = "bench-claude"
SURFACE_PATHS = {"chat": "/chat/completions", "responses": "/responses", "messages": "/messages"}


@dataclass(frozen=True)
class Mix:
    """What each request looks like; every request draws its key, model, end user and
    streaming from these at random."""

    keys: tuple[str, ...]
    models: tuple[str, ...] = ("bench-model",)
    end_users: int = 0
    stream_share: float = 0.0
    prompt_tokens: int = 100
    completion_tokens: int = 16
    # (surface, weight): chat (/chat/completions), responses (/responses), messages
    # (Anthropic's /messages, sent to messages_model)
    surfaces: tuple[tuple[str, float], ...] = (("chat", 1.0),)
    messages_model: str = ANTHROPIC_MODEL


@dataclass(frozen=True)
class Plan:
    """One load run, as each client process gets it (rate and concurrency are per process)."""

    url: str
    mix: Mix
    duration_s: float
    concurrency: int = 32
    rate: float | None = None
    warmup_s: float = 1.0
    timeout_s: float = 60.0
    seed: int = 0


@dataclass
class Samples:
    """Raw measurements of one client process, in seconds from the start of measurement."""

    started: array = field(default_factory=lambda: array("d"))
    latency: array = field(default_factory=lambda: array("d"))
    ok: array = field(default_factory=lambda: array("b"))
    ttfb: array = field(default_factory=lambda: array("d"))
    refused: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    measured_s: float = 0.0
    sent: int = 0  # warm-up included: what the server saw

    def merge(self, other: Samples) -> None:
        for name in ("started", "latency", "ok", "ttfb"):
            getattr(self, name).extend(getattr(other, name))
        self.refused.update(other.refused)
        self.errors.update(other.errors)
        self.measured_s = max(self.measured_s, other.measured_s)
        self.sent += other.sent


def refusal_reason(payload: bytes) -> str:
    """The kind of limit and the scope a 429 names: ``requests (api_key)`` from LiteLLM's
    wording ("Rate limit exceeded for api_key: … Limit type: requests"), ``budget_exceeded
    (Key)`` from "Budget has been exceeded! Key=…", else the error type and the label after
    "for"."""
    try:  # OpenAI's envelope, or Anthropic's ({"type": "error", "error": {...}})
        error = orjson.loads(payload)["error"]
        message = error.get("message") or ""
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return "unparsed 429"
    label = REFUSAL_LABEL.search(message) or BUDGET_LABEL.search(message)
    kind = LIMIT_TYPE.search(message)
    what = kind.group(1) if kind else str(error.get("type"))
    return f"{what} ({label.group(1)})" if label else what


class Client:
    """One process's requests: draws each from the mix, sends it, records what happened."""

    def __init__(self, plan: Plan, session: aiohttp.ClientSession, counters: Any) -> None:
        self.plan, self.session, self.counters = plan, session, counters
        self.random = random.Random(plan.seed)
        self.samples = Samples()
        self.content = "lorem " * max(1, plan.mix.prompt_tokens * 4 // 6)
        self.base = plan.url.rstrip("/")
        self.kinds = [name for name, _ in plan.mix.surfaces]
        self.weights = [weight for _, weight in plan.mix.surfaces]
        self.measure_from = 0.0

    def request(self) -> tuple[str, bytes, dict[str, str], bool]:
        """(url, body, headers, streamed) of one request of the mix, in its surface's form."""
        mix, rng = self.plan.mix, self.random
        stream = rng.random() < mix.stream_share
        surface = rng.choices(self.kinds, self.weights)[0] if len(self.kinds) > 1 else self.kinds[0]
        ask = [{"role": "user", "content": self.content}]
        user = f"bench-end-user-{rng.randrange(mix.end_users)}" if mix.end_users else None
        body: dict[str, Any]
        if surface == "messages":
            most = mix.completion_tokens
            body = {"model": mix.messages_model, "messages": ask, "max_tokens": most}
            if user:
                body["metadata"] = {"user_id": user}
        elif surface == "responses":
            body = {
                "model": rng.choice(mix.models),
                "input": self.content,
                "max_output_tokens": mix.completion_tokens,
            }
        else:
            model, most = rng.choice(mix.models), mix.completion_tokens
            body = {"model": model, "messages": ask, "max_tokens": most}
        if stream:
            body["stream"] = True
        if user and surface != "messages":
            body["user"] = user
        key = rng.choice(mix.keys)
        headers = {"Content-Type": "application/json"}
        if surface == "messages":
            headers |= {"x-api-key": key, "anthropic-version": "2023-06-01"}
        else:
            headers["Authorization"] = f"Bearer {key}"
        return self.base + SURFACE_PATHS[surface], orjson.dumps(body), headers, stream

    async def one(self, due: float) -> None:
        url, body, headers, stream = self.request()
        first = float("nan")
        status, payload = 0, b""
        try:
            async with self.session.post(url, data=body, headers=headers) as response:
                status = response.status
                if stream and status == 200:
                    async for _ in response.content.iter_any():
                        if first != first:
                            first = time.perf_counter()
                else:
                    payload = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.record(due, status, f"{type(exc).__name__}", first)
            return
        reason = ""
        if status == 429:
            reason = refusal_reason(payload)
        elif status != 200:
            reason = f"HTTP {status}"
        self.record(due, status, reason, first)

    def record(self, due: float, status: int, reason: str, first: float) -> None:
        end = time.perf_counter()
        row = self.counters
        self.samples.sent += 1
        if due < self.measure_from:
            row[0] += 1
            return
        row[1] += 1
        s = self.samples
        s.started.append(due - self.measure_from)
        s.latency.append(end - due)
        s.ok.append(status == 200)
        if status == 200:
            row[2] += 1
            if first == first:
                s.ttfb.append(first - due)
        elif status == 429:
            row[3] += 1
            s.refused[reason] += 1
        else:
            row[4] += 1
            s.errors[reason or "HTTP error"] += 1

    async def closed_loop(self, until: float) -> None:
        async def worker() -> None:
            while time.perf_counter() < until:
                await self.one(time.perf_counter())

        await asyncio.gather(*(worker() for _ in range(self.plan.concurrency)))

    async def open_loop(self, until: float, rate: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        start, n = time.perf_counter(), 0
        while (due := start + n / rate) < until:
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            task = asyncio.ensure_future(self.one(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        await asyncio.gather(*tasks)


async def drive(plan: Plan, counters: Any) -> Samples:
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=plan.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        client = Client(plan, session, counters)
        now = time.perf_counter()
        client.measure_from = now + plan.warmup_s
        until = client.measure_from + plan.duration_s
        if plan.rate:
            await client.open_loop(until, plan.rate)
        else:
            await client.closed_loop(until)
        client.samples.measured_s = time.perf_counter() - client.measure_from
        return client.samples


def _child(plan: Plan, counters: Any, results: Any) -> None:
    runner = uvloop.run if uvloop else asyncio.run
    results.put(runner(drive(plan, counters)))


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of values sorted ascending."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def _ms(values: Sequence[float], qs: Sequence[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for q in qs:
        value = percentile(ordered, q)
        out[f"p{q:g}"] = None if value is None else round(value * 1000, 3)
    return out


def summarise(samples: Samples, plan: Plan, processes: int) -> dict[str, Any]:
    answered = [lat for lat, ok in zip(samples.latency, samples.ok, strict=True) if ok]
    seconds = samples.measured_s or plan.duration_s
    done = len(samples.latency)
    return {
        "url": plan.url,
        "mode": "rate" if plan.rate else "concurrency",
        "concurrency": None if plan.rate else max(1, plan.concurrency // processes) * processes,
        "rate": plan.rate,
        "processes": processes,
        "duration_s": round(seconds, 3),
        "requests": done,
        "sent_with_warmup": samples.sent,
        "answered": len(answered),
        "refused": sum(samples.refused.values()),
        "errors": sum(samples.errors.values()),
        "rps": round(done / seconds, 1),
        "answered_rps": round(len(answered) / seconds, 1),
        "latency_ms": _ms(answered, (50, 90, 99, 99.9)),
        "ttfb_ms": _ms(samples.ttfb, (50, 90, 99)) if samples.ttfb else None,
        "streams": len(samples.ttfb),
        "refused_by_reason": dict(samples.refused.most_common()),
        "errors_by_kind": dict(samples.errors.most_common()),
        "mix": {k: v for k, v in asdict(plan.mix).items() if k != "keys"}
        | {"keys": len(plan.mix.keys)},
    }


def _progress(counters: Sequence[Any], elapsed: float, plan: Plan, final: bool = False) -> str:
    """Counts the measured requests only, as the report does, so its last line and the report
    agree; until the warm-up ends it says how many warm-up requests went out."""
    warmup, done, ok, refused, errors = (sum(row[i] for row in counters) for i in range(COUNTERS))
    clock = f"[{elapsed:5.1f}s/{plan.warmup_s + plan.duration_s:.0f}s]"
    if not done and not final:
        return f"{clock} warming up: {warmup:,} requests (not counted)"
    # A rough rate while running (this clock includes starting the processes); the report
    # gives the measured one.
    rate = "done" if final else f"{done / max(elapsed - plan.warmup_s, 1e-3):,.0f}/s"
    return f"{clock} {done:,} requests  {rate}  ok {ok:,}  429 {refused:,}  errors {errors:,}"


def run(plan: Plan, processes: int = 1, progress: bool = True) -> tuple[dict[str, Any], Samples]:
    """Run ``plan`` in ``processes`` client processes (each gets its share of concurrency and
    rate) and merge what they measured."""
    ctx = multiprocessing.get_context("spawn")
    counters = [ctx.Array("q", COUNTERS, lock=False) for _ in range(processes)]
    results = ctx.Queue()
    per_process = Plan(
        **{
            **asdict(plan),
            "mix": plan.mix,
            "concurrency": max(1, plan.concurrency // processes),
            "rate": plan.rate / processes if plan.rate else None,
        }
    )
    children = []
    for i in range(processes):
        child_plan = Plan(**{**asdict(per_process), "mix": plan.mix, "seed": plan.seed + i})
        child = ctx.Process(target=_child, args=(child_plan, counters[i], results), daemon=True)
        child.start()
        children.append(child)
    start, last = time.monotonic(), 0.0
    merged, received = Samples(), 0
    tty = sys.stderr.isatty()
    while received < processes:
        with contextlib.suppress(Exception):
            merged.merge(results.get(timeout=0.2))
            received += 1
        elapsed = time.monotonic() - start
        if progress and elapsed - last >= (PROGRESS_EVERY_S if tty else 5.0):
            last = elapsed
            line = _progress(counters, elapsed, plan)
            print(f"\r{line}" if tty else line, end="" if tty else "\n", file=sys.stderr)
        if received < processes and not any(c.is_alive() for c in children) and results.empty():
            raise RuntimeError("a load-generating process died; see its output above")
    for child in children:
        child.join()
    if progress:  # the final counts, the same as the report's
        line = _progress(counters, time.monotonic() - start, plan, final=True)
        print(f"\r{line}" if tty else line, file=sys.stderr)
    return summarise(merged, plan, processes), merged


def _preview(key: str) -> str:
    return f"{key[:3]}...{key[-4:]}" if len(key) > 10 else "the key"


def served_models(url: str, key: str) -> list[str] | None:
    """The model names ``GET {url}/models`` lists for ``key``; None when the target has no such
    route (a plain upstream may not), in which case there is nothing to check."""
    request = urllib.request.Request(
        url.rstrip("/") + "/models", headers={"Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=MODELS_TIMEOUT_S) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 405):
            return None
        detail = exc.read().decode(errors="replace")[:300]
        raise SystemExit(
            f"{url}/models answered HTTP {exc.code} for {_preview(key)}: {detail}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SystemExit(f"cannot reach {url}: {reason}") from None
    try:
        return [str(model["id"]) for model in orjson.loads(payload)["data"]]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def check_models(url: str, keys: Sequence[str], models: Sequence[str]) -> None:
    """Stops before the run when the target does not serve a model of the mix to a key: a run
    of 404s measures nothing, and the report alone would not say why."""
    for key in dict.fromkeys(keys):
        served = served_models(url, key)
        if served is None:
            print(f"{url}/models is not there: the models were not checked", file=sys.stderr)
            return
        missing = [model for model in models if model not in served]
        if missing:
            offer = ", ".join(served) if served else "none"
            hint = f"; pass --models {' '.join(served)}" if served else ""
            raise SystemExit(
                f"{url} does not serve {', '.join(map(repr, missing))} to {_preview(key)}. "
                f"The models it serves to this key: {offer}{hint}"
            )


def format_report(report: dict[str, Any], title: str = "") -> str:
    lat, ttfb = report["latency_ms"], report["ttfb_ms"]
    lines = [
        title or report["url"],
        f"  {report['requests']:,} requests in {report['duration_s']}s: "
        f"{report['rps']:,} req/s ({report['answered_rps']:,} answered/s)",
        f"  ok {report['answered']:,}  429 {report['refused']:,}  errors {report['errors']:,}",
        "  latency ms   " + "  ".join(f"{k} {v}" for k, v in lat.items()),
    ]
    if ttfb:
        lines.append(
            f"  first byte   {'  '.join(f'{k} {v}' for k, v in ttfb.items())} "
            f"({report['streams']:,} streams)"
        )
    for title_, table in (("429", "refused_by_reason"), ("error", "errors_by_kind")):
        for reason, count in report[table].items():
            lines.append(f"  {title_:5}        {count:>8,}  {reason}")
    return "\n".join(lines)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None
    return plt


def _plain_number(value: float, _position: float) -> str:
    return f"{value:,.0f}" if value >= 1 else f"{value:g}"


def _plain_axis(axis: Any, *, log: bool) -> None:
    """Plain millisecond figures on the ticks (20, 50, 100, not matplotlib's 2x10^1 or an
    offset): a reader compares them with the report's numbers."""
    from matplotlib import ticker

    if log:
        axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_minor_formatter(ticker.NullFormatter())
    axis.set_major_formatter(ticker.FuncFormatter(_plain_number))


def latency_figures(samples: Samples, title: str) -> dict[str, Any]:
    """Latency over time (every answered request, and p50/p99 per second) and its histogram,
    as matplotlib figures by file name."""
    plt = _pyplot()
    answered = [
        (t, lat * 1000)
        for t, lat, ok in zip(samples.started, samples.latency, samples.ok, strict=True)
        if ok
    ]
    per_second: dict[int, list[float]] = {}
    for t, lat in answered:
        per_second.setdefault(int(t), []).append(lat)
    seconds = sorted(per_second)
    over_time, ax = plt.subplots(figsize=(9, 4))
    # Big and opaque enough to see where a few thousand requests fall, light enough to show
    # where they pile up.
    ax.scatter(
        [t for t, _ in answered],
        [lat for _, lat in answered],
        s=6,
        alpha=0.35,
        linewidths=0,
        label="a request",
        rasterized=True,
    )
    for q, style in ((50, "-"), (99, "--")):
        ax.plot(
            [s + 0.5 for s in seconds],
            [percentile(sorted(per_second[s]), q) for s in seconds],
            style,
            color="black",
            label=f"p{q} per second",
        )
    ax.set(xlabel="seconds", ylabel="latency (ms)", title=f"{title}: latency over time")
    ax.set_yscale("log")
    _plain_axis(ax.yaxis, log=True)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    histogram, ax = plt.subplots(figsize=(9, 4))
    ax.hist([lat for _, lat in answered], bins=100)
    ax.set(xlabel="latency (ms)", ylabel="requests", title=f"{title}: latency histogram")
    _plain_axis(ax.xaxis, log=False)
    _plain_axis(ax.yaxis, log=False)
    return {"latency-over-time.png": over_time, "latency-histogram.png": histogram}


def plot(samples: Samples, directory: Path, title: str) -> list[Path]:
    """The figures of :func:`latency_figures`, as PNGs in ``directory``."""
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, figure in latency_figures(samples, title).items():
        figure.savefig(directory / name, dpi=110, bbox_inches="tight")
        plt.close(figure)
        paths.append(directory / name)
    return paths


@contextlib.contextmanager
def own_sidecar(args: argparse.Namespace) -> Iterator[tuple[str, list[str]]]:
    """Redis, the fake upstream and a fully enforcing sidecar, for a run with no ``--url``."""
    from benchmarks import services

    models = tuple(args.models)
    anthropic = (ANTHROPIC_MODEL,) if "messages" in dict(args.surfaces) else ()
    setup = services.SidecarSetup(models, anthropic_models=anthropic)
    with (
        services.workdir() as root,
        services.redis_server(root, appendonly=True) as redis,
        services.fake_upstream(root, args.upstream_latency_ms) as upstream,
        services.sidecar(root, upstream.url, redis.url, setup, workers=args.workers) as sidecar,
    ):
        keys = services.full_enforcement_keys(
            sidecar.url, sidecar.master_key, args.keys, models + anthropic
        )
        yield sidecar.url, keys


def parse_surfaces(text: str) -> tuple[tuple[str, float], ...]:
    mix = []
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in SURFACE_PATHS:
            raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(SURFACE_PATHS)}")
        mix.append((name, float(weight or 1)))
    return tuple(mix)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description=__doc__.split("\n\n")[2],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", help="base URL to load (…/v1); default: start a sidecar stack")
    p.add_argument("--key", action="append", default=[], help="API key for --url (repeatable)")
    p.add_argument("--keys", type=int, default=10, help="keys to create in the started stack")
    p.add_argument("--workers", type=int, default=1, help="worker processes of the sidecar")
    p.add_argument("--upstream-latency-ms", type=float, default=0.0)
    p.add_argument("--models", nargs="+", default=["bench-model"])
    p.add_argument("--end-users", type=int, default=100, help="distinct `user` values, 0: none")
    p.add_argument("--stream-share", type=float, default=0.2, help="share of streaming requests")
    p.add_argument(
        "--surfaces",
        type=parse_surfaces,
        default=(("chat", 1.0),),
        help="the API surfaces to mix, with weights: chat=2,responses=1,messages=1 "
        f"(messages go to model {ANTHROPIC_MODEL}, an Anthropic-format deployment)",
    )
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--completion-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--rate", type=float, help="requests per second instead of --concurrency")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds run first, not measured")
    p.add_argument("--processes", type=int, default=1, help="load-generating processes")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--plot", type=Path, help="write PNG plots into this directory")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = p.parse_args(argv)
    if args.url and not args.key:
        p.error("--url needs at least one --key")
    if not 0 <= args.stream_share <= 1:
        p.error("--stream-share must be between 0 and 1")
    if args.concurrency < 1 or args.processes < 1 or (args.rate is not None and args.rate <= 0):
        p.error("--concurrency, --processes and --rate must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.url:
            url, keys = args.url, args.key
        else:
            url, keys = stack.enter_context(own_sidecar(args))
        check_models(url, keys, args.models)
        mix = Mix(
            keys=tuple(keys),
            models=tuple(args.models),
            end_users=args.end_users,
            stream_share=args.stream_share,
            prompt_tokens=args.prompt_tokens,
            completion_tokens=args.completion_tokens,
            surfaces=args.surfaces,
        )
        plan = Plan(
            url=url,
            mix=mix,
            duration_s=args.duration,
            concurrency=args.concurrency,
            rate=args.rate,
            warmup_s=args.warmup,
            seed=int.from_bytes(os.urandom(4), "big"),
        )
        report, samples = run(plan, args.processes, progress=not args.quiet)
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    if args.plot:
        for path in plot(samples, args.plot, url):
            print(f"  plot: {path}")


if __name__ == "__main__":
    main()
