"""The engine on a three-master Redis Cluster: limits of one request in several slots."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from ratelimiter import (
    Budget,
    Concurrency,
    DuplicateRequest,
    Engine,
    InvalidLimit,
    SharedWindow,
    SlidingWindow,
)
from ratelimiter.engine import slot_tags


def test_every_slot_has_a_tag() -> None:
    tags = slot_tags()
    assert len(tags) == 16384
    assert all(key_slot(f"x{{{tag}}}y".encode()) == slot for slot, tag in enumerate(tags))


def spread(ns: str) -> list:
    return [
        SlidingWindow(f"{{key{ns}}}:rpm", 2, "1m"),
        SlidingWindow(f"{{user{ns}}}:tpm", 1_000, "1m", 300, measure="tokens"),
        Concurrency(f"{{team{ns}}}:par", 5),
        Budget(f"{{proxy{ns}}}:b", 10_000, "daily", 2_000),
    ]


async def test_one_request_across_slots(cluster_engine: Engine, ns: str) -> None:
    limits = spread(ns)
    assert len({key_slot(limit.key.encode()) for limit in limits}) > 1
    first = await cluster_engine.acquire(None, limits)
    assert first.allowed and first.reservation is not None
    assert len(first.reservation.anchors) > 1
    settled = await cluster_engine.settle(first.reservation, {"tokens": 100, "spend": 500})
    assert (settled.status, settled.charged) == ("settled", {"tokens": 100, "spend": 500})
    again = await cluster_engine.settle(first.reservation, {"tokens": 999, "spend": 999})
    assert (again.first, again.charged) == (False, {"tokens": 100, "spend": 500})
    remaining = [s.remaining for s in await cluster_engine.peek(limits)]
    assert remaining == [1, 900, 5, 9_500]


async def test_a_refusal_in_one_slot_releases_the_others(cluster_engine: Engine, ns: str) -> None:
    limits = spread(ns)
    for _ in range(2):
        assert (await cluster_engine.acquire(None, limits)).allowed
    before = [s.remaining for s in await cluster_engine.peek(limits)]
    refused = await cluster_engine.acquire(None, limits)
    assert (refused.allowed, refused.refused, refused.reason) == (False, limits[0], "window_full")
    assert [s.remaining for s in await cluster_engine.peek(limits)] == before


async def test_a_reused_id_takes_nothing_in_any_slot(cluster_engine: Engine, ns: str) -> None:
    """The id is held in one slot for one limit; reusing it for more limits must not leave
    the other slots' new reservations behind."""
    limits = spread(ns)
    assert (await cluster_engine.acquire("shared", limits[:1])).allowed
    before = [s.remaining for s in await cluster_engine.peek(limits)]
    with pytest.raises(DuplicateRequest, match="held for other limits"):
        await cluster_engine.acquire("shared", limits)
    assert [s.remaining for s in await cluster_engine.peek(limits)] == before


async def test_expired_holds_are_collected_in_every_slot(cluster_engine: Engine, ns: str) -> None:
    engine = Engine(cluster_engine.redis, prefix=cluster_engine.prefix, hold_ttl_ms=1)
    decision = await engine.acquire("lost-request", spread(ns), meta=b"m")
    assert decision.reservation is not None
    slots = len(decision.reservation.anchors)
    holds = []
    for _ in range(50):
        holds += await engine.collect_expired()
        if len(holds) == slots:
            break
    assert {h.request_id for h in holds} == {"lost-request"}
    assert len(holds) == slots
    assert (await engine.settle(decision.reservation)).status == "expired"


async def test_cluster_needs_the_reservation_not_just_the_id(cluster_engine: Engine) -> None:
    with pytest.raises(InvalidLimit, match="pass the Reservation"):
        await cluster_engine.settle("some-id")


async def test_budget_keys_need_a_hash_tag(cluster_engine: Engine) -> None:
    with pytest.raises(InvalidLimit, match="needs a hash tag"):
        await cluster_engine.acquire(None, [Budget("plain-key", 10, "daily", 1)])


async def test_scripts_reload_after_a_flush_on_every_node(cluster_engine: Engine, ns: str) -> None:
    limits = spread(ns)
    assert (await cluster_engine.acquire(None, limits)).allowed
    await cluster_engine.redis.script_flush()
    assert (await cluster_engine.acquire(None, limits)).allowed


async def test_shares_of_a_deployment_live_in_its_slot(cluster_engine: Engine, ns: str) -> None:
    """A deployment's window and its priorities' shares are one slot group among the request's
    others; a share outside its total's slot is refused before anything reaches Redis."""
    total = SlidingWindow(f"{{deployment{ns}}}:rpm", 4, "1m")
    prod, dev = (
        SharedWindow(f"{total.key}:{name}", share, "1m", total_key=total.key, saturation=2)
        for name, share in (("prod", 3), ("dev", 1))
    )
    key = SlidingWindow(f"{{key{ns}}}:rpm", 100, "1m")
    admitted = [(await cluster_engine.acquire(None, [key, total, dev])).allowed for _ in range(3)]
    assert admitted == [True, True, False]  # dev borrows up to the saturation level, 2
    assert [(await cluster_engine.acquire(None, [key, total, prod])).allowed for _ in range(3)] == [
        True,
        True,
        False,
    ]
    assert [s.remaining for s in await cluster_engine.peek([key, total, prod, dev])] == [
        96,
        0,
        1,
        0,
    ]
    astray = SharedWindow(f"{{other{ns}}}:p", 1, "1m", total_key=total.key)
    with pytest.raises(InvalidLimit, match="must share a hash tag"):
        await cluster_engine.acquire(None, [total, astray])
