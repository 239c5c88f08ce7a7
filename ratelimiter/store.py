"""Entities in Redis: budgets, virtual keys, users, teams and customers, with LiteLLM's fields.

Records are msgpack. Every sidecar caches them in memory; a change publishes an invalidation
that every sidecar applies within milliseconds, and a short TTL bounds staleness if a message
is ever lost (a reconnect also clears the cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from .connections import RedisClient, translate_errors
from .durations import parse_duration
from .errors import InvalidDuration, RateLimiterError

__all__ = ["KINDS", "EntityError", "Store", "validate"]

log = logging.getLogger("ratelimiter.store")

KINDS = ("budget", "key", "user", "team", "customer")
ID_FIELD = {
    "budget": "budget_id",
    "key": "token",
    "user": "user_id",
    "team": "team_id",
    "customer": "user_id",
}


class EntityError(RateLimiterError):
    """An admin call that cannot be carried out; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def _fail(field: str, problem: str) -> EntityError:
    return EntityError(400, f"{field}: {problem}", field)


# -- field checkers: (field name, raw value) -> stored value ---------------------------


def money(field: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _fail(field, f"must be a non-negative number of dollars, got {value!r}")
    return float(value)


def count(field: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(field, f"must be a non-negative whole number, got {value!r}")
    return value


def duration(field: str, value: Any) -> str | None:
    if value is None:
        return None
    try:
        return str(parse_duration(value))
    except InvalidDuration as exc:
        raise _fail(field, str(exc)) from None


def text(field: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 256:
        raise _fail(field, f"must be a non-empty string of at most 256 characters, got {value!r}")
    return value


def flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(field, f"must be true or false, got {value!r}")
    return value


def names(field: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _fail(field, f"must be a list of names, got {value!r}")
    return value


def mapping(field: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(field, f"must be an object, got {value!r}")
    return value


def model_counts(field: str, value: Any) -> dict[str, int]:
    return {m: count(f"{field}.{m}", v) or 0 for m, v in mapping(field, value).items()}


def model_budgets(field: str, value: Any) -> dict[str, dict[str, Any]]:
    """{model: {max_budget | budget_limit, budget_duration | time_period, tpm_limit, rpm_limit}}"""
    out = {}
    for model, spec in mapping(field, value).items():
        path = f"{field}.{model}"
        spec = mapping(path, spec)
        unknown = set(spec) - {
            "max_budget",
            "budget_limit",
            "budget_duration",
            "time_period",
            "tpm_limit",
            "rpm_limit",
        }
        if unknown:
            raise _fail(f"{path}.{sorted(unknown)[0]}", "unknown field")
        out[model] = {
            "max_budget": money(
                f"{path}.max_budget", spec.get("max_budget", spec.get("budget_limit"))
            ),
            "budget_duration": duration(
                f"{path}.budget_duration", spec.get("budget_duration", spec.get("time_period"))
            ),
            "tpm_limit": count(f"{path}.tpm_limit", spec.get("tpm_limit")),
            "rpm_limit": count(f"{path}.rpm_limit", spec.get("rpm_limit")),
        }
    return out


def budget_windows(field: str, value: Any) -> list[dict[str, Any]]:
    """Several budgets on one key, each enforced: [{max_budget, budget_duration}, ...]."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(field, f"must be a list of {{max_budget, budget_duration}}, got {value!r}")
    out = []
    for i, spec in enumerate(value):
        path = f"{field}[{i}]"
        spec = mapping(path, spec)
        if set(spec) - {"max_budget", "budget_duration"}:
            raise _fail(path, "each entry has only max_budget and budget_duration")
        limit = money(f"{path}.max_budget", spec.get("max_budget"))
        period = duration(f"{path}.budget_duration", spec.get("budget_duration"))
        if limit is None or period is None:
            raise _fail(path, "needs both max_budget and budget_duration")
        out.append({"max_budget": limit, "budget_duration": period})
    return out


def members(field: str, value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(field, f"must be a list of members, got {value!r}")
    return [member(f"{field}[{i}]", m) for i, m in enumerate(value)]


def member(field: str, value: Any) -> dict[str, Any]:
    spec = mapping(field, value)
    unknown = set(spec) - {"user_id", "user_email", "role", "max_budget_in_team"}
    if unknown:
        raise _fail(f"{field}.{sorted(unknown)[0]}", "unknown field")
    user_id = text(f"{field}.user_id", spec.get("user_id"))
    if user_id is None:
        raise _fail(f"{field}.user_id", "is required")
    role = spec.get("role", "user")
    if role not in ("admin", "user"):
        raise _fail(f"{field}.role", f"must be admin or user, got {role!r}")
    return {
        "user_id": user_id,
        "role": role,
        "max_budget_in_team": money(f"{field}.max_budget_in_team", spec.get("max_budget_in_team")),
    }


LIMITS: dict[str, Callable[[str, Any], Any]] = {
    "max_budget": money,
    "soft_budget": money,
    "budget_duration": duration,
    "tpm_limit": count,
    "rpm_limit": count,
    "max_parallel_requests": count,
    "model_max_budget": model_budgets,
}

SCHEMAS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "budget": {"budget_id": text, **LIMITS},
    "key": {
        **LIMITS,
        "key_alias": text,
        "models": names,
        "budget_limits": budget_windows,
        "model_rpm_limit": model_counts,
        "model_tpm_limit": model_counts,
        "user_id": text,
        "team_id": text,
        "budget_id": text,
        "metadata": mapping,
        "duration": duration,
        "blocked": flag,
    },
    "user": {
        **LIMITS,
        "user_id": text,
        "user_email": text,
        "models": names,
        "budget_id": text,
        "metadata": mapping,
    },
    "team": {
        **LIMITS,
        "team_id": text,
        "team_alias": text,
        "models": names,
        "members": members,
        "budget_id": text,
        "metadata": mapping,
        "blocked": flag,
    },
    "customer": {
        "user_id": text,
        "alias": text,
        "blocked": flag,
        "budget_id": text,
        "max_budget": money,
        "budget_duration": duration,
        "tpm_limit": count,
        "rpm_limit": count,
        "metadata": mapping,
    },
}


def validate(kind: str, body: Any, *, partial: bool = False) -> dict[str, Any]:
    """Check an admin request body against the entity's fields; unknown fields are refused."""
    if not isinstance(body, dict):
        raise EntityError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    schema = SCHEMAS[kind]
    for name in body:
        if name not in schema:
            raise _fail(name, f"unknown field for a {kind}; accepted: {', '.join(sorted(schema))}")
    out = {name: schema[name](name, value) for name, value in body.items()}
    if kind == "customer" and out.get("budget_id") and out.get("max_budget") is not None:
        raise EntityError(
            400, "give a customer either budget_id or max_budget, not both", "budget_id"
        )
    if not partial:
        for name, checker in schema.items():
            out.setdefault(name, checker(name, None) if checker not in (flag,) else False)
    return out


class Store:
    """Entities in Redis under ``<prefix>e:{<kind>}:<id>``, with a per-process cache."""

    def __init__(
        self, redis: RedisClient, *, prefix: str, address: str = "redis", cache_ttl_s: float = 5.0
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.address = address
        self.cache_ttl_s = cache_ttl_s
        self.channel = f"{prefix}invalidate"
        self._cache: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}

    def _key(self, kind: str, entity_id: str) -> str:
        return f"{self.prefix}e:{{{kind}}}:{entity_id}"

    def _index(self, kind: str) -> str:
        return f"{self.prefix}e:{{{kind}}}:index"

    async def get(self, kind: str, entity_id: str) -> dict[str, Any] | None:
        cached = self._cache.get((kind, entity_id))
        if cached and cached[0] > time.monotonic():
            return cached[1]
        with translate_errors(self.address):
            raw = await self.redis.get(self._key(kind, entity_id))
        entity = msgpack.unpackb(raw) if raw else None
        self._cache[(kind, entity_id)] = (time.monotonic() + self.cache_ttl_s, entity)
        return entity

    async def all(self, kind: str, batch: int = 500) -> list[dict[str, Any]]:
        """Every entity of a kind, read from Redis in MGETs of ``batch`` (one kind is one
        slot, so this works on a Cluster too); for listings, not the request path."""
        ids = await self.ids(kind)
        found: list[dict[str, Any]] = []
        for start in range(0, len(ids), batch):
            keys = [self._key(kind, i) for i in ids[start : start + batch]]
            with translate_errors(self.address):
                values = await self.redis.mget(keys)
            found += [msgpack.unpackb(v) for v in values if v]
        return found

    async def create(self, kind: str, entity_id: str, entity: Mapping[str, Any]) -> None:
        with translate_errors(self.address):
            created = await self.redis.set(
                self._key(kind, entity_id), msgpack.packb(entity), nx=True
            )
            if not created:
                raise EntityError(
                    409, f"a {kind} with id {entity_id!r} already exists", ID_FIELD[kind]
                )
            await self.redis.sadd(self._index(kind), entity_id)
        await self._changed(kind, entity_id)

    async def put(self, kind: str, entity_id: str, entity: Mapping[str, Any]) -> None:
        with translate_errors(self.address):
            await self.redis.set(self._key(kind, entity_id), msgpack.packb(entity))
        await self._changed(kind, entity_id)

    async def delete(self, kind: str, entity_id: str) -> bool:
        with translate_errors(self.address):
            removed = await self.redis.delete(self._key(kind, entity_id))
            await self.redis.srem(self._index(kind), entity_id)
        await self._changed(kind, entity_id)
        return bool(removed)

    async def ids(self, kind: str) -> list[str]:
        with translate_errors(self.address):
            members = await self.redis.smembers(self._index(kind))
        return sorted(m.decode() for m in members)

    async def _changed(self, kind: str, entity_id: str) -> None:
        self._cache.pop((kind, entity_id), None)
        with translate_errors(self.address):
            await self.redis.publish(self.channel, msgpack.packb([kind, entity_id]))

    async def listen(self) -> None:
        """Apply other sidecars' invalidations until cancelled; reconnects on its own."""
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self._cache.clear()  # whatever changed while we were not listening
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        kind, entity_id = msgpack.unpackb(message["data"])
                        self._cache.pop((kind, entity_id), None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The cache stays (its TTL bounds staleness) so that on_redis_error: allow
                # can still authenticate; it is cleared once subscribed again.
                log.warning("invalidation channel lost (%s); retrying in 1 s", exc)
                await asyncio.sleep(1)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), 1)
