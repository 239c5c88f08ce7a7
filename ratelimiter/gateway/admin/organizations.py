"""Organizations: a scope above teams, with LiteLLM's routes and shapes.

An organization has limits of its own (and may take the rest from a ``budget_id``, as every
entity does); every request of its teams' keys, and of keys that name it without a team,
meets them in the same atomic admission as its other scopes. LiteLLM's methods are served
(PATCH /organization/update, DELETE /organization/delete and /organization/member_delete),
and POST too, as the rest of this API is. Responses nest the limits in
``litellm_budget_table`` and list ``members`` and ``teams``, as LiteLLM's
LiteLLM_OrganizationTableWithMembers does.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from ...errors import EntityError
from ...responses import json_response
from ..http import STORE
from ..models import (
    OrganizationMemberAddRequest,
    OrganizationMemberDeleteRequest,
    UpdateOrganizationRequest,
    check,
    validate,
)
from ..policy import Scope
from ..resolver import effective_fields
from ..store import MAX_LIST, MAX_TEXT, Store
from . import access
from .common import (
    check_references,
    delete,
    ids_of,
    iso,
    lifetime_spends,
    load,
    now_ms,
    query,
    read_object,
    spend_windows,
    update,
)

__all__ = [
    "leave_organizations",
    "organization_delete",
    "organization_info",
    "organization_list",
    "organization_member_add",
    "organization_member_delete",
    "organization_new",
    "organization_update",
    "organization_view",
]

# Who LiteLLM records as created_by/updated_by when the master key acts (its
# litellm_proxy_admin_name).
ADMIN = "default_user_id"
# LiteLLM_BudgetTable's fields, which the responses nest under litellm_budget_table.
BUDGET_FIELDS = (
    "soft_budget",
    "max_budget",
    "max_parallel_requests",
    "tpm_limit",
    "rpm_limit",
    "tpd_limit",
    "model_max_budget",
    "budget_duration",
    "allowed_models",
    "temp_budget_increase",
    "temp_budget_expiry",
)
_SHOWN_ONLY = ("budget_reset_at", "created_at")  # of the nested table: shown, never written


async def organization_view(
    request: web.Request, org: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """An organization as LiteLLM shows it, with the limiter's spend of every budget window."""
    store = request.app[STORE]
    org_id = org["organization_id"]
    problem: dict[str, str] = {}
    try:
        fields = await effective_fields(store, f"organization {org_id!r}", org)
    except EntityError as exc:  # a missing budget: shown, so that an admin can mend it
        fields, problem = org, {"error": str(exc)}
    windows = await spend_windows(request, Scope("organization", org_id, fields))
    first = windows[0] if windows else {}
    own = {
        name: org.get(name)
        for name in org
        if name not in BUDGET_FIELDS and name not in ("members", "created_at", "updated_at")
    }
    teams = await store.naming("team", "organization_id", org_id)
    return {
        **own,
        "organization_id": org_id,
        "organization_alias": org.get("organization_alias"),
        "budget_id": org.get("budget_id"),
        "models": org.get("models") or [],
        "metadata": org.get("metadata") or {},
        "spend": (await lifetime_spends(request, "organization", [org_id]))[org_id],
        "model_spend": {},
        "created_by": org.get("created_by", ADMIN),
        "updated_by": org.get("updated_by", ADMIN),
        "created_at": iso(org.get("created_at")),
        "updated_at": iso(org.get("updated_at")),
        "litellm_budget_table": {
            "budget_id": org.get("budget_id"),
            **{name: fields.get(name) for name in BUDGET_FIELDS},
            "budget_reset_at": first.get("budget_reset_at"),
            "created_at": iso(org.get("created_at")),
        },
        "members": [_membership(org_id, m) for m in org.get("members") or []],
        "teams": sorted(teams, key=lambda t: t["team_id"]),
        "budget_reset_at": first.get("budget_reset_at"),
        "budget_windows": windows,
        **problem,
        **extra,
    }


def _membership(org_id: str, member: dict[str, Any]) -> dict[str, Any]:
    """LiteLLM_OrganizationMembershipTable."""
    return {
        "user_id": member["user_id"],
        "organization_id": org_id,
        "user_role": member.get("user_role"),
        "user_email": member.get("user_email"),
        "spend": 0.0,
        "budget_id": None,
        "max_budget_in_organization": member.get("max_budget_in_organization"),
        "created_at": iso(member.get("created_at")),
        "updated_at": iso(member.get("updated_at")),
    }


