"""The ledger's whole history: the entries still in Redis, then those the sink shipped to
PostgreSQL, merged so that none counts twice (one shipped but not yet trimmed is in both).

Redis is read first. An entry gone from Redis by then was committed to PostgreSQL before it was
trimmed, so the read of PostgreSQL that follows finds it; the other order could miss an entry
committed and trimmed between the two reads. Rows come back as the entries they were shipped
from (``sink.row`` is the mapping one way, ``entry_of`` the other), in pages.
"""

from __future__ import annotations

import calendar
import json
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta
from typing import Any

from .entries import Entry, Ledger
from .sink import SHADOW_INFO, PostgresSink

__all__ = ["FILTERS", "entry_of", "history", "shipped"]

# what a reader may filter on, pushed down to PostgreSQL: entry meta field -> column
FILTERS = {
    "key_hash": "api_key",
    "user_id": '"user"',
    "team_id": "team_id",
    "organization_id": "organization_id",
    "end_user": "end_user",
    "model": "model",
}
PAGE = 5_000
_INFO_COLUMNS = (
    "prompt_tokens",
    "completion_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_tokens",
)


async def history(
    ledger: Ledger,
    sink: PostgresSink | None,
    since_ms: int,
    until_ms: int,
    where: Mapping[str, str] | None = None,
) -> AsyncIterator[Entry]:
    """Every entry finished in [since_ms, until_ms) whose meta matches ``where`` (fields of
    ``FILTERS``), each once: Redis's first, then PostgreSQL's (none without a sink)."""
    where = dict(where or {})
    unknown = set(where) - set(FILTERS)
    if unknown:
        raise ValueError(f"cannot filter the ledger's history on {sorted(unknown)}")
    seen: set[str] = set()
    async for entry in ledger.entries(since_ms, until_ms):
        if all(entry.meta.get(field) == value for field, value in where.items()):
            seen.add(entry.request_id)
            yield entry
    if sink is None:
        return
    async for entry in shipped(sink, since_ms, until_ms, where):
        if entry.request_id not in seen:
            yield entry


async def shipped(
    sink: PostgresSink, since_ms: int, until_ms: int, where: Mapping[str, str] | None = None
) -> AsyncIterator[Entry]:
    """The shipped entries finished in [since_ms, until_ms), oldest first, page by page (keyset
    pagination on the finish time and the sidecar's id, so a page costs the same at any depth)."""
    conditions = ['"endTime" >= $1', '"endTime" < $2']
    args: list[Any] = [_naive(since_ms), _naive(until_ms)]
    for field, value in (where or {}).items():
        args.append(value)
        conditions.append(f"{FILTERS[field]} = ${len(args)}")
    after: tuple[datetime, str] | None = None
    pool = await sink.pool()
    while True:
        page_args = list(args)
        page_conditions = list(conditions)
        if after is not None:
            page_args += list(after)
            n = len(page_args)
            page_conditions.append(f'("endTime", sidecar_request_id) > (${n - 1}, ${n})')
        query = (
            f"SELECT * FROM {sink.table} WHERE {' AND '.join(page_conditions)} "
            f'ORDER BY "endTime", sidecar_request_id LIMIT {PAGE}'
        )
        async with pool.acquire() as conn:
            rows = await conn.fetch(query, *page_args)
        for row in rows:
            yield entry_of(row)
        if len(rows) < PAGE:
            return
        after = (rows[-1]["endTime"], rows[-1]["sidecar_request_id"])


def entry_of(row: Mapping[str, Any]) -> Entry:
    """The entry a row was shipped from: its meta, its usage and what was charged; of what was
    reserved, the row keeps only the spend."""
    metadata = _json(row["metadata"]) or {}
    tags = _json(row["request_tags"]) or []
    meta = {
        "key_hash": row["api_key"] or None,
        "key_alias": row["key_alias"],
        "user_id": row["user"] or None,
        "team_id": row["team_id"],
        "organization_id": row["organization_id"],
        "end_user": row["end_user"],
        "model": row["model"] or None,
        "deployment": row["deployment"],
        "route": row["call_type"] or None,
        "client_request_id": row["client_request_id"],
        "tags": tags or None,
    }
    info: dict[str, Any] = {name: row[name] for name in _INFO_COLUMNS if row[name]}
    if metadata.get("response_id"):
        info["response_id"] = metadata["response_id"]
    if metadata.get("usage_reported"):
        info["usage_reported"] = True
    info.update({name: metadata[name] for name in SHADOW_INFO if metadata.get(name)})
    charged = {"spend": row["spend_nano"]}
    for measure, column in (
        ("tokens", "total_tokens"),
        ("input_tokens", "input_tokens"),
        ("output_tokens", "output_tokens"),
    ):
        if row[column]:
            charged[measure] = row[column]
    return Entry(
        row["ledger_stream_id"] or "",
        row["sidecar_request_id"],
        _ms(row["startTime"]),
        _ms(row["endTime"]),
        row["ledger_status"],
        {"spend": row["estimated_spend_nano"]} if row["estimated_spend_nano"] else {},
        charged,
        {k: v for k, v in meta.items() if v is not None},
        info,
    )


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


_EPOCH = datetime(1970, 1, 1)
_LAST_MS = (datetime(9999, 12, 31) - _EPOCH) // timedelta(milliseconds=1)


def _naive(ms: int) -> datetime:
    """A moment as the table's TIMESTAMP(3) columns hold it: UTC, without a zone (exact: no
    float on the way); a window's open end past year 9999 stops there."""
    return _EPOCH + timedelta(milliseconds=min(max(ms, 0), _LAST_MS))


def _ms(moment: datetime) -> int:
    return calendar.timegm(moment.timetuple()) * 1000 + moment.microsecond // 1000
