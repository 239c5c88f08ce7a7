"""``ratelimiter serve``: the sidecar from the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import logging
import multiprocessing
import os
import signal
import socket
import sys
from datetime import UTC, date, datetime
from pathlib import Path

from aiohttp import web

from .engine import Engine
from .engine.connections import RedisSettings
from .engine.embedded import RedisServer
from .errors import RateLimiterError
from .gateway.app import create_app
from .gateway.config import ConfigError, Settings, load_config
from .gateway.http import SETTINGS
from .gateway.logs import configure_logging
from .gateway.reconcile import check
from .ledger.export import export
from .ledger.sink import TABLE, PostgresSink
from .testing.fake_upstream import FakeUpstream, create_fake_upstream

__all__ = ["main"]

log = logging.getLogger("ratelimiter")

# Net new container objects between collections of the young generation (CPython: 700).
GC_YOUNG_THRESHOLD = 7_000


def _log_format(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--log-format",
        choices=("json", "text"),
        # after the subcommand it overrides the top level's only when given
        default=default if default is not None else argparse.SUPPRESS,
        help="one JSON object per log line (default), or plain text",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratelimiter", description="LLM rate limiter sidecar")
    parser.add_argument("--version", action="version", version=f"ratelimiter {_version()}")
    _log_format(parser, "json")
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
    ledger = commands.add_parser(
        "ledger", help="export or check the spend ledger, or migrate its sink"
    )
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
    migrate = ledger_commands.add_parser(
        "migrate", help="create or upgrade the ledger sink's PostgreSQL table"
    )
    migrate.add_argument("--config", help="the sidecar's config.yaml (ledger_sink)")
    migrate.add_argument(
        "--sink", help="postgresql:// URL (default: RATELIMITER_LEDGER_SINK, then the config)"
    )
    key = commands.add_parser(
        "key", help="print the master key (saved under the data folder on first serve)"
    )
    key.add_argument("--config", help="the sidecar's config.yaml (its data_dir)")
    fake = commands.add_parser("fake-upstream", help="run a fake OpenAI-compatible upstream")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8000)
    fake.add_argument("--latency-ms", type=float, default=0.0, help="delay before answering")
    fake.add_argument("--error-rate", type=float, default=0.0, help="share of 500 answers, 0-1")
    for command in (serve, export, check, migrate, key, fake):
        _log_format(command, None)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("ratelimiter")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


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
    app = create_app(settings, engine)
    app.on_startup.append(_freeze_heap)
    return app


async def _freeze_heap(app: web.Application) -> None:
    """Once started (on_startup runs after every cleanup_ctx): what start-up built lives as
    long as the process, so the cyclic collector stops scanning it (gc.freeze), and it runs
    a tenth as often: a request's objects die by reference counting, so the young generation
    grows slowly and each of its collections only finds the few left in flight. Deployments'
    prices are looked up now, so the price data is loaded before, not on the first request."""
    for deployment in app[SETTINGS].models:
        _ = deployment.price
    gc.collect()
    gc.freeze()
    _, *older = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *older)


def _run_worker(
    settings: Settings, url: str, args: argparse.Namespace, announce: bool = True
) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    # SIGTERM: stop accepting, let in-flight requests finish for up to --shutdown-timeout, then
    # cancel the rest (each cancelled request releases or settles its reservation).
    web.run_app(
        _app(settings, url),
        host=args.host,
        port=args.port,
        # called once the port listens: the one line that says the sidecar is ready
        print=(lambda _: log.info(_ready_line(settings, url, args))) if announce else None,
        access_log=None,
        reuse_port=args.workers > 1,
        shutdown_timeout=args.shutdown_timeout,
    )


def _ready_line(settings: Settings, url: str, args: argparse.Namespace) -> str:
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    base = f"http://{host}:{args.port}"
    redis = "embedded, " if settings.redis_url is None else ""
    workers = f", {args.workers} workers" if args.workers > 1 else ""
    return (
        f"ratelimiter ready on {base} (listening on {args.host}:{args.port}{workers}); "
        f"admin UI {base}/ui; API docs {base}/docs; "
        f"Redis {redis}{RedisSettings.from_url(url).address}"
    )


def _check_port_free(host: str, port: int) -> None:
    """Before anything starts (an embedded Redis included): a second sidecar on a taken port
    must stop with one line, not a traceback after it has touched the first one's files."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise RateLimiterError(
                f"cannot listen on {host}:{port} ({exc.strerror}): another `ratelimiter "
                "serve` or another program is using it; stop it or pass --port"
            ) from None


