"""Rolling upgrades: a reservation held by one version's scripts is finished by the other's.

Sidecars are replaced one at a time, so a record or counter written by the old scripts is
settled, released, renewed, expired or repeated by the new ones, and the other way round (any
sidecar collects expired holds, and a retried acquire may reach another sidecar). The old scripts
are those of commit 8727933, the last before the settle plan (record field 'pl'), copied verbatim
into tests/engine/lua_8727933/. Both versions take the same arguments but the new acquire's
ARGV[13], which the old one ignores, so an engine running the old scripts is this engine with
its scripts swapped. Every mix must leave exactly what one version alone leaves.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ratelimiter import Budget, Concurrency, Engine, Gate, SlidingWindow
from ratelimiter.engine.scripts import Script, load_scripts
from ratelimiter.errors import DuplicateRequest

from ..conftest import ManualClock

OLD = Path(__file__).parent / "lua_8727933"
HOLD_TTL_MS = 20_000
VERSIONS = ("old", "new")
MIXES = [(first, then) for first in VERSIONS for then in VERSIONS]


def old_scripts() -> dict[str, Script]:
    lib = (OLD / "lib.lua").read_text()
    scripts = dict(load_scripts())
    for name in ("acquire", "settle", "renew", "expire"):
        source = f"{lib}\n{(OLD / f'{name}.lua').read_text()}".encode()
        scripts[name] = Script(name, source, hashlib.sha1(source).hexdigest())
    return scripts


def limits(ns: str, capped: bool = False) -> list[Any]:
    tag = f"u:{{{ns}}}"
    return [
        SlidingWindow(f"{tag}:rpm", 10, "1m"),
        SlidingWindow(f"{tag}:tpm", 1_000, "1m", 400, measure="tokens", capped=capped),
        Budget(f"{tag}:budget", 50_000, "daily", 2_000, measure="spend"),
        Concurrency(f"{tag}:lease", 2, 30_000),
        Gate(f"{tag}:gate"),
    ]


@asynccontextmanager
async def engines(redis_url: str, ns: str) -> AsyncIterator[dict[str, Engine]]:
    clock = ManualClock()
    kw = {"prefix": f"t:{ns}:", "clock": clock, "hold_ttl_ms": HOLD_TTL_MS}
    async with (
        await Engine.connect(redis_url, **kw) as old,
        await Engine.connect(redis_url, **kw) as new,
    ):
        old._scripts = old_scripts()
        yield {"old": old, "new": new, "clock": clock}  # type: ignore[dict-item]


async def observe(engine: Engine, ns: str, capped: bool = False) -> tuple[Any, ...]:
    """What any reader sees of the limits and the ledger afterwards."""
    states = await engine.peek(limits(ns, capped))
    [use] = await engine.budget_use([limits(ns)[2]])
    streams = [key async for key in engine.redis.scan_iter(match=f"t:{ns}:*ledger:*")]
    entries = sum([await engine.redis.xlen(key) for key in streams])
    return tuple(s.remaining for s in states), (use.spent, use.held), entries


Finish = Callable[[dict[str, Any], str], Awaitable[Any]]


async def settle(e: dict[str, Any], then: str) -> Any:
    return await e[then].settle("r", {"tokens": 150, "spend": 700}, info=b"i")


async def release(e: dict[str, Any], then: str) -> Any:
    return await e[then].release("r")


async def renew_then_settle(e: dict[str, Any], then: str) -> Any:
    e["clock"].advance(10_000)
    renewal = await e[then].renew("r")
    assert (renewal.status, renewal.lost_leases) == ("held", 0)
    e["clock"].advance(15_000)  # past the first deadline, not past the renewed one
    assert await e[then].collect_expired() == []
    return await e[then].settle("r", {"tokens": 900})


async def expire(e: dict[str, Any], then: str) -> Any:
    e["clock"].advance(HOLD_TTL_MS + 1)
    [hold] = await e[then].collect_expired()
    assert (hold.request_id, hold.lost) == ("r", False)
    return hold.reserved, await e[then].settle("r", {"tokens": 1})


FINISHES: list[Finish] = [settle, release, renew_then_settle, expire]


async def run(redis_url: str, ns: str, first: str, then: str, finish: Finish, capped: bool) -> Any:
    async with engines(redis_url, ns) as e:
        ask = limits(ns, capped)
        assert (await e[first].acquire("other", ask[:1])).allowed  # another request's share
        await e[first].settle("other")
        if capped:  # leaves less than the estimate: the capped window takes what is left
            big = SlidingWindow(ask[1].key, 1_000, "1m", 700)
            assert (await e[first].acquire("big", [big])).allowed
            await e[first].settle("big")
        decision = await e[first].acquire("r", ask, meta=b"m", ledger=["d:1"])
        assert decision.allowed
        with pytest.raises(DuplicateRequest) as repeated:
            await e[then].acquire("r", ask[:2], ledger=["d:1"])
        assert repeated.value.status == "conflict"
        again = await e[then].acquire("r", ask, meta=b"m", ledger=["d:1"])
        assert again.states == decision.states
        result = await finish(e, then)
        final = result[1] if finish is expire else result
        for version in VERSIONS:  # a repeated finish changes nothing, in either version
            assert await e[version].settle("r", {"tokens": 1}) == replace(final, first=False)
        return result, await observe(e[then], ns, capped)


@pytest.mark.parametrize("capped", [False, True], ids=["whole", "capped"])
@pytest.mark.parametrize("finish", FINISHES, ids=lambda f: f.__name__)
async def test_every_mix_of_versions_leaves_what_one_version_leaves(
    redis_url: str, finish: Finish, capped: bool
) -> None:
    outcomes = {}
    for first, then in MIXES:
        ns = f"{first}-{then}-{finish.__name__}-{capped}"
        outcome = await run(redis_url, f"{ns}-{id(outcomes)}", first, then, finish, capped)
        outcomes[first, then] = outcome
    assert len({repr(o) for o in outcomes.values()}) == 1, outcomes
