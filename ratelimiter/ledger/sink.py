"""The ledger sink: ledger entries shipped from Redis to PostgreSQL, exactly once, in the
shape of LiteLLM's ``LiteLLM_SpendLogs`` table.

One sidecar at a time ships (the collector's elected lease, ``collect_expired_holds``). For
each slot group it reads the ledger streams day by day, oldest entry first, writes a batch in
one transaction (``INSERT … ON CONFLICT DO NOTHING``: ``request_id`` is the primary key and the
sidecar's own id is unique too) and only after the commit trims the shipped entries from the
stream (``XTRIM MINID``). A crash between the commit and the trim sends those entries again,
and the keys ignore them; PostgreSQL down or slow, the entries wait in Redis and the next round
ships them. What waits (entries, and the age of the oldest) is the lag, written to Redis for
``/health/readiness`` and ``/metrics`` on every sidecar.

The table lives in its own PostgreSQL schema (``ratelimiter`` by default), so it never
collides with a LiteLLM proxy's own ``public."LiteLLM_SpendLogs"`` in the same database.
Its migrations are numbered; the versions applied are recorded in ``schema_version``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack
import orjson

from ..engine import Engine
from ..engine.connections import translate_errors
from .entries import DAY_MS, Entry, Ledger, day_number
from .spendlog import STATUS, log_request_id

__all__ = [
    "LAG_KEY",
    "LATEST_VERSION",
    "PostgresSink",
    "Shipper",
    "read_lag",
]

log = logging.getLogger("ratelimiter.ledger.sink")

TABLE = "LiteLLM_SpendLogs"
LAG_KEY = "ledger-sink"  # under the key prefix: a hash, the shipper's last round
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

# Each migration is a list of statements, {s} being the quoted schema. Version 1 is LiteLLM's
# columns (schema.prisma, model LiteLLM_SpendLogs) and ours; version 2 adds the usage buckets
# the ledger learned later (cache reads and writes, reasoning, input/output windows) and the
# stream id each row came from.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE SCHEMA IF NOT EXISTS {s}",
        """CREATE TABLE IF NOT EXISTS {s}.schema_version (
            version INTEGER PRIMARY KEY,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now())""",
        """CREATE TABLE IF NOT EXISTS {s}."LiteLLM_SpendLogs" (
            request_id TEXT PRIMARY KEY,
            call_type TEXT NOT NULL DEFAULT '',
            api_key TEXT NOT NULL DEFAULT '',
            spend DOUBLE PRECISION NOT NULL DEFAULT 0.0,
            total_tokens INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            "startTime" TIMESTAMP(3) NOT NULL,
            "endTime" TIMESTAMP(3) NOT NULL,
            request_duration_ms INTEGER,
            "completionStartTime" TIMESTAMP(3),
            model TEXT NOT NULL DEFAULT '',
            model_id TEXT DEFAULT '',
            model_group TEXT DEFAULT '',
            custom_llm_provider TEXT DEFAULT '',
            api_base TEXT DEFAULT '',
            "user" TEXT DEFAULT '',
            metadata JSONB DEFAULT '{{}}',
            cache_hit TEXT DEFAULT '',
            cache_key TEXT DEFAULT '',
            request_tags JSONB DEFAULT '[]',
            team_id TEXT,
            organization_id TEXT,
            end_user TEXT,
            requester_ip_address TEXT,
            messages JSONB DEFAULT '{{}}',
            response JSONB DEFAULT '{{}}',
            session_id TEXT,
            status TEXT,
            mcp_namespaced_tool_name TEXT,
            agent_id TEXT,
            proxy_server_request JSONB DEFAULT '{{}}',
            sidecar_request_id TEXT NOT NULL UNIQUE,
            spend_nano BIGINT NOT NULL DEFAULT 0,
            estimated_spend DOUBLE PRECISION NOT NULL DEFAULT 0.0,
            estimated_spend_nano BIGINT NOT NULL DEFAULT 0,
            ledger_status TEXT NOT NULL,
            deployment TEXT,
            client_request_id TEXT,
            key_alias TEXT)""",
        'CREATE INDEX IF NOT EXISTS "SpendLogs_startTime_idx" '
        '  ON {s}."LiteLLM_SpendLogs" ("startTime")',
        'CREATE INDEX IF NOT EXISTS "SpendLogs_startTime_request_id_idx" '
        '  ON {s}."LiteLLM_SpendLogs" ("startTime", request_id)',
        'CREATE INDEX IF NOT EXISTS "SpendLogs_end_user_idx" ON {s}."LiteLLM_SpendLogs" (end_user)',
        'CREATE INDEX IF NOT EXISTS "SpendLogs_session_id_idx" '
        '  ON {s}."LiteLLM_SpendLogs" (session_id)',
    ],
    2: [
        'ALTER TABLE {s}."LiteLLM_SpendLogs" '
        "  ADD COLUMN IF NOT EXISTS cache_read_input_tokens BIGINT NOT NULL DEFAULT 0, "
        "  ADD COLUMN IF NOT EXISTS cache_creation_input_tokens BIGINT NOT NULL DEFAULT 0, "
        "  ADD COLUMN IF NOT EXISTS reasoning_tokens BIGINT NOT NULL DEFAULT 0, "
        "  ADD COLUMN IF NOT EXISTS input_tokens BIGINT NOT NULL DEFAULT 0, "
        "  ADD COLUMN IF NOT EXISTS output_tokens BIGINT NOT NULL DEFAULT 0, "
        "  ADD COLUMN IF NOT EXISTS ledger_stream_id TEXT",
    ],
    # Counts as large as the engine takes (2**53-1): an INTEGER column refused the whole batch
    # for one absurd upstream report, and shipping stalled behind it.
    3: [
        'ALTER TABLE {s}."LiteLLM_SpendLogs" '
        "  ALTER COLUMN total_tokens TYPE BIGINT, "
        "  ALTER COLUMN prompt_tokens TYPE BIGINT, "
        "  ALTER COLUMN completion_tokens TYPE BIGINT, "
        "  ALTER COLUMN request_duration_ms TYPE BIGINT",
    ],
    # The history's reads (ledger/history.py) go by finish time, page by page.
    4: [
        'CREATE INDEX IF NOT EXISTS "SpendLogs_endTime_sidecar_request_id_idx" '
        '  ON {s}."LiteLLM_SpendLogs" ("endTime", sidecar_request_id)',
    ],
}
LATEST_VERSION = max(MIGRATIONS)

# (column, type): the row's columns in order, typed for jsonb_to_recordset
_COLUMNS = (
    ("request_id", "text"),
    ("call_type", "text"),
    ("api_key", "text"),
    ("spend", "double precision"),
    ("total_tokens", "bigint"),
    ("prompt_tokens", "bigint"),
    ("completion_tokens", "bigint"),
    ('"startTime"', "timestamp(3)"),
    ('"endTime"', "timestamp(3)"),
    ("request_duration_ms", "bigint"),
    ("model", "text"),
    ("model_id", "text"),
    ("model_group", "text"),
    ('"user"', "text"),
    ("metadata", "jsonb"),
    ("request_tags", "jsonb"),
    ("cache_hit", "text"),
    ("team_id", "text"),
    ("organization_id", "text"),
    ("end_user", "text"),
    ("status", "text"),
    ("sidecar_request_id", "text"),
    ("spend_nano", "bigint"),
    ("estimated_spend", "double precision"),
    ("estimated_spend_nano", "bigint"),
    ("ledger_status", "text"),
    ("deployment", "text"),
    ("client_request_id", "text"),
    ("key_alias", "text"),
    ("cache_read_input_tokens", "bigint"),
    ("cache_creation_input_tokens", "bigint"),
    ("reasoning_tokens", "bigint"),
    ("input_tokens", "bigint"),
    ("output_tokens", "bigint"),
    ("ledger_stream_id", "text"),
)


_KEYS = tuple(name.strip('"') for name, _ in _COLUMNS)


def _naive(ms: int) -> str:
    # Prisma's DateTime is TIMESTAMP(3) without a zone, in UTC
    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None).isoformat()


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _text(value: Any) -> str | None:
    # PostgreSQL's text and jsonb refuse NUL, and one refused row would stall the stream
    return value.replace("\x00", "") if isinstance(value, str) else None


# A shadow limit's would-be refusal (gateway/shadow.py), kept in the row's metadata.
SHADOW_INFO = ("shadow_refused", "shadow_reason")


def row(entry: Entry, request_id: str | None = None) -> tuple[Any, ...]:
    """The table's row for one entry (``_COLUMNS``' order)."""
    meta, info = entry.meta, entry.info
    spend, estimated = _int(entry.charged.get("spend")), _int(entry.reserved.get("spend"))
    tags = meta.get("tags")
    metadata = {
        "user_api_key": _text(meta.get("key_hash")),
        "user_api_key_alias": _text(meta.get("key_alias")),
        "user_api_key_user_id": _text(meta.get("user_id")),
        "user_api_key_team_id": _text(meta.get("team_id")),
        "user_api_key_org_id": _text(meta.get("organization_id")),
        "client_request_id": _text(meta.get("client_request_id")),
        "usage_reported": info.get("usage_reported") is True,
        "response_id": _text(info.get("response_id")),
        **{name: _text(info[name]) for name in SHADOW_INFO if info.get(name)},
    }
    return (
        request_id or log_request_id(entry),
        _text(meta.get("route")) or "",
        _text(meta.get("key_hash")) or "",
        spend / 1e9,
        _int(entry.charged.get("tokens")),
        _int(info.get("prompt_tokens")),
        _int(info.get("completion_tokens")),
        _naive(entry.started_ms),
        _naive(entry.finished_ms),
        entry.finished_ms - entry.started_ms,
        _text(meta.get("model")) or "",
        _text(meta.get("deployment")) or "",
        _text(meta.get("model")) or "",
        _text(meta.get("user_id")) or "",
        metadata,
        [_text(t) for t in tags if isinstance(t, str)] if isinstance(tags, list | tuple) else [],
        "True" if _int(info.get("cache_read_input_tokens")) else "False",
        _text(meta.get("team_id")),
        _text(meta.get("organization_id")),
        _text(meta.get("end_user")),
        STATUS.get(entry.status, entry.status),
        entry.request_id,
        spend,
        estimated / 1e9,
        estimated,
        entry.status,
        _text(meta.get("deployment")),
        _text(meta.get("client_request_id")),
        _text(meta.get("key_alias")),
        _int(info.get("cache_read_input_tokens")),
        _int(info.get("cache_creation_input_tokens")),
        _int(info.get("reasoning_tokens")),
        _int(entry.charged.get("input_tokens")),
        _int(entry.charged.get("output_tokens")),
        entry.stream_id,
    )


class PostgresSink:
    """The table in PostgreSQL, through asyncpg (a pool of two connections: the shipper
    writes, the readers read)."""

    def __init__(self, url: str, *, schema: str = "ratelimiter", timeout_s: float = 10.0):
        if not _NAME.fullmatch(schema):
            raise ValueError(f"ledger sink schema must be a plain SQL name, got {schema!r}")
        self.url, self.schema, self.timeout_s = url, schema, timeout_s
        self._pool: Any = None
        self.table = f'"{schema}"."{TABLE}"'

    @staticmethod
    def _driver() -> Any:
        try:
            import asyncpg
        except ImportError as exc:  # an optional extra
            raise RuntimeError(
                "the PostgreSQL ledger sink needs asyncpg: pip install 'ratelimiter[postgres]'"
            ) from exc
        return asyncpg

    async def pool(self) -> Any:
        if self._pool is None:
            self._pool = await self._driver().create_pool(
                self.url, min_size=0, max_size=2, timeout=self.timeout_s,
                command_timeout=self.timeout_s,
            )  # fmt: skip
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def version(self) -> int:
        """The schema version applied (0: none)."""
        async with (await self.pool()).acquire() as conn:
            exists = await conn.fetchval(
                "SELECT to_regclass($1) IS NOT NULL", f'"{self.schema}".schema_version'
            )
            if not exists:
                return 0
            return await conn.fetchval(
                f'SELECT coalesce(max(version), 0) FROM "{self.schema}".schema_version'
            )

    async def migrate(self, target: int = LATEST_VERSION) -> tuple[int, int]:
        """Create or upgrade the schema to ``target``; returns (version before, after). Many
        sidecars starting at once take turns (an advisory lock), so each step runs once."""
        async with (await self.pool()).acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self.schema)
            exists = await conn.fetchval(
                "SELECT to_regclass($1) IS NOT NULL", f'"{self.schema}".schema_version'
            )
            before = 0
            if exists:
                before = await conn.fetchval(
                    f'SELECT coalesce(max(version), 0) FROM "{self.schema}".schema_version'
                )
            for version in range(before + 1, target + 1):
                for statement in MIGRATIONS[version]:
                    await conn.execute(statement.format(s=f'"{self.schema}"'))
                await conn.execute(
                    f'INSERT INTO "{self.schema}".schema_version (version) VALUES ($1)', version
                )
                log.info("ledger sink: schema %s at version %d", self.schema, version)
            return before, max(before, target)

    async def write(self, entries: Sequence[Entry]) -> None:
        """Write entries in one transaction; those already there (the same sidecar id) are
        left alone.

        ``request_id`` is the upstream's answer id when there is one: if another request
        already holds that id (an upstream that repeats ids), this one keeps the sidecar's
        own id, so no entry is ever dropped for a key it does not own."""
        if not entries:
            return
        names = ", ".join(name for name, _ in _COLUMNS)
        typed = ", ".join(f"{name} {kind}" for name, kind in _COLUMNS)
        # One statement for the whole batch (one round trip): the rows travel as one JSON
        # array, typed by jsonb_to_recordset.
        insert = (
            f"INSERT INTO {self.table} ({names}) "
            f"SELECT {names} FROM jsonb_to_recordset($1::jsonb) AS r({typed}) "
            "ON CONFLICT DO NOTHING"
        )
        wanted = [log_request_id(e) for e in entries]
        async with (await self.pool()).acquire() as conn, conn.transaction():
            owners = dict(
                await conn.fetch(
                    f"SELECT request_id, sidecar_request_id FROM {self.table} "
                    "WHERE request_id IN (SELECT jsonb_array_elements_text($1::jsonb))",
                    orjson.dumps(wanted).decode(),
                )
            )
            rows = []
            for entry, rid in zip(entries, wanted, strict=True):
                owner = owners.get(rid)
                if owner is not None and owner != entry.request_id:
                    rid = entry.request_id  # the answer id is another request's
                owners.setdefault(rid, entry.request_id)
                rows.append(dict(zip(_KEYS, row(entry, rid), strict=True)))
            await conn.execute(insert, orjson.dumps(rows).decode())

    async def totals(self) -> tuple[int, int]:
        """(rows, spend in nano-dollars) of the whole table."""
        async with (await self.pool()).acquire() as conn:
            found = await conn.fetchrow(
                f"SELECT count(*), coalesce(sum(spend_nano), 0) FROM {self.table}"
            )
        return int(found[0]), int(found[1])


@dataclass
class Lag:
    entries: int = 0
    seconds: float = 0.0
    shipped: int = 0
    error: str = ""
    updated_ms: int = 0


async def read_lag(engine: Engine) -> Lag | None:
    """The shipper's last round as it wrote it to Redis (None: no round yet)."""
    with translate_errors(engine.address):
        raw = await engine.redis.get(engine.prefix + LAG_KEY)
    if raw is None:
        return None
    return Lag(**msgpack.unpackb(raw))


