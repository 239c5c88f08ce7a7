"""`ledger check` and ledger reads cost commands per day that holds data, not per day since
1970; entries written before the day index existed are still found; a bad entity is reported,
not fatal."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import msgpack
import pytest

from ratelimiter import Engine, RedisServer
from ratelimiter.gateway.config import Settings
from ratelimiter.gateway.policy import Scope, scope_budgets
from ratelimiter.gateway.reconcile import check
from ratelimiter.gateway.store import Store
from ratelimiter.ledger import Ledger, day_number

from ..conftest import Cluster, ManualClock, start_server
from .test_ledger_cli import ledger_cli

DAY_MS = 86_400_000
NEVER_RESETS = {"max_budget": 100.0}  # no budget_duration: one period from 1970 to 2070


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A server for this module alone, so INFO commandstats counts only what a test sends."""
    server = start_server(tmp_path_factory.mktemp("ledger-check"))
    yield server
    server.stop()


@pytest.fixture
async def counted(own_redis: RedisServer, ns: str, clock: ManualClock) -> AsyncIterator[Engine]:
    async with await Engine.connect(own_redis.url, prefix=f"t:{ns}:", clock=clock) as eng:
        yield eng


async def commands(engine: Engine) -> Counter[str]:
    stats = await engine.redis.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()})


async def sent_by(engine: Engine, before: Counter[str]) -> Counter[str]:
    """Commands since ``before`` was taken, without the INFO that took it."""
    return await commands(engine) - before - Counter(info=1)


async def spend(engine: Engine, prefix: str, token: str, n: int, clock: ManualClock | None) -> int:
    """``n`` settled requests of key ``token`` (its budgets as the proxy builds them), on the
    clock's current day; returns what they cost."""
    entity = await Store(engine.redis, prefix=prefix).get("key", token)
    budgets = list(scope_budgets(Scope("key", token, entity or {}), prefix, 1_000))
    total = 0
    for i in range(n):
        if clock:
            clock.advance(1_000)
        decision = await engine.acquire(
            None,
            budgets,
            meta=msgpack.packb({"key_hash": token}),
            ledger=["proxy:all", f"key:{token}"],
        )
        await engine.settle(decision.reservation, {"spend": 700 + i})
        total += 700 + i
    return total


async def keys_with_spend(
    engine: Engine, prefix: str, clock: ManualClock, days: list[int], keys: int = 3
) -> list[str]:
    """``keys`` keys with never-resetting budgets, each spending on each of ``days``."""
    store = Store(engine.redis, prefix=prefix)
    tokens = [hashlib.sha256(f"{prefix}{k}".encode()).hexdigest() for k in range(keys)]
    for token in tokens:
        await store.create("key", token, NEVER_RESETS)
    start = clock.now
    for day in days:
        clock.now = start + day * DAY_MS
        for token in tokens:
            await spend(engine, prefix, token, 20, clock)
    clock.now = start + (max(days) + 1) * DAY_MS
    return tokens


async def test_check_costs_commands_per_day_with_data_not_per_day_since_1970(
    counted: Engine, settings: Settings, clock: ManualClock
) -> None:
    keys = await keys_with_spend(counted, settings.key_prefix, clock, days=[0, 1, 3])
    now = clock.now
    assert len([e async for e in Ledger(counted).entries(now - 5 * DAY_MS, now)]) == 180
    before = await commands(counted)
    assert await check(counted, settings) == []
    sent = await sent_by(counted, before)
    # Per check: an index read or two, SMEMBERS per entity kind; per key its record and
    # counter; per day that holds data one XRANGE. Walking every day of the never-resetting
    # period (1970 to now) instead would be ~20,800 commands per budget. The EXISTS are the
    # index flag and the rollup consumer's probe (nothing was waiting to be folded).
    assert sum(sent.values()) <= 10 + 2 * len(keys) + 3, sent
    assert (sent["xrange"], sent["exists"], sent["evalsha"]) == (3, 2, 0)


