"""Reading the spend ledger: entries and daily rollups.

Entries are written by the settle and expire scripts in the same atomic step as the counters
(``lua/lib.lua``, ``ledger_write``): one Redis stream per slot group and UTC day, so no key
grows without bound and a Cluster spreads them. The rollup consumer (``rollups``) derives from
them one rollup hash per slot group and day, the lifetime spend and each slot group's index of
days (a sorted set), so reading a range costs commands per day that holds data, not per day of
the range; every read here folds first, so it is exact. Records inside are msgpack; this module
turns them into plain dictionaries for the HTTP edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

import msgpack

from ..engine import Engine
from ..engine.connections import translate_errors
from .rollups import DAYS_INDEX, LIFETIME, Rollups

__all__ = ["DAY_MS", "Entry", "Ledger", "collect_expired_holds", "day_number", "ledger_dims"]

log = logging.getLogger("ratelimiter.ledger")

DAY_MS = 86_400_000


def day_number(ms: int) -> int:
    return ms // DAY_MS


def _day(number: int) -> date:
    return date(1970, 1, 1) + timedelta(days=number)


def ledger_dims(meta: dict[str, Any]) -> list[str]:
    """The rollup dimensions of a request: the proxy, its key, user, team, organization,
    customer, model, and each of its tags."""
    dims = ["proxy:all"]
    for dim, name in (
        ("key", "key_hash"),
        ("user", "user_id"),
        ("team", "team_id"),
        ("organization", "organization_id"),
        ("customer", "end_user"),
        ("model", "model"),
    ):
        if meta.get(name):
            dims.append(f"{dim}:{meta[name]}")
    dims.extend(f"tag:{tag}" for tag in meta.get("tags") or ())
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


STATUSES = ("settled", "released", "expired")
INDEXED_FLAG = "ledger-indexed"  # set once the streams written before the index are indexed
_PAGE = 1000  # stream entries per XRANGE: a busy day's stream is never read in one reply
_DIMS = 1000  # dimensions per lifetime read: the script gets them as arguments, bounded
_DAY_KEY = re.compile(r"(?P<base>.*\}:)(?:ledger|rollup):(?P<day>\d+)")


class Ledger:
    """Reads the ledger through each slot group's index of the days it holds, so a query
    costs commands per day that holds data, however long the range asked for."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.consumer = Rollups(engine)
        self._indexed = False

    async def _days(self, kind: str, first: int, last: int) -> list[tuple[int, list[str]]]:
        """The days in [first, last] that hold data, each with its streams (kind "ledger")
        or rollup hashes ("rollup"), in order: one per slot group that wrote on that day.

        One Redis has one slot group. A Cluster has one per slot: their indexes are read in
        one pipeline (a fixed 16,384 small reads, whatever the size of the keyspace); the few
        with entries not folded yet are folded first and read by the same script."""
        await self._ensure_index()
        by_base = await self.consumer.read(
            lambda pipe, base: pipe.zrangebyscore(base + DAYS_INDEX, first, last),
            ["days", first, last],
        )
        found: dict[int, list[str]] = defaultdict(list)
        for base, days in by_base.items():
            for day in map(int, days):
                found[day].append(f"{base}{kind}:{day}")
        return sorted(found.items())

    async def _ensure_index(self) -> None:
        """Index the days written before the index existed, once per Redis (or Cluster)."""
        if self._indexed:
            return
        flag = f"{self.engine.prefix}{INDEXED_FLAG}"
        with translate_errors(self.engine.address):
            if not await self.engine.redis.exists(flag):
                await self.reindex()
                await self.engine.redis.set(flag, "1")
        self._indexed = True

    async def reindex(self) -> None:
        """Add every day that holds a ledger stream or rollup to its slot group's index, found
        with one SCAN of every master. Readers run it once, for streams written before the
        index existed; run it again (or delete the ``ledger-indexed`` key) if a sidecar of an
        older version wrote streams after that, during a rolling upgrade."""
        redis = self.engine.redis
        pattern = f"{_glob_escape(self.engine.prefix)}{{*}}:*:*"
        bases = {self.engine.ledger_base(anchor) for anchor in self.engine.anchors()}
        with translate_errors(self.engine.address):
            pipe = redis.pipeline(transaction=False)
            async for raw in redis.scan_iter(match=pattern, count=1000):
                match = _DAY_KEY.fullmatch(raw.decode() if isinstance(raw, bytes) else raw)
                if match and match["base"] in bases:  # not an entity id that looks like one
                    pipe.zadd(match["base"] + DAYS_INDEX, {match["day"]: int(match["day"])})
                if len(pipe) >= _PAGE:
                    await pipe.execute()
            await pipe.execute()

    async def entries(self, since_ms: int, until_ms: int) -> AsyncIterator[Entry]:
        """Every entry finished in [since_ms, until_ms), day by day."""
        async for _, entry in self.entries_with_keys(since_ms, until_ms):
            yield entry

    async def entries_with_keys(
        self, since_ms: int, until_ms: int
    ) -> AsyncIterator[tuple[str, Entry]]:
        """The same, with the stream each entry lives in (export acknowledges per stream)."""
        days = await self._days("ledger", day_number(since_ms), day_number(until_ms - 1))
        for _, keys in days:
            for key in keys:
                async for stream_id, fields in self._stream(key):
                    entry = Entry.from_stream(stream_id, fields)
                    if since_ms <= entry.finished_ms < until_ms:
                        yield key, entry

    async def _stream(self, key: str) -> AsyncIterator[tuple[bytes, dict[bytes, bytes]]]:
        start = "-"
        while True:
            with translate_errors(self.engine.address):
                rows = await self.engine.redis.xrange(key, min=start, count=_PAGE)
            for row in rows:
                yield row
            if len(rows) < _PAGE:
                return
            start = "(" + rows[-1][0].decode()

    async def rollup(self, day: int) -> dict[str, dict[str, int]]:
        """dimension -> measure -> total for one UTC day (requests, settled, released,
        expired, and each charged measure: tokens, spend in nano-dollars)."""
        return (await self._rollups(day, day)).get(day, {})

    async def rollups(self, since: date, until: date) -> dict[date, dict[str, dict[str, int]]]:
        """The rollup of each day from ``since`` to ``until`` (inclusive) that holds one."""
        epoch = date(1970, 1, 1)
        found = await self._rollups((since - epoch).days, (until - epoch).days)
        return {_day(day): totals for day, totals in found.items()}

    async def _rollups(self, first: int, last: int) -> dict[int, dict[str, dict[str, int]]]:
        out: dict[int, dict[str, dict[str, int]]] = {}
        for day, keys in await self._days("rollup", first, last):
            totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
            for key in keys:
                with translate_errors(self.engine.address):
                    fields = await self.engine.redis.hgetall(key)
                for name, value in fields.items():
                    dim, _, measure = name.decode().rpartition("|")
                    totals[dim][measure] += int(value)
            for measures in totals.values():
                # A day's requests are the sum of its statuses: settlements no longer count
                # them apart (older rollups did, and agree).
                measures["requests"] = sum(measures.get(s, 0) for s in STATUSES)
            if totals:  # an indexed day whose rollup expired (after 400 days) is left out
                out[day] = {dim: dict(measures) for dim, measures in totals.items()}
        return out

    async def lifetime_spend(self, dims: Sequence[str]) -> dict[str, int]:
        """The lifetime spend (nano-dollars) of each dimension (``key:3f9a…``, ``user:ann``,
        ``organization:acme``, any name the requests were rolled up under), for many at once.

        Each slot group's ``lifetime`` hash, which has no TTL (the daily rollups expire after
        400 days), holds what the rollup consumer folded. One Redis has one such hash: one
        HMGET. A Cluster has one per slot group: one HMGET per slot, in one pipeline. Groups
        with entries not folded yet are folded first, so the answer counts every request
        settled before the call."""
        wanted = list(dict.fromkeys(dims))
        totals = dict.fromkeys(wanted, 0)
        for first in range(0, len(wanted), _DIMS):
            page = wanted[first : first + _DIMS]
            found = await self.consumer.read(
                lambda pipe, base, page=page: pipe.hmget(base + LIFETIME, page),
                ["spend", *page],
            )
            for values in found.values():
                for dim, value in zip(page, values, strict=True):
                    if value is not None:
                        totals[dim] += int(value)
        return totals

    async def set_lifetime_spend(self, dim: str, amount: int = 0) -> None:
        """Make a dimension's lifetime spend ``amount`` (0: it starts again); the ledger keeps
        its entries. In each slot group the reset runs in the script that folds the group's
        last entries: every request settled before it is counted and then reset, none is
        folded onto the new value later, and one settling meanwhile is counted either before
        (and reset) or after, never twice. A Cluster clears every group, then sets one."""
        first, *others = self.consumer.bases()
        if others:
            await self.consumer.read(
                lambda pipe, base: pipe.hdel(base + LIFETIME, dim), ["set", dim, 0]
            )
        await self.consumer.fold([first], ["set", dim, amount])


