"""What every admin route shares: reading bodies and ids, loading and updating entities,
their references, their spend, and the gates that block them."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from ...engine.connections import translate_errors
from ...engine.durations import parse_duration, period_bounds, shown
from ...errors import EntityError
from ...ledger import Ledger
from ...pricing import dollars, nano
from ..http import ENGINE, SETTINGS, STORE, read_json
from ..models import refuse_unknown, validate
from ..policy import Scope, scope_budgets
from ..resolver import effective_fields, unmatched_models
from ..routing import serves
from ..store import MAX_TEXT, Store, hash_key

SCOPE_KIND = {
    "key": "key",
    "user": "user",
    "team": "team",
    "customer": "end_user",
    "organization": "organization",
    "tag": "tag",
}
MAX_IDS = 1_000  # ids in one delete, block or info call


def iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def present(kind: str, entity: Mapping[str, Any], tz: ZoneInfo | None = None) -> dict[str, Any]:
    """An entity as LiteLLM's responses show it: times in ISO 8601, a key's hash as its
    ``token_id`` and its expiry as ``expires``, a team's members as ``members_with_roles``,
    a budget's next reset (in ``tz``, the budgets' time zone) as ``budget_reset_at``.
    Records keep milliseconds, which the request path compares without parsing."""
    out = dict(entity)
    for name in ("created_at", "updated_at"):
        if isinstance(out.get(name), int):
            out[name] = iso(out[name])
    if kind == "key":
        out["token_id"] = entity["token"]
        out.setdefault("key_name", None)  # keys made before previews were kept
        out["expires"] = iso(entity.get("expires_at"))
    elif kind == "team":
        out["members_with_roles"] = [
            {"user_id": m["user_id"], "user_email": m.get("user_email"), "role": m["role"]}
            for m in entity.get("members") or []
        ]
    elif kind == "budget" and tz is not None and entity.get("budget_duration"):
        # every entity's window of this budget resets at the same boundary
        period = parse_duration(entity["budget_duration"])
        out["budget_reset_at"] = iso(period_bounds(period, now_ms(), tz)[1])
    return out


async def check_references(request: web.Request, kind: str, fields: dict[str, Any]) -> None:
    """The budget an entity names must exist, and so must a key's team and a team's or key's
    organization (404). A key's user is created if missing, as LiteLLM did: a key never names
    a user that does not exist (the resolver refuses such a key) or that a later /user/new
    would create with other limits. Every name in ``models`` must be able to match a served
    model or an alias (a typo would otherwise leave a key that can call nothing), and every
    alias target must be served."""
    store = request.app[STORE]
    settings = request.app[SETTINGS]
    alias_field = "model_aliases" if kind == "team" else "aliases"
    aliases = fields.get(alias_field) or {}
    for alias, target in aliases.items():
        if not serves(settings, target):
            raise EntityError(
                400,
                f"{alias_field}.{alias}: {target!r} is not served here (GET /v1/models lists "
                "what is, with the master key): an alias names a served model, and applies once, "
                "never to another alias",
                alias_field,
            )
    known = set(aliases)
    team_id = fields.get("team_id") if kind == "key" else None
    team = await store.get("team", team_id) if team_id else None
    known.update((team or {}).get("model_aliases") or {})
    unknown = unmatched_models(settings, fields.get("models") or (), known)
    if unknown:
        raise EntityError(
            400,
            f"models: {unknown[0]!r} matches no model served here (GET /v1/models lists them "
            "with the master key); name a model, an access group, a wildcard such as "
            "'openai/*', or all-proxy-models",
            "models",
        )
    budget_id = fields.get("budget_id")
    if budget_id and await store.get("budget", budget_id) is None:
        raise EntityError(
            404,
            f"budget_id {budget_id!r} does not exist: create it with /budget/new first",
            "budget_id",
        )
    organization_id = fields.get("organization_id")
    if (
        kind in ("key", "team")
        and organization_id
        and await store.get("organization", organization_id) is None
    ):
        raise EntityError(
            404,
            f"organization_id {organization_id!r} does not exist: create it with "
            "/organization/new first",
            "organization_id",
        )
    if kind != "key":
        return
    if team_id and team is None:
        raise EntityError(
            404, f"team_id {team_id!r} does not exist: create it with /team/new first", "team_id"
        )
    user_id = fields.get("user_id")
    if user_id and await store.get("user", user_id) is None:
        try:
            await store.create("user", user_id, validate("user", {"user_id": user_id}))
        except EntityError as exc:
            if exc.status != 409:  # 409: created meanwhile, which is as good
                raise


async def spend_windows(request: web.Request, scope: Scope) -> list[dict[str, Any]]:
    """Spend, remaining and reset time of every budget window of a scope, now. Spend is what
    was charged, past max_budget too (a request may cost more than it held); remaining is
    what is left after spend and the holds of requests in flight."""
    budgets = list(scope_budgets(scope, request.app[SETTINGS].key_prefix))
    if not budgets:
        return []
    return [
        {
            "budget_duration": str(budget.period),
            "max_budget": dollars(budget.capacity),
            "spend": dollars(use.spent),
            "remaining": dollars(max(budget.capacity - use.spent - use.held, 0)),
            "budget_reset_at": iso(use.end_ms),
        }
        for budget, use in zip(budgets, await request.app[ENGINE].budget_use(budgets), strict=True)
    ]


def dimension(kind: str, entity_id: str) -> str:
    """The ledger's name for an entity's spend: ``key:<hash>``, ``user:ann``, ``team:…``,
    ``customer:…``; any other kind (``organization``) is named the same way."""
    return f"{kind}:{entity_id}"


async def lifetime_spends(request: web.Request, kind: str, ids: list[str]) -> dict[str, float]:
    """The lifetime spend in dollars of many entities of one kind, in one read (listings)."""
    dims = {entity_id: dimension(kind, entity_id) for entity_id in ids}
    found = await Ledger(request.app[ENGINE]).lifetime_spend(list(dims.values()))
    return {entity_id: dollars(found[dim]) for entity_id, dim in dims.items()}


async def set_spend(
    request: web.Request, kind: str, entity_id: str, fields: dict[str, Any], spend: float
) -> None:
    """``spend`` on create or update, as LiteLLM takes it: the entity's spend becomes this
    (0 starts it again). Its lifetime spend is set to it, and the spend of every current
    budget period is lowered to it (never raised: a period holds what was spent in it).
    Requests in flight keep their holds and are counted once, when they settle. The lifetime
    spend goes first, so a request settling in between counts in both or in the lifetime
    only: lifetime spend is never below a period's."""
    amount = nano(spend)
    entity_id = scope_id(kind, entity_id, fields)  # a key's spend stays with its key_id
    await Ledger(request.app[ENGINE]).set_lifetime_spend(dimension(kind, entity_id), amount)
    owner = "this key" if kind == "key" else f"{kind} {entity_id!r}"
    with contextlib.suppress(EntityError):  # a missing budget: its own periods still are
        fields = await effective_fields(request.app[STORE], owner, fields)
    budgets = list(
        scope_budgets(Scope(SCOPE_KIND[kind], entity_id, fields), request.app[SETTINGS].key_prefix)
    )
    await request.app[ENGINE].reset_budgets(budgets, amount)


