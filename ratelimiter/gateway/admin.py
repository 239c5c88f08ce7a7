"""Admin routes with LiteLLM's paths and field names; all need the master key."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from aiohttp import web

from ..engine.connections import translate_errors
from ..engine.durations import expiry_ms, parse_duration, shown
from ..errors import EntityError
from ..ledger import Entry, Ledger, utc_ms
from ..pricing import dollars
from ..responses import json_response
from .http import ENGINE, SETTINGS, STORE, read_json, require_master
from .models import refuse_unknown, validate
from .openapi import add_docs_routes
from .policy import Scope, scope_budgets
from .resolver import effective_fields, unmatched_models
from .store import MAX_LIST, MAX_TEXT, REFERENCES, Store, hash_key, members, new_key

__all__ = ["add_admin_routes"]

SCOPE_KIND = {"key": "key", "user": "user", "team": "team", "customer": "end_user"}
MAX_IDS = 1_000  # ids in one delete, block or info call
MAX_PAGE = 1_000_000  # /spend/logs pages
MAX_PAGE_SIZE = 1_000  # /spend/logs rows per page
FIRST_DAY, LAST_DAY = date(1970, 1, 1), date(9999, 12, 30)  # LAST_DAY + 1 still exists


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat()


async def _check_references(request: web.Request, kind: str, fields: dict[str, Any]) -> None:
    """The budget an entity names must exist, and so must a key's team (404). A key's user is
    created if missing, as LiteLLM did: a key never names a user that does not exist (the
    resolver refuses such a key) or that a later /user/new would create with other limits.
    Every name in ``models`` must be able to match a served model (a typo would otherwise
    leave a key that can call nothing)."""
    store = request.app[STORE]
    unknown = unmatched_models(request.app[SETTINGS], fields.get("models") or ())
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
    if kind != "key":
        return
    team_id = fields.get("team_id")
    if team_id and await store.get("team", team_id) is None:
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


async def _spend(request: web.Request, scope: Scope) -> list[dict[str, Any]]:
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
            "budget_reset_at": _iso(use.end_ms),
        }
        for budget, use in zip(budgets, await request.app[ENGINE].budget_use(budgets), strict=True)
    ]


async def _info(
    request: web.Request, kind: str, entity_id: str, entity: dict[str, Any]
) -> dict[str, Any]:
    owner = "this key" if kind == "key" else f"{kind} {entity_id!r}"
    problem: dict[str, str] = {}
    try:
        fields = await effective_fields(request.app[STORE], owner, entity)
    except EntityError as exc:  # a missing budget: shown, so that an admin can mend it
        fields, problem = entity, {"error": str(exc)}
    windows = await _spend(request, Scope(SCOPE_KIND[kind], entity_id, fields))
    first = windows[0] if windows else {}
    return {
        **entity,
        "spend": first.get("spend", 0.0),
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


def _id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
        raise EntityError(
            400, f"{name} must be an id of 1 to {MAX_TEXT} characters, got {shown(value)}", name
        )
    return value


def _required(body: dict[str, Any], name: str) -> str:
    if body.get(name) is None:
        raise EntityError(400, f"{name} is required", name)
    return _id(name, body[name])


def _ids(body: dict[str, Any], name: str) -> list[str]:
    """A non-empty list of at most MAX_IDS ids (one id alone is taken as a list of one)."""
    ids = body.get(name)
    ids = [ids] if isinstance(ids, str) else ids
    if not isinstance(ids, list) or not ids or len(ids) > MAX_IDS:
        raise EntityError(
            400, f"{name} must be a non-empty list of at most {MAX_IDS} ids, got {shown(ids)}", name
        )
    return [_id(name, i) for i in ids]


def _query(request: web.Request, *names: str) -> str:
    for name in names:
        if request.query.get(name):
            return _id(name, request.query[name])
    raise EntityError(400, f"query parameter {names[0]} is required", names[0])


async def _load(store: Store, kind: str, entity_id: str) -> dict[str, Any]:
    entity = await store.get(kind, entity_id)
    if entity is None:
        raise EntityError(404, f"{kind} {entity_id!r} not found", SCOPE_KIND.get(kind, kind))
    return entity


def _key_id(value: str) -> str:
    """Keys are addressed by the plain key or by its hash (as /key/list shows them)."""
    return hash_key(value) if value.startswith("sk-") else value


# -- keys ---------------------------------------------------------------------------


def _now_ms() -> int:
    # The same clock that authenticate() compares expires_at with.
    return int(time.time() * 1000)


async def _create_key(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
    store = request.app[STORE]
    fields = validate("key", body)
    await _check_references(request, "key", fields)
    plain = new_key()
    token = hash_key(plain)
    now = _now_ms()
    expires = None
    if fields.get("duration"):
        expires = expiry_ms(parse_duration(fields["duration"]), now)
    entity = {**fields, "token": token, "created_at": now, "expires_at": expires}
    await store.create("key", token, entity)
    return {**entity, "key": plain, "expires": _iso(expires)}


async def key_generate(request: web.Request) -> web.Response:
    require_master(request)
    return json_response(await _create_key(request, await read_object(request)))


async def key_update(request: web.Request) -> web.Response:
    """A new ``duration`` counts from now, as in LiteLLM: the key expires that long after
    the update."""
    require_master(request)
    body = await read_object(request)
    token = _key_id(_required(body, "key"))
    changes = validate("key", body, partial=True)
    if changes.get("duration"):
        changes["expires_at"] = expiry_ms(parse_duration(changes["duration"]), _now_ms())
    entity = await _update(request, "key", token, changes)
    return json_response({**entity, "expires": _iso(entity.get("expires_at"))})


async def _update(
    request: web.Request, kind: str, entity_id: str, changes: dict[str, Any]
) -> dict[str, Any]:
    store = request.app[STORE]
    await _check_references(request, kind, changes)
    entity = {**await _load(store, kind, entity_id), **changes}
    if kind == "customer" and entity.get("budget_id") and entity.get("max_budget") is not None:
        raise EntityError(
            400, "give a customer either budget_id or max_budget, not both", "budget_id"
        )
    await store.put(kind, entity_id, entity)
    return entity


async def key_info(request: web.Request) -> web.Response:
    require_master(request)
    token = _key_id(_query(request, "key"))
    entity = await _load(request.app[STORE], "key", token)
    return json_response({"key": token, "info": await _info(request, "key", token, entity)})


async def key_delete(request: web.Request) -> web.Response:
    require_master(request)
    keys = _ids(await read_object(request), "keys")
    tokens = [_key_id(k) for k in keys]
    for token in tokens:
        await _load(request.app[STORE], "key", token)
    await _delete(request, "key", tokens)
    return json_response({"deleted_keys": keys})


async def _delete(request: web.Request, kind: str, ids: list[str]) -> None:
    for entity_id in ids:
        if kind in SCOPE_KIND:
            await _gate(request, kind, entity_id, True, DELETED_GATE_TTL_S)
        await request.app[STORE].delete(kind, entity_id)


# A deleted entity's gate outlives every sidecar's cached copy of it.
DELETED_GATE_TTL_S = 60


async def _gate(
    request: web.Request, kind: str, entity_id: str, closed: bool, ttl_s: int | None = None
) -> None:
    gate = Scope(SCOPE_KIND[kind], entity_id).gate(request.app[SETTINGS].key_prefix)
    with translate_errors(request.app[ENGINE].address):
        if closed:
            await request.app[ENGINE].redis.set(gate, 1, ex=ttl_s)
        else:
            await request.app[ENGINE].redis.delete(gate)


def _set_blocked(kind: str, blocked: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        require_master(request)
        body = await read_object(request)
        ids = [_key_id(_required(body, "key"))] if kind == "key" else _ids(body, "user_ids")
        entities = [await _update(request, kind, i, {"blocked": blocked}) for i in ids]
        for entity_id in ids:
            await _gate(request, kind, entity_id, blocked)
        return json_response(
            entities[0]
            if kind == "key"
            else {"blocked_users": ids}
            if blocked
            else {"unblocked_users": ids}
        )

    return handler


async def key_list(request: web.Request) -> web.Response:
    require_master(request)
    keys = await request.app[STORE].ids("key")
    return json_response({"keys": keys, "total_count": len(keys)})


# -- users, teams, customers, budgets ------------------------------------------------


async def user_new(request: web.Request) -> web.Response:
    require_master(request)
    body = await read_object(request)
    store = request.app[STORE]
    user = validate("user", body)
    user_id = user.get("user_id") or str(uuid.uuid4())
    user["user_id"] = user_id
    await _check_references(request, "user", user)
    await store.create("user", user_id, user)
    # LiteLLM's /user/new also hands out a key for the user; it shares the user's limits
    key = await _create_key(request, {"user_id": user_id, "models": user.get("models") or []})
    return json_response({**user, "key": key["key"], "expires": key["expires"]})


def _create(kind: str, id_field: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        require_master(request)
        store = request.app[STORE]
        entity = validate(kind, await read_object(request))
        entity_id = entity.get(id_field) or (None if kind != "team" else str(uuid.uuid4()))
        if not entity_id:
            raise EntityError(400, f"{id_field} is required", id_field)
        entity[id_field] = entity_id
        if kind != "budget":
            await _check_references(request, kind, entity)
        await store.create(kind, entity_id, entity)
        return json_response(entity)

    return handler


def _info_route(kind: str, *params: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        require_master(request)
        entity_id = _query(request, *params)
        entity = await _load(request.app[STORE], kind, entity_id)
        info = await _info(request, kind, entity_id, entity)
        return json_response({params[0]: entity_id, f"{kind}_info": info, **info})

    return handler


def _update_route(kind: str, id_field: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        require_master(request)
        body = await read_object(request)
        entity_id = _required(body, id_field)
        changes = validate(kind, body, partial=True)
        return json_response(await _update(request, kind, entity_id, changes))

    return handler


def _delete_route(kind: str, list_field: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Deleting a user or a team deletes its keys, as LiteLLM does; a budget that anything
    still names is not deleted (409). So a delete never leaves a key without its limits."""

    async def handler(request: web.Request) -> web.Response:
        require_master(request)
        ids = _ids(await read_object(request), list_field)
        store = request.app[STORE]
        for entity_id in ids:
            await _load(store, kind, entity_id)
        if kind == "budget":
            for budget_id in ids:
                await _refuse_if_used(store, budget_id)
        body: dict[str, Any] = {"deleted": ids}
        if kind in ("user", "team"):
            keys = [k["token"] for i in ids for k in await store.naming("key", f"{kind}_id", i)]
            await _delete(request, "key", keys)  # first: a failure here leaves the owner
            body["deleted_keys"] = keys
        await _delete(request, kind, ids)
        if kind == "user":
            await _leave_teams(request, set(ids))
        return json_response(body)

    return handler


