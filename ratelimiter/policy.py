"""Which limits one request meets: the only place that knows scopes.

A resolved request (key, user, team, team member, end user, model, deployment, proxy-wide
budget) becomes the complete list of engine limits: every scope's requests and tokens per
minute, its parallel-request lease, each of its budget windows, model-specific budgets and
model rpm/tpm. A new scope is a change here and nowhere else.

Every scope's keys share one hash tag (``rl:{key:3f9a…}:rpm``), so a scope is one Cluster slot.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .limits import Budget, Concurrency, Gate, Limit, SlidingWindow

__all__ = ["NANO", "Resolved", "Scope", "dollars", "limits_for", "nano", "scope_budgets"]

NANO = 1_000_000_000
LEASE_TTL_MS = 60_000
NEVER_RESETS = "100y"  # a budget without a duration: one period from 1970 to 2070
# Scopes an admin can block: their gate is checked inside the atomic admission, so a block
# holds from the moment the admin call returns, whatever any sidecar's cache says.
GATED = ("key", "user", "team", "end_user")


def nano(dollars: float) -> int:
    """Dollars at the API edge to integer nano-dollars inside."""
    return round(dollars * NANO)


def dollars(amount: int) -> float:
    return amount / NANO


@dataclass(frozen=True, slots=True)
class Scope:
    """One owner of limits: its kind and id, and the entity fields that set the limits."""

    kind: str  # proxy, key, user, team, member, end_user, key_model, deployment
    id: str
    fields: Mapping[str, Any] = field(default_factory=dict)

    def key(self, prefix: str, what: str) -> str:
        return f"{prefix}{{{self.kind}:{self.id}}}:{what}"

    def gate(self, prefix: str) -> str:
        return self.key(prefix, "blocked")


@dataclass(frozen=True, slots=True)
class Resolved:
    """Everything known about a request before admission."""

    scopes: tuple[Scope, ...]
    model: str
    tokens: int  # estimated prompt + completion tokens
    cost: int  # estimated cost, nano-dollars


def scope_budgets(scope: Scope, prefix: str, cost: int = 0) -> Iterator[Budget]:
    """Every budget window of a scope: max_budget over budget_duration (never resetting when
    no duration is set) and each of budget_limits; one duration given twice keeps the lower."""
    f = scope.fields
    windows: dict[str, tuple[float, str]] = {}
    if f.get("max_budget") is not None:
        windows[f.get("budget_duration") or NEVER_RESETS] = (f["max_budget"], "budget")
    for window in f.get("budget_limits") or ():
        period = window["budget_duration"]
        if period not in windows or window["max_budget"] < windows[period][0]:
            windows[period] = (window["max_budget"], f"budget:{period}")
    for period, (limit, name) in windows.items():
        yield Budget(
            scope.key(prefix, f"spend:{period}"),
            nano(limit),
            period,
            cost,
            name=f"{scope.kind}:{name}",
        )


def _rates(
    scope: Scope, prefix: str, tokens: int, rpm: Any, tpm: Any, what: str = ""
) -> Iterator[Limit]:
    if rpm is not None:
        yield SlidingWindow(
            scope.key(prefix, f"rpm{what}"), rpm, "1m", name=f"{scope.kind}:requests"
        )
    if tpm is not None:
        yield SlidingWindow(
            scope.key(prefix, f"tpm{what}"),
            tpm,
            "1m",
            tokens,
            measure="tokens",
            name=f"{scope.kind}:tokens",
        )


def limits_for(request: Resolved, prefix: str, lease_ttl_ms: int = LEASE_TTL_MS) -> list[Limit]:
    limits: list[Limit] = []
    model = request.model
    for scope in request.scopes:
        f = scope.fields
        if scope.kind in GATED:
            limits.append(Gate(scope.gate(prefix), name=f"{scope.kind}:blocked"))
        limits += _rates(scope, prefix, request.tokens, f.get("rpm_limit"), f.get("tpm_limit"))
        if f.get("max_parallel_requests") is not None:
            limits.append(
                Concurrency(
                    scope.key(prefix, "parallel"),
                    f["max_parallel_requests"],
                    lease_ttl_ms,
                    name=f"{scope.kind}:parallel",
                )
            )
        limits += scope_budgets(scope, prefix, request.cost)
        per_model = (f.get("model_max_budget") or {}).get(model)
        if per_model:
            what = f":model:{model}"
            limits += _rates(
                scope,
                prefix,
                request.tokens,
                per_model.get("rpm_limit"),
                per_model.get("tpm_limit"),
                what,
            )
            if per_model.get("max_budget") is not None:
                period = per_model.get("budget_duration") or NEVER_RESETS
                limits.append(
                    Budget(
                        scope.key(prefix, f"spend{what}:{period}"),
                        nano(per_model["max_budget"]),
                        period,
                        request.cost,
                        name=f"{scope.kind}:model_budget",
                    )
                )
        limits += _rates(
            scope,
            prefix,
            request.tokens,
            (f.get("model_rpm_limit") or {}).get(model),
            (f.get("model_tpm_limit") or {}).get(model),
            f":model_rate:{model}",
        )
    return limits
