"""Capacity blocks (issue 17, item 4): a process admits from a block of a hot limit's capacity
that Redis counted first. Never over-admitted, across processes too; what a block does not use
goes back; overruns are charged; a dead process's block is charged in full at its hold's
expiry; under-admission stays within the stated bound."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import pytest

from ratelimiter import Budget, Engine, SlidingWindow
from ratelimiter.engine.blocks import Blocks, Grant


async def used(engine: Engine, limit: Any) -> int:
    (state,) = await engine.peek([limit])
    return limit.capacity - state.remaining


async def open_block(blocks: Blocks, limit: Any) -> Grant:
    """A grant from a block: none is taken in a bucket's last moments, so ask in the next."""
    while True:
        grant = await blocks.take(limit)
        if grant is not None:
            return grant
        await asyncio.sleep(blocks.margin_s)


async def admit(engine: Engine, blocks: Blocks, limit: Any) -> Grant | bool:
    """As a caller does: from a block, else against the limit itself (False: refused)."""
    grant = await blocks.take(limit)
    if grant is not None:
        return grant
    decision = await engine.acquire(None, [limit])
    if decision.allowed:
        await engine.settle(decision.reservation, {})
    return decision.allowed


async def test_blocks_serve_then_the_limit_answers_exactly(engine: Engine, ns: str) -> None:
    limit = SlidingWindow(f"{ns}:rpm", 100, "1m", buckets=6)  # 10 s buckets
    blocks = Blocks(engine, size=lambda _: 10)
    answers = [await admit(engine, blocks, limit) for _ in range(120)]
    admitted = [a for a in answers if a]
    assert len(admitted) == 100 and answers[100:] == [False] * 20
    # from blocks, but for those asked as a bucket ended (admitted against the limit itself)
    assert sum(isinstance(a, Grant) for a in answers) >= 90
    for grant in admitted:
        if isinstance(grant, Grant):
            await blocks.give_back(grant, grant.amount)
    await blocks.close()
    assert await used(engine, limit) == 100


async def test_what_a_block_does_not_use_goes_back(engine: Engine, ns: str) -> None:
    now = [0.0]
    limit = SlidingWindow(f"{ns}:tpm", 10_000, "1m", 100, measure="tokens")
    blocks = Blocks(engine, size=lambda _: 1_000, clock=lambda: now[0])
    while (first := await blocks.take(limit)) is None:  # a bucket's last moments: next one
        now[0] += 1  # past the quiet time, on this clock
    second, refused = [await blocks.take(limit) for _ in range(2)]
    assert second is not None and refused is not None
    assert await used(engine, limit) == 1_000  # the block, counted in Redis before use
    await blocks.give_back(first, 80)  # used less than its estimate
    await blocks.give_back(second, 150)  # ran over it
    await blocks.give_back(refused, 0)  # refused elsewhere: nothing
    assert await used(engine, limit) == 1_000  # still the block's while it is open
    now[0] += 3600  # its time is up
    await blocks.sweep()
    assert await used(engine, limit) == 230
    assert blocks.outstanding == 0


async def test_a_budget_block_never_passes_the_budget(engine: Engine, ns: str) -> None:
    """Blocks of 300 for requests of 90: each leaves a sliver no request fits, counted until
    the block is settled. While they run, 10 are admitted (900); settled, the 11th fits."""
    budget = Budget(f"{{{ns}}}:spend", 1_000, "daily", 90)
    blocks = Blocks(engine, size=lambda _: 300)
    answers = [await admit(engine, blocks, budget) for _ in range(20)]
    grants = [a for a in answers if isinstance(a, Grant)]
    assert len(grants) == 10 and not any(a is True for a in answers)
    (state,) = await engine.peek([budget])
    assert state.remaining >= 0
    for grant in grants:
        await blocks.give_back(grant, 90)
    await blocks.close()
    assert await used(engine, budget) == 900
    eleventh = await admit(engine, blocks, budget)  # the slivers are back: 990
    assert eleventh and not await admit(engine, blocks, budget)
    if isinstance(eleventh, Grant):
        await blocks.give_back(eleventh, 90)
    await blocks.close()
    assert await used(engine, budget) == 990


async def test_a_block_lives_within_its_bucket(engine: Engine, ns: str) -> None:
    """A block closes a margin before the 1 s bucket it was counted in ends, and is settled
    then although no request comes to close it."""
    limit = SlidingWindow(f"{ns}:rps", 1_000, "10s", buckets=10)  # 1 s buckets
    blocks = Blocks(engine, size=lambda _: 100)
    grant = await open_block(blocks, limit)
    answered = blocks.clock()
    # it was asked for before the answer came, and its bucket ended at most 1 s after that
    assert grant.block.closes_at <= answered + 1.0 - blocks.margin_s
    await blocks.give_back(grant, 1)
    for _ in range(100):  # settled by its own timer, without another request
        if grant.block.settled:
            break
        await asyncio.sleep(0.05)
    assert grant.block.settled
    assert await used(engine, limit) == 1


async def test_a_dead_processs_block_is_charged_in_full(redis_url: str, ns: str) -> None:
    async with await Engine.connect(redis_url, prefix=f"t:{ns}:", hold_ttl_ms=200) as engine:
        limit = SlidingWindow(f"{ns}:rpm", 100, "1m")
        grant = await open_block(Blocks(engine, size=lambda _: 25), limit)  # then it "dies"
        await asyncio.sleep(0.4)
        expired = await engine.collect_expired()
        assert [e.request_id for e in expired] == [grant.block.reservation.request_id]
        assert await used(engine, limit) == 25


PROCESSES, DEMAND, CAPACITY, SIZE = 4, 100, 200, 8


async def _process(url: str, ns: str, barrier: Any) -> int:
    async with await Engine.connect(url, prefix=f"t:{ns}:") as engine:
        limit = SlidingWindow(f"{ns}:shared", CAPACITY, "1m")
        blocks = Blocks(engine, size=lambda _: SIZE)
        await engine.redis.ping()
        barrier.wait()
        answers = await asyncio.gather(*(admit(engine, blocks, limit) for _ in range(DEMAND)))
        for answer in answers:
            if isinstance(answer, Grant):
                await blocks.give_back(answer, answer.amount)
        await blocks.close()
        return sum(1 for answer in answers if answer)


def _worker(url: str, ns: str, barrier: Any, out: Any) -> None:
    out.put(asyncio.run(_process(url, ns, barrier)))


async def _used_by_all(url: str, ns: str) -> int:
    async with await Engine.connect(url, prefix=f"t:{ns}:") as engine:
        return await used(engine, SlidingWindow(f"{ns}:shared", CAPACITY, "1m"))


def test_processes_never_over_admit_and_under_admit_within_the_bound(
    redis_url: str, ns: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(redis_url, ns, barrier, out)) for _ in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    admitted = sum(out.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0
    # twice the capacity asked for at once: never more than it, and at most one block's worth
    # per process left unused while the others were refused
    assert CAPACITY - PROCESSES * SIZE <= admitted <= CAPACITY
    assert asyncio.run(_used_by_all(redis_url, ns)) == admitted


def test_only_uncapped_windows_and_budgets_are_blockable() -> None:
    assert Blocks.blockable(SlidingWindow("k", 10, "1m"))
    assert not Blocks.blockable(SlidingWindow("k", 10, "1m", capped=True))
    assert not Blocks.blockable(Budget("k", 10, "daily", 0))
    with pytest.raises(ValueError, match="only uncapped windows and budgets"):
        asyncio.run(Blocks(None).take(SlidingWindow("k", 10, "1m", capped=True)))  # type: ignore[arg-type]
