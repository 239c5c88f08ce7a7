"""``ratelimiter ledger export``: the ledger for finance teams, as JSON lines or CSV, and
read back (the round trip the tests check)."""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, TextIO

import orjson

from ..engine import Engine
from ..pricing import NANO
from .entries import Entry, Ledger, utc_ms

__all__ = ["CSV_FIELDS", "export", "read_export"]

# CSV is for spreadsheets: one column per field (request_id is the sidecar's id, response_id
# the upstream's chatcmpl-… id), times in ISO 8601, money in dollars. JSON
# lines keep every entry exactly as stored; CSV too, with what has no column of its own (rare:
# measures or metadata other than the sidecar's) in a last JSON column, "extra".
_META = (
    "key_hash",
    "key_alias",
    "user_id",
    "team_id",
    "organization_id",
    "end_user",
    "model",
    "deployment",
    "route",
    "client_request_id",
)
_COUNTS = (
    "prompt_tokens",
    "completion_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_tokens",
)
CSV_FIELDS = (
    "request_id",
    "response_id",
    "status",
    "started",
    "finished",
    *_META,
    *_COUNTS,
    "usage_reported",
    "estimated_tokens",
    "tokens",
    "input_tokens",
    "output_tokens",
    "estimated_spend",
    "spend",
    "stream_id",
    "extra",
)
# (column, the entry's map, key, kind): amounts are whole numbers; "spend" is nano-dollars.
_AMOUNTS = (
    ("estimated_tokens", "reserved", "tokens", int),
    ("tokens", "charged", "tokens", int),
    ("input_tokens", "charged", "input_tokens", int),  # the input/output token windows'
    ("output_tokens", "charged", "output_tokens", int),
    ("estimated_spend", "reserved", "spend", "dollars"),
    ("spend", "charged", "spend", "dollars"),
)


def _row(entry: Entry) -> dict[str, Any]:
    return asdict(entry)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def _iso(ms: int) -> str:
    # integer arithmetic: a float of seconds could round 123 ms down to 122
    return (_EPOCH + ms * _MS).isoformat(timespec="milliseconds")


def _ms(text: str) -> int:
    return (datetime.fromisoformat(text) - _EPOCH) // _MS


def _dollars(nano: int) -> str:
    """Exact: nano-dollars as a decimal string, never through a float."""
    sign, nano = ("-", -nano) if nano < 0 else ("", nano)
    return f"{sign}{nano // NANO}.{nano % NANO:09d}"


def _nano(text: str) -> int:
    return int(Decimal(text) * NANO)


def _csv_row(entry: Entry) -> dict[str, Any]:
    rest = {"meta": dict(entry.meta), "info": dict(entry.info)}
    rest |= {"reserved": dict(entry.reserved), "charged": dict(entry.charged)}
    row: dict[str, Any] = {
        "request_id": entry.request_id,
        "status": entry.status,
        "started": _iso(entry.started_ms),
        "finished": _iso(entry.finished_ms),
        "stream_id": entry.stream_id,
    }

    def take(column: str, part: str, key: str, fits: bool, shown: Any) -> None:
        if key in rest[part] and fits:
            row[column] = shown
            del rest[part][key]

    for name in _META:
        value = entry.meta.get(name)
        take(name, "meta", name, isinstance(value, str) and value != "", value)
    for name in _COUNTS:
        value = entry.info.get(name)
        take(name, "info", name, _whole(value), value)
    response = entry.info.get("response_id")  # the upstream's id of its answer
    take(
        "response_id", "info", "response_id", isinstance(response, str) and response != "", response
    )
    reported = entry.info.get("usage_reported")
    take("usage_reported", "info", "usage_reported", isinstance(reported, bool), str(reported))
    for column, part, key, kind in _AMOUNTS:
        value = getattr(entry, part).get(key)
        shown = _dollars(value) if kind == "dollars" and _whole(value) else value
        take(column, part, key, _whole(value), shown)
    extra = {part: values for part, values in rest.items() if values}
    row["extra"] = orjson.dumps(extra).decode() if extra else ""
    return row


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _from_csv(row: dict[str, str]) -> Entry:
    extra = orjson.loads(row["extra"]) if row.get("extra") else {}
    parts: dict[str, dict[str, Any]] = {
        part: dict(extra.get(part) or {}) for part in ("meta", "info", "reserved", "charged")
    }
    for name in _META:
        if row[name]:
            parts["meta"][name] = row[name]
    for name in _COUNTS:
        if row[name]:
            parts["info"][name] = int(row[name])
    if row.get("response_id"):
        parts["info"]["response_id"] = row["response_id"]
    if row["usage_reported"]:
        parts["info"]["usage_reported"] = row["usage_reported"] == "True"
    for column, part, key, kind in _AMOUNTS:
        if row[column]:
            parts[part][key] = _nano(row[column]) if kind == "dollars" else int(row[column])
    return Entry(
        row["stream_id"],
        row["request_id"],
        _ms(row["started"]),
        _ms(row["finished"]),
        row["status"],
        parts["reserved"],
        parts["charged"],
        parts["meta"],
        parts["info"],
    )


def read_export(text: str, fmt: str) -> list[Entry]:
    """Entries back from an export file (the round trip the tests check)."""
    if fmt == "jsonl":
        return [Entry(**orjson.loads(line)) for line in text.splitlines() if line]
    return [_from_csv(row) for row in csv.DictReader(io.StringIO(text))]


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
    if ack:  # each trim folds its slot group into the rollups first: nothing uncounted goes
        for key, stream_id in last.items():
            ms, _, seq = stream_id.partition("-")
            await ledger.consumer.trim(key, f"{ms}-{int(seq) + 1}")
    return count
