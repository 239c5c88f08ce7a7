"""Users, teams and their members, customers (end users) and budgets."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ...errors import EntityError
from ...responses import json_response
from ..http import ENGINE, STORE
from ..models import validate
from ..policy import LIMIT_FIELDS, Scope
from ..store import MAX_LIST, REFERENCES, Store, members
from . import access
from .common import (
    check_references,
    delete,
    entity_info,
    id_of,
    ids_of,
    lifetime_spends,
    load,
    now_ms,
    present,
    query,
    read_object,
    required,
    scope_id,
    set_spend,
    spend_windows,
    take_spend,
    update,
)
from .keys import create_key
from .organizations import leave_organizations


async def user_new(request: web.Request) -> web.Response:
    """A user, in the teams it names, with its first key unless ``auto_create_key`` is false
    (as LiteLLM's /user/new): the key shares the user's limits and takes ``duration``,
    ``key_alias`` and ``models`` from the request."""
    await access.admin(request)
    store = request.app[STORE]
    user = validate("user", await read_object(request))
    spend = take_spend(user)
    user_id = user.get("user_id") or str(uuid.uuid4())
    user["user_id"] = user_id
    for_key = {name: user.pop(name) for name in ("duration", "key_alias") if name in user}
    auto_create_key = user.pop("auto_create_key", None) is not False
    memberships = _memberships(user)
    teams = {team_id: await load(store, "team", team_id) for team_id, _ in memberships}
    await check_references(request, "user", user)
    now = now_ms()
    await store.create("user", user_id, {**user, "created_at": now, "updated_at": now})
    if spend is not None:  # a user id used before starts again only when told so
        await set_spend(request, "user", user_id, user, spend)
    for team_id, member in memberships:
        await _add_members(request, teams[team_id], [{**member, "user_id": user_id}])
    answer = present("user", {**user, "created_at": now, "updated_at": now})
    if auto_create_key:
        # LiteLLM's older team_id makes the user's key a key of that team as well
        team = {"team_id": user["team_id"]} if user.get("team_id") else {}
        key = await create_key(
            request, {"user_id": user_id, "models": user.get("models") or [], **for_key, **team}
        )
        answer |= {n: key[n] for n in ("key", "key_name", "token_id", "expires")}
    return json_response(answer)


def _memberships(user: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(team id, member fields) of each team /user/new names: ``teams`` as ids or as
    {team_id, max_budget_in_team, user_role}, and the older ``team_id``."""
    named: list[Any] = [*(user.get("teams") or []), *filter(None, [user.get("team_id")])]
    out = []
    for i, entry in enumerate(named):
        spec = {"team_id": entry} if isinstance(entry, str) else entry
        if not isinstance(spec, dict) or set(spec) - {"team_id", "max_budget_in_team", "user_role"}:
            raise EntityError(
                400,
                f"teams[{i}]: a team id, or {{team_id, max_budget_in_team, user_role}}",
                "teams",
            )
        team_id = id_of(f"teams[{i}].team_id", spec.get("team_id"))
        member = members(
            f"teams[{i}]",
            [
                {
                    "user_id": "-",  # the user's own, set once it exists
                    "role": spec.get("user_role") or "user",
                    "max_budget_in_team": spec.get("max_budget_in_team"),
                }
            ],
        )[0]
        out.append((team_id, member))
    return out


def create(kind: str, id_field: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        await access.admin(request)
        store = request.app[STORE]
        entity = validate(kind, await read_object(request))
        entity_id = entity.get(id_field) or (None if kind != "team" else str(uuid.uuid4()))
        if not entity_id:
            raise EntityError(400, f"{id_field} is required", id_field)
        entity[id_field] = entity_id
        spend = take_spend(entity)
        if kind != "budget":
            await check_references(request, kind, entity)
        if kind == "team":
            entity["members"] = await _team_members(request, entity)
        now = now_ms()
        entity |= {"created_at": now, "updated_at": now}
        await store.create(kind, entity_id, entity)
        if spend is not None:
            await set_spend(request, kind, entity_id, entity, spend)
        return json_response(present(kind, entity, request.app[ENGINE].tz))

    return handler


async def _team_members(request: web.Request, fields: dict[str, Any]) -> list[dict[str, Any]]:
    """``members`` and LiteLLM's ``members_with_roles`` together, one entry per user."""
    listed = [*(fields.pop("members", None) or []), *(fields.pop("members_with_roles", None) or [])]
    found = await _with_users(request, listed)
    by_user = {m["user_id"]: m for m in found}
    if len(by_user) > MAX_LIST:
        raise EntityError(400, f"a team has at most {MAX_LIST} members", "members")
    return list(by_user.values())


async def _with_users(request: web.Request, listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Members with their user ids: a member named by email is the user with that email, or
    a new user; a member named by an id that no user has becomes that user (as LiteLLM)."""
    store = request.app[STORE]
    by_email: dict[str, str] | None = None
    out = []
    for member in listed:
        user_id, email = member.get("user_id"), member.get("user_email")
        if user_id is None:
            if by_email is None:
                by_email = {
                    u["user_email"]: u["user_id"]
                    for u in await store.all("user")
                    if u.get("user_email")
                }
            user_id = by_email.get(email)
        if user_id is None or await store.get("user", user_id) is None:
            user_id = user_id or str(uuid.uuid4())
            await _ensure_user(request, user_id, email)
            if email and by_email is not None:
                by_email[email] = user_id
        out.append({**member, "user_id": user_id})
    return out


async def _ensure_user(request: web.Request, user_id: str, email: str | None) -> None:
    now = now_ms()
    user = validate("user", {"user_id": user_id, "user_email": email})
    try:
        await request.app[STORE].create(
            "user", user_id, {**user, "created_at": now, "updated_at": now}
        )
    except EntityError as exc:
        if exc.status != 409:  # made meanwhile, which is as good
            raise


async def _user_keys(request: web.Request, field: str, owner: str) -> list[dict[str, Any]]:
    """A user's or team's keys, each with its lifetime spend (read for all in one go)."""
    keys = await request.app[STORE].naming("key", field, owner)
    ids = [scope_id("key", k["token"], k) for k in keys]
    spends = await lifetime_spends(request, "key", ids)
    return [{**present("key", k), "spend": spends[i]} for k, i in zip(keys, ids, strict=True)]


def info_route(kind: str, *params: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """LiteLLM's shapes: /user/info {user_id, user_info, keys, teams}, /team/info {team_id,
    team_info, keys, team_memberships}, /customer/info the customer itself."""

    async def handler(request: web.Request) -> web.Response:
        await access.info(request, kind)
        store = request.app[STORE]
        entity_id = query(request, *params)
        entity = await load(store, kind, entity_id)
        info = present(kind, await entity_info(request, kind, entity_id, entity))
        if kind == "user":
            teams = [t for t in await store.all("team") if _member(t, entity_id)]
            body = {
                "user_id": entity_id,
                "user_info": info,
                "keys": await _user_keys(request, "user_id", entity_id),
                "teams": [
                    {
                        **present("team", t),
                        "team_memberships": [
                            await _membership(request, t, m)
                            for m in t.get("members") or []
                            if m["user_id"] == entity_id
                        ],
                    }
                    for t in teams
                ],
            }
        elif kind == "team":
            body = {
                "team_id": entity_id,
                "team_info": info,
                "keys": await _user_keys(request, "team_id", entity_id),
                "team_memberships": [
                    await _membership(request, entity, m) for m in entity.get("members") or []
                ],
            }
        else:
            body = {**info, "litellm_budget_table": _budget_table(info)}
        return json_response(body)

    return handler


def _member(team: dict[str, Any], user_id: str) -> bool:
    return any(m["user_id"] == user_id for m in team.get("members") or [])


async def _membership(
    request: web.Request, team: dict[str, Any], member: dict[str, Any]
) -> dict[str, Any]:
    """LiteLLM's TeamMembership: a member's budget in the team and its spend against it (the
    member scope's current window: what ``max_budget_in_team`` is enforced on)."""
    budget = member.get("max_budget_in_team")
    window = {"max_budget": budget, "budget_duration": team.get("budget_duration")}
    scope = Scope("member", f"{team['team_id']}:{member['user_id']}", window)
    spent = await spend_windows(request, scope) if budget is not None else []
    return {
        "team_id": team["team_id"],
        "user_id": member["user_id"],
        "spend": spent[0]["spend"] if spent else 0.0,
        "litellm_budget_table": None if budget is None else window,
    }


def _budget_table(entity: dict[str, Any]) -> dict[str, Any] | None:
    """The limits LiteLLM shows nested under ``litellm_budget_table``."""
    limits = {name: entity.get(name) for name in LIMIT_FIELDS}
    if all(v is None for v in limits.values()) and not entity.get("budget_id"):
        return None
    return {"budget_id": entity.get("budget_id"), **limits}


def update_route(kind: str, id_field: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        await access.admin(request)
        body = await read_object(request)
        changes = validate(kind, body, partial=True)
        if kind == "user" and body.get("user_id") is None and body.get("user_email") is not None:
            entity_id = await _user_by_email(request, changes.pop("user_email"))
        else:
            entity_id = required(body, id_field)
        if kind == "user":  # LiteLLM's /user/update makes a user it does not know
            await _ensure_user(request, entity_id, None)
        if kind == "team" and {"members", "members_with_roles"} & changes.keys():
            changes["members"] = await _team_members(request, changes)
        entity = await update(request, kind, entity_id, changes)
        return json_response(present(kind, entity, request.app[ENGINE].tz))

    return handler


async def _user_by_email(request: web.Request, email: str) -> str:
    for user in await request.app[STORE].all("user"):
        if user.get("user_email") == email:
            return user["user_id"]
    raise EntityError(404, f"no user has user_email {email!r}", "user_email")


def delete_route(kind: str, list_field: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Deleting a user or a team deletes its keys, as LiteLLM does; a budget that anything
    still names is not deleted (409). So a delete never leaves a key without its limits."""

    async def handler(request: web.Request) -> web.Response:
        await access.admin(request)
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
    await access.team_members(request)
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
    return json_response(present("team", await _add_members(request, team, added)))


async def _add_members(
    request: web.Request, team: dict[str, Any], added: list[dict[str, Any]]
) -> dict[str, Any]:
    current = {m["user_id"]: m for m in team.get("members") or []}
    for member in await _with_users(request, added):
        if member["user_id"] in current:
            raise EntityError(
                409,
                f"user {member['user_id']!r} is already in team {team['team_id']!r}",
                "member",
            )
        current[member["user_id"]] = member
    if len(current) > MAX_LIST:
        raise EntityError(400, f"a team has at most {MAX_LIST} members", "member")
    return await update(request, "team", team["team_id"], {"members": list(current.values())})


async def team_member_update(request: web.Request) -> web.Response:
    """A member's role, budget (``max_budget_in_team``) and rates in the team; a field
    left out stays as it was, null removes a budget or a rate."""
    await access.team_members(request)
    body = await read_object(request)
    team_id = required(body, "team_id")
    user_id = await _named_member(request, body)
    team = await load(request.app[STORE], "team", team_id)
    listed = team.get("members") or []
    current = next((m for m in listed if m["user_id"] == user_id), None)
    if current is None:
        raise EntityError(404, f"user {user_id!r} is not a member of team {team_id!r}", "user_id")
    changed = {
        n: body[n] for n in ("role", "max_budget_in_team", "rpm_limit", "tpm_limit") if n in body
    }
    if changed.get("role", "") is None:
        changed.pop("role")
    (member,) = members("member", [{**current, **changed}])
    kept = [member if m["user_id"] == user_id else m for m in listed]
    await update(request, "team", team_id, {"members": kept})
    return json_response({"team_id": team_id, **member})


async def _named_member(request: web.Request, body: dict[str, Any]) -> str:
    if body.get("user_id") is None and body.get("user_email") is not None:
        return await _user_by_email(request, id_of("user_email", body["user_email"]))
    return required(body, "user_id")


async def team_member_delete(request: web.Request) -> web.Response:
    await access.team_members(request)
    body = await read_object(request)
    team_id = required(body, "team_id")
    user_id = await _named_member(request, body)
    team = await load(request.app[STORE], "team", team_id)
    members = [m for m in team.get("members") or [] if m["user_id"] != user_id]
    if len(members) == len(team.get("members") or []):
        raise EntityError(404, f"user {user_id!r} is not a member of team {team_id!r}", "user_id")
    return json_response(
        present("team", await update(request, "team", team_id, {"members": members}))
    )


async def budget_list(request: web.Request) -> web.Response:
    await access.view(request)
    tz = request.app[ENGINE].tz
    budgets = await request.app[STORE].all("budget")
    return json_response([present("budget", b, tz) for b in budgets])


async def budget_info(request: web.Request) -> web.Response:
    await access.view(request)
    store = request.app[STORE]
    if request.method == "POST":
        ids = ids_of(await read_object(request), "budgets")
    else:
        ids = [query(request, "budget_id")]
    tz = request.app[ENGINE].tz
    return json_response([present("budget", await load(store, "budget", b), tz) for b in ids])
