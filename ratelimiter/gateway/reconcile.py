"""``ratelimiter ledger check``: every budget's counter reconciled with its ledger entries.

It knows entities and their budgets, so it belongs to the sidecar, not to the ledger."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from ..engine import Engine
from ..engine.durations import parse_duration, period_bounds
from ..engine.limits import Budget
from ..ledger import Entry, Ledger
from ..ledger.history import history
from ..ledger.sink import PostgresSink
from .config import Settings
from .policy import Scope, scope_budgets
from .store import Store

__all__ = ["check"]


@dataclass(slots=True)
class _Tally:
    """One budget's current period, and the sum of its ledger entries found so far."""

    budget: Budget
    owner: str  # the rollup dimension of its entity, e.g. "key:3f9a…"
    start: int
    end: int
    recorded: int = 0


_DIM_FIELDS = {"key": "key_hash", "user": "user_id", "team": "team_id", "customer": "end_user"}
_BUDGET_FIELDS = ("max_budget", "budget_duration", "budget_limits")
_SHOWN = 200  # characters of an entity's value or error quoted in a problem line


async def check(engine: Engine, settings: Settings) -> list[str]:
    """Compare, for every budget of every key, user, team, customer, tag and the proxy, the spend
    counter of the current period (without in-flight holds) with the sum of the ledger
    entries acquired in that period. Returns the differences, and a line for each entity
    whose budgets cannot be built (it is skipped); empty means they agree.

    The ledger is read once, from the earliest period start, through its index of days: a
    budget that never resets (a period from 1970) costs no more than one that resets daily.
    """
    now = await engine.now_ms()
    problems: list[str] = []
    tallies: list[_Tally] = []
    store = Store(engine.redis, prefix=settings.key_prefix)
    for scope, dim, dim_id in await _scopes(store, settings, problems):
        try:
            periods = _periods(scope, f"{dim}:{dim_id}", settings.key_prefix, now, engine.tz)
            tallies += _since_created(periods, scope) if dim == "tag" else periods
        except Exception as exc:  # only the entity's own fields are at work here, no Redis
            problems.append(_unusable(dim, dim_id, scope.fields, exc))
    counters = await _counters(engine, tallies, now)
    sink = None
    if settings.ledger_sink:  # what has shipped counts too, read from PostgreSQL
        sink = PostgresSink(settings.ledger_sink, schema=settings.ledger_sink_schema)
    try:
        await _sum_ledger(Ledger(engine), sink, tallies, now)
    finally:
        if sink is not None:
            await sink.close()
    for tally, counted in zip(tallies, counters, strict=True):
        if counted != tally.recorded:
            problems.append(
                f"{tally.budget.name} {tally.owner} period from "
                f"{datetime.fromtimestamp(tally.start / 1000, UTC).isoformat()}: "
                f"counter {counted} != ledger {tally.recorded} (nano-dollars)"
            )
    return problems


async def _scopes(
    store: Store, settings: Settings, problems: list[str]
) -> list[tuple[Scope, str, str]]:
    """The proxy and every stored entity, with its rollup dimension; an unreadable record
    becomes a problem line."""
    scopes: list[tuple[Scope, str, str]] = []
    if settings.max_budget is not None:
        fields = {
            "max_budget": settings.max_budget,
            "budget_duration": str(settings.budget_duration or "") or None,
        }
        scopes.append((Scope("proxy", "all", fields), "proxy", "all"))
    for kind, scope_kind, dim in (
        ("key", "key", "key"),
        ("user", "user", "user"),
        ("team", "team", "team"),
        ("customer", "end_user", "customer"),
        ("tag", "tag", "tag"),
    ):
        for entity_id in await store.ids(kind):
            try:
                entity = await store.get(kind, entity_id)
            except ValueError as exc:  # msgpack's errors for a damaged record
                problems.append(
                    f"{dim}:{entity_id}: not checked: its record cannot be read "
                    f"({_short(str(exc))})"
                )
                continue
            if entity:
                scopes.append((Scope(scope_kind, entity_id, entity), dim, entity_id))
    return scopes


def _periods(scope: Scope, owner: str, prefix: str, now: int, tz: ZoneInfo) -> list[_Tally]:
    """The current period of each of the scope's budgets."""
    tallies = []
    for budget in scope_budgets(scope, prefix):
        start, end = period_bounds(parse_duration(budget.period), now, tz)
        tallies.append(_Tally(budget, owner, start, end))
    return tallies


def _since_created(tallies: list[_Tally], scope: Scope) -> list[_Tally]:
    """A tag's requests before it was made (or made again) were labels, counted by no budget:
    its periods are reconciled from its creation on."""
    created = scope.fields.get("created_at")
    if isinstance(created, int):
        for tally in tallies:
            tally.start = max(tally.start, created)
    return tallies


def _unusable(dim: str, dim_id: str, fields: Any, exc: Exception) -> str:
    if isinstance(fields, Mapping):
        fields = {name: fields[name] for name in _BUDGET_FIELDS if name in fields}
    where = "in the config" if dim == "proxy" else f"with /{dim}/update"
    return (
        f"{dim}:{dim_id}: not checked: its budget fields {_short(repr(fields))} cannot be "
        f"turned into limits ({type(exc).__name__}: {_short(str(exc))}); correct them {where}"
    )


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"


async def _sum_ledger(
    ledger: Ledger, sink: PostgresSink | None, tallies: list[_Tally], now: int
) -> None:
    """Add each entry (in Redis, or shipped) to the tallies of its entities whose period it
    was acquired in."""
    if not tallies:
        return
    by_owner: dict[str, list[_Tally]] = defaultdict(list)
    for tally in tallies:
        by_owner[tally.owner].append(tally)
    async for entry in history(ledger, sink, min(t.start for t in tallies), now + 1):
        for owner in _owners(entry):
            for tally in by_owner.get(owner, ()):
                if tally.start <= entry.started_ms < tally.end:
                    tally.recorded += entry.charged.get(tally.budget.measure or "spend", 0)


def _owners(entry: Entry) -> Iterator[str]:
    yield "proxy:all"
    for dim, name in _DIM_FIELDS.items():
        value = entry.meta.get(name)
        if isinstance(value, str) and value:
            yield f"{dim}:{value}"
    tags = entry.meta.get("tags")
    for tag in tags if isinstance(tags, list) else ():
        if isinstance(tag, str):
            yield f"tag:{tag}"


async def _counters(engine: Engine, tallies: list[_Tally], now: int) -> list[int]:
    """Each tally's period counter: what was spent, without the holds in flight, plus what an
    admin's reset took off it (the ledger keeps those entries)."""
    uses = await engine.budget_use([t.budget for t in tallies], now)
    return [use.spent + use.reset for use in uses]
