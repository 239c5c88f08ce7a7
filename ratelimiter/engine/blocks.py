"""Capacity blocks for hot scopes: a process takes a block of a limit's capacity from Redis in
one admission and admits from it locally, as Google's Doorman grants capacity leases.

A limit that every request meets (the proxy-wide budget, a big team, a deployment's rpm/tpm)
puts every admission on one key and one Redis core: about 12,000 admissions a second at most,
whatever the number of sidecars. With a block, a process asks Redis once for ``size`` units and
serves many requests from them without a round trip.

Nothing is over-admitted, because a block is counted as used in Redis before any of it is
spent locally: the block is an ordinary capped reservation of the limit (its own request id,
no ledger entry). What is not used is given back when the block is settled, and what requests
ran over their estimates is charged with it. A sliding window's block is used only within the
bucket Redis counted it in (it closes a margin before that bucket ends, measured from when the
block was asked for, so the script ran later than the clock says and the bucket ends no
sooner); a budget's within its period and at most ``max_life_s``. A closed block is settled
once its last request has given its grant back. A process that dies holding a block has it
charged in full when its hold expires (``Engine.collect_expired``), as any reservation.

A block is asked for in a task of its own, so a caller that gives up waiting (a deadline)
does not cancel it: the block still arrives and serves the next requests. A block whose
answer never came (Redis timed out) is abandoned, retried on every sweep until Redis answers,
so it takes nothing; a block held open by a long request is renewed (``renew``) like any hold.

The price is under-admission, bounded: at any time each process holds at most one open block
per limit plus the unused part of closed blocks whose requests are still running, each at most
``size`` units. With N processes, a limit refuses while up to about N x ``size`` of its capacity
sits unused in blocks; choose ``size`` small against the capacity (the default takes 1/64).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .engine import Engine, LimitState, Reservation
from .limits import Budget, Limit, SharedWindow, SlidingWindow

__all__ = ["Block", "Blocks", "Grant"]

log = logging.getLogger("ratelimiter.blocks")

BLOCKABLE = (SlidingWindow, Budget)
DEFAULT_SHARE = 64  # a block is 1/64 of the limit's capacity, unless ``size`` says otherwise
BLOCK_MEASURE = "block"  # the measure a block's settlement names (windows of requests have none)


@dataclass(eq=False)
class Block:
    """A part of one limit's capacity, counted in Redis, admitted from here."""

    limit: Limit  # the limit as reserved: capped, the block's size as its amount
    reservation: Reservation
    granted: int
    closes_at: float  # on the Blocks' clock: nothing is taken from it from then on
    remaining: int  # what Redis said was left of the limit beyond the block, when granted
    resets_at: float  # on the Blocks' clock: when Redis said the block's units free up
    used: int = 0
    in_flight: int = 0
    settled: bool = False


@dataclass(frozen=True, slots=True)
class Grant:
    """What one request took of ``limit`` from a block; give it back with what it used."""

    block: Block
    amount: int
    limit: Limit


