"""The ledger sink: entries shipped from Redis to a real, private PostgreSQL in LiteLLM's
SpendLogs shape, exactly once. After every scenario the table's spend equals the counters
(the lifetime spend settlement adds to), no request_id appears twice, and what was shipped
has left Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import msgpack
import pytest

from ratelimiter import Engine
from ratelimiter.cli import main
from ratelimiter.ledger import Ledger
from ratelimiter.ledger.sink import (
    LATEST_VERSION,
    PostgresSink,
    ShipError,
    Shipper,
    read_lag,
)

from ..conftest import MASTER_KEY, MESSAGES, one_model, running_sidecar, running_upstream
from ..postgres import PostgresServer


@pytest.fixture
async def sink(postgres: PostgresServer, ns: str) -> AsyncIterator[PostgresSink]:
    """A sink in a schema of its own, so tests sharing the server never share rows."""
    sink = PostgresSink(postgres.url, schema=f"t_{ns}")
    yield sink
    await sink.close()


async def settle(engine: Engine, n: int, *, response_id: str | None = None) -> int:
    """``n`` settled requests, each with a ledger entry; returns what they cost."""
    total = 0
    for i in range(n):
        meta = {"key_hash": "k" * 64, "model": "m", "route": "chat", "user_id": "ann"}
        decision = await engine.acquire(
            None, [], meta=msgpack.packb(meta), ledger=["proxy:all", "model:m"]
        )
        info = {"prompt_tokens": 10, "completion_tokens": i}
        if response_id is not None:
            info["response_id"] = response_id
        await engine.settle(
            decision.reservation, {"spend": 1_000 + i, "tokens": 10 + i}, info=msgpack.packb(info)
        )
        total += 1_000 + i
    return total


async def rows(sink: PostgresSink) -> list[asyncpg.Record]:
    async with (await sink.pool()).acquire() as conn:
        return await conn.fetch(f"SELECT * FROM {sink.table}")


async def waiting(engine: Engine) -> int:
    shipper = Shipper(engine, PostgresSink("postgresql://unused"))
    return (await shipper.lag())[0]


async def assert_exact(engine: Engine, sink: PostgresSink, count: int) -> None:
    found = await rows(sink)
    assert len(found) == count
    assert len({r["request_id"] for r in found}) == count
    assert len({r["sidecar_request_id"] for r in found}) == count
    counters = (await Ledger(engine).lifetime_spend(["proxy:all"]))["proxy:all"]
    assert sum(r["spend_nano"] for r in found) == counters == (await sink.totals())[1]


async def test_ships_every_entry_once_and_trims_redis(engine: Engine, sink: PostgresSink):
    await settle(engine, 25)
    assert await waiting(engine) == 25
    shipper = Shipper(engine, sink, batch=10)  # three batches
    assert await shipper.ship() == 25
    await assert_exact(engine, sink, 25)
    assert await waiting(engine) == 0
    assert await shipper.ship() == 0  # nothing twice
    await assert_exact(engine, sink, 25)
    row = (await rows(sink))[0]
    assert row["call_type"] == "chat" and row["api_key"] == "k" * 64 and row["user"] == "ann"
    assert row["model"] == row["model_group"] == "m" and row["status"] == "success"
    assert row["prompt_tokens"] == 10 and row["ledger_status"] == "settled"
    assert row["spend"] == pytest.approx(row["spend_nano"] / 1e9)
    lag = await read_lag(engine)
    assert lag is not None and lag.entries == 0 and lag.error == ""


async def test_killed_between_commit_and_trim_sends_again_without_duplicates(
    engine: Engine, sink: PostgresSink
):
    await settle(engine, 12)
    shipper = Shipper(engine, sink, batch=5)
    await sink.migrate()
    # what a shipper killed after the commit leaves: the rows in PostgreSQL, the entries in Redis
    for key in await shipper.streams():
        await sink.write(await shipper.read(key))
    assert len(await rows(sink)) == 5 and await waiting(engine) == 12  # one batch, not trimmed
    await settle(engine, 3)  # and more arrive meanwhile
    assert await shipper.ship() == 15
    await assert_exact(engine, sink, 15)
    assert await waiting(engine) == 0


async def test_two_shippers_at_once_never_duplicate(engine: Engine, sink: PostgresSink):
    """The lease keeps a second shipper away; should two overlap anyway (a lease lost in a
    pause), the table's keys still admit each entry once."""
    await settle(engine, 40)
    await sink.migrate()
    other = PostgresSink(sink.url, schema=sink.schema)
    try:
        await asyncio.gather(
            Shipper(engine, sink, batch=7).ship(), Shipper(engine, other, batch=3).ship()
        )
    finally:
        await other.close()
    await assert_exact(engine, sink, 40)
    assert await waiting(engine) == 0


