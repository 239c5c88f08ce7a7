"""The rollup consumer (issue 17 item 2): settlement writes the ledger entry only; the rollups,
lifetime spend and index of days are folded from the streams exactly once, whoever folds and
however a folder dies; readers see no lag; resets, trims and upgrades stay exact."""

from __future__ import annotations

import asyncio
import io
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Sequence
from datetime import date

import msgpack
from redis.crc import key_slot

from ratelimiter import Engine, SlidingWindow
from ratelimiter.engine.engine import slot_tags
from ratelimiter.engine.limits import MAX_AMOUNT, Limit
from ratelimiter.ledger import Ledger, day_number, export
from ratelimiter.ledger.rollups import CHECKPOINT, DUE, Rollups

from ..conftest import MESSAGES, Stack

DIMS = ["proxy:all", "key:k1", "model:m"]


async def settle(
    engine: Engine,
    n: int,
    *,
    dims: list[str] = DIMS,
    first_spend: int = 1_000,
    limits: Sequence[Limit] = (),
) -> list[int]:
    """``n`` settled requests rolled up under ``dims``; returns each one's spend."""
    spent = []
    for i in range(n):
        decision = await engine.acquire(None, list(limits), meta=b"", ledger=dims)
        assert decision.reservation is not None
        spend = first_spend + i
        await engine.settle(decision.reservation, {"spend": spend, "tokens": 10})
        spent.append(spend)
    return spent


async def today(engine: Engine) -> int:
    return day_number(await engine.now_ms())


def base(engine: Engine) -> str:
    return engine.ledger_base(engine.anchors()[0])


async def test_settlement_writes_the_entry_and_the_consumer_the_rollups(engine: Engine) -> None:
    spent = await settle(engine, 3)
    day, lg = await today(engine), base(engine)
    redis = engine.redis
    # On the settlement's path: the stream entry (with its dimensions) and the due day only.
    assert await redis.smembers(lg + DUE) == {str(day).encode()}
    assert not await redis.exists(lg + f"rollup:{day}", lg + "lifetime", lg + "ledger-days")
    rows = await redis.xrange(lg + f"ledger:{day}")
    assert [msgpack.unpackb(fields[b"d"]) for _, fields in rows] == [DIMS] * 3
    # A reader folds first, so it is exact at once; the fold moved the checkpoint.
    ledger = Ledger(engine)
    rollup = await ledger.rollup(day)
    assert rollup["key:k1"] == {"settled": 3, "requests": 3, "spend": sum(spent), "tokens": 30}
    assert await ledger.lifetime_spend(["model:m"]) == {"model:m": sum(spent)}
    assert not await redis.exists(lg + DUE)
    assert await redis.hget(lg + CHECKPOINT, day) == rows[-1][0]
    assert await redis.pttl(lg + f"rollup:{day}") > 399 * 86_400_000
    # Folding again adds nothing.
    assert await Rollups(engine).catch_up() == 0
    assert await ledger.rollup(day) == rollup


async def expected(ledger: Ledger, since_ms: int, dims: list[str]) -> Counter[str]:
    """The rollup of ``dims`` computed from the entries themselves."""
    totals: Counter[str] = Counter()
    async for entry in ledger.entries(since_ms, since_ms + 3_600_000):
        for dim in dims:
            totals[f"{dim}|{entry.status}"] += 1
            for measure, amount in entry.charged.items():
                totals[f"{dim}|{measure}"] += amount
    return totals


def flat(rollup: dict[str, dict[str, int]]) -> Counter[str]:
    return Counter(
        {
            f"{dim}|{measure}": amount
            for dim, measures in rollup.items()
            for measure, amount in measures.items()
            if measure != "requests" and amount
        }
    )


async def test_consumers_racing_settlements_count_every_entry_once(engine: Engine) -> None:
    since = await engine.now_ms() - 1_000
    stop = asyncio.Event()

    async def consume() -> None:
        consumer = Rollups(engine, batch=3)  # many small folds, interleaved with writes
        while not stop.is_set():
            await consumer.catch_up()
            await asyncio.sleep(0)

    consumers = [asyncio.create_task(consume()) for _ in range(6)]
    writers = await asyncio.gather(*(settle(engine, 25, first_spend=100 * w) for w in range(4)))
    stop.set()
    await asyncio.gather(*consumers)
    ledger = Ledger(engine)
    rollup = await ledger.rollup(await today(engine))
    assert flat(rollup) == await expected(ledger, since, DIMS)
    total = sum(sum(w) for w in writers)
    assert await ledger.lifetime_spend(DIMS) == dict.fromkeys(DIMS, total)