async def _leave_teams(request: web.Request, user_ids: set[str]) -> None:
    """A deleted user is no longer a member of any team, as in LiteLLM."""
    for team in await request.app[STORE].all("team"):
        members = team.get("members") or []
        kept = [m for m in members if m.get("user_id") not in user_ids]
        if len(kept) != len(members):
            await _update(request, "team", team["team_id"], {"members": kept})


async def _refuse_if_used(store: Store, budget_id: str) -> None:
    users = {kind: len(await store.naming(kind, "budget_id", budget_id)) for kind in REFERENCES}
    counts = [f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in users.items() if n]
    if counts:
        raise EntityError(
            409,
            f"budget {budget_id!r} is still used by {', '.join(counts)}: give them another "
            "budget_id (or none) with /key/update, /user/update, /team/update or "
            "/customer/update, or delete them, then delete the budget",
            "id",
        )


async def team_member_add(request: web.Request) -> web.Response:
    require_master(request)
    body = await read_object(request)
    team_id = _required(body, "team_id")
    raw = body.get("member")
    raw = raw if isinstance(raw, list) else [raw]
    extra = (
        {"max_budget_in_team": body["max_budget_in_team"]} if "max_budget_in_team" in body else {}
    )
    # Anything but an object goes to validation as it is, to be refused there by name.
    merged = [{**m, **extra} if isinstance(m, dict) else m for m in raw]
    added = members("member", merged)
    team = await _load(request.app[STORE], "team", team_id)
    current = {m["user_id"]: m for m in team.get("members") or []}
    for member in added:
        if member["user_id"] in current:
            raise EntityError(
                409, f"user {member['user_id']!r} is already in team {team_id!r}", "member"
            )
        current[member["user_id"]] = member
    if len(current) > MAX_LIST:
        raise EntityError(400, f"a team has at most {MAX_LIST} members", "member")
    return json_response(
        await _update(request, "team", team_id, {"members": list(current.values())})
    )


