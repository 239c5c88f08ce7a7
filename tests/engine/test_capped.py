"""Capped limits: a request that may use less than its estimate takes up to it, while anything
is left, and settle, release and expiry give back exactly what it took."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from ratelimiter import Budget, Engine, SlidingWindow
from ratelimiter.engine.limits import DEFAULT_BUCKETS, DEFAULT_BUDGET_RETENTION_MS
from ratelimiter.errors import InvalidLimit

from ..conftest import ManualClock
from .test_concurrency import PROCESSES, TASKS, make_limits, run_processes


def tpm(ns: str, capacity: int, amount: int, capped: bool = True) -> SlidingWindow:
    return SlidingWindow(
        f"{ns}:tpm", capacity, "1m", amount, measure="tokens", buckets=6, capped=capped
    )


def budget(ns: str, capacity: int, amount: int, capped: bool = True) -> Budget:
    return Budget(f"{{{ns}}}:b", capacity, "daily", amount, capped=capped)


async def test_a_capped_budget_serves_its_first_request_and_holds_what_is_left(
    clocked: Engine, ns: str
) -> None:
    assert not (await clocked.acquire(None, [budget(ns, 1_000, 5_000, capped=False)])).allowed
    first = await clocked.acquire("a", [budget(ns, 1_000, 5_000)])
    assert first.allowed
    assert (first.states[0].taken, first.states[0].remaining) == (1_000, 0)
    second = await clocked.acquire("b", [budget(ns, 1_000, 5_000)])
    assert (second.allowed, second.reason) == (False, "budget_exhausted")
    settled = await clocked.settle("a", {"spend": 300})
    assert (settled.reserved, settled.charged) == ({"spend": 1_000}, {"spend": 300})
    third = await clocked.acquire("c", [budget(ns, 1_000, 5_000)])
    assert (third.states[0].taken, third.states[0].remaining) == (700, 0)
    released = await clocked.release("c")
    assert released.reserved == {"spend": 700}
    [use] = await clocked.budget_use([budget(ns, 1_000, 0)])
    assert (use.spent, use.held) == (300, 0)


async def test_a_capped_request_that_fits_takes_its_whole_amount(clocked: Engine, ns: str) -> None:
    decision = await clocked.acquire("a", [tpm(ns, 100, 30), budget(ns, 1_000, 200)])
    assert [(s.taken, s.remaining) for s in decision.states] == [(30, 70), (200, 800)]
    assert (await clocked.release("a")).reserved == {"tokens": 30, "spend": 200}


async def test_a_capped_window_refuses_only_when_nothing_is_left(
    clocked: Engine, ns: str, clock: ManualClock
) -> None:
    first = await clocked.acquire("a", [tpm(ns, 20, 4_106)])
    assert (first.allowed, first.states[0].taken) == (True, 20)
    refused = await clocked.acquire("b", [tpm(ns, 20, 4_106)])
    assert (refused.allowed, refused.reason) == (False, "window_full")
    assert (
        refused.retry_after_ms == 70_000
    )  # the 10 s bucket of "a" stops counting 60 s after it ends
    settled = await clocked.settle("a", {"tokens": 15})
    assert (settled.reserved, settled.charged) == ({"tokens": 20}, {"tokens": 15})
    again = await clocked.acquire("c", [tpm(ns, 20, 4_106)])
    assert (again.allowed, again.states[0].taken) == (True, 5)
    clock.advance(70_000)
    later = await clocked.acquire("d", [tpm(ns, 20, 4_106)])
    assert (later.allowed, later.states[0].taken) == (True, 20)


async def test_a_refused_capped_request_takes_nothing_anywhere(clocked: Engine, ns: str) -> None:
    assert (await clocked.acquire("a", [budget(ns, 1_000, 5_000)])).allowed
    before = (await clocked.peek([tpm(ns, 50, 0)]))[0].remaining
    refused = await clocked.acquire("b", [tpm(ns, 50, 40), budget(ns, 1_000, 5_000)])
    assert not refused.allowed and refused.refused == budget(ns, 1_000, 5_000)
    assert all(s.taken is None for s in refused.states)
    assert (await clocked.peek([tpm(ns, 50, 0)]))[0].remaining == before == 50


async def test_an_expired_capped_hold_is_charged_what_it_took(
    redis_url: str, ns: str, clock: ManualClock
) -> None:
    async with await Engine.connect(
        redis_url, clock=clock, hold_ttl_ms=1_000, prefix=f"t:{ns}:"
    ) as engine:
        assert (await engine.acquire("a", [tpm(ns, 20, 500), budget(ns, 100, 900)])).allowed
        clock.advance(2_000)
        [hold] = await engine.collect_expired()
        assert hold.reserved == {"tokens": 20, "spend": 100}
        [use] = await engine.budget_use([budget(ns, 100, 0)])
        assert (use.spent, use.held) == (100, 0)


async def test_a_forced_charge_takes_the_whole_amount(clocked: Engine, ns: str) -> None:
    settled = await clocked.charge("a", [budget(ns, 100, 900)], {"spend": 450})
    assert (settled.reserved, settled.charged) == ({"spend": 900}, {"spend": 450})
    [use] = await clocked.budget_use([budget(ns, 100, 0)])
    assert use.spent == 450


async def test_a_zero_capacity_capped_limit_never_admits(clocked: Engine, ns: str) -> None:
    refused = await clocked.acquire("a", [tpm(ns, 0, 10)])
    assert (refused.reason, refused.retry_after_ms) == ("exceeds_capacity", None)
    assert (await clocked.acquire("b", [tpm(ns, 0, 0)])).allowed  # asks for nothing


async def test_a_record_without_taken_amounts_settles_from_its_specs(
    clocked: Engine, ns: str
) -> None:
    """Reservations held when the scripts are upgraded have no ``took`` field: a request that
    took its full amounts is recorded exactly as the older scripts recorded it."""
    assert (await clocked.acquire("a", [tpm(ns, 100, 30), budget(ns, 1_000, 200)])).allowed
    record = await clocked.redis.hgetall(f"t:{ns}:{{rl}}:res:a")
    older = {b"s", b"t0", b"dl", b"spec", b"keys", b"at", b"meta", b"reply", b"grp"}
    assert set(record) == older | {b"pl"}  # plus the settle plan, which older scripts ignore
    settled = await clocked.settle("a", {"tokens": 12, "spend": 50})
    assert (settled.reserved, settled.charged) == (
        {"tokens": 30, "spend": 200},
        {"tokens": 12, "spend": 50},
    )
    [use] = await clocked.budget_use([budget(ns, 1_000, 0)])
    assert (use.spent, use.held) == (50, 0)


async def test_a_short_record_holds_the_amounts_taken_in_its_specs(
    clocked: Engine, ns: str
) -> None:
    """Scripts of every version read a record's amounts from its specs, so a sidecar not yet
    upgraded that expires this hold still returns what was taken; a repeated acquire (a retry
    after a lost reply) still matches the specs as asked."""
    limits = [tpm(ns, 20, 500), budget(ns, 1_000, 200)]
    assert (await clocked.acquire("a", limits)).allowed
    record = await clocked.redis.hgetall(f"t:{ns}:{{rl}}:res:a")
    assert [spec[1] for spec in msgpack.unpackb(record[b"spec"])] == [20, 200]
    again = await clocked.acquire("a", limits)
    assert again.allowed and [s.remaining for s in again.states] == [0, 800]
    assert (await clocked.peek(limits))[0].remaining == 0  # nothing taken twice
    assert (await clocked.settle("a", {"tokens": 3})).reserved == {"tokens": 20, "spend": 200}


def test_capped_must_be_a_boolean(ns: str) -> None:
    with pytest.raises(InvalidLimit, match="capped must be true or false"):
        SlidingWindow(f"{ns}:w", 5, "1m", capped="yes")  # type: ignore[arg-type]


async def test_capped_limits_across_cluster_slots(cluster_engine: Engine, ns: str) -> None:
    """Each slot group's record keeps what its own limits took."""
    limits = [
        SlidingWindow(f"{{user{ns}}}:rpm", 5, "1m"),
        SlidingWindow(f"{{key{ns}}}:tpm", 50, "1m", 400, measure="tokens", capped=True),
        Budget(f"{{proxy{ns}}}:b", 10_000, "daily", 2_000, capped=True),
    ]
    first = await cluster_engine.acquire(None, limits)
    assert first.reservation is not None and len(first.reservation.anchors) > 1
    assert [s.taken for s in first.states] == [1, 50, 2_000]
    released = await cluster_engine.release(first.reservation)
    assert released.reserved == {"tokens": 50, "spend": 2_000}
    assert [s.remaining for s in await cluster_engine.peek(limits)] == [5, 50, 10_000]


@pytest.mark.parametrize(
    ("spec", "admitted"),
    [
        # 142 requests of 7 tokens fit whole; the 143rd takes the 6 left
        (("window", "{ns}:tpm", 1_000, "1m", 7, "tokens", "", DEFAULT_BUCKETS, True), 143),
        # 111 of 9 fit whole; the 112th holds the 1 left
        (
            (
                "budget",
                "{{{ns}}}:b",
                1_000,
                "daily",
                9,
                "spend",
                "",
                DEFAULT_BUDGET_RETENTION_MS,
                True,
            ),
            112,
        ),
    ],
)
def test_processes_fill_a_capped_limit_exactly(
    redis_url: str, ns: str, spec: tuple[object, ...], admitted: int
) -> None:
    """Four processes of 50 tasks: exactly one request takes a partial amount, and what is
    held ends at the capacity, never past it."""
    assert admitted < PROCESSES * TASKS
    assert len(set(run_processes(redis_url, ns, [spec]))) == admitted

    async def remaining() -> int:
        async with await Engine.connect(redis_url) as engine:
            return (await engine.peek(make_limits(ns, [spec])))[0].remaining

    assert asyncio.run(remaining()) == 0
