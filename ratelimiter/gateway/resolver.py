"""From a proxy request's credentials, model and end user to the scopes it belongs to.

Authentication (expired, blocked, deleted keys), model access (names, access groups,
wildcards, ``all-proxy-models``; the narrowest list wins) and the default end-user budget
live here; which limits each scope sets is the policy's business.
"""

from __future__ import annotations

import fnmatch
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import EntityError
from .config import Deployment, Settings
from .policy import Resolved, Scope, inherit
from .priority import caller_priority
from .routing import serves
from .store import Store, hash_key
from .tags import MAX_TAG_SCOPES, NO_TAGS, ClientTags, key_tags, request_tags

__all__ = [
    "Caller",
    "authenticate",
    "check_model_access",
    "effective_fields",
    "may_call",
    "resolve",
    "unmatched_models",
]

ALL_MODELS = "all-proxy-models"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the master key (no per-key scopes) or a virtual key and its owners."""

    master: bool
    token: str | None = None  # the key's scope id: the hash it was created with (key_id)
    key: dict[str, Any] | None = None
    user: dict[str, Any] | None = None
    team: dict[str, Any] | None = None
    organization: dict[str, Any] | None = None


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
    user = await _owner(store, key, "user")
    team = await _owner(store, key, "team")
    if team is not None and team.get("blocked"):
        raise EntityError(403, f"team {key['team_id']!r} is blocked")
    # the scope is the key's first hash, which /key/regenerate keeps (admin.common.scope_id)
    key_id = key.get("key_id") or token
    return Caller(False, key_id, key, user, team, await _organization(store, key, team))


async def _organization(
    store: Store, key: dict[str, Any], team: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The organization a key is under: its team's, or, for a key with no team, the one it
    names. One that no longer exists is refused, as a missing owner is."""
    holder = team if team is not None else key
    org_id = holder.get("organization_id")
    if not org_id:
        return None
    org = await store.get("organization", org_id)
    if org is None:
        whose = f"its team {team['team_id']!r}" if team is not None else "it"
        raise EntityError(
            403,
            f"this API key is under organization {org_id!r} (named by {whose}), which does "
            "not exist, so its limits are unknown and the key is refused: create the "
            "organization with /organization/new or change organization_id with /team/update "
            "or /key/update",
            "organization_id",
        )
    return org