def _run_workers(settings: Settings, url: str, args: argparse.Namespace) -> None:
    """N processes on one port (SO_REUSEPORT): the kernel spreads connections among them."""
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_run_worker, args=(settings, url, args, n == 0), daemon=False)
        for n in range(args.workers)
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
    settings = load_config(
        args.config, allow_weak_master_key=args.unsafe_allow_weak_master_key, master_key="create"
    )
    if not settings.models:
        log.warning(
            "%s: no models: every request will be a 404. Add a model_list entry (model_name, "
            "litellm_params.model and api_base), as in config.example.yaml",
            settings.source,
        )
    if args.workers < 1:
        raise RateLimiterError(f"--workers must be at least 1, got {args.workers}")
    _check_port_free(args.host, args.port)
    server = None
    url = settings.redis_url
    if url is None:
        server = RedisServer(settings.data_dir, die_with_parent=True).start()
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


def print_key(args: argparse.Namespace) -> int:
    settings = load_config(args.config, allow_weak_master_key=True, master_key="optional")
    if not settings.master_key:
        raise RateLimiterError(
            f"no master key: none is set (RATELIMITER_MASTER_KEY, general_settings.master_key) "
            f"and none was saved in {settings.data_dir}; `ratelimiter serve` makes one"
        )
    print(settings.master_key)
    return 0


async def _migrate(args: argparse.Namespace) -> int:
    """``ratelimiter ledger migrate``: the sink's table created or upgraded, its version
    printed. Needs PostgreSQL only, not Redis."""
    settings = load_config(args.config, allow_weak_master_key=True, master_key="optional")
    url = args.sink or settings.ledger_sink
    if not url:
        raise SystemExit(
            "no ledger sink: give --sink postgresql://…, set RATELIMITER_LEDGER_SINK, or set "
            "ratelimiter_settings.ledger_sink in the config"
        )
    sink = PostgresSink(url, schema=settings.ledger_sink_schema)
    try:
        before, after = await sink.migrate()
    finally:
        await sink.close()
    table = f"{sink.schema}.{TABLE}"
    if before == after:
        print(f"{table} is at schema version {after}, the latest")
    else:
        print(f"{table} upgraded from schema version {before} to {after}")
    return 0


async def _ledger(args: argparse.Namespace) -> int:
    if args.ledger_command == "migrate":
        return await _migrate(args)
    settings = load_config(args.config, allow_weak_master_key=True, master_key="optional")
    server = None
    url = settings.redis_url
    if url is None:  # the embedded Redis: the running sidecar's, else started for this command
        embedded = RedisServer(settings.data_dir)
        if embedded.answers():
            url = embedded.url
        else:
            server = embedded.start()
            url = server.url
    try:
        return await _ledger_command(args, settings, url)
    finally:
        if server is not None:
            server.stop()


async def _ledger_command(args: argparse.Namespace, settings: Settings, url: str) -> int:
    async with await Engine.connect(
        url, prefix=settings.key_prefix, timezone=settings.timezone
    ) as engine:
        if args.ledger_command == "check":
            problems = await check(engine, settings)
            for problem in problems:
                print(problem)
            print("ledger and counters agree" if not problems else f"{len(problems)} difference(s)")
            return 1 if problems else 0
        if args.ack and settings.ledger_sink:
            raise RateLimiterError(
                "--ack with a ledger sink configured would trim entries the sink has not "
                "shipped yet: the sink's shipper trims what it has committed; export without "
                "--ack (the entries shipped are in PostgreSQL)"
            )
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
        if args.command == "key":
            return print_key(args)
        return serve(args) if args.command == "serve" else fake_upstream(args)
    except BrokenPipeError:  # `ratelimiter ledger export | head`: the reader has all it wants
        # Python would complain again when it flushes stdout at exit: point it nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ConfigError as exc:
        print(f"ratelimiter: configuration error: {exc}", file=sys.stderr)
        return 2
    except RateLimiterError as exc:
        print(f"ratelimiter: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
