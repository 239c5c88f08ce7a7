"""Which limits one request meets: the only place that knows scopes.

A resolved request (proxy-wide budget, organization, key, user, team, team member, end user,
tag, model, deployment) becomes the complete list of engine limits: every scope's requests
and tokens per minute, its parallel-request lease, each of its budget windows, model-specific
budgets and model rpm/tpm. A new scope is a change here and nowhere else.

Every scope's keys share one hash tag (``rl:{key:3f9a…}:rpm``), so a scope is one Cluster slot.

How a request's estimate is held (DESIGN.md, "Budgets and estimates"): a request that bounds
itself (``max_tokens``) holds its estimate in full in every token window and budget; one that
does not holds it capped at what is left (``capped=True``), or, under ``budget_enforcement:
strict``, is bounded by the proxy to what ``completion_room`` says its limits afford.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine import LimitState
from ..engine.limits import (
    Budget,
    Concurrency,
    Gate,
    Limit,
    SharedWindow,
    SlidingWindow,
    copy_with,
    is_amount,
)
from ..pricing import NANO, Price, cost_nano, nano
from ..responses import HeaderTemplate
from .priority import share_limits
from .shadow import SHADOW_FIELDS, shadow_keys

__all__ = [
    "LIMIT_FIELDS",
    "SCOPE_KINDS",
    "STRICT_MIN_TOKENS",
    "Plan",
    "Resolved",
    "Scope",
    "completion_room",
    "inherit",
    "limits_for",
    "plan_for",
    "scope_budgets",
]

# Scopes (per model and surface), and combinations of them, whose limits stay built; the
# least recently used go first.
PLANS = 16_384
LEASE_TTL_MS = 60_000
NEVER_RESETS = "100y"  # a budget without a duration: one period from 1970 to 2070
# Every kind of scope a request can meet, in the order they are checked.
SCOPE_KINDS = (
    "proxy",
    "organization",
    "key",
    "user",
    "team",
    "member",
    "end_user",
    "tag",
    "deployment",
)
# Scopes an admin can block: their gate is checked inside the atomic admission, so a block
# holds from the moment the admin call returns, whatever any sidecar's cache says.
GATED = ("key", "user", "team", "end_user")
# Under budget_enforcement: strict, a request whose limits afford fewer completion tokens than
# this is refused rather than sent with a reply too short to be of use.
STRICT_MIN_TOKENS = 16


# The limits an entity takes from the budget it names when it does not set them itself.
LIMIT_FIELDS = (
    "max_budget",
    "soft_budget",
    "budget_duration",
    "tpm_limit",
    "rpm_limit",
    "input_tpm_limit",
    "output_tpm_limit",
    "max_parallel_requests",
    "model_max_budget",
)


def inherit(entity: Mapping[str, Any], budget: Mapping[str, Any]) -> dict[str, Any]:
    """An entity's own limits, with the gaps filled from its budget's."""
    merged = dict(entity)
    for name in (*LIMIT_FIELDS, *SHADOW_FIELDS):
        if merged.get(name) is None and budget.get(name) is not None:
            merged[name] = budget[name]
    return merged


@dataclass(frozen=True, slots=True)
class Scope:
    """One owner of limits: its kind and id, and the entity fields that set the limits."""

    kind: str  # proxy, organization, key, user, team, member, end_user, tag, deployment
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
    # the estimate's two parts, for input and output token windows (None: tokens for both)
    input_tokens: int | None = None
    output_tokens: int | None = None

    def amount(self, measure: str) -> int:
        """What the request holds in a limit of ``measure``."""
        if measure == "tokens":
            return self.tokens
        if measure == "input_tokens":
            return self.tokens if self.input_tokens is None else self.input_tokens
        if measure == "output_tokens":
            return self.tokens if self.output_tokens is None else self.output_tokens
        return self.cost


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


RATE_WINDOW = "1m"
"""The window of every rpm/tpm limit (LiteLLM's are per minute; tests shorten it)."""


def _rates(
    scope: Scope, prefix: str, rpm: Any, tpm: Any, what: str = ""
) -> Iterator[tuple[Limit, str | None]]:
    if rpm is not None:
        requests = SlidingWindow(
            scope.key(prefix, f"rpm{what}"), rpm, RATE_WINDOW, name=f"{scope.kind}:requests"
        )
        yield requests, None
    if tpm is not None:
        tokens = SlidingWindow(
            scope.key(prefix, f"tpm{what}"),
            tpm,
            RATE_WINDOW,
            0,
            measure="tokens",
            name=f"{scope.kind}:tokens",
        )
        yield tokens, "tokens"


def limits_for(
    request: Resolved, prefix: str, lease_ttl_ms: int = LEASE_TTL_MS, *, capped: bool = False
) -> list[Limit]:
    """Every limit ``request`` meets, with its estimated tokens and cost as the amounts;
    ``capped`` (a request that does not bound itself) makes its token windows and budgets
    take up to those amounts, as much as is left."""
    return plan_for(request.scopes, request.model, prefix, lease_ttl_ms).limits(request, capped)


Keep = Callable[[Limit], bool]
Entry = tuple[Any, str | None]  # a limit and the measure whose amount it takes


@dataclass(frozen=True, slots=True)
class Plan:
    """The limits of every request of the same scopes (with the same fields) and model, built
    and checked once: a request only fills in its amounts. Each entry is a limit and the
    measure whose amount it takes (None: it keeps its own)."""

    entries: tuple[Entry, ...]
    shadowed: frozenset[str]  # keys in shadow by their entities' fields (shadow.py)
    unblocked: frozenset[str]  # every key but the blocks': in shadow when the sidecar is
    # the rate-limit header templates, made on first use: with shadowed, with unblocked
    _headers: dict[bool, HeaderTemplate] = field(default_factory=dict, compare=False, repr=False)

    def headers(self, everything: bool = False) -> HeaderTemplate:
        """The rate-limit headers of its decisions, with ``shadowed`` in shadow (``unblocked``
        when ``everything``)."""
        template = self._headers.get(everything)
        if template is None:
            shadow = self.unblocked if everything else self.shadowed
            limits = [limit for limit, _ in self.entries]
            template = self._headers[everything] = HeaderTemplate(limits, shadow)
        return template

    def limits(self, request: Resolved, capped: bool = False) -> list[Limit]:
        """The limits with ``request``'s amounts (see ``limits_for``)."""
        amounts = {
            "tokens": request.tokens,
            "input_tokens": request.amount("input_tokens"),
            "output_tokens": request.amount("output_tokens"),
            "cost": request.cost,
        }
        if not all(map(is_amount, amounts.values())):  # the limit it fails names itself
            return [t if m is None else t.with_amount(amounts[m], capped) for t, m in self.entries]
        return [t if m is None else copy_with(t, amounts[m], capped) for t, m in self.entries]


# One part per scope identity (prefix, lease TTL, model, keep, kind, id): the fields it was
# built from and the scope's entries. One plan per list of parts, which it holds, by identity:
# parts are shared by every request of the scope, so a key met with thousands of end users has
# one part, where a plan per combination of scopes would be rebuilt at every turn of the cache.
_parts: dict[tuple[Any, ...], tuple[Mapping[str, Any], tuple[Entry, ...]]] = {}
_plans: dict[tuple[int, ...], tuple[tuple[tuple[Entry, ...], ...], Plan]] = {}


def plan_for(
    scopes: Sequence[Scope],
    model: str,
    prefix: str,
    lease_ttl_ms: int = LEASE_TTL_MS,
    keep: Keep | None = None,
) -> Plan:
    """The plan of a request of ``scopes`` for ``model``, of the limits ``keep`` keeps (all
    when None; it must be hashable and always keep the same limits)."""
    parts = tuple([_part(scope, model, prefix, lease_ttl_ms, keep) for scope in scopes])
    key = tuple(map(id, parts))
    cached = _plans.pop(key, None)
    if cached is None or not all(map(operator.is_, cached[0], parts)):
        cached = (parts, _assemble(scopes, parts, prefix))
    _keep(_plans, key, cached)
    return cached[1]


def _part(
    scope: Scope, model: str, prefix: str, lease_ttl_ms: int, keep: Keep | None
) -> tuple[Entry, ...]:
    """One scope's entries, built once per content of its fields. They are compared by
    identity first, which is what the store's cached entities give: an entity edited (or
    reloaded) is a new object, compared by content, and one that changed gets a new part on
    its next request, replacing the old, so an admin change holds from the next request.
    Neither a team's members list nor a fingerprint of it costs per request. So fields must
    not be changed in place once a request met them (the store's entities never are)."""
    name = (prefix, lease_ttl_ms, model, keep, scope.kind, scope.id)
    fields = scope.fields
    cached = _parts.pop(name, None)
    if cached is None or not (cached[0] is fields or cached[0] == fields):
        built = _build(scope, model, prefix, lease_ttl_ms)
        cached = (fields, tuple(e for e in built if keep is None or keep(e[0])))
    _keep(_parts, name, cached)
    return cached[1]


def _keep(cache: dict[Any, Any], key: Any, value: Any) -> None:
    """``value`` as the most recently used of ``cache`` (taken out of it when looked up);
    past PLANS the least recently used goes."""
    if len(cache) >= PLANS:
        del cache[next(iter(cache))]
    cache[key] = value


def _assemble(scopes: Sequence[Scope], parts: Sequence[tuple[Entry, ...]], prefix: str) -> Plan:
    entries = tuple(itertools.chain.from_iterable(parts))
    limits = [limit for limit, _ in entries]
    return Plan(
        entries,
        shadow_keys(scopes, limits, prefix),
        shadow_keys(scopes, limits, prefix, everything=True),
    )


def completion_room(
    states: Iterable[LimitState], prompt: int, price: Price | None, choices: int
) -> int | None:
    """The most completion tokens per choice that fit what is left of every token window and
    budget in ``states`` along with a prompt of ``prompt`` tokens (0 when not even the prompt
    fits); None when none of them limits the completion."""
    if price is not None and not isinstance(price, Price):
        price = Price(*price)  # a bare (input, output) pair
    room: int | None = None
    for state in states:
        limit = state.limit
        if isinstance(limit, SharedWindow):
            continue  # a share may be borrowed past: its total bounds the request
        if isinstance(limit, SlidingWindow) and limit.measure == "tokens":
            fits = (state.remaining - prompt) // choices
        elif isinstance(limit, SlidingWindow) and limit.measure == "output_tokens":
            fits = state.remaining // choices
        elif isinstance(limit, SlidingWindow) and limit.measure == "input_tokens":
            fits = None if state.remaining >= prompt else 0
        elif isinstance(limit, Budget):
            fits = _affordable(state.remaining, prompt, price, choices)
        else:
            continue
        if fits is not None:
            room = max(fits, 0) if room is None else min(room, max(fits, 0))
    return room


def _affordable(left: int, prompt: int, price: Price | None, choices: int) -> int | None:
    """Completion tokens per choice that ``left`` nano-dollars pay for after the prompt."""
    # cost_nano, which never raises: near a budget of 2**53-1 the next step may not fit it
    prompt_cost = cost_nano(price, prompt, 0)
    if price is None or price.output <= 0:
        return None if prompt_cost <= left else 0
    fits = int((left - prompt_cost) // (price.output * NANO * choices))
    # the cost rounds the sum, not each part, and the division is in floats: move to
    # the exact answer, a step or two away
    while fits > 0 and cost_nano(price, prompt, fits * choices) > left:
        fits -= 1
    while fits >= 0 and cost_nano(price, prompt, (fits + 1) * choices) <= left:
        fits += 1
    return fits


def _build(
    scope: Scope, model: str, prefix: str, lease_ttl_ms: int
) -> Iterator[tuple[Limit, str | None]]:
    """Each limit with amount 0 where the request's size goes ("tokens" or "cost")."""
    f = scope.fields
    if scope.kind in GATED:
        yield Gate(scope.gate(prefix), name=f"{scope.kind}:blocked"), None
    yield from _rates(scope, prefix, f.get("rpm_limit"), f.get("tpm_limit"))
    if scope.kind == "deployment":  # its rpm/tpm split by priority, when configured
        yield from share_limits(f, lambda what: scope.key(prefix, what), RATE_WINDOW)
    for part in ("input", "output"):
        if f.get(f"{part}_tpm_limit") is not None:
            window = SlidingWindow(
                scope.key(prefix, f"{part}_tpm"),
                f[f"{part}_tpm_limit"],
                RATE_WINDOW,
                0,
                measure=f"{part}_tokens",
                name=f"{scope.kind}:{part}_tokens",
            )
            yield window, f"{part}_tokens"
    if f.get("max_parallel_requests") is not None:
        parallel = Concurrency(
            scope.key(prefix, "parallel"),
            f["max_parallel_requests"],
            lease_ttl_ms,
            name=f"{scope.kind}:parallel",
        )
        yield parallel, None
    for budget in scope_budgets(scope, prefix):
        yield budget, "cost"
    per_model = (f.get("model_max_budget") or {}).get(model)
    if per_model:
        what = f":model:{model}"
        yield from _rates(
            scope, prefix, per_model.get("rpm_limit"), per_model.get("tpm_limit"), what
        )
        if per_model.get("max_budget") is not None:
            period = per_model.get("budget_duration") or NEVER_RESETS
            budget = Budget(
                scope.key(prefix, f"spend{what}:{period}"),
                nano(per_model["max_budget"]),
                period,
                0,
                name=f"{scope.kind}:model_budget",
            )
            yield budget, "cost"
    yield from _rates(
        scope,
        prefix,
        (f.get("model_rpm_limit") or {}).get(model),
        (f.get("model_tpm_limit") or {}).get(model),
        f":model_rate:{model}",
    )
