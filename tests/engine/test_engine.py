"""The engine's behaviour on one Redis, with a hand-moved clock where timing matters."""

from __future__ import annotations

import asyncio
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from ratelimiter import (
    Budget,
    Concurrency,
    DuplicateRequest,
    Engine,
    Gate,
    Reservation,
    SlidingWindow,
)

from ..conftest import ManualClock


def window(ns: str, capacity: int, amount: int = 1, **kw: object) -> SlidingWindow:
    return SlidingWindow(
        f"{ns}:{kw.pop('suffix', 'w')}", capacity, kw.pop("window", "1m"), amount, **kw
    )  # type: ignore[arg-type]


async def snapshot(engine: Engine, ns: str) -> dict[bytes, object]:
    """Every key of the test with its type and full content."""
    out: dict[bytes, object] = {}
    async for key in engine.redis.scan_iter(match=f"*{ns}*"):
        kind = await engine.redis.type(key)
        if kind == b"hash":
            out[key] = await engine.redis.hgetall(key)
        elif kind == b"zset":
            out[key] = await engine.redis.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = await engine.redis.get(key)
    return out


async def test_window_admits_exactly_its_capacity(clocked: Engine, ns: str) -> None:
    limit = window(ns, 5)
    results = [(await clocked.acquire(None, [limit])).allowed for _ in range(8)]
    assert results == [True] * 5 + [False] * 3


async def test_window_retry_after_is_exact(clocked: Engine, ns: str, clock: ManualClock) -> None:
    limit = window(ns, 3, window="10s", buckets=10)  # 1 s buckets
    for _ in range(3):
        assert (await clocked.acquire(None, [limit])).allowed
        clock.advance(2_500)
    refused = await clocked.acquire(None, [limit])
    assert not refused.allowed and refused.reason == "window_full"
    assert refused.retry_after_ms is not None and refused.retry_after_ms > 0
    assert refused.states[0].remaining == 0
    clock.advance(refused.retry_after_ms - 1)
    assert not (await clocked.acquire(None, [limit])).allowed
    clock.advance(1)
    assert (await clocked.acquire(None, [limit])).allowed


async def test_weighted_window_and_never_fitting_request(clocked: Engine, ns: str) -> None:
    tokens = window(ns, 100, 60, measure="tokens")
    assert (await clocked.acquire(None, [tokens])).allowed
    refused = await clocked.acquire(None, [tokens])
    assert (refused.allowed, refused.states[0].remaining) == (False, 40)
    too_big = await clocked.acquire(None, [window(ns, 100, 101, measure="tokens")])
    assert too_big.reason == "exceeds_capacity" and too_big.retry_after_ms is None


async def test_refused_requests_consume_nothing(clocked: Engine, ns: str) -> None:
    limits = [
        window(ns, 10, suffix="rpm"),
        window(ns, 1000, 300, suffix="tpm", measure="tokens"),
        Concurrency(f"{ns}:par", 5),
        Budget(f"{{{ns}}}:spend", 1_000, "daily", 400),
    ]
    for _ in range(2):
        assert (await clocked.acquire(None, limits)).allowed
    before = await snapshot(clocked, ns)
    for _ in range(5):  # the budget refuses; every other limit had room
        decision = await clocked.acquire(None, limits)
        assert (decision.allowed, decision.reason) == (False, "budget_exhausted")
    assert await snapshot(clocked, ns) == before


async def test_refusal_reports_the_limit_that_frees_last(
    clocked: Engine, ns: str, clock: ManualClock
) -> None:
    short = window(ns, 1, suffix="short", window="10s")
    long = window(ns, 1, suffix="long", window="1h")
    assert (await clocked.acquire(None, [short, long])).allowed
    decision = await clocked.acquire(None, [short, long])
    assert decision.refused == long
    assert decision.retry_after_ms is not None and decision.retry_after_ms > 3_600_000


async def test_settle_replaces_estimates_exactly_once(clocked: Engine, ns: str) -> None:
    tokens = window(ns, 1000, 500, suffix="tpm", measure="tokens")
    spend = Budget(f"{{{ns}}}:b", 10_000, "monthly", 3_000)
    requests = window(ns, 10, suffix="rpm")
    decision = await clocked.acquire("req-1", [requests, tokens, spend], meta=b"\x00ledger")
    assert decision.allowed and decision.reservation is not None
    first = await clocked.settle(decision.reservation, {"tokens": 120, "spend": 900})
    again = await clocked.settle(decision.reservation, {"tokens": 999, "spend": 9_999})
    assert first.first and not again.first
    assert first.charged == again.charged == {"tokens": 120, "spend": 900}
    assert first.reserved == {"tokens": 500, "spend": 3_000}
    assert first.meta == again.meta == b"\x00ledger"
    await clocked.release(decision.reservation)  # too late: changes nothing
    states = await clocked.peek([requests, tokens, spend])
    assert [s.remaining for s in states] == [9, 880, 9_100]


