"""The aiohttp application: one factory that only composes, shared state in ``web.AppKey``s
(``http``), lifecycle in ``cleanup_ctx``. Errors leave in OpenAI's envelope, never as a
traceback."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from ..engine import Engine
from ..errors import RedisUnavailable
from ..ledger import collect_expired_holds
from ..ledger.rollups import fold_forever
from ..ledger.sink import PostgresSink, Shipper, read_lag
from .admin import add_admin_routes
from .alerts import add_alerts
from .config import Settings
from .health import add_health_routes, redis_health_warnings
from .hosted_budgets import add_hosted_budget_routes
from .http import ENGINE, MAX_BODY_BYTES, SETTINGS, SINK, STORE, edge_middleware, tag_response
from .metrics import SINK_LAG, add_metrics
from .proxy import add_proxy_routes
from .store import Store
from .tracing import add_tracing
from .ui import add_ui_routes

__all__ = ["create_app"]

log = logging.getLogger("ratelimiter.server")


def create_app(settings: Settings, engine: Engine) -> web.Application:
    """The sidecar: ``engine`` is connected by the caller and closed with the app."""
    app = web.Application(middlewares=[edge_middleware], client_max_size=MAX_BODY_BYTES)
    app.on_response_prepare.append(tag_response)
    app[SETTINGS] = settings
    app[ENGINE] = engine
    app[STORE] = Store(engine.redis, prefix=settings.key_prefix, address=engine.address)
    app.cleanup_ctx.append(_lifecycle)
    app.cleanup_ctx.append(_fold_rollups)
    add_health_routes(app)
    add_metrics(app)
    if settings.ledger_sink:
        app[SINK_LAG] = functools.partial(read_lag, engine)
    add_admin_routes(app)
    add_hosted_budget_routes(app)
    add_proxy_routes(app)
    add_ui_routes(app)
    add_alerts(app)
    add_tracing(app)
    return app


async def _fold_rollups(app: web.Application) -> AsyncIterator[None]:
    """The rollup consumer, in every sidecar (see ``ledger.rollups``); stopped before
    ``_lifecycle`` closes the engine."""
    task = asyncio.create_task(fold_forever(app[ENGINE]))
    yield
    task.cancel()
    await asyncio.wait([task], timeout=2)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    for warning in await redis_health_warnings(app[ENGINE]):
        log.warning(warning)
    try:
        await app[ENGINE].preload()
    except RedisUnavailable as exc:  # loaded on first use once Redis answers
        log.warning("could not load the Lua scripts yet: %s", exc)

    settings, shipper = app[SETTINGS], None
    if settings.ledger_sink:
        sink = app[SINK] = PostgresSink(settings.ledger_sink, schema=settings.ledger_sink_schema)
        shipper = Shipper(app[ENGINE], sink)
        try:  # create or upgrade the table now; if PostgreSQL is down, the shipper will
            before, after = await asyncio.wait_for(sink.migrate(), sink.timeout_s)
            shipper.migrated = True
            log.info(
                "ledger sink: PostgreSQL schema %s at version %d%s",
                sink.schema,
                after,
                "" if before == after else f" (was {before})",
            )
        except Exception as exc:
            log.warning("ledger sink: PostgreSQL not ready (%s); entries wait in Redis", exc)
    tasks = [
        asyncio.create_task(app[STORE].listen()),
        asyncio.create_task(
            collect_expired_holds(app[ENGINE], settings.collect_interval_s, shipper)
        ),
    ]
    yield
    for task in tasks:
        task.cancel()
    # bounded: a connection torn down mid-read must not hold the shutdown
    await asyncio.wait(tasks, timeout=2)
    if SINK in app:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(app[SINK].close(), 5)
    await asyncio.wait_for(app[ENGINE].close(), 5)
