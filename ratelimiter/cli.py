"""``ratelimiter serve``: the sidecar from the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
from datetime import UTC, date, datetime
from pathlib import Path

from aiohttp import web

from .engine import Engine
from .engine.embedded import RedisServer
from .errors import RateLimiterError
from .gateway.app import create_app
from .gateway.config import ConfigError, Settings, load_config
from .gateway.logs import configure_logging
from .gateway.reconcile import check
from .ledger.export import export
from .testing.fake_upstream import FakeUpstream, create_fake_upstream

__all__ = ["main"]

log = logging.getLogger("ratelimiter")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratelimiter", description="LLM rate limiter sidecar")
    parser.add_argument(
        "--log-format",
        choices=("json", "text"),
        default="json",
        help="one JSON object per log line (default), or plain text",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the sidecar")
    serve.add_argument("--config", help="LiteLLM-style config.yaml")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=4000)
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGTERM",
    )
    serve.add_argument(
        "--unsafe-allow-weak-master-key",
        action="store_true",
        help="accept a short or published master key (throwaway setups only)",
    )
    ledger = commands.add_parser("ledger", help="export or check the spend ledger")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", required=True)
    export = ledger_commands.add_parser("export", help="write ledger entries as JSONL or CSV")
    export.add_argument("--config", help="the sidecar's config.yaml (Redis URL, key prefix)")
    export.add_argument("--since", type=date.fromisoformat, required=True, help="YYYY-MM-DD")
    export.add_argument("--until", type=date.fromisoformat, help="YYYY-MM-DD, default today")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--out", type=Path, help="file to write (default: standard output)")
    export.add_argument(
        "--ack", action="store_true", help="trim the exported entries from Redis once written"
    )
    check = ledger_commands.add_parser("check", help="reconcile the ledger with the counters")
    check.add_argument("--config", help="the sidecar's config.yaml (Redis URL, key prefix)")
    fake = commands.add_parser("fake-upstream", help="run a fake OpenAI-compatible upstream")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8000)
    fake.add_argument("--latency-ms", type=float, default=0.0, help="delay before answering")
    fake.add_argument("--error-rate", type=float, default=0.0, help="share of 500 answers, 0-1")
    return parser


def fake_upstream(args: argparse.Namespace) -> int:
    if not 0 <= args.error_rate <= 1:
        raise RateLimiterError(f"--error-rate must be between 0 and 1, got {args.error_rate}")
    fake = FakeUpstream(latency_ms=args.latency_ms, error_rate=args.error_rate)
    log.info("fake upstream on http://%s:%d/v1", args.host, args.port)
    web.run_app(
        create_fake_upstream(fake), host=args.host, port=args.port, print=None, access_log=None
    )
    return 0


async def _app(settings: Settings, url: str) -> web.Application:
    engine = await Engine.connect(
        url,
        prefix=settings.key_prefix,
        timezone=settings.timezone,
        hold_ttl_ms=round(settings.hold_ttl_s * 1000),
    )
    return create_app(settings, engine)


def _run_worker(settings: Settings, url: str, args: argparse.Namespace) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    # SIGTERM: stop accepting, let in-flight requests finish for up to --shutdown-timeout, then
    # cancel the rest (each cancelled request releases or settles its reservation).
    web.run_app(
        _app(settings, url),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        reuse_port=args.workers > 1,
        shutdown_timeout=args.shutdown_timeout,
    )


def _run_workers(settings: Settings, url: str, args: argparse.Namespace) -> None:
    """N processes on one port (SO_REUSEPORT): the kernel spreads connections among them."""
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_run_worker, args=(settings, url, args), daemon=False)
        for _ in range(args.workers)
    ]
    for worker in workers:
        worker.start()
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.pid and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for worker in workers:
        worker.join()
    if not stopping:
        raise RateLimiterError("a worker exited on its own; see its log")


def serve(args: argparse.Namespace) -> int:
    settings = load_config(args.config, allow_weak_master_key=args.unsafe_allow_weak_master_key)
    if args.workers < 1:
        raise RateLimiterError(f"--workers must be at least 1, got {args.workers}")
    server = None
    url = settings.redis_url
    if url is None:
        server = RedisServer(settings.data_dir).start()
        url = server.url
    try:
        if args.workers == 1:
            _run_worker(settings, url, args)
        else:
            log.info("starting %d workers on port %d", args.workers, args.port)
            _run_workers(settings, url, args)
    finally:
        if server is not None:
            server.stop()
    return 0


async def _ledger(args: argparse.Namespace) -> int:
    settings = load_config(args.config, allow_weak_master_key=True)
    if settings.redis_url is None:
        raise RateLimiterError(
            "set REDIS_URL or ratelimiter_settings.redis_url: the ledger "
            "lives in the sidecar's Redis"
        )
    async with await Engine.connect(
        settings.redis_url, prefix=settings.key_prefix, timezone=settings.timezone
    ) as engine:
        if args.ledger_command == "check":
            problems = await check(engine, settings)
            for problem in problems:
                print(problem)
            print("ledger and counters agree" if not problems else f"{len(problems)} difference(s)")
            return 1 if problems else 0
        until = args.until or datetime.now(UTC).date()
        out = args.out.open("w", newline="") if args.out else sys.stdout
        try:
            await export(engine, args.since, until, args.format, out, ack=args.ack)
        finally:
            if args.out:
                out.close()
        return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(json=args.log_format == "json")
    try:
        if args.command == "ledger":
            return asyncio.run(_ledger(args))
        return serve(args) if args.command == "serve" else fake_upstream(args)
    except ConfigError as exc:
        print(f"ratelimiter: configuration error: {exc}", file=sys.stderr)
        return 2
    except RateLimiterError as exc:
        print(f"ratelimiter: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