async def entity_info(
    request: web.Request, kind: str, entity_id: str, entity: dict[str, Any]
) -> dict[str, Any]:
    owner = "this key" if kind == "key" else f"{kind} {entity_id!r}"
    problem: dict[str, str] = {}
    try:
        fields = await effective_fields(request.app[STORE], owner, entity)
    except EntityError as exc:  # a missing budget: shown, so that an admin can mend it
        fields, problem = entity, {"error": str(exc)}
    scope = Scope(SCOPE_KIND[kind], scope_id(kind, entity_id, entity), fields)
    windows = await spend_windows(request, scope)
    first = windows[0] if windows else {}
    spend = (await lifetime_spends(request, kind, [scope.id]))[scope.id]
    return {
        **entity,
        "spend": spend,
        "budget_reset_at": first.get("budget_reset_at"),
        "budget_windows": windows,
        **problem,
    }


async def read_object(request: web.Request) -> dict[str, Any]:
    """The JSON body, which every admin POST route takes as an object of known fields."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise EntityError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    resource = request.match_info.route.resource
    refuse_unknown(resource.canonical if resource else request.path, body)
    return body


def id_of(name: str, value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
        raise EntityError(
            400, f"{name} must be an id of 1 to {MAX_TEXT} characters, got {shown(value)}", name
        )
    return value


def required(body: dict[str, Any], name: str) -> str:
    if body.get(name) is None:
        raise EntityError(400, f"{name} is required", name)
    return id_of(name, body[name])


def ids_of(body: dict[str, Any], name: str) -> list[str]:
    """A non-empty list of at most MAX_IDS ids (one id alone is taken as a list of one)."""
    ids = body.get(name)
    ids = [ids] if isinstance(ids, str) else ids
    if not isinstance(ids, list) or not ids or len(ids) > MAX_IDS:
        raise EntityError(
            400, f"{name} must be a non-empty list of at most {MAX_IDS} ids, got {shown(ids)}", name
        )
    return list(dict.fromkeys(id_of(name, i) for i in ids))  # each once, in order


MAX_PAGE = 1_000_000  # pages of a listing


def whole(request: web.Request, name: str, default: int, most: int) -> int:
    """A query parameter that is a whole number from 1 to ``most``, else ``default``."""
    raw = request.query.get(name)
    if raw is None:
        return default
    # isdigit() before int(): int() of thousands of digits is slow, and refused past 4,300.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(most))) or not (
        1 <= int(raw) <= most
    ):
        raise EntityError(
            400, f"{name} must be a whole number from 1 to {most}, got {shown(raw)}", name
        )
    return int(raw)


def truth(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw not in ("true", "false"):
        raise EntityError(400, f"{name} must be true or false, got {shown(raw)}", name)
    return raw == "true"


def query(request: web.Request, *names: str) -> str:
    for name in names:
        if request.query.get(name):
            return id_of(name, request.query[name])
    raise EntityError(400, f"query parameter {names[0]} is required", names[0])


async def load(store: Store, kind: str, entity_id: str) -> dict[str, Any]:
    entity = await store.get(kind, entity_id)
    if entity is None:
        raise EntityError(404, f"{kind} {entity_id!r} not found", SCOPE_KIND.get(kind, kind))
    return entity


def key_token(value: str) -> str:
    """Keys are addressed by the plain key or by its hash (as /key/list shows them)."""
    return hash_key(value) if value.startswith("sk-") else value


def now_ms() -> int:
    # The same clock that authenticate() compares expires_at with.
    return int(time.time() * 1000)


async def key_organization(store: Store, key: dict[str, Any], changes: dict[str, Any]) -> None:
    """A key in a team is under its team's organization, whose id it carries (LiteLLM copies
    the team's organization_id onto the key); naming another one is a 400, as in LiteLLM. A
    key with no team keeps the organization it names."""
    team_id = key.get("team_id")
    if not team_id:
        return
    team = await store.get("team", team_id) or {}
    team_org = team.get("organization_id")
    asked = changes.get("organization_id")
    if asked and asked != team_org:
        where = f"organization {team_org!r}" if team_org else "no organization"
        raise EntityError(
            400,
            f"organization_id {asked!r} conflicts with team {team_id!r}, which is in {where}: "
            "a key in a team is under its team's organization; leave organization_id out "
            "or move the team with /team/update",
            "organization_id",
        )
    key["organization_id"] = team_org


async def _move_team_keys(store: Store, team_id: str, organization_id: str | None) -> None:
    """A team that changes organization takes its keys along (they carry its id)."""
    for key in await store.naming("key", "team_id", team_id):
        if key.get("organization_id") != organization_id:
            await store.put("key", key["token"], {**key, "organization_id": organization_id})


async def update(
    request: web.Request, kind: str, entity_id: str, changes: dict[str, Any]
) -> dict[str, Any]:
    store = request.app[STORE]
    spend = take_spend(changes)
    await check_references(request, kind, changes)
    before = await load(store, kind, entity_id)
    entity = {**before, **changes, "updated_at": now_ms()}
    if kind == "customer" and entity.get("budget_id") and entity.get("max_budget") is not None:
        raise EntityError(
            400, "give a customer either budget_id or max_budget, not both", "budget_id"
        )
    if kind == "key" and ("team_id" in changes or "organization_id" in changes):
        await key_organization(store, entity, changes)
    await store.put(kind, entity_id, entity)
    moved = entity.get("organization_id") != before.get("organization_id")
    if kind == "team" and moved:
        await _move_team_keys(store, entity_id, entity.get("organization_id"))
    if spend is not None:
        await set_spend(request, kind, entity_id, entity, spend)
    return entity


def take_spend(fields: dict[str, Any]) -> float | None:
    """``spend`` of a create or update body, taken out: it is never stored (the ledger
    keeps spend), it is applied with ``set_spend`` once the entity is written."""
    spend = fields.pop("spend", None)
    return None if spend is None else float(spend)


async def delete(request: web.Request, kind: str, ids: list[str]) -> None:
    store = request.app[STORE]
    for entity_id in ids:
        if kind in SCOPE_KIND:
            entity = await store.get(kind, entity_id) or {}
            scope = scope_id(kind, entity_id, entity)
            # A key rotated with a grace period has two records on one scope: closing the
            # scope for the one deleted would stop the other too.
            if kind != "key" or len(await store.naming("key", "key_id", scope)) < 2:
                await gate(request, kind, scope, True, DELETED_GATE_TTL_S)
        await store.delete(kind, entity_id)


def scope_id(kind: str, entity_id: str, entity: Mapping[str, Any]) -> str:
    """The id a scope's counters are kept under. A key's is the hash it was created with
    (``key_id``), so that its limits and spend stay with it when /key/regenerate gives it a
    new secret; keys made before rotation existed have no key_id and use their hash."""
    return entity.get("key_id") or entity_id if kind == "key" else entity_id


# A deleted entity's gate outlives every sidecar's cached copy of it.
DELETED_GATE_TTL_S = 60


async def gate(
    request: web.Request, kind: str, entity_id: str, closed: bool, ttl_s: int | None = None
) -> None:
    gate = Scope(SCOPE_KIND[kind], entity_id).gate(request.app[SETTINGS].key_prefix)
    with translate_errors(request.app[ENGINE].address):
        if closed:
            await request.app[ENGINE].redis.set(gate, 1, ex=ttl_s)
        else:
            await request.app[ENGINE].redis.delete(gate)
