"""Users, teams and their members, customers (end users) and budgets."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ...errors import EntityError
from ...responses import json_response
from ..http import STORE, require_master
from ..models import validate
from ..store import MAX_LIST, REFERENCES, Store, members
from .common import (
    check_references,
    delete,
    entity_info,
    ids_of,
    load,
    query,
    read_object,
    required,
    update,
)
from .keys import create_key
from .organizations import leave_organizations


async def user_new(request: web.Request) -> web.Response:
    require_master(request)
    body = await read_object(request)
    store = request.app[STORE]
    user = validate("user", body)
    user_id = user.get("user_id") or str(uuid.uuid4())
    user["user_id"] = user_id
    await check_references(request, "user", user)
    await store.create("user", user_id, user)
    # LiteLLM's /user/new also hands out a key for the user; it shares the user's limits
    key = await create_key(request, {"user_id": user_id, "models": user.get("models") or []})
    return json_response({**user, "key": key["key"], "expires": key["expires"]})


def create(kind: str, id_field: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        require_master(request)
        store = request.app[STORE]
        entity = validate(kind, await read_object(request))
        entity_id = entity.get(id_field) or (None if kind != "team" else str(uuid.uuid4()))
        if not entity_id:
            raise EntityError(400, f"{id_field} is required", id_field)
        entity[id_field] = entity_id
        if kind != "budget":
            await check_references(request, kind, entity)
        await store.create(kind, entity_id, entity)
        return json_response(entity)

    return handler


def info_route(kind: str, *params: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        require_master(request)
        entity_id = query(request, *params)
        entity = await load(request.app[STORE], kind, entity_id)
        info = await entity_info(request, kind, entity_id, entity)
        return json_response({params[0]: entity_id, f"{kind}_info": info, **info})

    return handler


def update_route(kind: str, id_field: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        require_master(request)
        body = await read_object(request)
        entity_id = required(body, id_field)
        changes = validate(kind, body, partial=True)
        return json_response(await update(request, kind, entity_id, changes))

    return handler


def delete_route(kind: str, list_field: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Deleting a user or a team deletes its keys, as LiteLLM does; a budget that anything
    still names is not deleted (409). So a delete never leaves a key without its limits."""

    async def handler(request: web.Request) -> web.Response:
        require_master(request)
        ids = ids_of(await read_object(request), list_field)
        store = request.app[STORE]
        for entity_id in ids:
            await load(store, kind, entity_id)
        if kind == "budget":
            for budget_id in ids:
                await _refuse_if_used(store, budget_id)
        body: dict[str, Any] = {"deleted": ids}
        if kind in ("user", "team"):
            keys = [k["token"] for i in ids for k in await store.naming("key", f"{kind}_id", i)]
            await delete(request, "key", keys)  # first: a failure here leaves the owner
            body["deleted_keys"] = keys
        await delete(request, kind, ids)
        if kind == "user":
            await _leave_teams(request, set(ids))
            await leave_organizations(request, set(ids))
        return json_response(body)

    return handler


async def _leave_teams(request: web.Request, user_ids: set[str]) -> None:
    """A deleted user is no longer a member of any team, as in LiteLLM."""
    for team in await request.app[STORE].all("team"):
        members = team.get("members") or []
        kept = [m for m in members if m.get("user_id") not in user_ids]
        if len(kept) != len(members):
            await update(request, "team", team["team_id"], {"members": kept})


async def _refuse_if_used(store: Store, budget_id: str) -> None:
    users = {kind: len(await store.naming(kind, "budget_id", budget_id)) for kind in REFERENCES}
    counts = [f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in users.items() if n]
    if counts:
        raise EntityError(
            409,
            f"budget {budget_id!r} is still used by {', '.join(counts)}: give them another "
            "budget_id (or none) with /key/update, /user/update, /team/update, "
            "/customer/update or /organization/update, or delete them, then delete the budget",
            "id",
        )


async def team_member_add(request: web.Request) -> web.Response:
    require_master(request)
    body = await read_object(request)
    team_id = required(body, "team_id")
    raw = body.get("member")
    raw = raw if isinstance(raw, list) else [raw]
    extra = (
        {"max_budget_in_team": body["max_budget_in_team"]} if "max_budget_in_team" in body else {}
    )
    # Anything but an object goes to validation as it is, to be refused there by name.
    merged = [{**m, **extra} if isinstance(m, dict) else m for m in raw]
    added = members("member", merged)
    team = await load(request.app[STORE], "team", team_id)
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
        await update(request, "team", team_id, {"members": list(current.values())})
    )


async def team_member_delete(request: web.Request) -> web.Response:
    require_master(request)
    body = await read_object(request)
    team_id, user_id = required(body, "team_id"), required(body, "user_id")
    team = await load(request.app[STORE], "team", team_id)
    members = [m for m in team.get("members") or [] if m["user_id"] != user_id]
    if len(members) == len(team.get("members") or []):
        raise EntityError(404, f"user {user_id!r} is not a member of team {team_id!r}", "user_id")
    return json_response(await update(request, "team", team_id, {"members": members}))


async def budget_list(request: web.Request) -> web.Response:
    require_master(request)
    return json_response(await request.app[STORE].all("budget"))


async def budget_info(request: web.Request) -> web.Response:
    require_master(request)
    store = request.app[STORE]
    if request.method == "POST":
        ids = ids_of(await read_object(request), "budgets")
    else:
        ids = [query(request, "budget_id")]
    return json_response([await load(store, "budget", b) for b in ids])