async def organization_new(request: web.Request) -> web.Response:
    await access.admin(request)
    org = validate("organization", await read_object(request))
    org_id = org.get("organization_id") or str(uuid.uuid4())
    org["organization_id"] = org_id
    await check_references(request, "organization", org)
    now = now_ms()
    org.update(created_at=now, updated_at=now, created_by=ADMIN, updated_by=ADMIN, members=[])
    await request.app[STORE].create("organization", org_id, org)
    return json_response(await organization_view(request, org))


async def organization_update(request: web.Request) -> web.Response:
    """LiteLLM's UI sends the limits nested in litellm_budget_table: they count as sent at
    the top level (the nested value wins, as in LiteLLM). The limits are the organization's
    own; a budget_id it names still fills those it leaves unset."""
    await access.admin(request)
    body = await read_object(request)
    check(UpdateOrganizationRequest, body, "an organization")  # the nested table's fields too
    flat = {k: v for k, v in body.items() if k != "litellm_budget_table"}
    nested = body.get("litellm_budget_table") or {}
    flat.update({k: v for k, v in nested.items() if k not in _SHOWN_ONLY})
    changes = validate("organization", flat, partial=True)
    changes["updated_at"] = now_ms()
    changes["updated_by"] = changes.get("updated_by") or ADMIN
    org = await update(request, "organization", body["organization_id"], changes)
    return json_response(await organization_view(request, org))


async def organization_info(request: web.Request) -> web.Response:
    """GET with ?organization_id= (LiteLLM's), or LiteLLM's deprecated POST
    {"organizations": [...]}, which answers a list."""
    await access.view(request)
    store = request.app[STORE]
    if request.method == "POST":
        ids = ids_of(await read_object(request), "organizations")
        return json_response(
            [await organization_view(request, await load(store, "organization", i)) for i in ids]
        )
    org = await load(store, "organization", query(request, "organization_id"))
    return json_response(await organization_view(request, org))


async def organization_list(request: web.Request) -> web.Response:
    """Every organization, or those matching ``org_id`` (exactly) and ``org_alias`` (a part
    of the alias, any case), as LiteLLM filters them."""
    await access.view(request)
    wanted_id = request.query.get("org_id") or None
    alias = (request.query.get("org_alias") or "").casefold()
    for name, value in (("org_id", wanted_id), ("org_alias", alias)):
        if value is not None and len(value) > MAX_TEXT:
            raise EntityError(400, f"{name} has at most {MAX_TEXT} characters", name)
    found = [
        org
        for org in await request.app[STORE].all("organization")
        if (wanted_id is None or org["organization_id"] == wanted_id)
        and alias in (org.get("organization_alias") or "").casefold()
    ]
    found.sort(key=lambda o: o["organization_id"])
    return json_response([await organization_view(request, org) for org in found])


async def organization_delete(request: web.Request) -> web.Response:
    """As LiteLLM does: the organization's teams go with it (and, as /team/delete has it,
    their keys), and so do the keys that name it, so nothing is left that its limits bound.
    Each is gated before it is deleted, so no sidecar serves it from its cache meanwhile.
    Answers the deleted organizations, as they were, each with the keys deleted."""
    await access.admin(request)
    ids = ids_of(await read_object(request), "organization_ids")
    store = request.app[STORE]
    orgs = [await load(store, "organization", org_id) for org_id in ids]
    deleted = []
    for org in orgs:
        org_id = org["organization_id"]
        teams = [t["team_id"] for t in await store.naming("team", "organization_id", org_id)]
        keys = {k["token"] for k in await store.naming("key", "organization_id", org_id)}
        for team_id in teams:
            keys.update(k["token"] for k in await store.naming("key", "team_id", team_id))
        view = await organization_view(request, org, deleted_keys=sorted(keys))
        await delete(request, "key", sorted(keys))  # first: a failure here leaves the owners
        await delete(request, "team", teams)
        await store.delete("organization", org_id)
        deleted.append(view)
    return json_response(deleted)


