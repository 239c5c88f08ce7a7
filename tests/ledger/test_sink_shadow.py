"""A ledger entry's shadow fields (a shadow limit's would-be refusal) survive shipping to
PostgreSQL: the row keeps them in its metadata, and /spend/logs reads them back from there."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgpack
import pytest

from ratelimiter import Engine
from ratelimiter.ledger import Ledger
from ratelimiter.ledger.history import shipped
from ratelimiter.ledger.sink import PostgresSink, Shipper
from ratelimiter.ledger.spendlog import spend_log

from ..postgres import PostgresServer


@pytest.fixture
async def sink(postgres: PostgresServer, ns: str) -> AsyncIterator[PostgresSink]:
    sink = PostgresSink(postgres.url, schema=f"t_{ns}")
    yield sink
    await sink.close()


async def settle(engine: Engine, info: dict[str, object]) -> str:
    meta = {"key_hash": "k" * 64, "model": "m", "route": "chat"}
    decision = await engine.acquire(None, [], meta=msgpack.packb(meta), ledger=["proxy:all"])
    assert decision.reservation is not None
    await engine.settle(decision.reservation, {"spend": 1_000}, info=msgpack.packb(info))
    return decision.request_id


async def test_shadow_fields_round_trip_through_the_sink(engine: Engine, sink: PostgresSink):
    shadowed = await settle(
        engine,
        {"prompt_tokens": 3, "shadow_refused": "team:requests", "shadow_reason": "window_full"},
    )
    plain = await settle(engine, {"prompt_tokens": 3})
    before = {e.request_id: spend_log(e) async for e in Ledger(engine).entries(0, 2**62)}
    assert await Shipper(engine, sink).ship() == 2
    after = {e.request_id: spend_log(e) async for e in shipped(sink, 0, 2**62)}
    for rid in (shadowed, plain):
        fields = ("shadow_refused", "shadow_reason")
        assert [after[rid][f] for f in fields] == [before[rid][f] for f in fields]
    assert after[shadowed]["shadow_refused"] == "team:requests"
    assert after[shadowed]["shadow_reason"] == "window_full"
    assert after[plain]["shadow_refused"] is None
