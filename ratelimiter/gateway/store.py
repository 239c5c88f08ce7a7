"""Entities in Redis: budgets, virtual keys, users, teams, customers and organizations, with
LiteLLM's fields.

Records are msgpack. Every sidecar caches them in memory; a change publishes an invalidation
that every sidecar applies within milliseconds, and a short TTL bounds staleness if a message
is ever lost (a reconnect also clears the cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import msgpack

from ..engine.connections import RedisClient, translate_errors
from ..engine.durations import parse_duration, shown
from ..engine.limits import MAX_AMOUNT
from ..errors import EntityError, InvalidDuration
from ..pricing import NANO
from .shadow import shadow_flag, shadow_names
from .tags import check_tag, tag_list

__all__ = [
    "KINDS",
    "REFERENCES",
    "ROLES",
    "EntityError",
    "Store",
    "hash_key",
    "new_key",
]

log = logging.getLogger("ratelimiter.store")

KINDS = ("budget", "key", "user", "team", "customer", "organization", "tag")
ID_FIELD = {
    "budget": "budget_id",
    "key": "token",
    "user": "user_id",
    "team": "team_id",
    "customer": "user_id",
    "organization": "organization_id",
    "tag": "name",
}


# Fields that name another entity. The store keeps, per field and value, the set of entities
# naming it, so deleting a user, team, organization or budget finds what names it without
# reading them all.
REFERENCES: dict[str, tuple[str, ...]] = {
    "key": ("user_id", "team_id", "budget_id", "key_id", "organization_id"),
    "user": ("budget_id",),
    "team": ("budget_id", "organization_id"),
    "customer": ("budget_id",),
    "organization": ("budget_id",),
    "tag": ("budget_id",),
}
# The engine counts exactly up to 2**53-1 units (limits.MAX_AMOUNT): nano-dollars for money.
MAX_DOLLARS = MAX_AMOUNT / NANO
MAX_TEXT = 256  # characters of an id, alias or name
MAX_LIST = 1_000  # entries in one list field (models, members, model_max_budget...)
MAX_WINDOWS = 32  # entries of budget_limits
_BATCH = 500  # entities per MGET


def _fail(field: str, problem: str) -> EntityError:
    return EntityError(400, f"{field}: {problem}", field)


def _bounded(field: str, value: Any, what: str) -> None:
    if len(value) > MAX_LIST:
        raise _fail(field, f"at most {MAX_LIST} {what}, got {len(value)}")


def _models(field: str, value: Any) -> dict[str, Any]:
    """An object keyed by model name: {model: ...}."""
    models = mapping(field, value)
    _bounded(field, models, "models")
    for model in models:
        if not 0 < len(model) <= MAX_TEXT:
            raise _fail(field, f"model names have 1 to {MAX_TEXT} characters, got {shown(model)}")
    return models


# -- field checkers: (field name, raw value) -> stored value ---------------------------


def money(field: str, value: Any) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise _fail(field, f"must be a non-negative number of dollars, got {shown(value)}")
    # Compared as nano-dollars, the unit the engine counts, so the maximum itself passes.
    if value * NANO > MAX_AMOUNT:
        raise _fail(
            field,
            f"must be at most {MAX_DOLLARS:.2f} dollars (2**53-1 nano-dollars, the most the "
            f"engine counts exactly), got {shown(value)}",
        )
    return float(value)


def count(field: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(field, f"must be a non-negative whole number, got {shown(value)}")
    if value > MAX_AMOUNT:
        raise _fail(
            field,
            f"must be at most {MAX_AMOUNT} (2**53-1, the most the engine counts exactly), "
            f"got {shown(value)}",
        )
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
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise _fail(
            field,
            f"must be a non-empty string of at most {MAX_TEXT} characters, got {shown(value)}",
        )
    return value


def flag(field: str, value: Any) -> bool:
    if value is None:  # LiteLLM's clients send every optional field, often as null
        return False
    if not isinstance(value, bool):
        raise _fail(field, f"must be true or false, got {shown(value)}")
    return value


def tag_name(field: str, value: Any) -> str:
    """A tag's name, which its entity and its scope ({tag:<name>}) are keyed by: required."""
    if value is None:
        raise _fail(field, "is required: the tag's name")
    return check_tag(value, field)


