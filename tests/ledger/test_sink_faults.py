"""The ledger sink under real faults (issue 19, item 4): sidecars running as their own
processes, SIGKILLed between PostgreSQL's commit and Redis's trim; PostgreSQL itself crashed in
the middle of a batch; two sidecars competing for the shipper's lease. After each, every
request is in the table exactly once and the table's spend equals the counters.

The moments are made, not hoped for: a trigger makes the table's INSERT sleep, so a batch is
seen in flight (``pg_stat_activity``) before the fault is struck; Redis's ``CLIENT PAUSE
WRITE`` holds the trim that follows a commit while the sidecar is killed."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from benchmarks import services
from ratelimiter import Engine
from ratelimiter.ledger import Ledger
from ratelimiter.ledger.sink import PostgresSink, Shipper

from ..postgres import PostgresServer

REQUESTS = 12
SLOW_INSERT_S = 3
WAIT_S = 30.0
COLLECT_INTERVAL_S = 0.2
# the lease lives three rounds; one more for the other sidecar's round to take it, and margin
LEASE_LAPSES_S = COLLECT_INTERVAL_S * 8


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Path, str, str]]:
    """A private Redis (these tests pause it) and the fake upstream, as processes."""
    with (
        services.redis_server(tmp_path) as redis,
        services.fake_upstream(tmp_path) as upstream,
    ):
        yield tmp_path, redis.url, upstream.url


@contextlib.contextmanager
def sidecar(stack: tuple[Path, str, str], sink_url: str, schema: str, name: str):  # type: ignore[no-untyped-def]
    root, redis_url, upstream = stack
    setup = services.SidecarSetup(
        models=("m",),
        proxy_budget=None,
        end_user_budget=False,
        key_prefix="faults:",
        extra_settings={
            "ledger_sink": sink_url,
            "ledger_sink_schema": schema,
            "collect_interval": COLLECT_INTERVAL_S,
        },
    )
    with services.sidecar(root, upstream, redis_url, setup, name=name) as running:
        yield running


@contextlib.asynccontextmanager
async def engine_on(redis_url: str) -> AsyncIterator[Engine]:
    async with await Engine.connect(redis_url, prefix="faults:") as engine:
        yield engine


async def serve(session: aiohttp.ClientSession, running: services.Service, n: int) -> None:
    headers = {"Authorization": f"Bearer {running.master_key}"}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for _ in range(n):
        async with session.post(
            running.url + "/chat/completions", json=body, headers=headers
        ) as response:
            assert response.status == 200, await response.text()


async def until(condition, what: str, timeout: float = WAIT_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def slow_inserts(sink: PostgresSink, on: bool) -> None:
    """A statement trigger that sleeps inside every INSERT into the table, or none."""
    await sink.migrate()
    async with (await sink.pool()).acquire() as conn:
        await conn.execute(f"DROP TRIGGER IF EXISTS slow ON {sink.table}")
        if on:
            await conn.execute(
                f"CREATE OR REPLACE FUNCTION {sink.schema}.slow() RETURNS trigger "
                f"LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep({SLOW_INSERT_S}); "
                "RETURN NULL; END $$"
            )
            await conn.execute(
                f"CREATE TRIGGER slow AFTER INSERT ON {sink.table} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {sink.schema}.slow()"
            )


async def insert_in_flight(url: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        found = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            "AND query ILIKE 'INSERT INTO%LiteLLM_SpendLogs%'"
        )
    finally:
        await conn.close()
    return bool(found)


async def table_rows(sink: PostgresSink) -> list[asyncpg.Record]:
    async with (await sink.pool()).acquire() as conn:
        return await conn.fetch(f"SELECT request_id, spend_nano FROM {sink.table}")


async def waiting_in_redis(engine: Engine) -> int:
    return (await Shipper(engine, PostgresSink("postgresql://unused")).lag())[0]


async def assert_each_once(engine: Engine, sink: PostgresSink, count: int) -> None:
    """Every request in the table once, nothing left in Redis, the table's spend equal to
    the proxy's lifetime counter."""

    async def all_shipped() -> bool:
        return await waiting_in_redis(engine) == 0 and len(await table_rows(sink)) >= count

    await until(all_shipped, f"{count} entries shipped")
    found = await table_rows(sink)
    assert len(found) == count
    assert len({r["request_id"] for r in found}) == count
    spent = (await Ledger(engine).lifetime_spend(["proxy:all"]))["proxy:all"]
    assert sum(r["spend_nano"] for r in found) == spent > 0