async def test_a_consumer_killed_mid_backlog_neither_loses_nor_doubles(
    engine: Engine, redis_url: str
) -> None:
    since = await engine.now_ms() - 1_000
    spent = await settle(engine, 300)
    lg = base(engine)
    folder = textwrap.dedent(
        f"""
        import asyncio
        from ratelimiter import Engine
        from ratelimiter.ledger.rollups import Rollups

        async def main():
            async with await Engine.connect({redis_url!r}, prefix={engine.prefix!r}) as engine:
                while True:  # one entry per script call, until killed
                    await Rollups(engine, batch=1).fold([{lg!r}])

        asyncio.run(main())
        """
    )
    process = subprocess.Popen([sys.executable, "-c", folder])
    try:
        deadline = time.monotonic() + 20
        while not await engine.redis.exists(lg + CHECKPOINT):
            assert time.monotonic() < deadline, "the folder never folded"
            await asyncio.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    ledger = Ledger(engine)
    assert await ledger.lifetime_spend(["key:k1"]) == {"key:k1": sum(spent)}
    assert flat(await ledger.rollup(await today(engine))) == await expected(ledger, since, DIMS)


async def test_a_reset_is_neither_undone_nor_repeated_by_entries_folded_after_it(
    engine: Engine,
) -> None:
    ledger = Ledger(engine)
    ledger.consumer.batch = 2  # the reset has to fold a backlog in several calls first
    before = await settle(engine, 9)  # nothing folded yet
    await ledger.set_lifetime_spend("key:k1", 0)
    assert await Rollups(engine).catch_up() == 0  # the reset folded everything before it
    assert await ledger.lifetime_spend(["key:k1", "model:m"]) == {
        "key:k1": 0,
        "model:m": sum(before),
    }
    # Requests settled after the reset count on top of it, once each, whoever folds them.
    after = await settle(engine, 3, first_spend=50)
    await ledger.set_lifetime_spend("model:m", 7)
    assert await ledger.lifetime_spend(["key:k1", "model:m"]) == {
        "key:k1": sum(after),
        "model:m": 7,
    }
    # Resets racing settlements and each other: the lifetime is what settled after the last
    # reset took effect, a suffix of the stream, never one entry less or more.
    racing = asyncio.create_task(settle(engine, 20, first_spend=1))
    await asyncio.gather(*(ledger.set_lifetime_spend("key:k1", 0) for _ in range(3)))
    await racing
    (found,) = (await ledger.lifetime_spend(["key:k1"])).values()
    assert found in {sum(range(first, 21)) for first in range(1, 22)}
    # The daily rollups are not reset: they are the ledger's history.
    assert (await ledger.rollup(await today(engine)))["key:k1"]["settled"] == 32


async def test_a_reset_on_a_cluster_covers_entries_not_folded_in_any_slot_group(
    cluster_engine: Engine, ns: str
) -> None:
    engine = cluster_engine
    groups = [SlidingWindow(f"t:{ns}:{{s{i}}}:rpm", 1000, "1m") for i in range(4)]
    spent = [await settle(engine, 2, limits=[limit]) for limit in groups]
    bases = [engine.ledger_base(slot_tags()[key_slot(g.key.encode())]) for g in groups]
    assert len(set(bases)) == 4
    ledger = Ledger(engine)
    assert await ledger.lifetime_spend(["key:k1"]) == {"key:k1": sum(map(sum, spent))}
    more = [await settle(engine, 2, limits=[limit], first_spend=10) for limit in groups]
    assert all([await engine.redis.exists(lg + DUE) for lg in bases])  # none folded yet
    await ledger.set_lifetime_spend("key:k1", 5)
    assert await Rollups(engine).catch_up() == 0
    assert await ledger.lifetime_spend(["key:k1", "model:m"]) == {
        "key:k1": 5,
        "model:m": sum(map(sum, spent + more)),
    }
    assert (await ledger.rollup(await today(engine)))["proxy:all"]["settled"] == 16