async def team_member_delete(request: web.Request) -> web.Response:
    require_master(request)
    body = await read_object(request)
    team_id, user_id = _required(body, "team_id"), _required(body, "user_id")
    team = await _load(request.app[STORE], "team", team_id)
    members = [m for m in team.get("members") or [] if m["user_id"] != user_id]
    if len(members) == len(team.get("members") or []):
        raise EntityError(404, f"user {user_id!r} is not a member of team {team_id!r}", "user_id")
    return json_response(await _update(request, "team", team_id, {"members": members}))


async def budget_list(request: web.Request) -> web.Response:
    require_master(request)
    return json_response(await request.app[STORE].all("budget"))


async def budget_info(request: web.Request) -> web.Response:
    require_master(request)
    store = request.app[STORE]
    if request.method == "POST":
        ids = _ids(await read_object(request), "budgets")
    else:
        ids = [_query(request, "budget_id")]
    return json_response([await _load(store, "budget", b) for b in ids])


# -- spend ----------------------------------------------------------------------------

GROUPS = {
    "key": "key",
    "api_key": "key",
    "user": "user",
    "team": "team",
    "customer": "customer",
    "end_user": "customer",
    "model": "model",
}
LOG_FILTERS = {
    "api_key": "key_hash",
    "user_id": "user_id",
    "team_id": "team_id",
    "end_user": "end_user",
    "model": "model",
}


