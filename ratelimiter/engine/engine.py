"""The engine: runs the Lua scripts over a list of limits and answers with decisions.

On a single Redis every call is one script. On a Cluster the limits of one request are
grouped by slot, one script runs per group, the groups run concurrently, and a refusal in
any group releases what the other groups reserved (an instant of under-admission, never
over-admission).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from math import inf
from pathlib import Path
from typing import Any

import msgpack
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from ..errors import DuplicateRequest, InvalidLimit
from .connections import (
    RedisClient,
    RedisSettings,
    as_unavailable,
    connect,
    refusing_errors,
    translate_errors,
    unavailable_errors,
)
from .durations import Duration, parse_duration, period_bounds, time_zone
from .embedded import DEFAULT_DATA_DIR, RedisServer
from .frames import Layout, Parts, limit_parts
from .limits import (
    MAX_AMOUNT,
    Budget,
    Concurrency,
    Gate,
    Limit,
    SharedWindow,
    SlidingWindow,
    validate_limits,
)
from .multiplex import Multiplexer, Packed
from .scripts import Script, load_all, load_scripts, run_script

__all__ = [
    "BudgetUse",
    "Decision",
    "Engine",
    "ExpiredHold",
    "LimitState",
    "Renewal",
    "Reservation",
    "Settlement",
]

SINGLE_ANCHOR = "rl"
SLOTS = 16384
_CLOCK_REFRESH_S = 30.0
_UNAVAILABLE = (*unavailable_errors, *refusing_errors)
LAYOUTS = 4096  # limit sets whose packed arguments are kept (see frames.py)
LIMIT_PARTS = 16_384  # and limits' parts, as policy's plans


@cache
def slot_tags() -> tuple[str, ...]:
    """For each Cluster slot, a short hash tag that lands in it.

    A request's record for one slot group is named with its slot's tag, and so is that
    slot's index of pending holds: the collector can then visit every slot by name.
    """
    tags: list[str | None] = [None] * SLOTS
    missing, n = SLOTS, 0
    while missing:
        tag = format(n, "x")
        slot = key_slot(tag.encode())
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        n += 1
    return tuple(tags)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Reservation:
    """What ``settle``, ``release`` and ``renew`` need: the request id and its slot groups."""

    request_id: str
    anchors: tuple[str, ...] = (SINGLE_ANCHOR,)


@dataclass(frozen=True, slots=True)
class LimitState:
    """A limit after the call: what is left of it and when it resets. ``taken`` (admissions
    only) is what the request took of it: its amount, or less for a capped limit."""

    limit: Limit
    remaining: int
    reset_ms: int
    taken: int | None = None
    shadow: bool = False  # the caller made it a shadow limit (see ``Engine.acquire``)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to ``acquire``.

    ``retry_after_ms`` (refusals only) is the time until every refusing limit has room for
    this request; ``None`` when it never will (it asks for more than a limit's capacity).

    ``shadow_refused`` (admissions only): the shadow limit that would have refused, with
    ``shadow_reason`` and ``shadow_retry_after_ms`` as an enforced refusal has them; the
    request then took nothing in any shadow limit.
    """

    allowed: bool
    request_id: str
    states: tuple[LimitState, ...]
    reservation: Reservation | None = None
    refused: Limit | None = None
    reason: str | None = None
    retry_after_ms: int | None = None
    shadow_refused: Limit | None = None
    shadow_reason: str | None = None
    shadow_retry_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Settlement:
    """The outcome of a reservation, the same however often it is asked for.

    ``status`` is ``settled``, ``released``, ``expired`` or ``unknown`` (no such reservation,
    or its record has aged out); ``first`` is true for the call that finished it.
    """

    request_id: str
    status: str
    first: bool
    started_ms: int | None = None
    finished_ms: int | None = None
    reserved: dict[str, int] = field(default_factory=dict)
    charged: dict[str, int] = field(default_factory=dict)
    meta: bytes = b""


@dataclass(frozen=True, slots=True)
class BudgetUse:
    """A budget's current period as it stands, not clamped at the capacity: ``spent`` is
    settled (and expired) spend, ``held`` the estimates of requests still in flight."""

    spent: int
    held: int
    start_ms: int
    end_ms: int
    reset: int = 0  # spend taken off by resets in this period (``reset_budgets``)


