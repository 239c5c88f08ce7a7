"""The ledger's history across Redis and PostgreSQL (issue 19, item 3): entries still in Redis,
shipped and trimmed, and shipped but not yet trimmed, each read once, as the entries they were;
filters pushed down to PostgreSQL; a shipped row is the entry it came from."""

from __future__ import annotations

import asyncio

import aiohttp
import msgpack
import pytest

from ratelimiter import Engine
from ratelimiter.gateway.reconcile import check
from ratelimiter.ledger import Entry, Ledger
from ratelimiter.ledger import history as history_module
from ratelimiter.ledger.history import history, shipped
from ratelimiter.ledger.sink import PostgresSink, Shipper

from ..conftest import MESSAGES, Admin, one_model, running_sidecar, running_upstream
from ..postgres import PostgresServer
from .test_sink import sink  # noqa: F401  (the fixture: a schema of its own)

FOREVER = (0, 2**62)  # a window open at both ends


async def requests(engine: Engine, n: int, user: str) -> None:
    for i in range(n):
        meta = {"key_hash": "k" * 64, "model": "m", "route": "chat", "user_id": user, "tags": ["a"]}
        decision = await engine.acquire(None, [], meta=msgpack.packb(meta), ledger=["model:m"])
        info = {"prompt_tokens": 10, "completion_tokens": i + 1, "response_id": f"chatcmpl-{i}"}
        actuals = {"spend": 1_000 + i, "tokens": 11 + i}
        await engine.settle(decision.reservation, actuals, info=msgpack.packb(info))


async def everything(engine: Engine, into: PostgresSink | None, **where: str) -> list[Entry]:
    return [e async for e in history(Ledger(engine), into, *FOREVER, where or None)]


async def test_each_entry_once_wherever_it_is(engine: Engine, sink: PostgresSink) -> None:  # noqa: F811
    await requests(engine, 3, "ann")
    assert await Shipper(engine, sink).ship() == 3  # committed and trimmed: only in PostgreSQL
    await requests(engine, 2, "bob")
    ledger = Ledger(engine)
    in_redis = [e async for e in ledger.entries(*FOREVER)]
    await sink.write(in_redis[:1])  # committed, not yet trimmed: in both
    await requests(engine, 1, "cid")  # only in Redis
    found = await everything(engine, sink)
    assert len(found) == 6 == len({e.request_id for e in found})
    assert sum(e.charged["spend"] for e in found) == sum(1_000 + i for i in (0, 1, 2, 0, 1, 0))
    assert sorted(e.meta["user_id"] for e in await everything(engine, sink, user_id="bob")) == [
        "bob",
        "bob",
    ]
    assert len(await everything(engine, None)) == 3  # without a sink: Redis alone


async def test_a_shipped_row_is_the_entry_it_came_from(
    engine: Engine,
    sink: PostgresSink,  # noqa: F811
) -> None:
    await requests(engine, 2, "ann")
    original = [e async for e in Ledger(engine).entries(*FOREVER)]
    await Shipper(engine, sink).ship()
    back = [e async for e in shipped(sink, *FOREVER)]
    assert len(back) == 2
    for before, after in zip(sorted(original, key=_id), sorted(back, key=_id), strict=True):
        assert (after.request_id, after.status) == (before.request_id, before.status)
        assert (after.started_ms, after.finished_ms) == (before.started_ms, before.finished_ms)
        assert after.stream_id == before.stream_id
        assert after.meta == before.meta
        assert after.charged == before.charged
        assert after.reserved.get("spend", 0) == before.reserved.get("spend", 0)
        assert after.info == before.info


async def test_the_window_is_the_finish_time_and_pages_join(
    engine: Engine,
    sink: PostgresSink,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await requests(engine, 5, "ann")
    original = sorted(
        [e async for e in Ledger(engine).entries(*FOREVER)], key=lambda e: e.finished_ms
    )
    await Shipper(engine, sink).ship()
    middle = original[2].finished_ms
    inside = [e async for e in history(Ledger(engine), sink, middle, middle + 1)]
    assert {e.request_id for e in inside} == {
        e.request_id for e in original if e.finished_ms == middle
    }
    monkeypatch.setattr(history_module, "PAGE", 2)  # five rows: three pages
    paged = [e.request_id async for e in shipped(sink, *FOREVER)]
    assert sorted(paged) == sorted(e.request_id for e in original)


def _id(entry: Entry) -> str:
    return entry.request_id


async def test_spend_logs_and_the_check_read_what_shipped(
    postgres: PostgresServer,
    redis_url: str,
    ns: str,
) -> None:
    """Through the sidecar: once its requests are shipped and trimmed from Redis, /spend/logs
    still lists them (from PostgreSQL), and ``ledger check`` still finds the key's budget equal
    to its ledger; a request after that is read from Redis, the rest from PostgreSQL."""
    import openai

    async with running_upstream() as upstream:
        settings = one_model(
            ns, upstream, ledger_sink=postgres.url, ledger_sink_schema=f"h_{ns}",
            collect_interval_s=0.2,
        )  # fmt: skip
        async with (
            running_sidecar(settings, redis_url) as base,
            aiohttp.ClientSession() as session,
            await Engine.connect(redis_url, prefix=settings.key_prefix) as engine,
        ):
            admin = Admin(session, base)
            key = (await admin.post("/key/generate", {"max_budget": 1}))["key"]
            client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
            for _ in range(4):
                await client.chat.completions.create(model="m", messages=MESSAGES)
            for _ in range(100):  # shipped and trimmed by the sidecar's own shipper
                if await Shipper(engine, PostgresSink("postgresql://unused")).lag() == (0, 0.0):
                    break
                await asyncio.sleep(0.1)
            assert [e async for e in Ledger(engine).entries(*FOREVER)] == []
            await client.chat.completions.create(model="m", messages=MESSAGES)  # in Redis
            await client.close()
            logs = await admin.get("/spend/logs", api_key=key)
            assert len(logs) == 5 == len({row["sidecar_request_id"] for row in logs})
            spent = (await admin.get("/key/info", key=key))["info"]["spend"]
            assert sum(row["spend"] for row in logs) == pytest.approx(spent)
            assert await check(engine, settings) == []
