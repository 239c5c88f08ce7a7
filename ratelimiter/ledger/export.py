"""``ratelimiter ledger export``: the ledger for finance teams, as JSON lines or CSV, and
read back (the round trip the tests check)."""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import asdict
from datetime import date, timedelta
from typing import Any, TextIO

import orjson

from ..engine import Engine
from .entries import Entry, Ledger, utc_ms

__all__ = ["CSV_FIELDS", "export", "read_export"]

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