@dataclass(frozen=True, slots=True)
class Renewal:
    status: str
    lost_leases: int = 0
    deadline_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ExpiredHold:
    """A reservation that was never settled, finalised at its estimate by ``collect_expired``
    (on a Cluster, one per slot group of the request). ``lost`` marks one whose record aged
    out before collection: its amounts are unknown."""

    request_id: str
    started_ms: int | None
    expired_ms: int | None
    deadline_ms: int | None
    reserved: dict[str, int]
    meta: bytes
    lost: bool = False


def _unpack(raw: bytes) -> Any:
    # Lua strings come back as msgpack str even when they hold bytes (caller metadata).
    return msgpack.unpackb(raw, unicode_errors="surrogateescape")


def _as_bytes(value: Any) -> bytes:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else b""


def _as_map(value: Any) -> dict[str, int]:
    return dict(value) if isinstance(value, dict) else {}


class Engine:
    """Atomic admission, settlement and inspection of limits in Redis.

    ``hold_ttl_ms``: a reservation not settled (nor renewed) within this is expired at its
    estimate by ``collect_expired``. ``record_grace_ms``: how long an expired hold's record
    waits for collection. ``result_ttl_ms``: how long a finished reservation answers repeated
    calls with its first outcome. ``timezone``: where calendar budget periods turn over.
    ``clock``: milliseconds since the epoch to use instead of Redis's clock (tests and
    simulations only: production must use Redis's clock so every sidecar agrees).
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        address: str = "redis",
        prefix: str = "rl:",
        hold_ttl_ms: int = 600_000,
        record_grace_ms: int = 3_600_000,
        result_ttl_ms: int = 60_000,
        timezone: str = "UTC",
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.redis = redis
        self.address = address
        self.cluster = isinstance(redis, RedisCluster)
        self.prefix = prefix
        self.hold_ttl_ms = hold_ttl_ms
        self.record_grace_ms = record_grace_ms
        self.result_ttl_ms = result_ttl_ms
        self.tz = time_zone(timezone)
        self._clock = clock
        self._offset_ms = 0.0
        self._offset_at = float("-inf")
        self._periods: dict[Duration, tuple[int, int, int]] = {}
        self._layouts: dict[tuple[object, ...], Layout] = {}
        self._limit_parts: dict[object, Parts] = {}
        self._scripts = load_scripts()
        # A Cluster client routes each call by slot itself; one server gets pipelined calls.
        self._scripts_via: RedisClient | Multiplexer = (
            redis if self.cluster else Multiplexer(redis)  # type: ignore[arg-type]
        )
        self._server: RedisServer | None = None

    @classmethod
    async def connect(
        cls,
        settings: RedisSettings | str | None,
        *,
        data_dir: str | Path = DEFAULT_DATA_DIR,
        **options: Any,
    ) -> Engine:
        """Connect to Redis (see ``RedisSettings.from_url``) and build an engine on it.

        With ``settings=None`` a private server is started (see ``RedisServer``), persisting
        in ``data_dir``; ``close`` stops it.
        """
        server = None
        if settings is None:
            server = RedisServer(data_dir).start()
            settings = server.url
        if isinstance(settings, str):
            settings = RedisSettings.from_url(settings)
        try:
            engine = cls(await connect(settings), address=settings.address, **options)
        except BaseException:
            if server:
                server.stop()
            raise
        engine._server = server
        return engine

    async def preload(self) -> None:
        """Load the scripts now rather than on their first use, whose retry after NOSCRIPT
        would go behind calls made meanwhile (see ``scripts.load_all``)."""
        with translate_errors(self.address):
            await load_all(self._scripts_via)

    async def close(self) -> None:
        if isinstance(self._scripts_via, Multiplexer):
            await self._scripts_via.aclose()
        await self.redis.aclose()
        if self._server is not None:
            self._server.stop()
            self._server = None

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- public API -----------------------------------------------------------------

    async def acquire(
        self,
        request_id: str | None,
        limits: Iterable[Limit],
        *,
        meta: bytes = b"",
        force: bool = False,
        ledger: Sequence[str] | None = None,
        shadow: Collection[str] = (),
    ) -> Decision:
        """Reserve every limit for one request, or none of them.

        Repeating the call with the same id and the same limits while the reservation is
        held returns an admission again without taking anything twice (safe to retry after
        a timeout); the same id with other limits, or once finished, raises
        ``DuplicateRequest`` and takes nothing.
        ``force`` takes every limit even past its capacity: for usage that already happened.
        ``ledger``: rollup dimensions (e.g. ``"key:3f9a"``, ``"model:gpt-4o"``); when given,
        finishing the request writes one ledger entry with ``meta`` and them, in the same
        atomic step, which the rollup consumer adds to those dimensions' daily rollups (see
        ``ratelimiter.ledger.rollups``); ``limits`` may then be empty.
        ``shadow``: the keys of limits to evaluate and count without enforcing. A shadow limit
        never refuses; when one would, the request is admitted by the enforced limits alone
        and takes nothing in any shadow limit, as if refused there (so a shadow limit counts
        exactly what it would enforced), and the decision names it in ``shadow_refused``. A
        request refused by an enforced limit takes nothing anywhere. On a Cluster the slot
        groups that took their shadow limits meanwhile are undone and taken again without
        them (an instant of under-admission, as for a refusal; refused if their room went).
        """
        request_id = _check_request_id(request_id)
        limits, layout = self._layout(limits, ledger is not None)
        if type(shadow) is not frozenset or shadow not in layout.shadows:
            shadow = _check_shadow(shadow, limits)
        if not isinstance(meta, bytes):
            raise InvalidLimit(f"meta must be bytes, got {type(meta).__name__}")
        now = await self._now_ms()
        groups = layout.groups
        dims = None if ledger is None else msgpack.packb(list(ledger))
        calls: list[GroupCall] = [
            (
                anchor,
                [limits[i].key for i in indices] if self.cluster else fragments.keys,
                fragments.fill(limits),
                places,
            )
            for (anchor, indices), fragments, places in zip(
                groups,
                layout.fragments_at(now, self._parts),
                layout.shadow_places(shadow),
                strict=True,
            )
        ]
        replies = await self._gather(
            self._acquire_group(
                request_id,
                call,
                meta,
                force,
                dims if n == 0 else None,  # the first group keeps the request's ledger entry
                layout.spans,
            )
            for n, call in enumerate(calls)
        )
        reused = next((r["dup"] for r in replies if r.get("dup") not in (None, "held")), None)
        if reused is not None:
            # The id is finished or held for other limits: undo only what this call took.
            taken = [
                anchor
                for (anchor, _), reply in zip(groups, replies, strict=True)
                if reply["ok"] and "dup" not in reply
            ]
            if taken:
                await self._cancel(Reservation(request_id, tuple(taken)))
            raise DuplicateRequest(request_id, reused)
        final_states, refusal, would = _read_replies(groups, replies, limits, shadow)
        if refusal is None and would is not None and len(groups) > 1:
            # Another slot group may have counted the request in its shadow limits: taken again
            # without them, so no shadow limit of the request counts it, as on one Redis.
            final_states, refusal, would = await self._without_shadow(
                request_id, groups, replies, limits, shadow, calls, (meta, dims, layout.spans)
            )
        reservation = Reservation(request_id, tuple(anchor for anchor, _ in groups))
        if refusal is None and would is not None:
            index, reason, retry = would
            return Decision(
                True,
                request_id,
                final_states,
                reservation,
                shadow_refused=limits[index],
                shadow_reason=reason,
                shadow_retry_after_ms=None if retry < 0 else retry,
            )
        if refusal is None:
            return Decision(True, request_id, final_states, reservation)
        admitted = [
            anchor for (anchor, _), reply in zip(groups, replies, strict=True) if reply["ok"]
        ]
        if admitted:
            await self._cancel(Reservation(request_id, tuple(admitted)))
        index, reason, retry = refusal
        return Decision(
            False,
            request_id,
            final_states,
            None,
            limits[index],
            reason,
            None if retry < 0 else retry,
        )

    async def _without_shadow(
        self,
        request_id: str,
        groups: list[tuple[str, list[int]]],
        replies: list[dict[str, Any]],
        limits: Sequence[Limit],
        shadow: frozenset[str],
        calls: list[GroupCall],
        request: tuple[bytes, bytes | None, str],
    ) -> tuple[tuple[LimitState, ...], tuple[int, str, int] | None, tuple[int, str, int] | None]:
        """A shadow limit of one slot group would refuse: the groups that took their shadow
        limits are undone and taken again, skipping them. Between the two, another request
        may take their enforced limits' room: this one is then refused, taking nothing."""
        meta, dims, spans = request
        redo = [
            n
            for n, ((_, indices), reply) in enumerate(zip(groups, replies, strict=True))
            if "sk" not in reply and any(limits[i].key in shadow for i in indices)
        ]
        if redo:
            await self._cancel(Reservation(request_id, tuple(groups[n][0] for n in redo)))
            again = await self._gather(
                self._acquire_group(
                    request_id,
                    calls[n],
                    meta,
                    False,
                    dims if n == 0 else None,
                    spans,
                    skip_shadow=True,
                )
                for n in redo
            )
            for n, reply in zip(redo, again, strict=True):
                replies[n] = reply
        return _read_replies(groups, replies, limits, shadow)

    async def settle(
        self,
        reservation: Reservation | str,
        actuals: Mapping[str, int] | None = None,
        *,
        info: bytes = b"",
    ) -> Settlement:
        """Replace estimates by ``actuals`` (measure -> amount) and free the leases.

        Exactly once: a repeated call changes nothing and returns the first outcome.
        ``info`` goes into the ledger entry, if the request has one.
        """
        if not isinstance(info, bytes):
            raise InvalidLimit(f"info must be bytes, got {type(info).__name__}")
        packed = msgpack.packb(_check_actuals(actuals or {}))
        return await self._finish(reservation, "settle", packed, info)

    async def charge(
        self,
        request_id: str,
        limits: Iterable[Limit],
        actuals: Mapping[str, int],
        *,
        meta: bytes = b"",
        ledger: Sequence[str] | None = None,
        info: bytes = b"",
    ) -> Settlement:
        """Record usage that happened without an admission (Redis was unreachable): every
        limit takes it even past its capacity, exactly once per request id."""
        limits = validate_limits(limits)
        anchors = tuple(anchor for anchor, _ in self._groups(limits))
        with contextlib.suppress(DuplicateRequest):  # charged before: settle answers how
            await self.acquire(request_id, limits, meta=meta, force=True, ledger=ledger)
        return await self.settle(Reservation(request_id, anchors), actuals, info=info)

    async def release(self, reservation: Reservation | str) -> Settlement:
        """Refund everything reserved (the request failed before the upstream answered)."""
        return await self._finish(reservation, "release", msgpack.packb({}))

    async def _cancel(self, reservation: Reservation) -> None:
        """Undo the slot groups a refused or conflicting acquire took, as if it had never
        run there: refunded, no ledger entry, no record left to meet the id again."""
        await self._finish(reservation, "cancel", msgpack.packb({}))

    async def abandon(self, request_id: str, limits: Iterable[Limit]) -> Settlement:
        """Undo an acquire whose answer never came (Redis timed out or the connection broke):
        whether it ran, runs later or never runs, it ends up taking nothing. Safe to retry."""
        anchors = tuple(anchor for anchor, _ in self._groups(validate_limits(limits)))
        return await self._finish(
            Reservation(request_id, anchors), "release", msgpack.packb({}), abandon=True
        )

    async def renew(self, reservation: Reservation | str) -> Renewal:
        """Extend the leases and the hold of a running request (a long stream)."""
        reservation = self._reservation(reservation)
        script = self._scripts["renew"]
        args = [
            reservation.request_id,
            self._now_override(),
            self.hold_ttl_ms,
            self.record_grace_ms,
        ]
        replies = await self._gather(
            self._run(script, self._record_keys(anchor, reservation.request_id), args)
            for anchor in reservation.anchors
        )
        statuses = {reply["s"] for reply in replies}
        status = "held" if statuses == {"held"} else sorted(statuses - {"held"})[0]
        deadlines = [reply["dl"] for reply in replies if "dl" in reply]
        return Renewal(status, sum(r["lost"] for r in replies), min(deadlines, default=None))

    async def peek(self, limits: Iterable[Limit]) -> list[LimitState]:
        """Remaining capacity and time to reset of each limit, changing nothing."""
        limits = validate_limits(limits)
        now = await self._now_ms()
        groups = self._groups(limits)
        script = self._scripts["peek"]
        replies = await self._gather(
            self._run(
                script,
                [limits[i].key for i in indices],
                [
                    0 if self._clock is None else now,
                    self._encode([limits[i] for i in indices], now),
                ],
            )
            for _, indices in groups
        )
        states: list[LimitState | None] = [None] * len(limits)
        for (_, indices), flat in zip(groups, replies, strict=True):
            for n, i in enumerate(indices):
                states[i] = LimitState(limits[i], flat[2 * n], flat[2 * n + 1])
        return [s for s in states if s is not None]

    async def budget_use(
        self, budgets: Sequence[Budget], now_ms: int | None = None, batch: int = 1000
    ) -> list[BudgetUse]:
        """Spent and held amounts of each budget's period at ``now_ms`` (default: now), read
        in pipelines of ``batch``. ``peek`` answers what remains, clamped at 0; this shows
        spend past the budget."""
        now = await self._now_ms() if now_ms is None else now_ms
        periods = [period_bounds(parse_duration(b.period), now, self.tz) for b in budgets]
        found: list[BudgetUse] = []
        for first in range(0, len(budgets), batch):
            pipe = self.redis.pipeline(transaction=False)
            for budget, (start, _) in zip(
                budgets[first : first + batch], periods[first : first + batch], strict=True
            ):
                pipe.hmget(f"{budget.key}:{start}", "u", "h", "r")  # as lib.lua's budget_key
            with translate_errors(self.address):
                replies = await pipe.execute()
            for (used, held, reset), (start, end) in zip(
                replies, periods[first : first + batch], strict=True
            ):
                held_now = int(held or 0)
                found.append(
                    BudgetUse(int(used or 0) - held_now, held_now, start, end, int(reset or 0))
                )
        return found

    async def reset_budgets(self, budgets: Sequence[Budget], most: int = 0) -> list[int]:
        """Lower the spend of each budget's current period to at most ``most`` (0: it starts
        again), atomically per period and keeping the holds of requests in flight, which
        settle into the period afterwards and are counted once. Returns what each lost.
        ``budget_use`` shows what resets took off in a period as ``reset``."""
        if not isinstance(most, int) or isinstance(most, bool) or not 0 <= most <= MAX_AMOUNT:
            raise InvalidLimit(f"most must be a whole number from 0 to 2**53-1, got {most!r}")
        if not budgets:
            return []
        now = await self._now_ms()
        keys = [
            f"{b.key}:{period_bounds(parse_duration(b.period), now, self.tz)[0]}" for b in budgets
        ]
        script = self._scripts["reset"]
        groups = self._groups(list(budgets))
        replies = await self._gather(
            self._run(script, [keys[i] for i in indices], [most]) for _, indices in groups
        )
        taken = [0] * len(budgets)
        for (_, indices), reply in zip(groups, replies, strict=True):
            for i, off in zip(indices, reply, strict=True):
                taken[i] = int(off)
        return taken

    async def collect_expired(self, batch: int = 100) -> list[ExpiredHold]:
        """Finalise reservations whose hold deadline passed, charged at their estimate.

        Each expired hold is returned by exactly one call, whichever process makes it, so
        the caller can record it (in the ledger) once.
        """
        anchors = await self._anchors_with_holds()
        script = self._scripts["expire"]
        replies = await self._gather(
            self._run(
                script,
                [self._pending_key(anchor)],
                [self._now_override(), batch, self._record_prefix(anchor), self.result_ttl_ms],
            )
            for anchor in anchors
        )
        return [
            ExpiredHold(
                item["rid"],
                item.get("t0"),
                item.get("t1"),
                item.get("dl"),
                _as_map(item.get("est")),
                _as_bytes(item.get("meta")),
                bool(item.get("lost")),
            )
            for reply in replies
            for item in reply
        ]

    async def now_ms(self) -> int:
        """The engine's clock: Redis's, calibrated, unless a test clock was given."""
        return await self._now_ms()

    # -- internals ------------------------------------------------------------------

    def _reservation(self, reservation: Reservation | str) -> Reservation:
        if isinstance(reservation, Reservation):
            return reservation
        request_id = _check_request_id(reservation)
        if self.cluster:
            raise InvalidLimit(
                "in Cluster mode a request id alone does not say which slots hold its "
                "reservation: pass the Reservation that acquire returned"
            )
        return Reservation(request_id)

    async def _finish(
        self,
        reservation: Reservation | str,
        mode: str,
        actuals: bytes,
        info: bytes = b"",
        abandon: bool = False,
    ) -> Settlement:
        reservation = self._reservation(reservation)
        rid = reservation.request_id
        script = self._scripts["settle"]
        args = [rid, self._now_override(), mode, actuals, self.result_ttl_ms, info]
        args.append("1" if abandon else "0")
        replies = await self._gather(
            self._run(script, self._record_keys(anchor, rid), args)
            for anchor in reservation.anchors
        )
        known = [r for r in replies if r["s"] != "unknown"] or replies
        reserved: dict[str, int] = {}
        charged: dict[str, int] = {}
        for reply in known:
            reserved.update(_as_map(reply.get("est")))
            charged.update(_as_map(reply.get("out")))
        head = known[0]
        return Settlement(
            rid,
            head["s"],
            any(r["first"] for r in replies),
            head.get("t0"),
            head.get("t1"),
            reserved,
            charged,
            _as_bytes(head.get("meta")),
        )

    async def _acquire_group(
        self,
        rid: str,
        call: GroupCall,
        meta: bytes,
        force: bool,
        ledger_dims: bytes | None,
        spans: str,
        skip_shadow: bool = False,
    ) -> dict[str, Any]:
        anchor, limit_keys, (specs, plan, flat), shadow_places = call
        keys = self._record_keys(anchor, rid)
        if type(limit_keys) is Packed:
            keys.append(limit_keys)
        else:
            keys += limit_keys
        args = [
            rid,
            self._now_override(),
            specs,
            self.hold_ttl_ms,
            self.record_grace_ms,
            meta,
            "1" if force else "0",
            "" if ledger_dims is None else self.ledger_base(anchor),
            ledger_dims or b"",
            spans,
            shadow_places,
            "1" if skip_shadow else "0",
            plan,
            flat,
        ]
        return await self._run(self._scripts["acquire"], keys, args)

    def _layout(self, limits: Any, allow_empty: bool) -> tuple[tuple[Limit, ...], Layout]:
        """``limits`` as a tuple, checked, and their layout: found by their tokens when a list
        of limits with the same tokens was met before (checked then), made otherwise."""
        if type(limits) is list:
            limits = tuple(limits)
        elif type(limits) is not tuple:
            limits = validate_limits(limits, allow_empty=allow_empty)
        try:
            tokens = tuple([limit.token for limit in limits])
            layout = self._layouts.get(tokens) if tokens else None
        except (AttributeError, TypeError):  # not limits: validate_limits says what is wrong
            tokens, layout = (), None
        if layout is None:
            limits = validate_limits(limits, allow_empty=allow_empty)
            layout = self._new_layout(limits)
            if tokens:
                if len(self._layouts) >= LAYOUTS:
                    del self._layouts[next(iter(self._layouts))]
                self._layouts[tokens] = layout
        return limits, layout

    def _new_layout(self, limits: tuple[Limit, ...]) -> Layout:
        groups = self._groups(limits)
        for _, indices in groups:
            group = [limits[i] for i in indices]
            for limit in group:
                if isinstance(limit, SharedWindow):
                    _share_spec(limit, group)  # its total must be in its group: raises if not
        return Layout(limits, groups, ",".join(anchor for anchor, _ in groups))

    def _parts(self, group: list[Limit], now: int) -> list[Parts]:
        """Each limit's parts (frames.py) for the periods of ``now``: kept by its token, but a
        shared window's, whose spec holds its total's place in the group."""
        made = []
        for limit in group:
            parts = self._limit_parts.get(limit.token)
            if parts is None or not parts.start <= now < parts.end:
                if isinstance(limit, SharedWindow):
                    parts = limit_parts(_share_spec(limit, group), limit.key, -inf, inf)
                else:
                    parts = self._new_parts(limit, now)
            made.append(parts)
        return made

    def _new_parts(self, limit: Limit, now: int) -> Parts:
        (spec,) = self._specs([limit], now)
        start, end = (spec[4], spec[5]) if spec[0] == "b" else (-inf, inf)
        parts = limit_parts(spec, limit.key, start, end)
        if len(self._limit_parts) >= LIMIT_PARTS:
            del self._limit_parts[next(iter(self._limit_parts))]
        self._limit_parts[limit.token] = parts
        return parts

    async def _run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        # translate_errors without its generator's cost: every acquire and settle passes here
        try:
            reply = await run_script(self._scripts_via, script, keys, args)
        except _UNAVAILABLE as exc:
            raise as_unavailable(self.address, exc) from exc
        return _unpack(reply)

    async def _gather(self, calls: Iterable[Any]) -> list[Any]:
        calls = list(calls)
        if len(calls) == 1:
            return [await calls[0]]
        return list(await asyncio.gather(*calls))

    def _groups(self, limits: Sequence[Limit]) -> list[tuple[str, list[int]]]:
        if not self.cluster:
            return [(SINGLE_ANCHOR, list(range(len(limits))))]
        if not limits:  # a request no limit applies to still gets its ledger entry
            return [(slot_tags()[0], [])]
        by_slot: dict[int, list[int]] = defaultdict(list)
        for i, limit in enumerate(limits):
            if isinstance(limit, Budget) and "{" not in limit.key:
                raise InvalidLimit(
                    f"budget key {limit.key!r} needs a hash tag such as {{scope}} in Cluster "
                    "mode, so that all its periods live in one slot"
                )
            by_slot[key_slot(limit.key.encode())].append(i)
        tags = slot_tags()
        return [(tags[slot], indices) for slot, indices in by_slot.items()]

    def ledger_base(self, anchor: str) -> str:
        """Prefix of one slot group's ledger streams and rollups (``ledger:<day>``...)."""
        return f"{self.prefix}{{{anchor}}}:"

    def anchors(self) -> list[str]:
        """Every slot group name: one on a single Redis, one per slot on a Cluster."""
        return list(slot_tags()) if self.cluster else [SINGLE_ANCHOR]

    def _record_prefix(self, anchor: str) -> str:
        return f"{self.prefix}{{{anchor}}}:res:"

    def _pending_key(self, anchor: str) -> str:
        return f"{self.prefix}{{{anchor}}}:pending"

    def _record_keys(self, anchor: str, rid: str) -> list[str]:
        return [self._record_prefix(anchor) + rid, self._pending_key(anchor)]

    async def _anchors_with_holds(self) -> list[str]:
        if not self.cluster:
            return [SINGLE_ANCHOR]
        tags = slot_tags()
        with translate_errors(self.address):
            pipe = self.redis.pipeline(transaction=False)
            for tag in tags:
                pipe.exists(self._pending_key(tag))
            found = await pipe.execute()
        return [tag for tag, exists in zip(tags, found, strict=True) if exists]

    def _encode(self, limits: Sequence[Limit], now: int) -> bytes:
        return msgpack.packb(self._specs(limits, now))

    def _specs(self, limits: Sequence[Limit], now: int) -> list[list[Any]]:
        specs: list[list[Any]] = []
        for limit in limits:
            if isinstance(limit, SharedWindow):
                specs.append(_share_spec(limit, limits))
            elif isinstance(limit, SlidingWindow):
                specs.append(
                    [
                        "w",
                        limit.amount,
                        limit.capacity,
                        limit.measure or "",
                        limit.window_ms,
                        limit.bucket_ms,
                        *_CAPPED[limit.capped],
                    ]
                )
            elif isinstance(limit, Concurrency):
                specs.append(["l", 1, limit.capacity, "", limit.ttl_ms])
            elif isinstance(limit, Gate):
                specs.append(["g", 0, 1, ""])
            else:
                b0, b1, b2 = self._period(limit.period, now)
                specs.append(
                    [
                        "b",
                        limit.amount,
                        limit.capacity,
                        limit.measure or "",
                        b0,
                        b1,
                        b2,
                        limit.retention_ms,
                        *_CAPPED[limit.capped],
                    ]
                )
        return specs

    def _period(self, duration: Duration, now: int) -> tuple[int, int, int]:
        """Current period and the next one's end: the script picks by its own clock."""
        cached = self._periods.get(duration)
        if cached and cached[0] <= now < cached[1]:
            return cached
        start, end = period_bounds(duration, now, self.tz)
        bounds = (start, end, period_bounds(duration, end, self.tz)[1])
        self._periods[duration] = bounds
        return bounds

    def _now_override(self) -> int:
        """What scripts get as "now": 0 tells them to read Redis's own clock."""
        return 0 if self._clock is None else self._clock()

    async def _now_ms(self) -> int:
        if self._clock is not None:
            return self._clock()
        local = time.time()
        if local - self._offset_at > _CLOCK_REFRESH_S:
            with translate_errors(self.address):
                before = time.time()
                seconds, micros = await self.redis.time()
                after = time.time()
            self._offset_ms = seconds * 1000 + micros / 1000 - (before + after) * 500
            self._offset_at = local = after
        return int(local * 1000 + self._offset_ms)


