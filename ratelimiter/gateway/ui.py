"""The admin web UI at ``/ui``: static files shipped in the package (no CDN, no build step),
and the few read-only views the admin API lacks, all behind the master key. The browser keeps
the master key in its session storage only and sends it as a bearer token."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from ..engine.connections import translate_errors
from ..engine.durations import parse_duration, period_bounds, time_zone
from ..responses import json_response
from .admin import access
from .admin.common import lifetime_spends
from .http import ENGINE, SETTINGS, STORE
from .metrics import METRICS
from .priority import deployment_shares
from .resolver import may_call
from .shadow_counts import shadow_refusals_today

__all__ = ["add_ui_routes"]

STATIC = Path(__file__).resolve().parent / "static"
LIVE_EVERY_S = 1.0
LIVE_STALE_S = 5.0
# The page's sparkline covers a minute, one point a second, and its 429 list the last few
# seconds. Each sidecar keeps that history itself, so the page draws both from its first poll
# instead of waiting to difference two of its own.
LIVE_HISTORY = 60
LIVE_REFUSED_S = 10
FILES = {"app.js": "text/javascript", "style.css": "text/css"}
# Everything comes from the sidecar itself: a page that loads nothing else cannot leak the key.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(
        STATIC / name, headers={**SECURITY_HEADERS, "Content-Type": FILES[name]}
    )


async def redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


async def budgets(request: web.Request) -> web.Response:
    """Every budget with when its current period ends and what uses it."""
    await access.view(request)
    store, settings = request.app[STORE], request.app[SETTINGS]
    users: dict[str, dict[str, int]] = {}
    for kind in ("key", "customer"):
        for entity in await store.all(kind):
            if entity.get("budget_id"):
                counts = users.setdefault(entity["budget_id"], {"key": 0, "customer": 0})
                counts[kind] += 1
    now_ms = int(time.time() * 1000)
    rows = []
    for budget in await store.all("budget"):
        budget_id = budget["budget_id"]
        reset = None
        if budget.get("budget_duration"):
            duration = parse_duration(budget["budget_duration"])
            reset = period_bounds(duration, now_ms, time_zone(settings.timezone))[1]
        counts = users.get(budget_id, {"key": 0, "customer": 0})
        rows.append(
            {
                **budget,
                "budget_reset_at": reset,
                "keys": counts["key"],
                "customers": counts["customer"],
            }
        )
    return json_response(rows)


def entities(kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``/user/list``, ``/team/list``, ``/customer/list``: every entity of a kind, each with
    its lifetime ``spend`` (read for all of them at once)."""
    id_field = {"user": "user_id", "team": "team_id", "customer": "user_id"}[kind]

    async def handler(request: web.Request) -> web.Response:
        await access.view(request)
        found = await request.app[STORE].all(kind)
        spends = await lifetime_spends(request, kind, [e[id_field] for e in found])
        return json_response([{**e, "spend": spends[e[id_field]]} for e in found])

    return handler


async def model_info(request: web.Request) -> web.Response:
    """The configured deployments, as LiteLLM's ``/model/info`` shows them (no API keys):
    to a virtual key, only those it may call."""
    caller = await access.caller_of(request)
    settings = request.app[SETTINGS]
    data = [
        {
            "model_name": d.model_name,
            "litellm_params": {
                "model": d.model,
                "api_base": d.api_base,
                "rpm": d.rpm,
                "tpm": d.tpm,
                "input_cost_per_token": d.input_cost_per_token,
                "output_cost_per_token": d.output_cost_per_token,
            },
            "model_info": {
                "id": d.deployment_id,
                "access_groups": list(d.access_groups),
                "priority_reservation": deployment_shares(
                    settings.priority_reservation, d.rpm, d.tpm
                ),
            },
        }
        for d in settings.models
        if may_call(caller, d, settings)
    ]
    return json_response({"data": data})


