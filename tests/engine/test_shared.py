"""Shares of a total window (``SharedWindow``): borrowing below the saturation level, each share
held to its own above it, and a waiting share's unused part kept for it."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import pytest

from ratelimiter import Engine, SharedWindow, SlidingWindow
from ratelimiter.engine.blocks import Blocks
from ratelimiter.errors import InvalidLimit

from ..conftest import ManualClock


def deployment(ns: str) -> tuple[SlidingWindow, SharedWindow, SharedWindow]:
    """100 tokens per 10 s, split prod 90 / dev 10, saturated at 60."""
    total = SlidingWindow(f"{{{ns}}}:tpm", 100, "10s", measure="tokens", buckets=10)
    prod, dev = (
        SharedWindow(
            f"{{{ns}}}:tpm:{name}",
            share,
            "10s",
            measure="tokens",
            buckets=10,
            total_key=total.key,
            saturation=60,
        )
        for name, share in (("prod", 90), ("dev", 10))
    )
    return total, prod, dev


def ask(total: SlidingWindow, share: SharedWindow, tokens: int) -> list[SlidingWindow]:
    return [total.with_amount(tokens), share.with_amount(tokens)]


async def test_borrowing_stops_at_saturation_and_shares_hold_above_it(
    clocked: Engine, ns: str
) -> None:
    total, prod, dev = deployment(ns)
    assert (await clocked.acquire(None, ask(total, dev, 60))).allowed  # borrows up to 60
    refused = await clocked.acquire(None, ask(total, dev, 1))
    assert (refused.allowed, refused.reason) == (False, "share_full")
    assert refused.refused == dev.with_amount(1)
    assert (await clocked.acquire(None, ask(total, prod, 40))).allowed  # its own share
    full = await clocked.acquire(None, ask(total, prod, 1))
    assert (full.reason, full.refused) == ("window_full", total.with_amount(1))


async def test_a_waiting_share_keeps_its_unused_part(
    clocked: Engine, clock: ManualClock, ns: str
) -> None:
    total, prod, dev = deployment(ns)
    assert (await clocked.acquire(None, ask(total, dev, 60))).allowed
    clock.advance(5_000)
    assert (await clocked.acquire(None, ask(total, prod, 40))).allowed
    # prod, within its share, finds the total full: it is waiting from now on
    assert not (await clocked.acquire(None, ask(total, prod, 10))).allowed
    clock.advance(6_000)  # dev's 60 slid out: the total holds prod's 40
    # below saturation (40 + 20 <= 60), but prod's unused 50 is not dev's to borrow
    borrowed = await clocked.acquire(None, ask(total, dev, 20))
    assert (borrowed.allowed, borrowed.reason) == (False, "share_full")
    assert (await clocked.acquire(None, ask(total, dev, 10))).allowed  # its own share
    assert (await clocked.acquire(None, ask(total, prod, 50))).allowed  # prod's share whole
    clock.advance(11_000)  # everything slid out, and prod waits no more: dev borrows again
    assert (await clocked.acquire(None, ask(total, dev, 50))).allowed


async def test_settling_adjusts_the_share_and_the_total_once(clocked: Engine, ns: str) -> None:
    total, prod, _ = deployment(ns)
    decision = await clocked.acquire("r1", ask(total, prod, 80))
    assert decision.allowed
    await clocked.settle("r1", {"tokens": 30})
    await clocked.settle("r1", {"tokens": 5})  # changes nothing
    states = await clocked.peek([total, prod])
    assert [s.remaining for s in states] == [70, 60]


async def test_retry_after_is_the_shares_own(clocked: Engine, clock: ManualClock, ns: str) -> None:
    total, prod, dev = deployment(ns)
    assert (await clocked.acquire(None, ask(total, prod, 70))).allowed
    clock.advance(3_000)
    assert (await clocked.acquire(None, ask(total, dev, 10))).allowed
    refused = await clocked.acquire(None, ask(total, dev, 5))
    # dev's own 10 frees when its bucket (1 s) has slid out of the 10 s window
    assert (refused.reason, refused.retry_after_ms) == ("share_full", 11_000)
    bigger = await clocked.acquire(None, ask(total, dev, 70))
    assert (bigger.reason, bigger.retry_after_ms) == ("exceeds_capacity", None)


async def test_a_share_needs_its_total_in_the_request(clocked: Engine, ns: str) -> None:
    total, prod, _ = deployment(ns)
    with pytest.raises(InvalidLimit, match="must be a SlidingWindow of the same request"):
        await clocked.acquire(None, [prod])
    with pytest.raises(InvalidLimit, match="another window"):
        SharedWindow(total.key, 1, "1m", total_key=total.key)
    with pytest.raises(InvalidLimit, match="saturation"):
        SharedWindow(f"{total.key}:x", 1, "1m", total_key=total.key, saturation=-1)


def test_a_share_is_never_served_from_a_local_block(ns: str) -> None:
    total, prod, _ = deployment(ns)
    assert Blocks.blockable(total.with_amount(5))
    assert not Blocks.blockable(prod.with_amount(5))


async def _hammer(url: str, ns: str, name: str, barrier: Any) -> int:
    """50 requests at once of one priority, against 40 requests per minute split prod 30 /
    dev 10, saturated at 20."""
    total = SlidingWindow(f"{{{ns}}}:rpm", 40, "1m")
    share = SharedWindow(
        f"{total.key}:{name}",
        30 if name == "prod" else 10,
        "1m",
        total_key=total.key,
        saturation=20,
    )
    async with await Engine.connect(url, prefix=f"t:{ns}:") as engine:
        await engine.redis.ping()
        barrier.wait()  # every process connected: start together
        decisions = await asyncio.gather(*(engine.acquire(None, [total, share]) for _ in range(50)))
        return sum(d.allowed for d in decisions)


def _worker(url: str, ns: str, name: str, barrier: Any, out: Any) -> None:
    out.put((name, asyncio.run(_hammer(url, ns, name, barrier))))


def test_processes_share_a_total_exactly(redis_url: str, ns: str) -> None:
    """Four processes, two per priority, each asking 50: the total admits exactly 40; dev takes
    at most max(its 10, the saturation level 20), so prod at least 20; each at least its share
    (the other cannot pass the total)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    names = ["prod", "prod", "dev", "dev"]
    procs = [ctx.Process(target=_worker, args=(redis_url, ns, n, barrier, out)) for n in names]
    for proc in procs:
        proc.start()
    admitted = {"prod": 0, "dev": 0}
    for _ in procs:
        name, count = out.get(timeout=60)
        admitted[name] += count
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0
    assert admitted["prod"] + admitted["dev"] == 40, admitted
    assert 10 <= admitted["dev"] <= 20 and 20 <= admitted["prod"] <= 30, admitted