async def test_release_refunds_everything(clocked: Engine, ns: str) -> None:
    limits = [
        window(ns, 2, suffix="rpm"),
        Concurrency(f"{ns}:par", 1),
        Budget(f"{{{ns}}}:b", 100, "1h", 60),
    ]
    decision = await clocked.acquire("r", limits)
    assert [s.remaining for s in decision.states] == [1, 0, 40]
    result = await clocked.release("r")
    assert (result.status, result.first, result.charged) == ("released", True, {"spend": 0})
    assert [s.remaining for s in await clocked.peek(limits)] == [2, 1, 100]
    assert (await clocked.settle("r", {"spend": 50})).status == "released"


async def test_settle_lands_in_the_period_that_was_reserved(
    clocked: Engine, ns: str, clock: ManualClock
) -> None:
    clock.now = 1_800_000_029_000  # 1 s before a 30 s boundary
    budget = Budget(f"{{{ns}}}:b", 1_000, "30s", 400)
    held = await clocked.acquire(None, [budget])
    clock.advance(2_000)  # next period
    assert (await clocked.peek([budget]))[0].remaining == 1_000
    assert held.reservation is not None
    await clocked.settle(held.reservation, {"spend": 100})
    assert (await clocked.peek([budget]))[0].remaining == 1_000
    clock.advance(-2_000)
    assert (await clocked.peek([budget]))[0].remaining == 900


async def test_thirty_second_budget_resets_exactly_at_its_boundary(
    clocked: Engine, ns: str, clock: ManualClock
) -> None:
    clock.now = 1_800_000_000_000  # a multiple of 30 s
    budget = Budget(f"{{{ns}}}:b", 100, "30s", 100)
    assert (await clocked.acquire(None, [budget])).allowed
    clock.advance(10_000)
    refused = await clocked.acquire(None, [budget])
    assert (refused.reason, refused.retry_after_ms) == ("budget_exhausted", 20_000)
    clock.advance(19_999)
    assert not (await clocked.acquire(None, [budget])).allowed
    clock.advance(1)
    assert (await clocked.acquire(None, [budget])).allowed


async def test_monthly_budget_resets_at_local_midnight_on_the_first(
    redis_url: str, ns: str, clock: ManualClock
) -> None:
    tz = ZoneInfo("America/New_York")
    boundary = int(datetime(2027, 3, 1, tzinfo=tz).timestamp() * 1000)
    clock.now = boundary - 60_000
    async with await Engine.connect(
        redis_url, prefix=f"t:{ns}:", clock=clock, timezone="America/New_York"
    ) as engine:
        budget = Budget(f"{{{ns}}}:m", 50, "monthly", 50)
        assert (await engine.acquire(None, [budget])).allowed
        refused = await engine.acquire(None, [budget])
        assert refused.retry_after_ms == 60_000
        clock.now = boundary - 1
        assert not (await engine.acquire(None, [budget])).allowed
        clock.now = boundary  # 05:00 UTC, not midnight UTC
        assert (await engine.acquire(None, [budget])).allowed
        state = (await engine.peek([budget]))[0]
        april = int(datetime(2027, 4, 1, tzinfo=tz).timestamp() * 1000)
        assert state.reset_ms == april - boundary


