"""Shadow mode: which of a request's limits are evaluated and counted but not enforced.

A limit is in shadow when the whole sidecar is (``ratelimiter_settings.shadow: true``), when
its scope's entity sets ``shadow_mode: true``, or when the entity names the limit's field in
``shadow_limits`` (``["rpm_limit", "max_budget"]``). Both fields are ours (LiteLLM has no shadow
mode); they are admin-API fields, so switching a limit from shadow to enforced takes effect
on the next request, with no restart. An entity without them takes them from its budget
(``budget_id``), as it takes its limits; a team member's limits follow its team's.

Blocks (the gates of blocked keys, users, teams and end users) are never in shadow: they
are access control, not limits. The engine decides shadow limits in the same atomic step as
the others (``Engine.acquire(shadow=...)``): see README "Shadow mode".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from ..engine.durations import shown
from ..engine.limits import Gate, Limit
from ..errors import EntityError

__all__ = [
    "SHADOWABLE",
    "SHADOW_FIELDS",
    "shadow_flag",
    "shadow_keys",
    "shadow_names",
]

SHADOW_FIELDS = ("shadow_mode", "shadow_limits")
# The limit fields ``shadow_limits`` may name. max_budget covers every spend window of the
# entity (max_budget and budget_limits); model_max_budget its per-model budgets and rates.
SHADOWABLE = (
    "rpm_limit",
    "tpm_limit",
    "input_tpm_limit",
    "output_tpm_limit",
    "max_parallel_requests",
    "max_budget",
    "model_max_budget",
    "model_rpm_limit",
    "model_tpm_limit",
)
# A limit's key ends in what it counts (policy.py names them): the field that set it.
_BY_KEY_PREFIX = (
    ("rpm:model_rate:", "model_rpm_limit"),
    ("tpm:model_rate:", "model_tpm_limit"),
    ("rpm:model:", "model_max_budget"),
    ("tpm:model:", "model_max_budget"),
    ("spend:model:", "model_max_budget"),
    ("spend:", "max_budget"),
)
_BY_KEY = {
    "rpm": "rpm_limit",
    "tpm": "tpm_limit",
    "input_tpm": "input_tpm_limit",
    "output_tpm": "output_tpm_limit",
    "parallel": "max_parallel_requests",
}


class Scope(Protocol):
    """What this needs of ``policy.Scope`` (which imports this module for its fields)."""

    @property
    def kind(self) -> str: ...

    @property
    def fields(self) -> Mapping[str, Any]: ...

    def key(self, prefix: str, what: str) -> str: ...


def shadow_flag(field: str, value: Any) -> bool | None:
    """``shadow_mode``: true, false, or null (none set: the budget's, if any, applies)."""
    if value is None or isinstance(value, bool):
        return value
    raise EntityError(400, f"{field}: must be true or false, got {shown(value)}", field)


def shadow_names(field: str, value: Any) -> list[str] | None:
    """``shadow_limits``: names of limit fields, each once, or null."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > len(SHADOWABLE):
        raise EntityError(
            400,
            f"{field}: must be a list of at most {len(SHADOWABLE)} limit names "
            f"({', '.join(SHADOWABLE)}), got {shown(value)}",
            field,
        )
    for name in value:
        if name not in SHADOWABLE:
            raise EntityError(
                400,
                f"{field}: {shown(name)} is not a limit that can be in shadow; "
                f"use {', '.join(SHADOWABLE)}",
                field,
            )
    return list(dict.fromkeys(value))


def limit_field(what: str) -> str | None:
    """The entity field that set a limit whose key ends in ``what`` (``rpm``, ``spend:30d``)."""
    field = _BY_KEY.get(what)
    if field is not None:
        return field
    return next((name for prefix, name in _BY_KEY_PREFIX if what.startswith(prefix)), None)


def in_shadow(fields: Mapping[str, Any], what: str) -> bool:
    if fields.get("shadow_mode"):
        return True
    named = fields.get("shadow_limits")
    return bool(named) and limit_field(what) in named


def shadow_keys(
    scopes: Sequence[Scope], limits: Iterable[Limit], prefix: str, everything: bool = False
) -> frozenset[str]:
    """The keys of ``limits`` that are in shadow for a request of ``scopes``; ``everything``:
    the whole sidecar is (every limit but the blocks)."""
    if everything:
        return frozenset(limit.key for limit in limits if not isinstance(limit, Gate))
    team = next((s.fields for s in scopes if s.kind == "team"), {})
    owners = [
        (scope.key(prefix, ""), fields)
        for scope in scopes
        if _shadows(fields := team if scope.kind == "member" else scope.fields)
    ]
    if not owners:  # most requests: nothing in shadow, nothing more to do
        return frozenset()
    found = set()
    for limit in limits:
        if isinstance(limit, Gate):
            continue
        for base, fields in owners:
            if limit.key.startswith(base) and in_shadow(fields, limit.key[len(base) :]):
                found.add(limit.key)
    return frozenset(found)


def _shadows(fields: Mapping[str, Any]) -> bool:
    return bool(fields.get("shadow_mode") or fields.get("shadow_limits"))