class _Shipper(Protocol):
    """What the collector needs of ``sink.Shipper`` (named here so neither imports the
    other)."""

    async def ship(self, still_mine: Callable[[], Awaitable[bool]] | None = None) -> int: ...


async def collect_expired_holds(
    engine: Engine, interval_s: float = 5.0, shipper: _Shipper | None = None
) -> None:
    """Finalise holds whose sidecar died, and ship the ledger to its sink when one is
    configured, in one sidecar at a time, until cancelled.

    A short lease in Redis elects the collector: whoever holds it renews it each round (and
    between the shipper's batches); when it dies, another takes over within three intervals.
    (The expire script is atomic and the sink's keys ignore an entry sent twice, so two
    collectors could not double-charge or double-ship anyway; the lease keeps the others
    from scanning.)
    """
    me = uuid.uuid4().hex.encode()
    lease, ttl_ms = f"{engine.prefix}collector", int(interval_s * 3000)

    async def still_mine() -> bool:
        if await engine.redis.get(lease) != me:
            return False
        await engine.redis.pexpire(lease, ttl_ms)
        return True

    while True:
        try:
            mine = await still_mine()
            if not mine and await engine.redis.get(lease) is None:
                mine = bool(await engine.redis.set(lease, me, nx=True, px=ttl_ms))
            if mine:
                while len(await engine.collect_expired()) > 0:
                    pass  # a full batch may mean more are due
                if shipper is not None:
                    with contextlib.suppress(Exception):  # logged; entries wait in Redis
                        await shipper.ship(still_mine)
        except Exception as exc:
            log.warning("collecting expired holds failed: %s", exc)
        await asyncio.sleep(interval_s)


def utc_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
