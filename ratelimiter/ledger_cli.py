"""``ratelimiter ledger export|check``: the ledger for finance teams, and its reconciliation."""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from typing import Any, TextIO

import orjson

from .config import Settings
from .durations import period_bounds
from .engine import Engine
from .ledger import Entry, Ledger, utc_ms
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


async def check(engine: Engine, settings: Settings) -> list[str]:
    """Compare, for every budget of every key, user, team, customer and the proxy, the spend
    counter of the current period (without in-flight holds) with the sum of the ledger
    entries acquired in that period. Returns the differences; empty means they agree."""
    store, ledger = Store(engine.redis, prefix=settings.key_prefix), Ledger(engine)
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
            entity = await store.get(kind, entity_id)
            if entity:
                scopes.append((Scope(scope_kind, entity_id, entity), dim, entity_id))
    now = await engine.now_ms()
    problems = []
    for scope, dim, dim_id in scopes:
        for budget in scope_budgets(scope, settings.key_prefix):
            start, end = period_bounds(budget.period, now, engine.tz)  # type: ignore[arg-type]
            raw = await engine.redis.hmget(f"{budget.key}:{start}", "u", "h")
            counted = int(raw[0] or 0) - int(raw[1] or 0)
            recorded = 0
            async for entry in ledger.entries(start, now + 1):
                if start <= entry.started_ms < end and _in_dim(entry, dim, dim_id):
                    recorded += entry.charged.get(budget.measure or "spend", 0)
            if counted != recorded:
                problems.append(
                    f"{budget.name} {dim}:{dim_id} period from "
                    f"{datetime.fromtimestamp(start / 1000, UTC).isoformat()}: "
                    f"counter {counted} != ledger {recorded} (nano-dollars)"
                )
    return problems


def _in_dim(entry: Entry, dim: str, dim_id: str) -> bool:
    field = {
        "proxy": None,
        "key": "key_hash",
        "user": "user_id",
        "team": "team_id",
        "customer": "end_user",
    }[dim]
    return field is None or entry.meta.get(field) == dim_id