# What settlement wrote before the consumer (lib.lua's ledger_write until this change): the
# entry without its dimensions, the day index and the rollups, at once.
OLD_LEDGER_WRITE = """
local lg, day, dims, out = ARGV[1], ARGV[2], cmsgpack.unpack(ARGV[3]), ARGV[4]
redis.call('XADD', lg .. 'ledger:' .. day, '*', 'rid', ARGV[5], 't0', '1', 't1', '2',
  's', 'settled', 'est', out, 'out', out, 'meta', '', 'info', '')
redis.call('ZADD', lg .. 'ledger-days', day, day)
local rollup = lg .. 'rollup:' .. day
for _, d in ipairs(dims) do
  redis.call('HINCRBY', rollup, d .. '|settled', 1)
  for measure, amount in pairs(cmsgpack.unpack(out)) do
    redis.call('HINCRBY', rollup, d .. '|' .. measure, amount)
  end
  redis.call('HINCRBY', lg .. 'lifetime', d, cmsgpack.unpack(out).spend)
end
"""


async def test_an_upgrade_keeps_inline_rollups_and_folds_only_new_entries(engine: Engine) -> None:
    """During a rolling upgrade old and new sidecars write to the same day's stream: the old
    entries (no dimensions) were counted as written, the new ones are folded, each once."""
    day, lg = await today(engine), base(engine)
    ledger = Ledger(engine)
    total = 0
    for round_ in range(3):
        for i in range(4):
            out = msgpack.packb({"spend": 300 + i, "tokens": 1})
            await engine.redis.eval(
                OLD_LEDGER_WRITE, 1, lg + "x", lg, day, msgpack.packb(DIMS), out, f"old{i}"
            )
            total += 300 + i
        total += sum(await settle(engine, 2))
        if round_ == 1:  # a reader in the middle: the consumer has a checkpoint now
            assert await ledger.lifetime_spend(["proxy:all"]) == {"proxy:all": total}
    assert await ledger.lifetime_spend(DIMS) == dict.fromkeys(DIMS, total)
    rollup = await ledger.rollup(day)
    assert rollup["key:k1"]["settled"] == 18 and rollup["key:k1"]["spend"] == total
    assert rollup["model:m"]["tokens"] == 12 + 6 * 10


async def test_trimming_never_drops_an_entry_the_rollups_have_not_counted(
    engine: Engine,
) -> None:
    spent = await settle(engine, 5)
    day, lg = await today(engine), base(engine)
    assert await engine.redis.exists(lg + DUE)  # nothing folded yet
    out = io.StringIO()
    moment = date.fromordinal(date(1970, 1, 1).toordinal() + day)
    assert await export(engine, moment, moment, "jsonl", out, ack=True, progress=None) == 5
    assert await engine.redis.xlen(lg + f"ledger:{day}") == 0  # trimmed...
    ledger = Ledger(engine)  # ...after the same script folded them
    assert await ledger.lifetime_spend(["key:k1"]) == {"key:k1": sum(spent)}
    assert (await ledger.rollup(day))["key:k1"]["settled"] == 5


async def test_sums_past_2_to_the_53_stay_exact(engine: Engine) -> None:
    await settle(engine, 3, first_spend=MAX_AMOUNT - 2)
    found = await Ledger(engine).lifetime_spend(["proxy:all"])
    assert found == {"proxy:all": 3 * MAX_AMOUNT - 3}  # past a double's whole numbers


async def test_the_sidecar_folds_within_seconds_with_no_reader(stack: Stack) -> None:
    key = await stack.key()
    await stack.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    engine = stack.engine
    lg, day = base(engine), await today(engine)
    deadline = time.monotonic() + 5
    while await engine.redis.exists(lg + DUE):
        assert time.monotonic() < deadline, "no background fold within 5 s"
        await asyncio.sleep(0.1)
    assert await engine.redis.hget(lg + f"rollup:{day}", "proxy:all|settled") is not None