# A capped limit's spec ends with a 1 (lib.lua); others are sent as before, so records held
# by older scripts and repeated acquires compare equal.
_CAPPED: dict[bool, tuple[int, ...]] = {False: (), True: (1,)}


def _share_spec(limit: SharedWindow, group: Sequence[Limit]) -> list[Any]:
    """A shared window's spec: its total is named by its place in the same slot group."""
    place = next((n for n, other in enumerate(group, 1) if other.key == limit.total_key), None)
    if place is None:
        raise InvalidLimit(
            f"shared window {limit.name or limit.key!r} and its total {limit.total_key!r} must "
            "share a hash tag, so that one script sees both in Cluster mode"
        )
    return [
        "p",
        limit.amount,
        limit.capacity,
        limit.measure or "",
        limit.window_ms,
        limit.bucket_ms,
        place,
        limit.saturation,
        *_CAPPED[limit.capped],
    ]


# One slot group's call: its anchor, its limits' keys (``multiplex.Packed`` on one server), the
# specs, settle plan and flat specs with the request's amounts (frames.py), its shadow places.
GroupCall = tuple[str, Sequence[str] | bytes, tuple[bytes, bytes, bytes], bytes]

_new = object.__new__
_set_limit, _set_remaining, _set_reset_ms, _set_taken, _set_shadow = (
    getattr(LimitState, name).__set__
    for name in ("limit", "remaining", "reset_ms", "taken", "shadow")
)


