"""A plain-Python model of the limit kinds, written from their definitions, not from the Lua.

Sliding window: a request admitted at time t lands in bucket t // g and counts while its
bucket id >= (now - W) // g. Lease: a member with an expiry, purged by the next admission
once expired. Budget: one counter per calendar period holding spend plus holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from ratelimiter import Budget, Concurrency, SlidingWindow
from ratelimiter.engine.durations import period_bounds

NEVER = None


@dataclass
class Event:
    rid: str
    at: int
    bucket: int
    amount: int


@dataclass
class WindowModel:
    limit: SlidingWindow
    events: list[Event] = field(default_factory=list)

    @property
    def g(self) -> int:
        return self.limit.bucket_ms

    @property
    def w(self) -> int:
        return self.limit.window_ms

    def counted(self, now: int) -> list[Event]:
        lo = (now - self.w) // self.g
        return [e for e in self.events if e.bucket >= lo]

    def used(self, now: int) -> int:
        return sum(e.amount for e in self.counted(now))

    def exact_used(self, now: int) -> int:
        """What a perfect sliding window would count: admissions in (now - W, now]."""
        return sum(e.amount for e in self.events if now - self.w < e.at <= now)

    def frees_at(self, bucket: int) -> int:
        return (bucket + 1) * self.g + self.w

    def reset(self, now: int) -> int:
        buckets = {e.bucket for e in self.counted(now) if self._bucket_sum(e.bucket) > 0}
        return max((self.frees_at(b) - now for b in buckets), default=0)

    def _bucket_sum(self, bucket: int) -> int:
        return sum(e.amount for e in self.events if e.bucket == bucket)

    def check(self, now: int, amount: int) -> tuple[str | None, int | None]:
        cap = self.limit.capacity
        if amount > cap:
            return "exceeds_capacity", NEVER
        if self.used(now) + amount <= cap:
            return None, None
        for t in sorted({self.frees_at(e.bucket) for e in self.counted(now)}):
            if self.used(t) + amount <= cap:
                return "window_full", t - now
        raise AssertionError("unreachable: everything frees eventually")

    def check_capped(self, now: int, amount: int) -> tuple[str | None, int | None, int]:
        """A capped request: (reason, retry, what it takes), taking up to ``amount`` while at
        least one unit is left; one asking for nothing is decided as any other."""
        if amount == 0:
            return (*self.check(now, 0), 0)
        if self.limit.capacity < 1:
            return "exceeds_capacity", NEVER, 0
        take = min(amount, max(self.limit.capacity - self.used(now), 0))
        if take >= 1:
            return None, None, take
        return (*self.check(now, 1), 0)

    def take(self, rid: str, now: int, amount: int) -> None:
        self.events.append(Event(rid, now, now // self.g, amount))

    def set_amount(self, rid: str, amount: int) -> None:
        for e in self.events:
            if e.rid == rid:
                e.amount = amount


@dataclass
class LeaseModel:
    limit: Concurrency
    leases: dict[str, int] = field(default_factory=dict)  # rid -> expiry

    def purge(self, now: int) -> None:
        self.leases = {rid: exp for rid, exp in self.leases.items() if exp > now}

    def live(self, now: int) -> int:
        return sum(1 for exp in self.leases.values() if exp > now)

    def reset(self, now: int, used: int) -> int:
        if used < self.limit.capacity or used == 0:
            return 0
        return max(min(self.leases.values()) - now, 0)

    def check(self, now: int) -> tuple[str | None, int | None]:
        if self.limit.capacity < 1:
            return "exceeds_capacity", NEVER
        if len(self.leases) + 1 <= self.limit.capacity:
            return None, None
        return "no_free_slot", max(min(self.leases.values()) - now, 0)

    def renew(self, rid: str, now: int) -> bool:
        if rid not in self.leases:
            return False
        self.leases[rid] = now + self.limit.ttl_ms
        return True


@dataclass
class BudgetModel:
    limit: Budget
    tz: ZoneInfo
    used: dict[int, int] = field(default_factory=dict)  # period start -> spent + held

    def period(self, now: int) -> tuple[int, int]:
        return period_bounds(self.limit.period, now, self.tz)  # type: ignore[arg-type]

    def current(self, now: int) -> int:
        return self.used.get(self.period(now)[0], 0)

    def check(self, now: int, amount: int) -> tuple[str | None, int | None]:
        cap, used = self.limit.capacity, self.current(now)
        if amount > cap:
            return "exceeds_capacity", NEVER
        if used >= cap or used + amount > cap:
            return "budget_exhausted", self.period(now)[1] - now
        return None, None

    def check_capped(self, now: int, amount: int) -> tuple[str | None, int | None, int]:
        """A capped request: (reason, retry, what it holds), as for a window."""
        if amount == 0:
            return (*self.check(now, 0), 0)
        if self.limit.capacity < 1:
            return "exceeds_capacity", NEVER, 0
        take = min(amount, max(self.limit.capacity - self.current(now), 0))
        if take >= 1:
            return None, None, take
        return "budget_exhausted", self.period(now)[1] - now, 0

    def add(self, start: int, amount: int) -> None:
        self.used[start] = self.used.get(start, 0) + amount


@dataclass
class ShareModel:
    """A share of a total window (``SharedWindow``): its own window held to its share, which it
    may pass, borrowing, while the total after the request stays within the saturation level
    less the unused part of every other waiting share. ``board`` is shared by all shares of one
    total: share key -> (waiting until, share); ``peers`` their own windows by key."""

    own: WindowModel
    total: WindowModel
    board: dict[str, tuple[int, int]]
    peers: dict[str, WindowModel]

    @property
    def share(self) -> int:
        return self.own.limit.capacity

    def protected(self, now: int) -> int:
        return sum(
            max(share - self.peers[key].used(now), 0)
            for key, (until, share) in self.board.items()
            if key != self.own.limit.key and until > now
        )

    def level(self, now: int) -> int:
        saturation = self.own.limit.saturation  # type: ignore[attr-defined]
        return min(saturation, self.total.limit.capacity - self.protected(now))

    def room(self, now: int) -> int:
        return max(self.share - self.own.used(now), self.level(now) - self.total.used(now))

    def most(self) -> int:
        saturation = self.own.limit.saturation  # type: ignore[attr-defined]
        return max(self.share, min(saturation, self.total.limit.capacity))

    def retry(self, now: int, amount: int) -> int:
        if amount <= self.share:
            return self.own.check(now, amount)[1]  # type: ignore[return-value]
        level, total = self.level(now), self.total
        for t in sorted({total.frees_at(e.bucket) for e in total.counted(now)}):
            if total.used(t) + amount <= level:
                return t - now
        return total.frees_at(now // total.g) - now

    def check(self, now: int, amount: int) -> tuple[str | None, int | None]:
        if amount > self.most():
            return "exceeds_capacity", NEVER
        if amount <= self.room(now):
            return None, None
        return "share_full", self.retry(now, amount)

    def check_capped(self, now: int, amount: int) -> tuple[str | None, int | None, int]:
        if amount == 0:
            return (*self.check(now, 0), 0)
        if self.most() < 1:
            return "exceeds_capacity", NEVER, 0
        take = min(amount, max(self.room(now), 0))
        if take >= 1:
            return None, None, take
        return "share_full", self.retry(now, 1), 0

    def mark_waiting(self, now: int, need: int) -> None:
        """After a refusal: within its share, but the total was full."""
        within = self.own.used(now) + need <= self.share
        if within and self.total.used(now) + need > self.total.limit.capacity:
            self.board[self.own.limit.key] = (now + self.total.w, self.share)


Check = tuple[str | None, int | None]  # (reason, retry-after ms or NEVER) of one limit


def reported(refusals: list[Check]) -> Check:
    """The refusal a decision reports of several: one that never frees, else the one that
    frees last (the first of equals)."""
    never = [c for c in refusals if c[1] is NEVER]
    return never[0] if never else max(refusals, key=lambda c: c[1] or 0)


@dataclass
class Admission:
    """One acquire decided with shadow limits: ``refusal`` by an enforced limit (nothing is
    taken), else admitted, ``would`` naming a shadow limit that would have refused, and
    ``taken`` the limits that count the request: all, or, when one would, the enforced ones."""

    refusal: Check | None
    would: Check | None
    taken: frozenset[int]


def admit(checks: dict[int, Check], shadow: frozenset[int]) -> Admission:
    """``checks``: each limit's own answer, by id. A shadow limit never refuses; when one
    would, no shadow limit counts the request (as a refusal would count nowhere)."""
    refusing = [c for i, c in checks.items() if c[0] is not None and i not in shadow]
    if refusing:
        return Admission(reported(refusing), None, frozenset())
    would = [c for i, c in checks.items() if c[0] is not None and i in shadow]
    if would:
        return Admission(None, reported(would), frozenset(checks) - shadow)
    return Admission(None, None, frozenset(checks))