class Shipper:
    """Moves the ledger from Redis to the sink; one round is ``ship()``."""

    def __init__(self, engine: Engine, sink: PostgresSink, *, batch: int = 1000) -> None:
        self.engine, self.sink, self.batch = engine, sink, batch
        self.ledger = Ledger(engine)
        self.migrated = False
        self._done: set[str] = set()  # streams of days long past, found empty

    async def _now_ms(self) -> int:
        seconds, micros = await self.engine.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def streams(self) -> list[str]:
        """Every ledger stream that may hold entries, oldest day first."""
        now = await self._now_ms()
        days = await self.ledger._days("ledger", 0, day_number(now) + 1)
        return [key for _, keys in days for key in keys if key not in self._done]

    async def read(self, key: str) -> list[Entry]:
        """The stream's oldest entries, one batch."""
        with translate_errors(self.engine.address):
            rows = await self.engine.redis.xrange(key, min="-", count=self.batch)
        return [Entry.from_stream(stream_id, fields) for stream_id, fields in rows]

    async def trim(self, key: str, last: str) -> None:
        """Remove the stream's entries up to ``last`` (committed to the sink), in the script
        that first folds them into the rollups: an entry is never trimmed before it counts."""
        ms, _, seq = last.partition("-")
        await self.ledger.consumer.trim(key, f"{ms}-{int(seq) + 1}")

    async def ship(self, still_mine: Callable[[], Awaitable[bool]] | None = None) -> int:
        """One round: ship every stream's entries, batch by batch, each committed before it
        is trimmed; stops early when ``still_mine`` says the lease is lost. Returns how many
        entries left Redis. The lag is written to Redis afterwards, error or not."""
        shipped, error = 0, ""
        try:
            if not self.migrated:
                await self.sink.migrate()
                self.migrated = True
            now = await self._now_ms()
            for key in await self.streams():
                while True:
                    entries = await self.read(key)
                    if not entries:
                        day = int(key.rpartition(":")[2])
                        if day < day_number(now) - 1:  # no entry lands on it any more
                            self._done.add(key)
                        break
                    await self.sink.write(entries)
                    await self.trim(key, entries[-1].stream_id)
                    shipped += len(entries)
                    if len(entries) < self.batch:
                        break
                    if still_mine is not None and not await still_mine():
                        return shipped
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.warning("ledger sink: shipping failed, entries wait in Redis: %s", error)
        finally:
            try:
                await self.record_lag(shipped, error)
            except Exception as exc:
                log.warning("ledger sink: could not record the lag: %s", exc)
        if error:
            raise ShipError(error)
        return shipped

    async def lag(self) -> tuple[int, float]:
        """(entries waiting in Redis, seconds since the oldest of them was written)."""
        keys = await self.streams()
        if not keys:
            return 0, 0.0
        with translate_errors(self.engine.address):
            pipe = self.engine.redis.pipeline(transaction=False)
            for key in keys:
                pipe.xlen(key)
                pipe.xrange(key, min="-", count=1)
            replies = await pipe.execute()
            now = await self._now_ms()
        waiting, oldest = 0, None
        for length, first in zip(replies[::2], replies[1::2], strict=True):
            waiting += int(length)
            if first:
                ms = int(first[0][0].decode().partition("-")[0])
                oldest = ms if oldest is None else min(oldest, ms)
        return waiting, 0.0 if oldest is None else max(0, now - oldest) / 1000

    async def record_lag(self, shipped: int, error: str) -> Lag:
        entries, seconds = await self.lag()
        lag = Lag(entries, seconds, shipped, error, await self._now_ms())
        with translate_errors(self.engine.address):
            await self.engine.redis.set(
                self.engine.prefix + LAG_KEY,
                msgpack.packb(lag.__dict__),
                px=DAY_MS,  # a stale record dies with its shipper, within a day
            )
        return lag


class ShipError(RuntimeError):
    """A shipping round failed; its entries wait in Redis for the next."""
