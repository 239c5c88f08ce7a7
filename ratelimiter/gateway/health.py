"""Health routes and the start-up check of Redis's persistence settings."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..engine import Engine
from ..ledger.sink import read_lag
from ..responses import json_response
from .http import ENGINE, SETTINGS, is_master

__all__ = ["add_health_routes", "redis_health_warnings"]

log = logging.getLogger("ratelimiter.health")


async def health_liveliness(request: web.Request) -> web.Response:
    return json_response("I'm alive!")


async def health_readiness(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        await asyncio.wait_for(engine.redis.ping(), 2)
    except Exception as exc:
        log.error("readiness: Redis at %s: %s", engine.address, exc or "timeout")
        body = {"status": "unhealthy", "redis": "unreachable"}
        if is_master(request):  # operators may see where and why
            body["detail"] = f"Redis at {engine.address}: {exc or 'timeout'}"
        return json_response(body, 503)
    body = {"status": "healthy", "redis": "connected"}
    if request.app[SETTINGS].ledger_sink:
        body["ledger_sink"] = await _sink_detail(engine, is_master(request))
    return json_response(body)


async def _sink_detail(engine: Engine, master: bool) -> dict[str, object]:
    """The shipper's last round: what waits in Redis for PostgreSQL, and the last error. A
    sink behind does not make the sidecar unready (traffic is unaffected; entries wait).
    Only the master key sees the error's text (it may name the database's host)."""
    try:
        lag = await asyncio.wait_for(read_lag(engine), 2)
    except Exception as exc:
        return {"status": "unknown", "last_error": (str(exc) or "timeout") if master else None}
    if lag is None:
        return {"status": "starting", "lag_entries": None, "lag_seconds": None}
    return {
        "status": "error" if lag.error else "shipping",
        "lag_entries": lag.entries,
        "lag_seconds": round(lag.seconds, 3),
        "last_round_shipped": lag.shipped,
        "last_error": (lag.error or None) if master else None,
    }


async def redis_health_warnings(engine: Engine) -> list[str]:
    """What in Redis's configuration puts counters or the ledger at risk."""
    warnings = []
    try:
        persistence = await engine.redis.info("persistence")
        save = (await engine.redis.config_get("save")).get("save", "")
        policy = (await engine.redis.config_get("maxmemory-policy")).get("maxmemory-policy", "")
    except Exception as exc:
        return [
            f"could not read Redis's persistence settings ({exc}); check that AOF is on "
            "and maxmemory-policy is noeviction"
        ]
    if not int(persistence.get("aof_enabled", 0)) and not save:
        warnings.append(
            "Redis persistence is off (no AOF, no RDB snapshots): a restart "
            "loses every counter and the spend ledger; enable appendonly yes"
        )
    if policy and policy != "noeviction":
        warnings.append(
            f"Redis maxmemory-policy is {policy}: under memory pressure it may "
            "evict counters (admitting too much) or ledger entries; use noeviction"
        )
    return warnings


def add_health_routes(app: web.Application) -> None:
    app.router.add_get("/health/liveliness", health_liveliness)
    app.router.add_get("/health/readiness", health_readiness)
