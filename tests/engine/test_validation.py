"""Malformed limits and amounts are refused with a clear error before anything reaches Redis.

The engine here points at a port where nothing listens: an error other than InvalidLimit
would mean the call tried to talk to Redis first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from ratelimiter import Budget, Concurrency, Engine, InvalidLimit, SlidingWindow
from ratelimiter.engine.embedded import free_port


@pytest.fixture
async def unreachable() -> AsyncIterator[Engine]:
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=None)
    engine = Engine(client, clock=lambda: 1_800_000_000_000)
    yield engine
    await engine.close()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: SlidingWindow("k", -1, "1m"),
            "capacity must be between 0 and 2\\*\\*53-1, got -1",
        ),
        (lambda: SlidingWindow("k", 10, "1m", "5"), "amount must be a whole number, got '5'"),
        (lambda: SlidingWindow("k", 10, "1m", 2.5), "amount must be a whole number, got 2.5"),
        (lambda: SlidingWindow("k", 10, "1m", True), "amount must be a whole number"),
        (lambda: SlidingWindow("k", 10, "1mo"), "no fixed length"),
        (lambda: SlidingWindow("k", 10, "soon"), "invalid duration 'soon'"),
        (lambda: SlidingWindow("", 10, "1m"), "key must be a non-empty string"),
        (lambda: SlidingWindow("k", 10, "1m", buckets=0), "buckets must be between 1"),
        (lambda: Concurrency("k", -3), "capacity must be between 0"),
        (lambda: Concurrency("k", 3, ttl_ms=0), "ttl_ms must be between 1"),
        (lambda: Budget("k", 100, "monthly", -5), "amount must be between 0"),
        (lambda: Budget("k", 100, "fortnight", 5), "invalid duration 'fortnight'"),
        (lambda: Budget("k", 2**60, "daily", 5), "capacity must be between 0 and 2\\*\\*53-1"),
    ],
)
def test_bad_limits(make: object, message: str) -> None:
    with pytest.raises(InvalidLimit, match=message):
        make()  # type: ignore[operator]


async def test_empty_list(unreachable: Engine) -> None:
    with pytest.raises(InvalidLimit, match="limits must not be empty"):
        await unreachable.acquire("r", [])


async def test_unknown_kind(unreachable: Engine) -> None:
    with pytest.raises(InvalidLimit, match="unknown limit kind dict"):
        await unreachable.acquire("r", [{"key": "k", "capacity": 5}])  # type: ignore[list-item]


async def test_not_a_list(unreachable: Engine) -> None:
    with pytest.raises(InvalidLimit, match="limits must be a list of limits, got str"):
        await unreachable.acquire("r", "k")  # type: ignore[arg-type]


async def test_one_key_twice(unreachable: Engine) -> None:
    with pytest.raises(InvalidLimit, match="key 'k' is used by two limits"):
        await unreachable.acquire("r", [SlidingWindow("k", 1, "1m"), Concurrency("k", 1)])


@pytest.mark.parametrize(
    ("actuals", "message"),
    [
        ({"tokens": "12"}, "tokens must be a whole number between 0 and 2\\*\\*53-1, got '12'"),
        ({"tokens": -1}, "tokens must be a whole number"),
        ({"spend": 0.5}, "spend must be a whole number"),
        ({"": 5}, "measure names must be non-empty strings"),
        ([("tokens", 5)], "actuals must map a measure to an amount, got list"),
    ],
)
async def test_bad_actuals(unreachable: Engine, actuals: object, message: str) -> None:
    with pytest.raises(InvalidLimit, match=message):
        await unreachable.settle("r", actuals)  # type: ignore[arg-type]


@pytest.mark.parametrize("request_id", ["", "x" * 201, 42])
async def test_bad_request_ids(unreachable: Engine, request_id: object) -> None:
    with pytest.raises(InvalidLimit, match="request id must be a non-empty string"):
        await unreachable.acquire(request_id, [Concurrency("k", 1)])  # type: ignore[arg-type]


async def test_meta_must_be_bytes(unreachable: Engine) -> None:
    with pytest.raises(InvalidLimit, match="meta must be bytes, got str"):
        await unreachable.acquire("r", [Concurrency("k", 1)], meta="text")  # type: ignore[arg-type]
