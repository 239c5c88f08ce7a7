"""Who may call which admin route, as LiteLLM decides it.

The caller is the master key or a virtual key; a virtual key acts with its user's
``user_role`` (LiteLLM's LitellmUserRoles):

- ``proxy_admin``: as the master key, on every admin route.
- ``proxy_admin_viewer``: reads every info, list and spend route; changes nothing.
- ``internal_user`` (also a user with no role, as LiteLLM treats one): reads its own keys, its
  user, its teams and its own spend; creates, updates and deletes keys of its own user.
- ``internal_user_viewer``: reads its own keys, its user, its teams and its own spend.
- a key with no user: reads its own /key/info and its team's /team/info.

A team admin (a member whose role is ``admin``) also adds and removes the team's members, and
creates, updates and deletes the team's keys. Anything else is the admin's alone.

Refusals carry LiteLLM's status and the start of its message, which clients match. Where a
refusal could tell another user's key from one that does not exist, both get the same answer.

Each route's handler starts with one call here, which returns the caller (authenticated by
the resolver: a blocked, expired or deleted key gets nothing) or raises the refusal.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...errors import EntityError
from ..http import SETTINGS, STORE, bearer
from ..resolver import Caller, authenticate
from ..store import ROLES, Store
from .common import key_token, read_object, required

__all__ = [
    "ROLES",
    "admin",
    "caller_of",
    "info",
    "key_delete",
    "key_generate",
    "key_info",
    "key_list",
    "key_update",
    "listed_user",
    "role_of",
    "spend_logs",
    "team_members",
    "view",
]

PROXY_ADMIN, PROXY_ADMIN_VIEWER, INTERNAL_USER, INTERNAL_USER_VIEWER = ROLES
READERS = frozenset({PROXY_ADMIN, PROXY_ADMIN_VIEWER})  # may read everything
KEY_MAKERS = frozenset({INTERNAL_USER})  # may manage keys of their own user

# A key's fields that only an admin (or the admin of the key's team) may change on
# /key/update: its budgets, as in LiteLLM, and, stricter than LiteLLM, its other limits, so
# that a key an admin handed out keeps the limits it was given.
GUARDED_ON_UPDATE = frozenset(
    {
        "max_budget",
        "soft_budget",
        "budget_duration",
        "budget_limits",
        "budget_id",
        "model_max_budget",
        "spend",
        "temp_budget_increase",
        "temp_budget_expiry",
        "tpm_limit",
        "rpm_limit",
        "max_parallel_requests",
        "model_rpm_limit",
        "model_tpm_limit",
        "models",
        "duration",
        "input_tpm_limit",
        "output_tpm_limit",
        # an alias reaches its target past a models list that names the alias, and a key of
        # no team is under the organization it names: only an admin sets either
        "aliases",
        "organization_id",
        # every request of the key carries its tags, and meets their budgets
        "tags",
    }
)
# What a non-admin may not set on a key it generates (LiteLLM's clients send every field,
# often empty: only a value counts).
ADMIN_ONLY_ON_GENERATE = ("aliases", "organization_id")

CALLER = web.RequestKey("caller", Caller)


async def caller_of(request: web.Request) -> Caller:
    """The authenticated caller of this request (once per request)."""
    if CALLER not in request:
        request[CALLER] = await authenticate(
            request.app[STORE], request.app[SETTINGS], bearer(request)
        )
    return request[CALLER]


def role_of(caller: Caller) -> str | None:
    """The master key is a proxy admin; a key acts with its user's role (a user without a
    valid one is an internal_user, as in LiteLLM); a key with no user has none."""
    if caller.master:
        return PROXY_ADMIN
    if caller.user is None:
        return None
    role = caller.user.get("user_role")
    return role if role in ROLES else INTERNAL_USER


def user_id_of(caller: Caller) -> str | None:
    return caller.user["user_id"] if caller.user is not None else None


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


def _admin_only(request: web.Request, caller: Caller) -> EntityError:
    # LiteLLM's words and status (401, its type auth_error) for a route a role may not call
    return EntityError(
        401,
        "Authentication Error, Only proxy admin can be used to generate, delete, update info "
        f"for new keys/users/teams. Route={_route(request)}. Your role="
        f"{role_of(caller) or 'unknown'}. (The master key, or a key of a user whose user_role "
        "is proxy_admin, may call it.)",
        kind="auth_error",
    )


def _viewer_write(request: web.Request) -> EntityError:
    return EntityError(
        403,
        f"user not allowed to access this route, role= {PROXY_ADMIN_VIEWER}. Trying to "
        f"access: {_route(request)} (proxy_admin_viewer reads, it changes nothing)",
    )


def _refuse_role(request: web.Request, caller: Caller) -> EntityError:
    if role_of(caller) == PROXY_ADMIN_VIEWER:
        return _viewer_write(request)
    return _admin_only(request, caller)


async def admin(request: web.Request) -> Caller:
    """A route that changes what only an admin may: the master key or a proxy_admin."""
    caller = await caller_of(request)
    if role_of(caller) != PROXY_ADMIN:
        raise _refuse_role(request, caller)
    return caller


async def view(request: web.Request) -> Caller:
    """A route that reads across every entity: admins and proxy_admin_viewer."""
    caller = await caller_of(request)
    if role_of(caller) not in READERS:
        raise _admin_only(request, caller)
    return caller


async def _team(store: Store, team_id: Any) -> dict[str, Any] | None:
    return await store.get("team", team_id) if isinstance(team_id, str) and team_id else None


def _member(team: dict[str, Any] | None, user_id: str | None) -> dict[str, Any] | None:
    if team is None or user_id is None:
        return None
    return next((m for m in team.get("members") or [] if m.get("user_id") == user_id), None)


async def _team_admin(store: Store, caller: Caller, team_id: Any) -> bool:
    member = _member(await _team(store, team_id), user_id_of(caller))
    return member is not None and member.get("role") == "admin"


async def _manages(store: Store, caller: Caller, key: dict[str, Any]) -> bool:
    """A key is the caller's to see and manage: itself, a key of its user, or a key of a
    team it administers."""
    if (key.get("key_id") or key.get("token")) == caller.token:  # the caller's own key
        return True
    user_id = user_id_of(caller)
    if user_id is not None and key.get("user_id") == user_id:
        return True
    return await _team_admin(store, caller, key.get("team_id"))


def _not_yours(caller: Caller, what: str) -> EntityError:
    # one answer for another user's key and a key that does not exist
    return EntityError(
        403,
        f"{what}. Your role={role_of(caller) or 'unknown'}; a key you may not see and a key "
        "that does not exist look the same from here",
        "key",
    )


# -- keys ---------------------------------------------------------------------------------


async def key_info(request: web.Request) -> Caller:
    """/key/info: readers see every key; others their own keys, their user's and the keys of
    teams they administer (LiteLLM's _can_user_query_key_info)."""
    caller = await caller_of(request)
    if role_of(caller) in READERS:
        return caller
    raw = request.query.get("key")
    if not raw:
        return caller  # a key asks about itself; the master key must name one
    key = await request.app[STORE].get("key", key_token(raw))
    # A key that does not exist is a 404 to anyone, as in LiteLLM: a secret is 190 random
    # bits, so saying a guessed one does not exist tells nothing.
    if key is not None and not await _manages(request.app[STORE], caller, key):
        raise _not_yours(caller, "You are not allowed to access this key's info")
    return caller


async def key_list(request: web.Request) -> Caller:
    """/key/list: readers list every key, a user's key the user's keys (LiteLLM)."""
    caller = await caller_of(request)
    if role_of(caller) not in READERS and user_id_of(caller) is None:
        raise EntityError(
            403,
            "You are not authorized to access this endpoint. No 'user_id' is associated with "
            "your API key.",
        )
    return caller


def listed_user(caller: Caller) -> str | None:
    """The user whose keys ``caller`` may list; None: every key (readers)."""
    return None if role_of(caller) in READERS else user_id_of(caller)


async def _check_team(request: web.Request, caller: Caller, team_id: Any) -> None:
    """A key named for a team: only the team's admins make or move one (a plain member may
    only read its keys, LiteLLM's default team member permissions)."""
    member = _member(await _team(request.app[STORE], team_id), user_id_of(caller))
    if member is None:  # also for a team that does not exist
        raise EntityError(
            400, f"User={user_id_of(caller)} not assigned to team={team_id}", "team_id"
        )
    if member.get("role") != "admin":
        raise EntityError(
            401,
            f"Team member does not have permissions for endpoint: {_route(request)}. Only the "
            f"team's admins (members with role admin) may manage team {team_id!r}'s keys",
            "team_id",
            kind="team_member_permission_error",
        )


def _own_user_id(caller: Caller, body: dict[str, Any]) -> None:
    user_id = user_id_of(caller)
    if "user_id" in body and body["user_id"] != user_id:
        raise EntityError(
            403,
            f"User can only create keys for themselves. Got user_id={body['user_id']}, "
            f"Your ID={user_id}",
            "user_id",
        )


def _ceiling(caller: Caller, body: dict[str, Any]) -> None:
    """A key may not be given a larger budget than the key that makes it (LiteLLM's
    delegation ceiling, on max_budget and on each of budget_limits)."""
    own = (caller.key or {}).get("max_budget")
    if own is None:
        return
    asked = [("max_budget", body.get("max_budget"))] + [
        ("budget_limits", w.get("max_budget"))
        for w in body.get("budget_limits") or []
        if isinstance(w, dict)
    ]
    for field, value in asked:
        if isinstance(value, int | float) and not isinstance(value, bool) and value > own:
            raise EntityError(
                400,
                f"max_budget ({value}) cannot exceed the caller's own max_budget ({own}).",
                field,
            )


async def key_generate(request: web.Request) -> dict[str, Any]:
    """/key/generate: admins make any key; an internal_user makes keys for its own user only
    (a key without user_id is given the caller's, as LiteLLM does), for a team only if it
    administers the team, and within its own key's budget. Returns the body to create."""
    caller = await caller_of(request)
    role = role_of(caller)
    if role == PROXY_ADMIN:
        return await read_object(request)
    if role not in KEY_MAKERS:
        raise _refuse_role(request, caller)
    body = await read_object(request)
    _own_user_id(caller, body)
    for field in ADMIN_ONLY_ON_GENERATE:
        if body.get(field) not in (None, {}, ""):
            raise EntityError(
                403,
                f"{field}: only an admin sets a key's {field} (it could reach models or "
                "escape limits the caller's own keys are held to)",
                field,
            )
    if body.get("team_id") is not None:
        await _check_team(request, caller, body["team_id"])
    _ceiling(caller, body)
    return {**body, "user_id": user_id_of(caller)}


async def key_update(request: web.Request) -> Caller:
    """/key/update: an internal_user updates the keys of its own user (or of teams it
    administers); only an admin, or the admin of the key's team, changes a key's limits,
    and only an admin unblocks one."""
    caller = await caller_of(request)
    role = role_of(caller)
    if role == PROXY_ADMIN:
        return caller
    if role not in KEY_MAKERS:
        raise _refuse_role(request, caller)
    store = request.app[STORE]
    body = await read_object(request)
    key = await store.get("key", key_token(required(body, "key")))
    if key is None or not await _manages(store, caller, key):
        raise _not_yours(caller, "User can only create keys for themselves")
    _own_user_id(caller, body)
    for team_id in {key.get("team_id"), body.get("team_id")} if "team_id" in body else ():
        if team_id is not None:
            await _check_team(request, caller, team_id)
    team_admin = await _team_admin(store, caller, key.get("team_id"))
    guarded = sorted(GUARDED_ON_UPDATE & set(body)) + _retagged(body, key)
    if guarded and not team_admin:
        raise EntityError(
            403,
            f"Only proxy admins, team admins, or org admins can call /key/update "
            f"({', '.join(guarded)}). user_role={role}, user_id={user_id_of(caller)}. To "
            "change your own key's limits, generate a new key and delete this one",
            guarded[0],
        )
    if body.get("blocked") is False and key.get("blocked"):
        raise EntityError(403, "only an admin can unblock a key, with /key/unblock", "blocked")
    return caller


def _retagged(body: dict[str, Any], key: dict[str, Any]) -> list[str]:
    """["metadata.tags"] when an update's metadata would change the key's tags there (a key's
    metadata.tags are its tags, as in LiteLLM), else []."""
    if "metadata" not in body:
        return []
    sent, kept = body.get("metadata"), key.get("metadata") or {}
    tags = sent.get("tags") if isinstance(sent, dict) else None
    return [] if tags == kept.get("tags") else ["metadata.tags"]


async def key_delete(request: web.Request) -> Caller:
    """/key/delete: an internal_user deletes keys of its own user (or of teams it
    administers); the same refusal for another user's key and one that does not exist."""
    caller = await caller_of(request)
    role = role_of(caller)
    if role == PROXY_ADMIN:
        return caller
    if role not in KEY_MAKERS:
        raise _refuse_role(request, caller)
    store = request.app[STORE]
    keys = (await read_object(request)).get("keys")
    for raw in [keys] if isinstance(keys, str) else keys if isinstance(keys, list) else []:
        key = await store.get("key", key_token(raw)) if isinstance(raw, str) and raw else None
        if key is None or not await _manages(store, caller, key):
            raise _not_yours(caller, "You can only delete your own keys")
    return caller


# -- users, teams, spend ------------------------------------------------------------------


async def info(request: web.Request, kind: str) -> Caller:
    """/user/info: a key reads its own user; /team/info: a key reads its own team, or a team
    its user is a member of (LiteLLM); everything else is for readers."""
    caller = await caller_of(request)
    if role_of(caller) in READERS:
        return caller
    if kind == "user":
        wanted = request.query.get("user_id")
        if wanted and wanted != user_id_of(caller):
            raise EntityError(
                403,
                f"key not allowed to access this user's info. user_id={wanted}, key's "
                f"user_id={user_id_of(caller)}",
                "user_id",
            )
        return caller
    if kind == "team":
        wanted = request.query.get("team_id")
        if not wanted or wanted == (caller.key or {}).get("team_id"):
            return caller
        if _member(await _team(request.app[STORE], wanted), user_id_of(caller)) is None:
            raise EntityError(
                403,
                f"User={user_id_of(caller)} not authorized to access this team={wanted}",
                "team_id",
            )
        return caller
    raise _admin_only(request, caller)


async def team_members(request: web.Request) -> Caller:
    """/team/member_add, member_update and member_delete: admins, and the team's own admins."""
    caller = await caller_of(request)
    role = role_of(caller)
    if role == PROXY_ADMIN:
        return caller
    if role == PROXY_ADMIN_VIEWER:
        raise _viewer_write(request)
    team_id = (await read_object(request)).get("team_id")
    if not await _team_admin(request.app[STORE], caller, team_id):
        raise EntityError(
            403,
            "Call not allowed. User not proxy admin OR team admin. "
            f"route={_route(request)}, team_id={team_id}",
            "team_id",
        )
    return caller


async def spend_logs(request: web.Request) -> dict[str, str]:
    """/spend/logs: readers see every entry; an internal_user or internal_user_viewer only
    its own user's. Returns the filter the caller's rows must match."""
    caller = await caller_of(request)
    role = role_of(caller)
    if role in READERS:
        return {}
    user_id = user_id_of(caller)
    if role is None or user_id is None:
        raise _admin_only(request, caller)
    wanted = request.query.get("user_id")
    if wanted and wanted != user_id:
        raise EntityError(
            403,
            f"key not allowed to access this user's spend. user_id={wanted}, key's "
            f"user_id={user_id}",
            "user_id",
        )
    return {"user_id": user_id}