async def test_a_repeated_upstream_id_keeps_both_requests(engine: Engine, sink: PostgresSink):
    """request_id is the upstream's answer id; an upstream that repeats one must not make a
    request vanish from the table (and its spend with it)."""
    await settle(engine, 3, response_id="chatcmpl-same")
    await Shipper(engine, sink).ship()
    await assert_exact(engine, sink, 3)
    ids = {r["request_id"] for r in await rows(sink)}
    assert "chatcmpl-same" in ids


async def test_postgres_down_entries_wait_in_redis_and_ship_when_back(
    engine: Engine, postgres: PostgresServer, ns: str
):
    sink = PostgresSink(postgres.url, schema=f"t_{ns}", timeout_s=2)
    try:
        await sink.migrate()
        await settle(engine, 8)
        shipper = Shipper(engine, sink)
        postgres.stop()
        try:
            with pytest.raises(ShipError):
                await shipper.ship()
            assert await waiting(engine) == 8  # nothing trimmed
            await settle(engine, 2)
            lag = await read_lag(engine)
            assert lag is not None and lag.error and lag.entries == 8
        finally:
            postgres.start()
        for _ in range(50):  # the pool's dead connections are replaced
            try:
                await shipper.ship()
                break
            except ShipError:
                await asyncio.sleep(0.1)
        await assert_exact(engine, sink, 10)
        assert await waiting(engine) == 0
    finally:
        await sink.close()


async def test_schema_from_an_earlier_version_is_upgraded_in_place(
    engine: Engine, sink: PostgresSink, postgres: PostgresServer
):
    assert await sink.version() == 0
    assert await sink.migrate(1) == (0, 1)
    async with (await sink.pool()).acquire() as conn:  # a row written by version 1
        await conn.execute(
            f'INSERT INTO {sink.table} (request_id, call_type, "startTime", "endTime", '
            "sidecar_request_id, ledger_status, spend_nano) "
            "VALUES ('old', 'chat', now(), now(), 'old-sidecar', 'settled', 0)"
        )
    before, after = await sink.migrate()  # as the sidecar does at start
    assert (before, after) == (1, LATEST_VERSION) and await sink.version() == LATEST_VERSION
    assert await sink.migrate() == (LATEST_VERSION, LATEST_VERSION)  # idempotent
    await settle(engine, 4)
    await Shipper(engine, sink).ship()
    found = await rows(sink)
    assert len(found) == 5 and "old" in {r["request_id"] for r in found}
    assert all(r["ledger_stream_id"] for r in found if r["request_id"] != "old")


def test_ledger_migrate_command(postgres: PostgresServer, capsys: pytest.CaptureFixture[str]):
    assert main(["ledger", "migrate", "--sink", postgres.url]) == 0
    first = capsys.readouterr().out
    assert main(["ledger", "migrate", "--sink", postgres.url]) == 0
    again = capsys.readouterr().out
    assert f"to {LATEST_VERSION}" in first or "the latest" in first
    assert f"schema version {LATEST_VERSION}, the latest" in again


