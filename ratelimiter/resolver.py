"""From a proxy request's credentials, model and end user to the scopes it belongs to.

Authentication (expired, blocked, deleted keys), model access (names, access groups,
wildcards, ``all-proxy-models``; the narrowest list wins) and the default end-user budget
live here; which limits each scope sets is the policy's business.
"""

from __future__ import annotations

import fnmatch
import hmac
import time
from dataclasses import dataclass
from typing import Any

from .admin import effective_fields
from .config import Deployment, Settings
from .policy import Resolved, Scope
from .server import hash_key
from .store import EntityError, Store

__all__ = ["Caller", "authenticate", "check_model_access", "resolve"]

ALL_MODELS = "all-proxy-models"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the master key (no per-key scopes) or a virtual key and its owners."""

    master: bool
    token: str | None = None
    key: dict[str, Any] | None = None
    user: dict[str, Any] | None = None
    team: dict[str, Any] | None = None


async def authenticate(store: Store, settings: Settings, presented: str | None) -> Caller:
    if not presented:
        raise EntityError(401, "missing API key: send 'Authorization: Bearer sk-...'")
    if hmac.compare_digest(presented.encode(), settings.master_key.encode()):
        return Caller(master=True)
    token = hash_key(presented)
    key = await store.get("key", token)
    if key is None:
        raise EntityError(401, "invalid API key: it does not exist or was deleted")
    expires = key.get("expires_at")
    if expires is not None and expires <= time.time() * 1000:
        raise EntityError(401, "this API key has expired; ask for a new one")
    if key.get("blocked"):
        raise EntityError(403, "this API key is blocked; an admin can unblock it with /key/unblock")
    user = await store.get("user", key["user_id"]) if key.get("user_id") else None
    team = await store.get("team", key["team_id"]) if key.get("team_id") else None
    if team is not None and team.get("blocked"):
        raise EntityError(403, f"team {key['team_id']!r} is blocked")
    return Caller(False, token, key, user, team)


def _matches(entry: str, deployment: Deployment, groups: dict[str, set[str]]) -> bool:
    if entry == ALL_MODELS or entry == deployment.model_name:
        return True
    if deployment.model_name in groups.get(entry, ()):
        return True
    return any(
        fnmatch.fnmatchcase(name, entry) for name in (deployment.model_name, deployment.model)
    )


def check_model_access(caller: Caller, deployment: Deployment, settings: Settings) -> None:
    """Every non-empty ``models`` list on the key, its user and its team must allow the model."""
    groups = settings.access_groups
    for owner, entity in (("key", caller.key), ("user", caller.user), ("team", caller.team)):
        allowed = (entity or {}).get("models") or []
        if allowed and not any(_matches(entry, deployment, groups) for entry in allowed):
            raise EntityError(
                403,
                f"this {owner} may not use model {deployment.model_name!r}; it may use: "
                f"{', '.join(allowed)}",
                "model",
            )


async def _customer(store: Store, settings: Settings, end_user: str) -> dict[str, Any]:
    customer = await store.get("customer", end_user)
    if customer is None:
        # The first request naming an end user creates it, under the default budget if one
        # exists: creating a budget called "default" limits every end user.
        budget = await store.get("budget", settings.end_user_budget_id)
        customer = {
            "user_id": end_user,
            "blocked": False,
            "budget_id": settings.end_user_budget_id if budget else None,
        }
        try:
            await store.create("customer", end_user, customer)
        except EntityError as exc:
            if exc.status != 409:
                raise
            customer = await store.get("customer", end_user) or customer
    if customer.get("blocked"):
        raise EntityError(403, f"end user {end_user!r} is blocked", "user")
    return customer


async def resolve(
    store: Store,
    settings: Settings,
    caller: Caller,
    deployment: Deployment,
    end_user: str | None,
    tokens: int,
    cost: int,
) -> Resolved:
    check_model_access(caller, deployment, settings)
    scopes = []
    if settings.max_budget is not None:
        proxy = {
            "max_budget": settings.max_budget,
            "budget_duration": str(settings.budget_duration) if settings.budget_duration else None,
        }
        scopes.append(Scope("proxy", "all", proxy))
    if caller.key is not None and caller.token is not None:
        scopes.append(Scope("key", caller.token, await effective_fields(store, caller.key)))
        if caller.user is not None:
            scopes.append(
                Scope("user", caller.user["user_id"], await effective_fields(store, caller.user))
            )
        if caller.team is not None:
            team_id = caller.team["team_id"]
            scopes.append(Scope("team", team_id, await effective_fields(store, caller.team)))
            member = next(
                (
                    m
                    for m in caller.team.get("members") or []
                    if m["user_id"] == caller.key.get("user_id")
                ),
                None,
            )
            if member and member.get("max_budget_in_team") is not None:
                scopes.append(
                    Scope(
                        "member",
                        f"{team_id}:{member['user_id']}",
                        {
                            "max_budget": member["max_budget_in_team"],
                            "budget_duration": caller.team.get("budget_duration"),
                        },
                    )
                )
    if end_user:
        customer = await _customer(store, settings, end_user)
        scopes.append(Scope("end_user", end_user, await effective_fields(store, customer)))
    scopes.append(
        Scope(
            "deployment",
            deployment.deployment_id,
            {"rpm_limit": deployment.rpm, "tpm_limit": deployment.tpm},
        )
    )
    return Resolved(tuple(scopes), deployment.model_name, tokens, cost)
