"""Shadow limits in the engine: decided in the same atomic step, never refusing, counted exactly
as the same limit enforced would count, settled exactly once."""

from __future__ import annotations

import pytest

from ratelimiter import (
    Budget,
    Concurrency,
    DuplicateRequest,
    Engine,
    InvalidLimit,
    SlidingWindow,
)

from ..conftest import ManualClock
from .test_engine import snapshot, window


async def test_a_shadow_copy_counts_what_the_enforced_copy_refuses(
    clocked: Engine, ns: str
) -> None:
    enforced = window(ns, 3, suffix="enforced")
    shadowed = window(ns, 3, suffix="shadowed")
    admitted, would = [], []
    for _ in range(7):
        admitted.append((await clocked.acquire(None, [enforced])).allowed)
        decision = await clocked.acquire(None, [shadowed], shadow=[shadowed.key])
        assert decision.allowed
        would.append(decision.shadow_refused is not None)
    assert admitted == [True] * 3 + [False] * 4
    assert would == [not a for a in admitted]
    states = await clocked.peek([enforced, shadowed])
    assert [s.remaining for s in states] == [0, 0]


async def test_a_would_refusal_names_the_limit_reason_and_retry(
    clocked: Engine, ns: str, clock: ManualClock
) -> None:
    limit = window(ns, 1, window="10s", buckets=10)
    assert (await clocked.acquire(None, [limit], shadow=[limit.key])).shadow_refused is None
    clock.advance(2_000)
    decision = await clocked.acquire(None, [limit], shadow=[limit.key])
    assert decision.allowed and decision.reservation is not None
    assert decision.shadow_refused == limit and decision.shadow_reason == "window_full"
    assert decision.shadow_retry_after_ms == 9_000  # the first bucket frees at 11 s
    assert decision.states[0].shadow and decision.states[0].taken == 0
    assert decision.refused is None and decision.reason is None


async def test_an_enforced_refusal_takes_nothing_in_shadow_limits(clocked: Engine, ns: str) -> None:
    enforced = window(ns, 1, suffix="enforced")
    shadowed = [
        window(ns, 10, suffix="shadow-rpm"),
        Concurrency(f"{ns}:par", 5),
        Budget(f"{{{ns}}}:budget", 1_000, "1d", 10),
    ]
    keys = [limit.key for limit in shadowed]
    assert (await clocked.acquire("first", [enforced, *shadowed], shadow=keys)).allowed
    before = await snapshot(clocked, ns)
    refused = await clocked.acquire("second", [enforced, *shadowed], shadow=keys)
    assert not refused.allowed and refused.refused == enforced
    assert refused.shadow_refused is None
    assert await snapshot(clocked, ns) == before


async def test_one_shadow_would_refuse_so_no_shadow_limit_counts(clocked: Engine, ns: str) -> None:
    full = SlidingWindow(f"{ns}:full", 0, "1m", 1)  # refuses every request
    roomy = window(ns, 100, suffix="roomy")
    budget = Budget(f"{{{ns}}}:b", 1_000, "1d", 10)
    lease = Concurrency(f"{ns}:par", 1)
    enforced = window(ns, 100, suffix="enforced")
    shadow = [full.key, roomy.key, budget.key, lease.key]
    decision = await clocked.acquire("r", [enforced, full, roomy, budget, lease], shadow=shadow)
    assert decision.allowed and decision.shadow_refused == full
    assert decision.shadow_reason == "exceeds_capacity" and decision.shadow_retry_after_ms is None
    assert [s.taken for s in decision.states] == [1, 0, 0, 0, 0]
    states = await clocked.peek([enforced, roomy, budget, lease])
    assert [s.remaining for s in states] == [99, 100, 1_000, 1]
    settled = await clocked.settle("r", {"spend": 500, "tokens": 3})
    assert settled.status == "settled" and settled.first
    states = await clocked.peek([enforced, roomy, budget, lease])
    assert [s.remaining for s in states] == [99, 100, 1_000, 1]  # nothing settled into them
    again = await clocked.settle("r", {"spend": 900})
    assert not again.first and again.charged == settled.charged