async def _owner(store: Store, key: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The user or team a key belongs to. Deleting one deletes its keys; a key that still
    names a missing one (a race, or a key from an older version) is refused, because its
    owner's limits are unknown and unknown must never mean unlimited."""
    owner_id = key.get(f"{kind}_id")
    if not owner_id:
        return None
    owner = await store.get(kind, owner_id)
    if owner is None:
        raise EntityError(
            403,
            f"this API key belongs to {kind} {owner_id!r}, which does not exist, so its "
            f"limits are unknown and the key is refused: create the {kind} with /{kind}/new "
            f"or move the key with /key/update",
            f"{kind}_id",
        )
    return owner


async def effective_fields(store: Store, owner: str, entity: dict[str, Any]) -> dict[str, Any]:
    """An entity's own limits, with the gaps filled from the budget it names.

    A named budget that does not exist (deleted by a race, or by an older version) is an
    error, never "no limits": ``owner`` ("this API key", "user 'ana'"...) says whose it is."""
    budget_id = entity.get("budget_id")
    if not budget_id:
        return entity
    budget = await store.get("budget", budget_id)
    if budget is None:
        raise EntityError(
            403,
            f"{owner} names budget {budget_id!r}, which does not exist, so its limits are "
            "unknown and requests are refused: create the budget again with /budget/new or "
            "give it another budget_id",
            "budget_id",
        )
    return inherit(entity, budget)


def _matches(entry: str, deployment: Deployment, groups: dict[str, set[str]]) -> bool:
    if entry == ALL_MODELS or entry == deployment.model_name:
        return True
    group = groups.get(entry, ())
    if deployment.model_name in group or deployment.pattern in group:
        return True
    return any(
        fnmatch.fnmatchcase(name, entry) for name in (deployment.model_name, deployment.model)
    )


def _allowed(
    entity: dict[str, Any], owner: str, deployment: Deployment, groups: dict[str, set[str]]
) -> bool:
    """Whether an entity's ``models`` list (non-empty) allows a request served by
    ``deployment``. Asked for by an alias, the list may allow the alias or the model it is
    served by (LiteLLM checks both); a team's list also allows the team's own aliases
    (LiteLLM's rule, which LiteLLM applies to the key's list too: here the narrower list
    wins)."""
    allowed = entity.get("models") or []
    if any(_matches(entry, deployment, groups) for entry in allowed):
        return True
    alias = deployment.alias
    if alias is None:
        return False
    if owner == "team" and alias in (entity.get("model_aliases") or {}):
        return True
    return any(entry == alias or fnmatch.fnmatchcase(alias, entry) for entry in allowed)


def unmatched_models(
    settings: Settings, names: Iterable[str], aliases: Iterable[str] = ()
) -> list[str]:
    """The names of a ``models`` list that can match no deployment: not a model (or a name
    a wildcard entry serves), an access group, one of ``aliases`` or all-proxy-models, and
    not a wildcard (which may match models added later)."""
    groups, aliased = settings.access_groups, set(aliases)
    return [
        name
        for name in names
        if name != ALL_MODELS
        and name not in groups
        and name not in aliased
        and not any(ch in name for ch in "*?[")
        and not serves(settings, name)
        and not any(_matches(name, deployment, groups) for deployment in settings.models)
    ]


def check_model_access(caller: Caller, deployment: Deployment, settings: Settings) -> None:
    """Every non-empty ``models`` list on the key, its user, its team and its organization
    must allow the model (or the alias it was asked for by)."""
    groups = settings.access_groups
    owners = (
        ("key", caller.key),
        ("user", caller.user),
        ("team", caller.team),
        ("organization", caller.organization),
    )
    for owner, entity in owners:
        allowed = (entity or {}).get("models") or []
        if allowed and not _allowed(entity or {}, owner, deployment, groups):
            # LiteLLM's wording and status (403 in its current code, 401 before), which
            # clients match; the list is shown as LiteLLM shows it, a Python list.
            raise EntityError(
                403,
                f"{owner} not allowed to access model. This {owner} can only access "
                f"models={list(allowed)!r}. Tried to access "
                f"{deployment.alias or deployment.model_name} "
                f"(an admin can allow it with /{owner}/update)",
                "model",
                kind=f"{_SHORT.get(owner, owner)}_model_access_denied",  # LiteLLM's type
            )


def may_call(caller: Caller, deployment: Deployment, settings: Settings) -> bool:
    """Whether ``caller`` may call ``deployment``: what /v1/models and /model/info list."""
    try:
        check_model_access(caller, deployment, settings)
    except EntityError:
        return False
    return True


_SHORT = {"organization": "org"}  # LiteLLM's org_model_access_denied


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


async def tag_scopes(store: Store, caller: Caller, client: ClientTags) -> list[Scope]:
    """A scope for each of the request's tags that is a tag entity (any other tag is a label,
    in the ledger only). A key that carries tags may not add a tag entity it does not carry
    (gateway/tags.py says why); more than MAX_TAG_SCOPES tag entities is a 400, never some
    of them silently left out."""
    own = key_tags(caller.key)
    named = request_tags(own, client)
    known = await store.known("tag") if named else frozenset()
    scopes = []
    for name in named:
        tag = await store.get("tag", name) if name in known else None
        if tag is None:
            continue
        if own and name not in own:
            where = client.sources[name]
            raise EntityError(
                403,
                f"tag {name!r} (from {where}) is not one of this API key's tags {list(own)}: "
                "a key that carries tags may add only labels, not another tag's budget. An "
                "admin can add the tag to the key with /key/update",
                where,
            )
        fields = await effective_fields(store, f"tag {name!r}", tag)
        scopes.append(Scope("tag", name, fields))
    if len(scopes) > MAX_TAG_SCOPES:
        raise EntityError(
            400,
            f"a request carries at most {MAX_TAG_SCOPES} tags that have budgets or limits, "
            f"this one {len(scopes)}: {[s.id for s in scopes]}",
            "tags",
        )
    return scopes


def _member_limits(member: dict[str, Any]) -> bool:
    return any(member.get(n) is not None for n in ("max_budget_in_team", "rpm_limit", "tpm_limit"))


async def resolve(
    store: Store,
    settings: Settings,
    caller: Caller,
    deployment: Deployment,
    end_user: str | None,
    tokens: int,
    cost: int,
    *,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    tags: ClientTags = NO_TAGS,
) -> Resolved:
    """Every scope the request belongs to, with its estimate: ``tokens`` in all, of which
    ``input_tokens`` and ``output_tokens`` when known, and ``cost`` in nano-dollars;
    ``tags``: those the client sent (the key's own are added here)."""
    check_model_access(caller, deployment, settings)
    scopes = []
    if settings.max_budget is not None:
        proxy = {
            "max_budget": settings.max_budget,
            "budget_duration": str(settings.budget_duration) if settings.budget_duration else None,
        }
        scopes.append(Scope("proxy", "all", proxy))
    if caller.organization is not None:
        org_id = caller.organization["organization_id"]
        org = await effective_fields(store, f"organization {org_id!r}", caller.organization)
        scopes.append(Scope("organization", org_id, org))
    if caller.key is not None and caller.token is not None:
        key = await effective_fields(store, "this API key", caller.key)
        scopes.append(Scope("key", caller.token, key))
        if caller.user is not None:
            user_id = caller.user["user_id"]
            user = await effective_fields(store, f"user {user_id!r}", caller.user)
            scopes.append(Scope("user", user_id, user))
        if caller.team is not None:
            team_id = caller.team["team_id"]
            team = await effective_fields(store, f"team {team_id!r}", caller.team)
            scopes.append(Scope("team", team_id, team))
            member = next(
                (
                    m
                    for m in caller.team.get("members") or []
                    if m["user_id"] == caller.key.get("user_id")
                ),
                None,
            )
            if member and _member_limits(member):
                scopes.append(
                    Scope(
                        "member",
                        f"{team_id}:{member['user_id']}",
                        {
                            "max_budget": member.get("max_budget_in_team"),
                            "budget_duration": caller.team.get("budget_duration"),
                            "rpm_limit": member.get("rpm_limit"),
                            "tpm_limit": member.get("tpm_limit"),
                        },
                    )
                )
    if end_user:
        customer = await _customer(store, settings, end_user)
        fields = await effective_fields(store, f"end user {end_user!r}", customer)
        scopes.append(Scope("end_user", end_user, fields))
    scopes.extend(await tag_scopes(store, caller, tags))
    scopes.append(
        Scope(
            "deployment",
            deployment.deployment_id,
            {
                "rpm_limit": deployment.rpm,
                "tpm_limit": deployment.tpm,
                **_priority_fields(settings, caller, deployment),
            },
        )
    )
    return Resolved(tuple(scopes), deployment.model_name, tokens, cost, input_tokens, output_tokens)


def _priority_fields(settings: Settings, caller: Caller, deployment: Deployment) -> dict[str, Any]:
    """The caller's pool on ``deployment`` and its share, when priorities are configured."""
    reservation = settings.priority_reservation
    if reservation is None or (deployment.rpm is None and deployment.tpm is None):
        return {}
    pool = reservation.pool(caller_priority(caller.team, caller.key))
    return {
        "priority": pool,
        "priority_share": reservation.fractions(deployment.rpm, deployment.tpm)[pool],
        "saturation_threshold": reservation.saturation_threshold,
    }