def _state(limit: Limit, remaining: int, reset_ms: int, taken: int | None, shadow: bool) -> Any:
    """``LimitState(limit, remaining, reset_ms, taken, shadow)`` in half the time: its slots set
    through their descriptors, not the frozen ``__init__``'s ``object.__setattr__`` calls. A
    decision has a state per limit, 20 and more for a sidecar request."""
    state = _new(LimitState)
    _set_limit(state, limit)
    _set_remaining(state, remaining)
    _set_reset_ms(state, reset_ms)
    _set_taken(state, taken)
    _set_shadow(state, shadow)
    return state


def _later(retry: int, other: int) -> bool:
    """Whether ``retry`` frees later than ``other``; -1 means never."""
    return other >= 0 and (retry < 0 or retry > other)


def _read_replies(
    groups: Sequence[tuple[str, list[int]]],
    replies: Sequence[dict[str, Any]],
    limits: Sequence[Limit],
    shadow: frozenset[str],
) -> tuple[tuple[LimitState, ...], tuple[int, str, int] | None, tuple[int, str, int] | None]:
    """Every limit's state from the groups' replies, the enforced refusal that frees last and
    the shadow limit that would refuse (each as limit index, reason, retry-after or -1)."""
    states: list[LimitState | None] = [None] * len(limits)
    refusal: tuple[int, str, int] | None = None
    would: tuple[int, str, int] | None = None
    for (_, indices), reply in zip(groups, replies, strict=True):
        flat, took, ok = reply["st"], reply.get("took"), reply["ok"]
        for n, i in enumerate(indices):
            limit = limits[i]
            taken = (took[n] if took else limit.amount) if ok else None
            states[i] = _state(limit, flat[2 * n], flat[2 * n + 1], taken, limit.key in shadow)
        if not reply["ok"]:
            candidate = (indices[reply["i"] - 1], reply["why"], reply["ra"])
            if refusal is None or _later(candidate[2], refusal[2]):
                refusal = candidate
        elif "sh" in reply:
            candidate = (indices[reply["sh"] - 1], reply["shwhy"], reply["shra"])
            if would is None or _later(candidate[2], would[2]):
                would = candidate
    return tuple(filter(None, states)), refusal, would