def _date(request: web.Request, name: str, default: date) -> date:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        day = None
    if day is None or not FIRST_DAY <= day <= LAST_DAY:
        raise EntityError(
            400,
            f"{name} must be a date like 2026-11-24 from {FIRST_DAY} to {LAST_DAY}, "
            f"got {shown(raw)}",
            name,
        )
    return day


def _whole(request: web.Request, name: str, default: int, most: int) -> int:
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


def _dates(request: web.Request) -> tuple[date, date]:
    today = datetime.now(UTC).date()
    start = _date(request, "start_date", today - timedelta(days=30))
    end = _date(request, "end_date", today)
    if end < start or (end - start).days > 366:
        raise EntityError(
            400, "end_date must be on or after start_date, at most 366 days on", "end_date"
        )
    return start, end


def _log(entry: Entry) -> dict[str, Any]:
    meta, info = entry.meta, entry.info
    return {
        "request_id": entry.request_id,
        "api_key": meta.get("key_hash"),
        "key_alias": meta.get("key_alias"),
        "user": meta.get("user_id"),
        "team_id": meta.get("team_id"),
        "end_user": meta.get("end_user"),
        "model": meta.get("model"),
        "deployment": meta.get("deployment"),
        "call_type": meta.get("route"),
        "startTime": _iso(entry.started_ms),
        "endTime": _iso(entry.finished_ms),
        "duration_ms": entry.finished_ms - entry.started_ms,
        "prompt_tokens": info.get("prompt_tokens", 0),
        "completion_tokens": info.get("completion_tokens", 0),
        "total_tokens": entry.charged.get("tokens", 0),
        "spend": dollars(entry.charged.get("spend", 0)),
        "estimated_spend": dollars(entry.reserved.get("spend", 0)),
        "status": {"settled": "success", "released": "failure"}.get(entry.status, entry.status),
    }