async def test_sidecar_sigkilled_between_commit_and_trim(
    postgres: PostgresServer, stack: tuple[Path, str, str], ns: str
) -> None:
    schema = f"k_{ns}"
    sink = PostgresSink(postgres.url, schema=schema)
    await slow_inserts(sink, on=True)
    async with engine_on(stack[1]) as engine, aiohttp.ClientSession() as session:
        with sidecar(stack, postgres.url, schema, "first") as first:
            await serve(session, first, REQUESTS)
            await until(lambda: insert_in_flight(postgres.url), "a batch in flight")
            await until(lambda: _equal(waiting_in_redis(engine), REQUESTS), "every request settled")
            # the commit goes through; the trim after it waits on Redis, and dies with it
            await engine.redis.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
            try:
                await until(lambda: _positive(table_rows(sink)), "the batch committed")
                first.process.send_signal(signal.SIGKILL)
                first.process.wait(10)
            finally:
                await engine.redis.execute_command("CLIENT", "UNPAUSE")
            committed = len(await table_rows(sink))
            assert committed > 0 and await waiting_in_redis(engine) == REQUESTS
        await slow_inserts(sink, on=False)
        await engine.redis.delete("faults:collector")  # its lease would lapse in 3 rounds
        with sidecar(stack, postgres.url, schema, "second"):
            await assert_each_once(engine, sink, REQUESTS)
    await sink.close()


async def test_postgres_crashed_mid_batch(
    postgres: PostgresServer, stack: tuple[Path, str, str], ns: str
) -> None:
    schema = f"c_{ns}"
    sink = PostgresSink(postgres.url, schema=schema)
    await slow_inserts(sink, on=True)
    await sink.close()
    async with engine_on(stack[1]) as engine, aiohttp.ClientSession() as session:
        with sidecar(stack, postgres.url, schema, "only") as running:
            await serve(session, running, REQUESTS)
            await until(lambda: insert_in_flight(postgres.url), "a batch in flight")
            postgres.stop(signal.SIGQUIT)  # PostgreSQL's immediate shutdown: a crash
            await serve(session, running, REQUESTS)  # serving goes on; entries wait
            await until(lambda: _equal(waiting_in_redis(engine), 2 * REQUESTS), "entries waiting")
            postgres.start()
            sink = PostgresSink(postgres.url, schema=schema)
            assert await table_rows(sink) == []  # the batch in flight was never committed
            await slow_inserts(sink, on=False)
            await assert_each_once(engine, sink, 2 * REQUESTS)
    await sink.close()


async def test_two_sidecars_competing_for_the_lease(
    postgres: PostgresServer, stack: tuple[Path, str, str], ns: str
) -> None:
    """Two sidecars, each stopped (SIGSTOP) in turn while the other serves: the stopped one's
    lease lapses and the other takes it and ships; woken (SIGCONT), the stopped one goes on
    with the round it was in, believing the lease its own. Both held it, and no entry is in
    the table twice."""
    schema = f"l_{ns}"
    sink = PostgresSink(postgres.url, schema=schema)
    async with engine_on(stack[1]) as engine, aiohttp.ClientSession() as session:
        with (
            sidecar(stack, postgres.url, schema, "a") as a,
            sidecar(stack, postgres.url, schema, "b") as b,
        ):
            holders = set()
            for stopped, serving in ((a, b), (b, a), (a, b), (b, a)):
                stopped.process.send_signal(signal.SIGSTOP)
                try:
                    await serve(session, serving, REQUESTS // 2)
                    await asyncio.sleep(LEASE_LAPSES_S)
                    holders.add(await engine.redis.get("faults:collector"))
                finally:
                    stopped.process.send_signal(signal.SIGCONT)
            assert len(holders - {None}) == 2, "each sidecar held the lease in turn"
            await assert_each_once(engine, sink, 2 * REQUESTS)
    await sink.close()


async def _equal(value, expected: int) -> bool:  # type: ignore[no-untyped-def]
    return await value == expected


async def _positive(rows) -> bool:  # type: ignore[no-untyped-def]
    return len(await rows) > 0
