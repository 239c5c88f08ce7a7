"""``ratelimiter ledger export|check``: the ledger for finance teams, and its reconciliation."""

from __future__ import annotations

import csv
import io
import sys
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, TextIO
from zoneinfo import ZoneInfo

import orjson

from .config import Settings
from .durations import parse_duration, period_bounds
from .engine import Engine
from .ledger import Entry, Ledger, utc_ms
from .limits import Budget
from .policy import Scope, scope_budgets
from .store import Store

__all__ = ["CSV_FIELDS", "check", "export", "read_export"]

CSV_FIELDS = (
    "stream_id",
    "request_id",
    "started_ms",
    "finished_ms",
    "status",
    "reserved",
    "charged",
    "meta",
    "info",
)
_JSON_COLUMNS = ("reserved", "charged", "meta", "info")


def _row(entry: Entry) -> dict[str, Any]:
    return asdict(entry)


def _csv_row(entry: Entry) -> dict[str, Any]:
    row = _row(entry)
    for name in _JSON_COLUMNS:
        row[name] = orjson.dumps(row[name]).decode()
    return row


def read_export(text: str, fmt: str) -> list[Entry]:
    """Entries back from an export file (the round trip the tests check)."""
    if fmt == "jsonl":
        return [Entry(**orjson.loads(line)) for line in text.splitlines() if line]
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        values: dict[str, Any] = dict(row)
        for name in _JSON_COLUMNS:
            values[name] = orjson.loads(values[name])
        values["started_ms"], values["finished_ms"] = (
            int(values["started_ms"]),
            int(values["finished_ms"]),
        )
        rows.append(Entry(**values))
    return rows


async def export(
    engine: Engine,
    since: date,
    until: date,
    fmt: str,
    out: TextIO,
    *,
    ack: bool = False,
    progress: TextIO | None = sys.stderr,
) -> int:
    """Write every entry finished from ``since`` to ``until`` (UTC days, inclusive).

    With ``ack``, each exported stream is trimmed up to the last exported entry once the
    whole export has been written: nothing unexported is ever removed.
    """
    writer = csv.DictWriter(out, CSV_FIELDS) if fmt == "csv" else None
    if writer:
        writer.writeheader()
    last: dict[str, str] = {}
    count = 0
    ledger = Ledger(engine)
    async for key, entry in ledger.entries_with_keys(utc_ms(since), utc_ms(until + timedelta(1))):
        if writer:
            writer.writerow(_csv_row(entry))
        else:
            out.write(orjson.dumps(_row(entry)).decode() + "\n")
        last[key] = entry.stream_id
        count += 1
        if progress and count % 1000 == 0:
            progress.write(f"\rexported {count:,} entries")
            progress.flush()
    out.flush()
    if progress:
        progress.write(f"\rexported {count:,} entries\n")
    if ack:
        for key, stream_id in last.items():
            ms, _, seq = stream_id.partition("-")
            await engine.redis.xtrim(key, minid=f"{ms}-{int(seq) + 1}")
    return count


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
    """Compare, for every budget of every key, user, team, customer and the proxy, the spend
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
            tallies += _periods(scope, f"{dim}:{dim_id}", settings.key_prefix, now, engine.tz)
        except Exception as exc:  # only the entity's own fields are at work here, no Redis
            problems.append(_unusable(dim, dim_id, scope.fields, exc))
    counters = await _counters(engine, tallies, now)
    await _sum_ledger(Ledger(engine), tallies, now)
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


async def _sum_ledger(ledger: Ledger, tallies: list[_Tally], now: int) -> None:
    """Add each entry to the tallies of its entities whose period it was acquired in."""
    if not tallies:
        return
    by_owner: dict[str, list[_Tally]] = defaultdict(list)
    for tally in tallies:
        by_owner[tally.owner].append(tally)
    async for entry in ledger.entries(min(t.start for t in tallies), now + 1):
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


async def _counters(engine: Engine, tallies: list[_Tally], now: int) -> list[int]:
    """Each tally's period counter: what was spent, without the holds in flight."""
    return [use.spent for use in await engine.budget_use([t.budget for t in tallies], now)]