async def spend_logs(request: web.Request) -> web.Response:
    require_master(request)
    start, end = _dates(request)
    wanted = {meta: request.query[q] for q, meta in LOG_FILTERS.items() if request.query.get(q)}
    if wanted.get("key_hash", "").startswith("sk-"):  # a plain key: look it up by its hash
        wanted["key_hash"] = hash_key(wanted["key_hash"])
    request_id = request.query.get("request_id")
    page = _whole(request, "page", 1, MAX_PAGE)
    size = _whole(request, "page_size", 50, MAX_PAGE_SIZE)
    ledger = Ledger(request.app[ENGINE])
    matched = []
    async for entry in ledger.entries(utc_ms(start), utc_ms(end + timedelta(days=1))):
        if request_id and entry.request_id != request_id:
            continue
        if all(entry.meta.get(k) == v for k, v in wanted.items()):
            matched.append(entry)
    matched.sort(key=lambda e: e.finished_ms, reverse=True)
    rows = [_log(e) for e in matched[(page - 1) * size : page * size]]
    return json_response({"data": rows, "total": len(matched), "page": page, "page_size": size})


async def global_spend(request: web.Request) -> web.Response:
    require_master(request)
    settings = request.app[SETTINGS]
    start, end = _dates(request)
    days = await Ledger(request.app[ENGINE]).rollups(start, end)
    total = sum(d.get("proxy:all", {}).get("spend", 0) for d in days.values())
    return json_response(
        {
            "spend": dollars(total),
            "max_budget": settings.max_budget,
            "start_date": start.isoformat(),
            "end_date": end.isoformat(),
        }
    )


async def global_spend_report(request: web.Request) -> web.Response:
    require_master(request)
    group = request.query.get("group_by", "team")
    if group not in GROUPS:
        raise EntityError(
            400, f"group_by must be one of {', '.join(GROUPS)}, got {group!r}", "group_by"
        )
    start, end = _dates(request)
    prefix = GROUPS[group] + ":"
    report = []
    for day, dims in (await Ledger(request.app[ENGINE]).rollups(start, end)).items():
        for dim, totals in sorted(dims.items()):
            if dim.startswith(prefix):
                report.append(
                    {
                        "group_by_day": day.isoformat(),
                        group: dim[len(prefix) :],
                        "spend": dollars(totals.get("spend", 0)),
                        "total_tokens": totals.get("tokens", 0),
                        "requests": totals.get("requests", 0),
                        "failures": totals.get("released", 0) + totals.get("expired", 0),
                    }
                )
    return json_response(report)


def add_admin_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/key/generate", key_generate)
    r.add_post("/key/update", key_update)
    r.add_get("/key/info", key_info)
    r.add_post("/key/delete", key_delete)
    r.add_post("/key/block", _set_blocked("key", True))
    r.add_post("/key/unblock", _set_blocked("key", False))
    r.add_get("/key/list", key_list)
    r.add_post("/user/new", user_new)
    r.add_get("/user/info", _info_route("user", "user_id"))
    r.add_post("/user/update", _update_route("user", "user_id"))
    r.add_post("/user/delete", _delete_route("user", "user_ids"))
    r.add_post("/team/new", _create("team", "team_id"))
    r.add_get("/team/info", _info_route("team", "team_id"))
    r.add_post("/team/update", _update_route("team", "team_id"))
    r.add_post("/team/delete", _delete_route("team", "team_ids"))
    r.add_post("/team/member_add", team_member_add)
    r.add_post("/team/member_delete", team_member_delete)
    for base in ("/customer", "/end_user"):
        r.add_post(f"{base}/new", _create("customer", "user_id"))
        r.add_get(f"{base}/info", _info_route("customer", "end_user_id", "user_id"))
        r.add_post(f"{base}/update", _update_route("customer", "user_id"))
        r.add_post(f"{base}/delete", _delete_route("customer", "user_ids"))
        r.add_post(f"{base}/block", _set_blocked("customer", True))
        r.add_post(f"{base}/unblock", _set_blocked("customer", False))
    r.add_post("/budget/new", _create("budget", "budget_id"))
    r.add_post("/budget/info", budget_info)
    r.add_get("/budget/info", budget_info)
    r.add_post("/budget/update", _update_route("budget", "budget_id"))
    r.add_post("/budget/delete", _delete_route("budget", "id"))
    r.add_get("/budget/list", budget_list)
    r.add_get("/spend/logs", spend_logs)
    r.add_get("/global/spend", global_spend)
    r.add_get("/global/spend/report", global_spend_report)
    add_docs_routes(app)  # the document describes the routes above