async def test_script_picks_the_period_by_its_own_clock(
    clocked: Engine, ns: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Periods are computed by the sidecar, but the script chooses by Redis's clock: a
    sidecar whose clock lags still charges the period Redis is in."""
    budget = Budget(f"{{{ns}}}:b", 10, "30s", 10)
    clock.now = 1_800_000_029_000
    assert (await clocked.acquire(None, [budget])).allowed  # fills the old period
    clock.now = 1_800_000_030_500

    async def lagging() -> int:
        return clock.now - 1_000

    monkeypatch.setattr(clocked, "_now_ms", lagging)
    decision = await clocked.acquire(None, [budget])
    assert decision.allowed and decision.states[0].reset_ms == 29_500


async def test_leases_free_on_settle_and_expire_by_ttl(engine: Engine, ns: str) -> None:
    lease = Concurrency(f"{ns}:par", 2, ttl_ms=300)
    first = await engine.acquire(None, [lease])
    await engine.acquire(None, [lease])
    refused = await engine.acquire(None, [lease])
    assert refused.reason == "no_free_slot"
    assert refused.retry_after_ms is not None and 0 < refused.retry_after_ms <= 300
    assert first.reservation is not None
    await engine.settle(first.reservation)
    assert (await engine.acquire(None, [lease])).allowed
    await asyncio.sleep(0.35)
    assert (await engine.peek([lease]))[0].remaining == 2


async def test_renew_keeps_a_long_request_alive(
    clocked: Engine, ns: str, clock: ManualClock
) -> None:
    lease = Concurrency(f"{ns}:par", 1, ttl_ms=10_000)
    held = await clocked.acquire("stream", [lease])
    for _ in range(5):
        clock.advance(8_000)
        renewal = await clocked.renew("stream")
        assert (renewal.status, renewal.lost_leases) == ("held", 0)
    assert not (await clocked.acquire(None, [lease])).allowed
    assert await clocked.collect_expired() == []  # the hold deadline moved too
    clock.advance(10_001)
    assert (await clocked.acquire(None, [lease])).allowed
    assert held.reservation is not None
    assert (await clocked.renew(held.reservation)).lost_leases == 1


async def test_renew_never_takes_a_slot_given_to_someone_else(
    clocked: Engine, ns: str, clock: ManualClock
) -> None:
    lease = Concurrency(f"{ns}:par", 1, ttl_ms=1_000)
    await clocked.acquire("old", [lease])
    clock.advance(1_500)
    assert (await clocked.acquire("new", [lease])).allowed
    assert (await clocked.renew("old")).lost_leases == 1
    assert (await clocked.peek([lease]))[0].remaining == 0


async def test_expired_holds_are_collected_once_at_their_estimate(
    clocked: Engine, ns: str, clock: ManualClock
) -> None:
    budget = Budget(f"{{{ns}}}:b", 1_000, "daily", 250)
    lease = Concurrency(f"{ns}:par", 1)
    await clocked.acquire("crashed", [budget, lease], meta=b"who")
    clock.advance(19_999)
    assert await clocked.collect_expired() == []
    clock.advance(1)
    (hold,) = await clocked.collect_expired()
    assert (hold.request_id, hold.reserved, hold.meta) == ("crashed", {"spend": 250}, b"who")
    assert await clocked.collect_expired() == []
    assert [s.remaining for s in await clocked.peek([budget, lease])] == [750, 1]
    late = await clocked.settle("crashed", {"spend": 10})
    assert (late.status, late.first, late.charged) == ("expired", False, {"spend": 250})


async def test_repeated_acquire_is_idempotent_and_reuse_is_refused(
    clocked: Engine, ns: str
) -> None:
    limit = window(ns, 5)
    first = await clocked.acquire("same", [limit])
    again = await clocked.acquire("same", [limit])
    assert first.allowed and again.allowed
    assert (await clocked.peek([limit]))[0].remaining == 4
    await clocked.settle("same")
    with pytest.raises(DuplicateRequest, match="already used and is settled"):
        await clocked.acquire("same", [limit])


async def test_a_held_id_with_other_limits_is_refused_and_takes_nothing(
    clocked: Engine, ns: str
) -> None:
    mine, other = window(ns, 5, suffix="mine"), window(ns, 5, suffix="other")
    assert (await clocked.acquire("shared", [mine])).allowed
    for limits in ([other], [mine, other], [mine.with_amount(2)]):
        with pytest.raises(DuplicateRequest, match="held for other limits"):
            await clocked.acquire("shared", limits)
    assert [s.remaining for s in await clocked.peek([mine, other])] == [4, 5]


async def test_unknown_reservation_changes_nothing(clocked: Engine) -> None:
    result = await clocked.settle(Reservation("never-acquired"), {"tokens": 5})
    assert (result.status, result.first) == ("unknown", False)
    assert (await clocked.renew("never-acquired")).status == "unknown"


async def test_keys_carry_ttls(engine: Engine, ns: str) -> None:
    limits = [window(ns, 5), Concurrency(f"{ns}:par", 5), Budget(f"{{{ns}}}:b", 9, "1h", 1)]
    decision = await engine.acquire(None, limits, meta=b"m")
    assert decision.reservation is not None
    await engine.settle(decision.reservation)
    async for key in engine.redis.scan_iter(match=f"*{ns}*"):
        assert await engine.redis.pttl(key) > 0, key


async def test_a_gate_refuses_from_the_moment_its_key_exists(engine: Engine, ns: str) -> None:
    gate, rpm = Gate(f"{ns}:blocked", name="key:blocked"), window(ns, 10)
    assert (await engine.acquire(None, [gate, rpm])).allowed
    await engine.redis.set(gate.key, 1)
    refused = await engine.acquire(None, [gate, rpm])
    assert (refused.refused, refused.reason, refused.retry_after_ms) == (gate, "closed", None)
    assert [s.remaining for s in await engine.peek([gate, rpm])] == [0, 9]
    await engine.redis.delete(gate.key)
    decision = await engine.acquire(None, [gate, rpm])
    assert decision.allowed and decision.reservation is not None
    assert (await engine.settle(decision.reservation)).status == "settled"


async def test_charge_records_usage_past_capacity_exactly_once(clocked: Engine, ns: str) -> None:
    limits = [window(ns, 1, suffix="rpm"), Budget(f"{{{ns}}}:b", 100, "daily", 80)]
    assert (await clocked.acquire(None, limits)).allowed
    first = await clocked.charge("while-redis-was-down", limits, {"spend": 70})
    again = await clocked.charge("while-redis-was-down", limits, {"spend": 70})
    assert (first.first, again.first) == (True, False)
    assert [s.remaining for s in await clocked.peek(limits)] == [0, 0]
    start = clocked._period(Budget(f"{{{ns}}}:b", 1, "daily", 0).period, await clocked.now_ms())
    spent = await clocked.redis.hget(f"{{{ns}}}:b:{start[0]}", "u")
    assert int(spent) == 150  # 80 held by the first request + 70 charged