async def test_entries_written_before_the_day_index_are_found_and_indexed_once(
    counted: Engine, settings: Settings, clock: ManualClock
) -> None:
    await keys_with_spend(counted, settings.key_prefix, clock, days=[0, 2], keys=1)
    await Ledger(counted).consumer.catch_up()  # the consumer indexes the days it folds
    index = counted.ledger_base(counted.anchors()[0]) + "ledger-days"
    written = [int(d) for d in await counted.redis.zrange(index, 0, -1)]
    await counted.redis.delete(index)  # what the previous version left: streams, no index
    now = clock.now
    ledger = Ledger(counted)
    assert len([e async for e in ledger.entries(0, now)]) == 40
    epoch_days = await ledger.rollups(date(1970, 1, 1), date(2070, 1, 1))
    assert [day for day, dims in epoch_days.items() if dims] == [
        datetime.fromtimestamp(d * 86_400, UTC).date() for d in written
    ]
    assert [int(d) for d in await counted.redis.zrange(index, 0, -1)] == written
    assert await check(counted, settings) == []
    before = await commands(counted)
    assert await check(counted, settings) == []
    sent = await sent_by(counted, before)
    assert (sent["scan"], sent["xrange"]) == (0, 2)  # indexed once: no second scan
    assert sum(sent.values()) <= 10 + 2 + 2, sent


async def test_a_cluster_finds_entries_of_every_slot_group_from_before_the_index(
    redis_cluster: Cluster, ns: str
) -> None:
    prefix = f"t:{ns}:"
    settings = Settings(master_key="sk-test-master-7f3a9c2e5b1d", key_prefix=prefix)
    async with await Engine.connect(redis_cluster.url, prefix=prefix) as engine:
        store = Store(engine.redis, prefix=prefix)
        tokens = [hashlib.sha256(f"{ns}{k}".encode()).hexdigest() for k in range(4)]
        for token in tokens:
            await store.create("key", token, NEVER_RESETS)
            await spend(engine, prefix, token, 3, None)
        today = day_number(await engine.now_ms())
        async for raw in engine.redis.scan_iter(match=f"{prefix}*ledger-days", count=1000):
            await engine.redis.delete(raw)
        now = await engine.now_ms()
        ledger = Ledger(engine)
        found = [e async for e in ledger.entries(now - DAY_MS, now + 1)]
        assert sorted(e.meta["key_hash"] for e in found) == sorted(tokens * 3)
        assert (await ledger.rollup(today))["proxy:all"]["requests"] == 12
        assert await check(engine, settings) == []


async def stored_as_is(engine: Engine, prefix: str, kind: str, entity_id: str, raw: bytes) -> None:
    """An entity record as an older version may have left it: written with no validation."""
    await engine.redis.set(f"{prefix}e:{{{kind}}}:{entity_id}", raw)
    await engine.redis.sadd(f"{prefix}e:{{{kind}}}:index", entity_id)


async def test_check_reports_a_bad_entity_and_goes_on(
    engine: Engine, settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    prefix = settings.key_prefix
    bad = {
        ("key", "huge"): {"max_budget": 1e10},  # past 2**53 nano-dollars
        ("key", "infinite"): {"max_budget": 1e308},
        ("key", "forever"): {"max_budget": 1, "budget_duration": "100000y"},
        ("user", "banana"): {"budget_limits": [{"budget_duration": "banana", "max_budget": 1}]},
        ("team", "listed"): [1, 2],
    }
    for (kind, entity_id), fields in bad.items():
        await stored_as_is(engine, prefix, kind, entity_id, msgpack.packb(fields))
    await stored_as_is(engine, prefix, "customer", "garbled", b"\xc1\xc1")
    token = hashlib.sha256(b"good").hexdigest()
    await Store(engine.redis, prefix=prefix).create("key", token, {"max_budget": 1})
    await spend(engine, prefix, token, 3, None)
    await engine.redis.hincrby(f"{prefix}{{key:{token}}}:spend:100y:0", "u", 5)

    problems = await check(engine, settings)
    for owner in ("key:huge", "key:infinite", "key:forever", "user:banana", "team:listed"):
        [line] = [p for p in problems if p.startswith(f"{owner}: not checked")]
        assert "cannot be turned into limits" in line and "update" in line
    assert "2**53" in next(p for p in problems if p.startswith("key:huge"))
    assert any(p.startswith("customer:garbled: not checked") for p in problems)
    [difference] = [p for p in problems if token in p]
    assert difference.startswith(f"key:budget key:{token}") and "counter 2108 != ledger 2103" in (
        difference
    )
    assert len(problems) == 7

    result = await asyncio.to_thread(ledger_cli, tmp_path, redis_url, prefix, "check")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "7 difference(s)" in result.stdout and "key:infinite: not checked" in result.stdout