def _counter(metric: Any) -> dict[tuple[str, ...], float]:
    totals: dict[tuple[str, ...], float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                totals[tuple(sample.labels.values())] = sample.value
    return totals


def _own_counts(app: web.Application) -> dict[str, Any]:
    metrics = app[METRICS]
    proxied = sum(
        v
        for (route, _), v in _counter(metrics.requests).items()
        if route.endswith(("completions", "embeddings"))
    )
    return {
        "requests": proxied,
        "refused": _by_reason(metrics.refusals),
        "shadow_refused": _by_reason(metrics.shadow_refusals),
    }


def _by_reason(metric: Any) -> dict[str, float]:
    """A counter labelled by scope and reason, as ``reason (scope)`` -> count."""
    counts: dict[str, float] = {}
    for (scope, reason), value in _counter(metric).items():
        label = f"{reason} ({scope})"
        counts[label] = counts.get(label, 0) + value
    return counts


def _live_key(app: web.Application) -> str:
    return f"{app[SETTINGS].key_prefix}{{live}}"


def _recent(snapshots: deque[dict[str, Any]]) -> dict[str, Any]:
    """Requests per second for each second of the history (oldest first), and refusals by
    reason over the last LIVE_REFUSED_S seconds, from one sidecar's snapshots."""
    shots = list(snapshots)
    rates = [
        max(b["requests"] - a["requests"], 0) / max(b["at"] - a["at"], 0.001)
        for a, b in itertools.pairwise(shots)
    ]
    recent: dict[str, dict[str, float]] = {"refused": {}, "shadow_refused": {}}
    if shots:
        first, last = shots[max(len(shots) - 1 - LIVE_REFUSED_S, 0)], shots[-1]
        for what, grown in recent.items():
            for reason, value in last[what].items():
                if value > first[what].get(reason, 0):
                    grown[reason] = value - first[what].get(reason, 0)
    return {
        "rates": rates,
        "recent_refused": recent["refused"],
        "recent_shadow_refused": recent["shadow_refused"],
    }


async def _publish_counts(app: web.Application) -> AsyncIterator[None]:
    """Behind a load balancer each poll of the page reaches any sidecar: every sidecar puts
    its counters and their recent history in one Redis hash each second, and the page reads
    their sum."""
    me = uuid.uuid4().hex
    snapshots: deque[dict[str, Any]] = deque(maxlen=LIVE_HISTORY + 1)

    async def publish() -> None:
        redis = app[ENGINE].redis
        while True:
            snapshots.append({**_own_counts(app), "at": time.time()})
            with contextlib.suppress(Exception):  # the page shows stale figures, that is all
                counts = {**snapshots[-1], **_recent(snapshots)}
                await redis.hset(_live_key(app), me, orjson.dumps(counts))
            await asyncio.sleep(LIVE_EVERY_S)

    task = asyncio.create_task(publish())
    yield
    task.cancel()
    with contextlib.suppress(Exception):
        await app[ENGINE].redis.hdel(_live_key(app), me)


async def live(request: web.Request) -> web.Response:
    """Every sidecar's counters, summed: totals, requests per second for each of the last
    LIVE_HISTORY seconds (oldest first, zeros before a sidecar started), and refusals by
    reason in the last LIVE_REFUSED_S seconds."""
    await access.view(request)
    app, now = request.app, time.time()
    with translate_errors(app[ENGINE].address):
        published = await app[ENGINE].redis.hgetall(_live_key(app))
    total: dict[str, Any] = {"requests": 0.0, "refused": {}, "shadow_refused": {}}
    rps = [0.0] * LIVE_HISTORY
    recent: dict[str, float] = {}
    recent_shadow: dict[str, float] = {}
    sidecars, stale = 0, []
    for sidecar, raw in published.items():
        counts = orjson.loads(raw)
        if counts["at"] < now - LIVE_STALE_S:
            stale.append(sidecar)  # stopped without saying so
            continue
        sidecars += 1
        total["requests"] += counts["requests"]
        for reason, value in counts["refused"].items():
            total["refused"][reason] = total["refused"].get(reason, 0) + value
        # Sidecars tick within a second of each other: their newest seconds line up.
        for i, rate in enumerate(reversed(counts.get("rates", [])[-LIVE_HISTORY:])):
            rps[-1 - i] += rate
        for reason, value in counts.get("recent_refused", {}).items():
            recent[reason] = recent.get(reason, 0) + value
        # a sidecar of a version before shadow mode publishes none
        for reason, value in counts.get("shadow_refused", {}).items():
            total["shadow_refused"][reason] = total["shadow_refused"].get(reason, 0) + value
        for reason, value in counts.get("recent_shadow_refused", {}).items():
            recent_shadow[reason] = recent_shadow.get(reason, 0) + value
    if stale:
        with translate_errors(app[ENGINE].address):
            await app[ENGINE].redis.hdel(_live_key(app), *stale)
    return json_response(
        {
            "at": now,
            "sidecars": sidecars,
            **total,
            "rps": rps,
            "recent_refused": recent,
            "recent_shadow_refused": recent_shadow,
            "recent_seconds": LIVE_REFUSED_S,
        }
    )


async def shadow_refusals(request: web.Request) -> web.Response:
    """Today's would-be refusals of shadow limits, per entity and limit (shadow_counts.py)."""
    await access.view(request)
    return json_response(await shadow_refusals_today(request.app))


def add_ui_routes(app: web.Application) -> None:
    app.cleanup_ctx.append(_publish_counts)
    r = app.router
    r.add_get("/ui", redirect)
    r.add_get("/ui/", index)
    r.add_get("/ui/static/{name}", static)
    r.add_get("/ui/api/budgets", budgets)
    r.add_get("/ui/api/live", live)
    r.add_get("/ui/api/shadow", shadow_refusals)
    r.add_get("/model/info", model_info)
    for kind in ("user", "team", "customer"):
        r.add_get(f"/{kind}/list", entities(kind))
    r.add_get("/end_user/list", entities("customer"))
