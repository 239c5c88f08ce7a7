"""Capacity blocks in the sidecar: the windows and budgets of the scopes named in
``ratelimiter_settings.capacity_blocks`` (the proxy-wide budget, a deployment's rpm/tpm: the
limits every request meets) are admitted from blocks of their capacity that this sidecar took
from Redis first (``engine.blocks``), so they cost no Redis work per request.

A request takes its share of each such limit from a block, and the rest of its limits go to
Redis in its one atomic acquire. Refused there, it gives its shares back unused; admitted, it
gives them back at settlement with what it used (its actual tokens and spend), or unused when
the upstream never had it. A limit whose block is spent or closed, or nearly full in Redis, is
checked in the acquire itself, exactly, as without blocks; requests that do not bound
themselves (capped) and ``budget_enforcement: strict`` never use blocks, nor do shadow limits
and a deployment's windows split by priority (decided in Redis with their shares). The
under-admission
this costs is bounded by the blocks outstanding: per sidecar and limit, about one block of
capacity / share, plus the unused part of blocks whose requests still run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace

from aiohttp import web

from ..engine import Blocks, Decision, Grant
from ..engine.limits import Limit, SharedWindow
from .http import ENGINE, SETTINGS
from .metrics import BLOCK_UNITS

__all__ = ["BLOCKS", "add_capacity_blocks", "give_back", "take_blocks", "with_block_states"]

BLOCKS = web.AppKey("capacity_blocks", Blocks)
# A block smaller than this many requests' worth saves too few round trips to be worth its
# under-admission: such a limit is checked in Redis per request.
MIN_REQUESTS_PER_BLOCK = 4


def _share(shares: Mapping[str, int], limit: Limit) -> int | None:
    return shares.get(limit.name.partition(":")[0]) if limit.name else None


def _served(shares: Mapping[str, int], limit: Limit) -> bool:
    share = _share(shares, limit)
    return (
        share is not None
        and Blocks.blockable(limit)
        and limit.capacity // share >= MIN_REQUESTS_PER_BLOCK * limit.amount
    )


async def take_blocks(
    blocks: Blocks, shares: Mapping[str, int], limits: Sequence[Limit]
) -> tuple[list[Limit], list[Grant]]:
    """Each limit of a blocked scope taken from this sidecar's block where one serves it:
    the limits left to check in Redis, and the grants to give back when the request ends."""
    checked: list[Limit] = []
    grants: list[Grant] = []
    # a deployment's window split by priority is decided in Redis with its shares
    totals = {limit.total_key for limit in limits if isinstance(limit, SharedWindow)}
    try:
        for limit in limits:
            served = _served(shares, limit) and limit.key not in totals
            grant = await blocks.take(limit) if served else None
            if grant is None:
                checked.append(limit)
            else:
                grants.append(grant)
    except BaseException:
        for grant in grants:
            blocks.put_back(grant, 0)
        raise
    return checked, grants


def with_block_states(blocks: Blocks, decision: Decision, grants: Sequence[Grant]) -> Decision:
    """An admission's states with the block-served limits' own (for its rate-limit headers)."""
    if not grants:
        return decision
    return replace(decision, states=(*decision.states, *(blocks.state(g) for g in grants)))


def give_back(
    app: web.Application, grants: Sequence[Grant], actuals: Mapping[str, int] | None
) -> None:
    """The request is over: each grant goes back with what its limit would have kept in
    Redis, its actual amount by measure (``actuals``, as settling does), or nothing when the
    request was refused or never sent (``None``). Nothing waits: a block it finishes is
    settled by a task of the blocks' own."""
    if grants:
        blocks = app[BLOCKS]
        for grant in grants:
            blocks.put_back(grant, _used(grant, actuals))


def _used(grant: Grant, actuals: Mapping[str, int] | None) -> int:
    if actuals is None:
        return 0
    measure = grant.limit.measure
    return grant.amount if measure is None else actuals.get(measure, grant.amount)


async def _blocks(app: web.Application) -> AsyncIterator[None]:
    """This sidecar's blocks, closed (settled in Redis) after the last settlement: it is
    registered before the settling context, which unwinds first."""
    settings = app[SETTINGS]
    shares = settings.capacity_blocks
    blocks = app[BLOCKS] = Blocks(
        app[ENGINE], size=lambda limit: limit.capacity // (_share(shares, limit) or 1)
    )
    app[BLOCK_UNITS] = blocks.outstanding_by_limit
    renewing = asyncio.create_task(_renew_forever(blocks, settings.hold_ttl_s / 4))
    yield
    renewing.cancel()
    await blocks.close()


async def _renew_forever(blocks: Blocks, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            await blocks.renew()
        except Exception:  # Redis away: the next round tries again, well within the hold
            continue


def add_capacity_blocks(app: web.Application) -> None:
    if app[SETTINGS].capacity_blocks:
        app.cleanup_ctx.append(_blocks)