def _check_shadow(shadow: Any, limits: Sequence[Limit]) -> frozenset[str]:
    """The shadow limits' keys, each the key of one of ``limits``."""
    if isinstance(shadow, (str, bytes)) or not hasattr(shadow, "__iter__"):
        raise InvalidLimit(f"shadow must be a collection of limit keys, got {shadow!r}")
    keys = tuple(shadow)
    known = {limit.key for limit in limits}
    unknown = [key for key in keys if not isinstance(key, str) or key not in known]
    if unknown:
        raise InvalidLimit(f"shadow names keys that no limit of the request has: {unknown[:5]!r}")
    return frozenset(keys)


def _check_request_id(request_id: str | None) -> str:
    if request_id is None:
        return uuid.uuid4().hex
    if not isinstance(request_id, str) or not request_id or len(request_id) > 200:
        raise InvalidLimit(
            f"request id must be a non-empty string of at most 200 characters, got {request_id!r}"
        )
    return request_id


def _check_actuals(actuals: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(actuals, Mapping):
        raise InvalidLimit(f"actuals must map a measure to an amount, got {type(actuals).__name__}")
    for measure, amount in actuals.items():
        if not isinstance(measure, str) or not measure:
            raise InvalidLimit(f"actuals: measure names must be non-empty strings, got {measure!r}")
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= MAX_AMOUNT:
            raise InvalidLimit(
                f"actuals: {measure} must be a whole number between 0 and 2**53-1, got {amount!r}"
            )
    return dict(actuals)
