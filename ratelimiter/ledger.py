"""Reading the spend ledger: entries and daily rollups.

Entries are written by the settle and expire scripts in the same atomic step as the counters
(``lua/lib.lua``, ``ledger_write``): one Redis stream per slot group and UTC day, so no key
grows without bound and a Cluster spreads them; rollups are one hash per slot group and day.
Records inside are msgpack; this module turns them into plain dictionaries for the HTTP edge.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import msgpack

from .connections import translate_errors
from .engine import Engine

__all__ = ["DAY_MS", "Entry", "Ledger", "collect_expired_holds", "day_number", "ledger_dims"]

log = logging.getLogger("ratelimiter.ledger")

DAY_MS = 86_400_000


def day_number(ms: int) -> int:
    return ms // DAY_MS


def _day(number: int) -> date:
    return date(1970, 1, 1) + timedelta(days=number)


def ledger_dims(meta: dict[str, Any]) -> list[str]:
    """The rollup dimensions of a request: the proxy, its key, user, team, customer, model."""
    dims = ["proxy:all"]
    for dim, name in (
        ("key", "key_hash"),
        ("user", "user_id"),
        ("team", "team_id"),
        ("customer", "end_user"),
        ("model", "model"),
    ):
        if meta.get(name):
            dims.append(f"{dim}:{meta[name]}")
    return dims


def _unpack(raw: bytes | None) -> Any:
    return msgpack.unpackb(raw) if raw else {}


@dataclass(frozen=True, slots=True)
class Entry:
    """One finished request: ``status`` is settled, released (refunded) or expired."""

    stream_id: str
    request_id: str
    started_ms: int
    finished_ms: int
    status: str
    reserved: dict[str, int]
    charged: dict[str, int]
    meta: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_stream(cls, stream_id: bytes, fields: dict[bytes, bytes]) -> Entry:
        return cls(
            stream_id.decode(),
            fields[b"rid"].decode(),
            int(fields[b"t0"]),
            int(fields[b"t1"]),
            fields[b"s"].decode(),
            dict(_unpack(fields.get(b"est")) or {}),
            dict(_unpack(fields.get(b"out")) or {}),
            dict(_unpack(fields.get(b"meta")) or {}),
            dict(_unpack(fields.get(b"info")) or {}),
        )


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


class Ledger:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._found: dict[str, dict[int, list[str]]] = {}

    async def _existing(self, kind: str, day: int) -> list[str]:
        """The streams (kind "ledger") or rollup hashes ("rollup") written on ``day``.

        One Redis holds one of each. A Cluster may hold one per slot group (16,384 possible
        anchors): asking for each would be 16,384 calls a day, so the keys of the kind are
        found with one SCAN of every master and remembered for this Ledger's lifetime."""
        if not self.engine.cluster:
            key = f"{self.engine.ledger_base(self.engine.anchors()[0])}{kind}:{day}"
            return [key] if await self.engine.redis.exists(key) else []
        if kind not in self._found:
            found: dict[int, list[str]] = defaultdict(list)
            pattern = f"{_glob_escape(self.engine.prefix)}{{*}}:{kind}:*"
            async for raw in self.engine.redis.scan_iter(match=pattern, count=1000):
                key = raw.decode() if isinstance(raw, bytes) else raw
                suffix = key.rpartition(":")[2]
                if suffix.isdigit():
                    found[int(suffix)].append(key)
            self._found[kind] = found
        return sorted(self._found[kind].get(day, []))

    async def entries(self, since_ms: int, until_ms: int) -> AsyncIterator[Entry]:
        """Every entry finished in [since_ms, until_ms), day by day."""
        async for _, entry in self.entries_with_keys(since_ms, until_ms):
            yield entry

    async def entries_with_keys(
        self, since_ms: int, until_ms: int
    ) -> AsyncIterator[tuple[str, Entry]]:
        """The same, with the stream each entry lives in (export acknowledges per stream)."""
        redis = self.engine.redis
        for day in range(day_number(since_ms), day_number(until_ms - 1) + 1):
            with translate_errors(self.engine.address):
                keys = await self._existing("ledger", day)
            for key in keys:
                with translate_errors(self.engine.address):
                    rows = await redis.xrange(key)
                for stream_id, fields in rows:
                    entry = Entry.from_stream(stream_id, fields)
                    if since_ms <= entry.finished_ms < until_ms:
                        yield key, entry

    async def rollup(self, day: int) -> dict[str, dict[str, int]]:
        """dimension -> measure -> total for one UTC day (requests, settled, released,
        expired, and each charged measure: tokens, spend in nano-dollars)."""
        totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        with translate_errors(self.engine.address):
            for key in await self._existing("rollup", day):
                for name, value in (await self.engine.redis.hgetall(key)).items():
                    dim, _, measure = name.decode().rpartition("|")
                    totals[dim][measure] += int(value)
        return {dim: dict(measures) for dim, measures in totals.items()}

    async def rollups(self, since: date, until: date) -> dict[date, dict[str, dict[str, int]]]:
        first = (since - date(1970, 1, 1)).days
        last = (until - date(1970, 1, 1)).days
        return {_day(d): await self.rollup(d) for d in range(first, last + 1)}


async def collect_expired_holds(engine: Engine, interval_s: float = 5.0) -> None:
    """Finalise holds whose sidecar died, in one sidecar at a time, until cancelled.

    A short lease in Redis elects the collector: whoever holds it renews it each round; when
    it dies, another takes over within three intervals. (The expire script is atomic, so two
    collectors could not double-charge anyway; the lease keeps the others from scanning.)
    """
    me = uuid.uuid4().hex
    lease, ttl_ms = f"{engine.prefix}collector", int(interval_s * 3000)
    while True:
        try:
            holder = await engine.redis.get(lease)
            mine = holder == me.encode()
            if mine:
                await engine.redis.pexpire(lease, ttl_ms)
            elif holder is None:
                mine = bool(await engine.redis.set(lease, me, nx=True, px=ttl_ms))
            if mine:
                while len(await engine.collect_expired()) > 0:
                    pass  # a full batch may mean more are due
        except Exception as exc:
            log.warning("collecting expired holds failed: %s", exc)
        await asyncio.sleep(interval_s)


def utc_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