@dataclass
class Blocks:
    """The blocks of one process, one open block per limit key.

    ``size(limit)``: the units a block asks for (default: capacity / 64, at least the
    request's amount); ``margin_s``: how long before its bucket or period ends a block closes;
    ``max_life_s``: the longest a budget's block stays open; ``clock``: seconds, monotonic.
    """

    engine: Engine
    size: Callable[[Limit], int] | None = None
    margin_s: float = 0.05
    max_life_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _open: dict[str, Block] = field(default_factory=dict)
    _closed: set[Block] = field(default_factory=set)
    _refills: dict[str, asyncio.Task[Block | None]] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # blocks whose answer never came: abandoned until Redis confirms, so they take nothing
    _lost: dict[str, Limit] = field(default_factory=dict)
    _sweeping: bool = False  # a put_back's sweep is pending
    # per key: no block is asked for before then (a bucket about to end; Redis refused one)
    _quiet_until: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def blockable(limit: Limit) -> bool:
        # a share is decided with its total and the other shares, in Redis, never locally
        blockable = isinstance(limit, BLOCKABLE) and not isinstance(limit, SharedWindow)
        return blockable and not limit.capped and limit.amount > 0

    async def take(self, limit: Limit) -> Grant | None:
        """``limit.amount`` of ``limit`` from this process's block, asking Redis for a new
        block when the open one is spent or closed. None when no block can serve it (the
        limit is nearly full, or Redis refused): the caller then admits the request against
        the limit itself, as without blocks, and gets an exact answer."""
        if not self.blockable(limit):
            raise ValueError(f"{limit.name or limit.key}: only uncapped windows and budgets")
        block = self._usable(limit)
        if block is None:
            if self.clock() < self._quiet_until.get(limit.key, 0.0):
                return None
            block = await self._refill(limit)
            if block is None or block.granted - block.used < limit.amount:
                return None
            if self.clock() >= block.closes_at:
                return None
        block.used += limit.amount
        block.in_flight += 1
        return Grant(block, limit.amount, limit)

    def state(self, grant: Grant) -> LimitState:
        """The limit as this process sees it after ``grant``, for rate-limit headers: what
        Redis had left beyond the block when it was granted, plus the block's unused part.
        Other processes may have taken some since; the limit itself is exact, this view not."""
        block = grant.block
        remaining = block.remaining + max(block.granted - block.used, 0)
        reset_ms = max(round((block.resets_at - self.clock()) * 1000), 0)
        return LimitState(grant.limit, remaining, reset_ms, grant.amount)

    async def give_back(self, grant: Grant, used: int) -> None:
        """The request is over and used ``used`` (its estimate was ``grant.amount``; 0 when
        it was refused elsewhere or never sent). The block's count follows, and a closed
        block whose last request this was is settled."""
        self.put_back(grant, used)
        await self.sweep()

    def put_back(self, grant: Grant, used: int) -> None:
        """``give_back`` for a caller that does not wait: a closed block whose last request
        this was is settled by a task of its own, at most one such task at a time."""
        block = grant.block
        block.used += used - grant.amount
        block.in_flight -= 1
        if block.in_flight == 0 and block in self._closed and not self._sweeping:
            self._sweeping = True

            async def soon() -> None:
                try:
                    await self.sweep()
                finally:
                    self._sweeping = False

            self._track(asyncio.get_running_loop().create_task(soon()))

    async def sweep(self) -> None:
        """Close the blocks whose time is up and settle the closed ones no request holds.
        Runs after each give-back and when a block's time is up; call it on a test clock."""
        now = self.clock()
        for block in [b for b in self._open.values() if now >= b.closes_at]:
            self._retire(block)
        for block_id, limit in list(self._lost.items()):
            try:
                await self.engine.abandon(block_id, [limit])
                del self._lost[block_id]
            except Exception as exc:
                log.warning("could not abandon capacity block %s: %s", block_id, exc)
        for block in [b for b in self._closed if b.in_flight == 0]:
            try:
                await self._settle(block)
            except Exception as exc:  # Redis away: the next sweep tries again
                log.warning("could not settle capacity block %s: %s", block.reservation, exc)

    async def renew(self) -> None:
        """Extend the hold of every unsettled block, as a long stream renews its own: a block
        that a long request keeps from settling must not expire and be charged in full. A
        block whose hold expired anyway was charged in full by the collector, once."""
        for block in [*self._open.values(), *self._closed]:
            if block.settled:
                continue
            renewal = await self.engine.renew(block.reservation)
            if renewal.status != "held":
                block.settled = True
                self._retire(block)
                self._closed.discard(block)

    async def close(self) -> None:
        """Stop taking and settle every block whose requests are done (on shutdown, after
        the requests); the tasks that close blocks on time are cancelled, and blocks still
        being asked for are waited for, so that they are settled rather than left to expire."""
        if self._refills:
            await asyncio.wait(list(self._refills.values()), timeout=5)
        for block in list(self._open.values()):
            self._retire(block)
        for task in self._tasks:
            task.cancel()
        await self.sweep()

    @property
    def outstanding(self) -> int:
        """Units counted in Redis that no request has used: the under-admission right now."""
        return sum(self.outstanding_by_limit().values())

    def outstanding_by_limit(self) -> dict[str, int]:
        """``outstanding`` per limit (its name, else its key): units are the limit's own."""
        units: dict[str, int] = {}
        for block in [*self._open.values(), *self._closed]:
            if not block.settled:
                name = block.limit.name or block.limit.key
                units[name] = units.get(name, 0) + max(block.granted - block.used, 0)
        return units

    def _usable(self, limit: Limit) -> Block | None:
        block = self._open.get(limit.key)
        if block is None:
            return None
        if self.clock() >= block.closes_at:
            self._retire(block)
            return None
        return block if block.granted - block.used >= limit.amount else None

    def _retire(self, block: Block) -> None:
        if self._open.get(block.limit.key) is block:
            del self._open[block.limit.key]
        if not block.settled:
            self._closed.add(block)

    def _sweep_at(self, block: Block) -> None:
        """Settles the block when its time is up even if no request comes to close it: an
        unsettled block would be charged in full when its hold expires."""

        async def later() -> None:
            await asyncio.sleep(max(block.closes_at - self.clock(), 0))
            await self.sweep()

        self._track(asyncio.get_running_loop().create_task(later()))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)  # a running task must be referenced, or it may be collected
        task.add_done_callback(self._tasks.discard)

    async def _refill(self, limit: Limit) -> Block | None:
        """One block per key at a time: concurrent takers wait for the same refill, which
        runs as a task of its own so that no taker's cancellation cancels it."""
        task = self._refills.get(limit.key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._ask(limit))
            self._refills[limit.key] = task
            task.add_done_callback(lambda t: self._forget_refill(limit.key, t))
            # retrieved: a failed refill whose takers all gave up is not an unhandled error
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    def _forget_refill(self, key: str, task: asyncio.Task[Block | None]) -> None:
        if self._refills.get(key) is task:  # never a newer refill of the same key
            del self._refills[key]

    async def _ask(self, limit: Limit) -> Block | None:
        old = self._open.get(limit.key)
        if old is not None:
            self._retire(old)
        wanted = max(self.size(limit) if self.size else limit.capacity // DEFAULT_SHARE, 1)
        wanted = max(wanted, limit.amount)
        reserved = _as_block(limit, wanted)
        asked = self.clock()
        block_id = f"blk:{uuid.uuid4().hex}"
        try:
            decision = await self.engine.acquire(block_id, [reserved])
        except BaseException:
            # it may have run in Redis: until abandoned, it would be charged in full
            self._lost[block_id] = reserved
            raise
        if not decision.allowed or decision.reservation is None:
            # nearly full: its requests go to Redis themselves for a while, and get exact
            # answers, instead of a refused block each
            self._quiet_until[limit.key] = self.clock() + self.margin_s
            return None
        (state,) = decision.states
        granted = state.taken if state.taken is not None else wanted
        ends_in = self._ends_in(limit, state.reset_ms / 1000)
        if ends_in < 2 * self.margin_s:
            # the bucket or period ends before the block could serve: give it back at once
            # and ask again once the next one has begun
            self._quiet_until[limit.key] = asked + ends_in
            await self.engine.release(decision.reservation)
            return None
        block = Block(
            reserved,
            decision.reservation,
            granted,
            asked + ends_in - self.margin_s,
            remaining=state.remaining,
            resets_at=asked + state.reset_ms / 1000,
        )
        self._open[limit.key] = block
        self._sweep_at(block)
        return block

    def _ends_in(self, limit: Limit, reset_s: float) -> float:
        """Seconds from when the block was asked for until its bucket or period ends, at the
        soonest (the script ran after it was asked for)."""
        if isinstance(limit, SlidingWindow):
            # reset is when the block's bucket slides out: the bucket itself ends a window sooner
            return reset_s - limit.window_ms / 1000
        return min(reset_s, self.max_life_s)

    async def _settle(self, block: Block) -> None:
        if block.settled:
            return
        block.settled = True
        self._closed.discard(block)
        if self._open.get(block.limit.key) is block:
            del self._open[block.limit.key]
        try:
            await self.engine.settle(block.reservation, {BLOCK_MEASURE: max(block.used, 0)})
        except BaseException:
            block.settled = False
            self._closed.add(block)
            raise


def _as_block(limit: Limit, size: int) -> Limit:
    """The limit as a block reserves it: capped at what is left, ``size`` units, settled
    through a measure of its own so that what was not used goes back."""
    # replace, not a copy changed in place: another measure is another limit (its token)
    return replace(limit, amount=size, capped=True, measure=BLOCK_MEASURE)  # type: ignore[type-var]
