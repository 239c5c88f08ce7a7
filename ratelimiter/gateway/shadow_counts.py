"""Would-be refusals of shadow limits per entity, for the admin UI: one Redis hash per UTC
day, field ``<scope kind>:<scope id>|<limit name>`` -> count, shared by every sidecar.

The metric ``ratelimiter_shadow_refusals_total`` counts by scope kind and reason in each
sidecar; this says which key, team or user a would-be refusal was for, summed over sidecars.
It is a report, not a limit: counted after the response, off the client's latency (a count
lost to a Redis outage is only a report's), on the sidecar's clock, kept 8 days.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from ..engine.connections import translate_errors
from ..engine.limits import Limit
from .http import ENGINE, SETTINGS, SETTLING
from .shadow import Scope

__all__ = ["count_shadow_refusal", "shadow_refusals_today"]

DAY_S = 86_400
KEPT_S = 8 * DAY_S
_MOST_FIELDS = 10_000  # what the UI reads of one day: more entities than a page shows


def _key(app: web.Application, day: int) -> str:
    return f"{app[SETTINGS].key_prefix}{{shadow}}:refusals:{day}"


def owner(scopes: Sequence[Scope], limit: Limit, prefix: str) -> Scope | None:
    """The scope a limit belongs to (its key starts with the scope's)."""
    return next((s for s in scopes if limit.key.startswith(s.key(prefix, ""))), None)


def count_shadow_refusal(app: web.Application, scopes: Sequence[Scope], limit: Limit) -> None:
    """Count one would-be refusal of ``limit`` for its entity, after the response."""
    scope = owner(scopes, limit, app[SETTINGS].key_prefix)
    if scope is not None:
        field = f"{scope.kind}:{scope.id}|{limit.name}"
        app[SETTLING].start(_count(app, field))


async def _count(app: web.Application, field: str) -> None:
    key = _key(app, int(time.time()) // DAY_S)
    with contextlib.suppress(Exception):
        pipe = app[ENGINE].redis.pipeline(transaction=False)
        pipe.hincrby(key, field, 1)
        pipe.expire(key, KEPT_S)
        await pipe.execute()


async def shadow_refusals_today(app: web.Application) -> dict[str, Any]:
    """Today's (UTC) would-be refusals: entity (``key:<id>``) -> limit name -> count."""
    day = int(time.time()) // DAY_S
    entities: dict[str, dict[str, int]] = {}
    with translate_errors(app[ENGINE].address):
        async for raw, value in app[ENGINE].redis.hscan_iter(_key(app, day), count=1000):
            field = raw.decode() if isinstance(raw, bytes) else raw
            entity, _, limit = field.partition("|")
            entities.setdefault(entity, {})[limit] = int(value)
            if len(entities) >= _MOST_FIELDS:
                break
    return {"day_start": day * DAY_S * 1000, "entities": entities}