async def _users_by_email(store: Store) -> dict[str, dict[str, Any]]:
    return {u["user_email"]: u for u in await store.all("user") if u.get("user_email")}


async def organization_member_add(request: web.Request) -> web.Response:
    """Each member is found by user_id, else by user_email; a user that does not exist is
    created (with that id, or a new one, and the email), as LiteLLM does. A user already in
    the organization is a 409."""
    await access.admin(request)
    body = check(
        OrganizationMemberAddRequest, await read_object(request), "/organization/member_add"
    )
    store = request.app[STORE]
    org = await load(store, "organization", body.organization_id)
    added = body.member if isinstance(body.member, list) else [body.member]
    current = {m["user_id"]: m for m in org.get("members") or []}
    if len(current) + len(added) > MAX_LIST:
        raise EntityError(400, f"an organization has at most {MAX_LIST} members", "member")
    by_email: dict[str, dict[str, Any]] | None = None
    users, memberships, now = [], [], now_ms()
    for i, member in enumerate(added):
        user = await store.get("user", member.user_id) if member.user_id else None
        if user is None and member.user_id is None:
            if not member.user_email:
                raise EntityError(
                    400, f"member[{i}]: give user_id or user_email", f"member[{i}].user_id"
                )
            by_email = by_email if by_email is not None else await _users_by_email(store)
            user = by_email.get(member.user_email)
        if user is None:
            fields = {"user_id": member.user_id or str(uuid.uuid4())}
            if member.user_email:
                fields["user_email"] = member.user_email
            user = validate("user", fields)
            try:
                await store.create("user", user["user_id"], user)
            except EntityError as exc:
                if exc.status != 409:  # 409: created meanwhile, which is as good
                    raise
                user = await store.get("user", user["user_id"]) or user
        if user["user_id"] in current:
            raise EntityError(
                409,
                f"user {user['user_id']!r} is already in organization {body.organization_id!r}",
                "member",
            )
        current[user["user_id"]] = {
            "user_id": user["user_id"],
            "user_role": member.role,
            "user_email": member.user_email or user.get("user_email"),
            "max_budget_in_organization": body.max_budget_in_organization,
            "created_at": now,
            "updated_at": now,
        }
        users.append(user)
        memberships.append(_membership(body.organization_id, current[user["user_id"]]))
    await update(request, "organization", body.organization_id, {"members": list(current.values())})
    return json_response(
        {
            "organization_id": body.organization_id,
            "updated_users": users,
            "updated_organization_memberships": memberships,
        }
    )


async def organization_member_delete(request: web.Request) -> web.Response:
    """The member named by user_id, else by user_email; answers the membership removed."""
    await access.admin(request)
    body = check(
        OrganizationMemberDeleteRequest,
        await read_object(request),
        "/organization/member_delete",
    )
    if body.user_id is None and not body.user_email:
        raise EntityError(400, "give user_id or user_email", "user_id")
    org = await load(request.app[STORE], "organization", body.organization_id)
    members = org.get("members") or []
    if body.user_id is not None:
        gone = [m for m in members if m["user_id"] == body.user_id]
    else:
        gone = [m for m in members if m.get("user_email") == body.user_email]
        if not gone:  # a membership added by user_id: the user's record has the email
            users = await _users_by_email(request.app[STORE])
            user_id = users.get(body.user_email or "", {}).get("user_id")
            gone = [m for m in members if m["user_id"] == user_id]
    if not gone:
        who = body.user_id if body.user_id is not None else body.user_email
        raise EntityError(
            404,
            f"user {who!r} is not a member of organization {body.organization_id!r}",
            "user_id",
        )
    kept = [m for m in members if m["user_id"] != gone[0]["user_id"]]
    await update(request, "organization", body.organization_id, {"members": kept})
    return json_response(_membership(body.organization_id, gone[0]))


async def leave_organizations(request: web.Request, user_ids: set[str]) -> None:
    """A deleted user is no longer a member of any organization."""
    for org in await request.app[STORE].all("organization"):
        members = org.get("members") or []
        kept = [m for m in members if m.get("user_id") not in user_ids]
        if len(kept) != len(members):
            await update(request, "organization", org["organization_id"], {"members": kept})