async def test_shadow_amounts_taken_normally_settle_and_expire_once(
    clocked: Engine, ns: str, clock: ManualClock
) -> None:
    budget = Budget(f"{{{ns}}}:b", 1_000, "1d", 300)
    lease = Concurrency(f"{ns}:par", 1, ttl_ms=60_000)
    shadow = [budget.key, lease.key]
    first = await clocked.acquire("a", [budget, lease], shadow=shadow)
    assert first.allowed and first.shadow_refused is None
    assert [s.taken for s in first.states] == [300, 1]
    second = await clocked.acquire("b", [budget, lease], shadow=shadow)
    assert second.shadow_refused == lease and second.shadow_reason == "no_free_slot"
    await clocked.settle("a", {"spend": 120})
    await clocked.settle("a", {"spend": 120})
    assert [s.remaining for s in await clocked.peek([budget, lease])] == [880, 1]
    clock.advance(30_000)  # b's hold (20 s) expires: it took nothing, so nothing is charged
    expired = await clocked.collect_expired()
    assert [h.request_id for h in expired] == ["b"] and expired[0].reserved == {}
    assert [s.remaining for s in await clocked.peek([budget, lease])] == [880, 1]


async def test_a_repeated_acquire_must_name_the_same_shadow_limits(
    clocked: Engine, ns: str
) -> None:
    limit = window(ns, 5)
    first = await clocked.acquire("same", [limit], shadow=[limit.key])
    again = await clocked.acquire("same", [limit], shadow=[limit.key])
    assert again.allowed and [s.remaining for s in again.states] == [
        s.remaining for s in first.states
    ]
    with pytest.raises(DuplicateRequest) as raised:
        await clocked.acquire("same", [limit])
    assert raised.value.status == "conflict"


@pytest.mark.parametrize(
    "shadow", ["key", b"key", 7, ["nope"], [None], [["list"]]], ids=lambda v: repr(v)[:12]
)
async def test_hostile_shadow_arguments_are_refused(
    clocked: Engine, ns: str, shadow: object
) -> None:
    limit = window(ns, 5)
    with pytest.raises(InvalidLimit):
        await clocked.acquire(None, [limit], shadow=shadow)  # type: ignore[arg-type]
    assert [s.remaining for s in await clocked.peek([limit])] == [5]


async def test_on_a_cluster_no_shadow_limit_of_any_slot_counts_a_would_be_refusal(
    cluster_engine: Engine, ns: str
) -> None:
    """Limits in three slots: a shadow limit of one would refuse, so the shadow limit of
    another is not counted either (its group is taken again without it), as on one Redis;
    an enforced refusal in any slot takes nothing anywhere."""
    limits = [
        SlidingWindow(f"{{{ns}a}}:w", 1, "1m"),
        SlidingWindow(f"{{{ns}b}}:w", 5, "1m"),
        SlidingWindow(f"{{{ns}c}}:w", 5, "1m"),
    ]
    shadow = [limits[0].key, limits[1].key]
    assert (await cluster_engine.acquire(None, limits, shadow=shadow)).shadow_refused is None
    decision = await cluster_engine.acquire("second", limits, shadow=shadow)
    assert decision.allowed and decision.shadow_refused == limits[0]
    assert [s.taken for s in decision.states] == [0, 0, 1]
    assert [s.remaining for s in await cluster_engine.peek(limits)] == [0, 4, 3]
    again = await cluster_engine.acquire("second", limits, shadow=shadow)  # a retry
    assert again.allowed and [s.remaining for s in await cluster_engine.peek(limits)] == [0, 4, 3]
    assert decision.reservation is not None
    settled = await cluster_engine.settle(decision.reservation)
    assert settled.status == "settled" and settled.first
    assert [s.remaining for s in await cluster_engine.peek(limits)] == [0, 4, 3]
    enforced = [SlidingWindow(f"{{{ns}d}}:w", 0, "1m"), *limits]
    refused = await cluster_engine.acquire(None, enforced, shadow=shadow)
    assert not refused.allowed
    assert [s.remaining for s in await cluster_engine.peek(limits)] == [0, 4, 3]