async def test_a_sidecar_with_a_sink_ships_what_it_serves(
    postgres: PostgresServer, redis_url: str, ns: str
):
    """The whole path: requests through the sidecar, shipped by its collector's lease, the
    upstream's chatcmpl- id as request_id, the lag in /health/readiness and /metrics."""
    import openai

    async with running_upstream() as upstream:
        settings = one_model(
            ns, upstream, ledger_sink=postgres.url, ledger_sink_schema=f"s_{ns}",
            collect_interval_s=0.2,
        )  # fmt: skip
        async with running_sidecar(settings, redis_url) as base:
            client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=MASTER_KEY, max_retries=0)
            for _ in range(5):
                await client.chat.completions.create(model="m", messages=MESSAGES)
            await client.close()
            sink = PostgresSink(postgres.url, schema=f"s_{ns}")
            try:
                for _ in range(100):
                    if len(await rows(sink)) == 5:
                        break
                    await asyncio.sleep(0.1)
                found = await rows(sink)
                assert len(found) == 5
                assert all(r["request_id"].startswith("chatcmpl-") for r in found)
                assert all(r["spend_nano"] > 0 for r in found)
                async with await Engine.connect(redis_url, prefix=settings.key_prefix) as eng:
                    await assert_exact(eng, sink, 5)
                    assert await waiting(eng) == 0
            finally:
                await sink.close()
            async with aiohttp.ClientSession() as session:
                for _ in range(50):
                    async with session.get(f"{base}/health/readiness") as response:
                        body = await response.json()
                    if body["ledger_sink"]["lag_entries"] == 0:
                        break
                    await asyncio.sleep(0.1)
                assert response.status == 200
                assert body["ledger_sink"]["status"] == "shipping", body
                assert body["ledger_sink"]["lag_entries"] == 0
                async with session.get(f"{base}/metrics") as response:
                    metrics = await response.text()
                assert "ratelimiter_ledger_sink_lag_entries 0.0" in metrics
                assert "ratelimiter_ledger_sink_lag_seconds" in metrics


def test_the_sink_url_comes_from_the_environment_or_the_config(tmp_path):
    from ratelimiter.gateway.config import ConfigError, load_config

    path = tmp_path / "config.yaml"
    path.write_text(
        "general_settings:\n  master_key: sk-a-long-enough-master-key-1234\n"
        "ratelimiter_settings:\n  ledger_sink: postgresql://db/spend\n"
        "  ledger_sink_schema: finance\n"
    )
    settings = load_config(path, env={})
    assert settings.ledger_sink == "postgresql://db/spend"
    assert settings.ledger_sink_schema == "finance"
    env = {"RATELIMITER_LEDGER_SINK": "postgresql://other/db"}
    assert load_config(path, env=env).ledger_sink == "postgresql://other/db"
    path.write_text(
        "general_settings:\n  master_key: sk-a-long-enough-master-key-1234\n"
        "ratelimiter_settings:\n  ledger_sink: mysql://db/spend\n"
    )
    with pytest.raises(ConfigError, match="postgresql://"):
        load_config(path, env={})
    assert load_config(None, env={}, master_key="optional").ledger_sink is None


async def test_an_absurd_entry_ships_instead_of_stalling_its_stream(
    engine: Engine, sink: PostgresSink
) -> None:
    """Counts past INTEGER and a NUL in a name once made PostgreSQL refuse the batch, and
    every later entry of the stream waited behind it for ever."""
    meta = {"key_hash": "k" * 64, "model": "m", "route": "chat", "key_alias": "a\x00b"}
    decision = await engine.acquire(None, [], meta=msgpack.packb(meta), ledger=["proxy:all"])
    huge = 2**31 * 3
    info = {"prompt_tokens": huge, "completion_tokens": huge, "reasoning_tokens": huge}
    await engine.settle(
        decision.reservation, {"spend": 7, "tokens": 2**53 - 1}, info=msgpack.packb(info)
    )
    await settle(engine, 2)
    assert await Shipper(engine, sink).ship() == 3
    await assert_exact(engine, sink, 3)
    (odd,) = [r for r in await rows(sink) if r["prompt_tokens"] == huge]
    assert odd["total_tokens"] == 2**53 - 1 and odd["key_alias"] == "ab"