def names(field: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(
        isinstance(v, str) and 0 < len(v) <= MAX_TEXT for v in value
    ):
        raise _fail(
            field, f"must be a list of names of at most {MAX_TEXT} characters, got {shown(value)}"
        )
    _bounded(field, value, "names")
    return value


def mapping(field: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(field, f"must be an object, got {shown(value)}")
    return value


def model_counts(field: str, value: Any) -> dict[str, int]:
    return {m: count(f"{field}.{m}", v) or 0 for m, v in _models(field, value).items()}


def model_budgets(field: str, value: Any) -> dict[str, dict[str, Any]]:
    """{model: {max_budget | budget_limit, budget_duration | time_period, tpm_limit, rpm_limit}}"""
    out = {}
    for model, spec in _models(field, value).items():
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
        # LiteLLM's two spellings, each checked: a malformed one must not hide behind the other
        limits = [money(f"{path}.{n}", spec.get(n)) for n in ("max_budget", "budget_limit")]
        periods = [duration(f"{path}.{n}", spec.get(n)) for n in ("budget_duration", "time_period")]
        out[model] = {
            "max_budget": next((v for v in limits if v is not None), None),
            "budget_duration": next((v for v in periods if v is not None), None),
            "tpm_limit": count(f"{path}.tpm_limit", spec.get("tpm_limit")),
            "rpm_limit": count(f"{path}.rpm_limit", spec.get("rpm_limit")),
        }
    return out


def aliases(field: str, value: Any) -> dict[str, str]:
    """{name asked for: name served}, as LiteLLM's key ``aliases`` and team ``model_aliases``.
    Names are exact (no wildcards); whether each target is served is checked against the
    config by the admin routes (admin.common.check_references)."""
    found = mapping(field, value)
    _bounded(field, found, "aliases")
    for name, target in found.items():
        if not 0 < len(name) <= MAX_TEXT or "*" in name:
            raise _fail(
                field,
                f"an alias is a model name of 1 to {MAX_TEXT} characters without *, "
                f"got {shown(name)}",
            )
        if not isinstance(target, str) or not 0 < len(target) <= MAX_TEXT or "*" in target:
            raise _fail(
                f"{field}.{name}",
                f"must name the model it stands for: 1 to {MAX_TEXT} characters without *, "
                f"got {shown(target)}",
            )
    return found


def budget_windows(field: str, value: Any) -> list[dict[str, Any]]:
    """Several budgets on one key, each enforced: [{max_budget, budget_duration}, ...]."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(field, f"must be a list of {{max_budget, budget_duration}}, got {shown(value)}")
    if len(value) > MAX_WINDOWS:
        raise _fail(field, f"at most {MAX_WINDOWS} budget windows, got {len(value)}")
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


# LiteLLM's user roles (LitellmUserRoles), the only values user_role takes; what each may do
# on the admin API is admin/access.py's business.
ROLES = ("proxy_admin", "proxy_admin_viewer", "internal_user", "internal_user_viewer")


def role(field: str, value: Any) -> str | None:
    if value is None:
        return None
    if value not in ROLES:
        raise _fail(field, f"must be one of {', '.join(ROLES)}, got {shown(value)}")
    return str(value)


def members(field: str, value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(field, f"must be a list of members, got {shown(value)}")
    _bounded(field, value, "members")
    return [member(f"{field}[{i}]", m) for i, m in enumerate(value)]


def member(field: str, value: Any) -> dict[str, Any]:
    spec = mapping(field, value)
    unknown = set(spec) - {
        "user_id",
        "user_email",
        "role",
        "max_budget_in_team",
        "rpm_limit",
        "tpm_limit",
    }
    if unknown:
        raise _fail(f"{field}.{sorted(unknown)[0]}", "unknown field")
    # by email alone, the admin route finds the user (or makes one) before it is stored
    email = text(f"{field}.user_email", spec.get("user_email"))
    user_id = text(f"{field}.user_id", spec.get("user_id"))
    if user_id is None and email is None:
        raise _fail(f"{field}.user_id", "is required, or user_email")
    role = spec.get("role", "user")
    if role not in ("admin", "user"):
        raise _fail(f"{field}.role", f"must be admin or user, got {shown(role)}")
    return {
        "user_id": user_id,
        "user_email": email,
        "role": role,
        "max_budget_in_team": money(f"{field}.max_budget_in_team", spec.get("max_budget_in_team")),
        # the member's own rates within the team (/team/member_update); absent: none
        **{
            name: count(f"{field}.{name}", spec[name])
            for name in ("rpm_limit", "tpm_limit")
            if spec.get(name) is not None
        },
    }


LIMITS: dict[str, Callable[[str, Any], Any]] = {
    "max_budget": money,
    "soft_budget": money,
    "budget_duration": duration,
    "tpm_limit": count,
    "rpm_limit": count,
    # input and output tokens per minute, as separate windows (Anthropic's ITPM/OTPM)
    "input_tpm_limit": count,
    "output_tpm_limit": count,
    "max_parallel_requests": count,
    "model_max_budget": model_budgets,
    # ours: the entity's limits (all, or those named) are counted but not enforced (shadow.py)
    "shadow_mode": shadow_flag,
    "shadow_limits": shadow_names,
}

# The fields the limiter acts on, per kind, each with its checker; models.py builds the
# request models around them (with LiteLLM's other fields, accepted but not enforced).
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
        "aliases": aliases,
        "organization_id": text,
        # every request of the key carries them (gateway/tags.py)
        "tags": tag_list,
    },
    "user": {
        **LIMITS,
        "user_id": text,
        "user_email": text,
        "user_role": role,
        "models": names,
        "budget_id": text,
        "metadata": mapping,
        "model_rpm_limit": model_counts,
        "model_tpm_limit": model_counts,
        "aliases": aliases,
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
        "model_rpm_limit": model_counts,
        "model_tpm_limit": model_counts,
        "model_aliases": aliases,
        "organization_id": text,
    },
    "customer": {
        **LIMITS,
        "user_id": text,
        "alias": text,
        "blocked": flag,
        "budget_id": text,
        "metadata": mapping,
    },
    # A scope above teams: its limits apply to every request of its teams' keys (and of keys
    # that name it without a team).
    "organization": {
        **LIMITS,
        "organization_id": text,
        "organization_alias": text,
        "models": names,
        "budget_id": text,
        "metadata": mapping,
        "model_rpm_limit": model_counts,
        "model_tpm_limit": model_counts,
    },
    # A request's tag (gateway/tags.py): its limits apply to every request that carries it.
    "tag": {"name": tag_name, "budget_id": text, **LIMITS},
}


def new_key() -> str:
    return "sk-" + secrets.token_urlsafe(24)


def hash_key(key: str) -> str:
    """Virtual keys are stored as sha256: a leaked database leaks no usable key."""
    return hashlib.sha256(key.encode()).hexdigest()


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
        self._known: dict[str, tuple[float, frozenset[str]]] = {}  # kind -> cached ids
        self._references_indexed: set[str] = set()

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

    async def known(self, kind: str) -> frozenset[str]:
        """The ids of every entity of a kind, cached and invalidated as entities are: the
        request path asks it before looking up names a client chose (tags), so that made-up
        names cost no Redis call and grow no cache."""
        cached = self._known.get(kind)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        ids = frozenset(await self.ids(kind))
        self._known[kind] = (time.monotonic() + self.cache_ttl_s, ids)
        return ids

    async def all(self, kind: str) -> list[dict[str, Any]]:
        """Every entity of a kind, read from Redis in batched MGETs (one kind is one slot, so
        this works on a Cluster too); for listings, not the request path."""
        return [entity async for _, entity in self._read(kind, await self.ids(kind)) if entity]

    async def _read(self, kind: str, ids: list[str]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(id, entity) of those of ``ids`` that exist, from Redis in MGETs of ``_BATCH``."""
        for start in range(0, len(ids), _BATCH):
            chunk = ids[start : start + _BATCH]
            with translate_errors(self.address):
                values = await self.redis.mget([self._key(kind, i) for i in chunk])
            for entity_id, raw in zip(chunk, values, strict=True):
                yield entity_id, msgpack.unpackb(raw) if raw else {}

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
            await self._refer(kind, entity_id, {}, entity)
        await self._changed(kind, entity_id)

    async def put(self, kind: str, entity_id: str, entity: Mapping[str, Any]) -> None:
        with translate_errors(self.address):
            before = await self._stored(kind, entity_id)
            await self._refer(kind, entity_id, before, entity)
            await self.redis.set(self._key(kind, entity_id), msgpack.packb(entity))
            await self._unrefer(kind, entity_id, before, entity)
        await self._changed(kind, entity_id)

    async def delete(self, kind: str, entity_id: str) -> bool:
        with translate_errors(self.address):
            before = await self._stored(kind, entity_id)
            removed = await self.redis.delete(self._key(kind, entity_id))
            await self.redis.srem(self._index(kind), entity_id)
            await self._unrefer(kind, entity_id, before, {})
        await self._changed(kind, entity_id)
        return bool(removed)

    async def naming(self, kind: str, field: str, value: str) -> list[dict[str, Any]]:
        """Every entity of ``kind`` whose ``field`` is ``value`` (a key's ``user_id``...),
        read from Redis, not the cache."""
        await self._index_references(kind)
        refs = self._refs(kind, field, value)
        with translate_errors(self.address):
            ids = sorted(m.decode() for m in await self.redis.smembers(refs))
        found, stale = [], []
        async for entity_id, entity in self._read(kind, ids):
            if entity.get(field) == value:
                found.append(entity)
            else:
                stale.append(entity_id)
        if stale:  # left by a write that did not finish, or a race: harmless, tidied here
            with translate_errors(self.address):
                await self.redis.srem(refs, *stale)
        return found

    def _refs(self, kind: str, field: str, value: str) -> str:
        # "r:" never meets an entity key ("e:"), whatever the ids; same slot as the kind.
        return f"{self.prefix}r:{{{kind}}}:{field}:{value}"

    async def _stored(self, kind: str, entity_id: str) -> dict[str, Any]:
        if kind not in REFERENCES:
            return {}
        raw = await self.redis.get(self._key(kind, entity_id))
        return msgpack.unpackb(raw) if raw else {}

    async def _refer(
        self, kind: str, entity_id: str, before: Mapping[str, Any], after: Mapping[str, Any]
    ) -> None:
        """Add to the sets of the values ``after`` names, before it is written, so that a
        write cut short leaves a set naming too much (``naming`` filters and tidies it),
        not too little."""
        for field in REFERENCES.get(kind, ()):
            value = after.get(field)
            if value and value != before.get(field):
                await self.redis.sadd(self._refs(kind, field, value), entity_id)

    async def _unrefer(
        self, kind: str, entity_id: str, before: Mapping[str, Any], after: Mapping[str, Any]
    ) -> None:
        for field in REFERENCES.get(kind, ()):
            value = before.get(field)
            if value and value != after.get(field):
                await self.redis.srem(self._refs(kind, field, value), entity_id)

    async def _index_references(self, kind: str) -> None:
        """Entities written before the store kept reference sets are added once, on the
        first lookup (a batched read of the kind); a marker in Redis says it was done. The
        marker names the fields indexed, so a field added to REFERENCES is indexed again
        (a key's organization_id was stored, not indexed, before organizations existed)."""
        if kind in self._references_indexed:
            return
        fields = ",".join(REFERENCES.get(kind, ()))
        marker = f"{self.prefix}r:{{{kind}}}:indexed:{fields}"
        with translate_errors(self.address):
            if not await self.redis.exists(marker):
                async for entity_id, entity in self._read(kind, await self.ids(kind)):
                    await self._refer(kind, entity_id, {}, entity)
                await self.redis.set(marker, 1)
        self._references_indexed.add(kind)

    async def ids(self, kind: str) -> list[str]:
        with translate_errors(self.address):
            members = await self.redis.smembers(self._index(kind))
        return sorted(m.decode() for m in members)

    async def _changed(self, kind: str, entity_id: str) -> None:
        self._cache.pop((kind, entity_id), None)
        self._known.pop(kind, None)
        with translate_errors(self.address):
            await self.redis.publish(self.channel, msgpack.packb([kind, entity_id]))

    async def listen(self) -> None:
        """Apply other sidecars' invalidations until cancelled; reconnects on its own."""
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self._cache.clear()  # whatever changed while we were not listening
                self._known.clear()
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        kind, entity_id = msgpack.unpackb(message["data"])
                        self._cache.pop((kind, entity_id), None)
                        self._known.pop(kind, None)
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
