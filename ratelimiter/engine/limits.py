"""The three kinds of limit the engine enforces, validated before anything reaches Redis.

A limit is pure mechanism: a Redis key, a capacity and the amount one request takes. Which
limits a request meets (key, user, team, model...) is decided by the policy layer above.

``measure`` names the quantity a limit counts (``"tokens"``, ``"spend"``); settling a request
with ``{"tokens": 812}`` replaces the estimate in every limit with that measure. Limits
without a measure (a request counter, a lease) keep what they reserved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidLimit
from .durations import Duration, parse_duration

__all__ = [
    "Budget",
    "Concurrency",
    "Gate",
    "Limit",
    "SharedWindow",
    "SlidingWindow",
    "validate_limits",
]

# Integers above 2**53 lose precision in Lua's doubles.
MAX_AMOUNT = 2**53 - 1
DEFAULT_BUCKETS = 60
DEFAULT_LEASE_TTL_MS = 60_000
DEFAULT_BUDGET_RETENTION_MS = 2 * 86_400_000


def _new_token(limit: Any) -> None:
    """Give ``limit`` a token of its own: an object standing for every field of it but the amount
    and capped, shared only with its copies (``copy_with``), so that the engine can pack once what
    they have in common (frames.py). Set last, once the limit is checked."""
    object.__setattr__(limit, "token", object())


def _check_int(owner: str, name: str, value: Any, *, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidLimit(f"{owner}: {name} must be a whole number, got {value!r}")
    if not minimum <= value <= MAX_AMOUNT:
        raise InvalidLimit(f"{owner}: {name} must be between {minimum} and 2**53-1, got {value}")


def is_amount(value: Any) -> bool:
    """Whether ``value`` is a whole number the engine counts exactly (0 to 2**53-1)."""
    return type(value) is int and 0 <= value <= MAX_AMOUNT


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidLimit(f"{owner}: {name} must be true or false, got {value!r}")


def _check_key(owner: str, key: Any) -> None:
    if not isinstance(key, str) or not key or "\0" in key:
        raise InvalidLimit(f"{owner}: key must be a non-empty string without NUL, got {key!r}")


@dataclass(frozen=True, slots=True)
class SlidingWindow:
    """At most ``capacity`` units in any window of ``window``; a request takes ``amount``.

    The window is kept in ``buckets`` buckets. It never over-admits; it may under-admit by
    at most what the oldest bucket holds (1/``buckets`` of the window's traffic).

    ``capped``: the request takes up to ``amount`` (an estimate it may not reach): it is
    admitted while at least one unit is left and takes ``min(amount, what is left)``, so the
    window is passed only by the excess of one such request's actual use at a time.
    """

    key: str
    capacity: int
    window: str | Duration
    amount: int = 1
    measure: str | None = None
    name: str = ""
    buckets: int = DEFAULT_BUCKETS
    capped: bool = False
    window_ms: int = field(init=False, repr=False, compare=False)
    bucket_ms: int = field(init=False, repr=False, compare=False)
    token: object = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        owner = f"sliding window {self.name or self.key!r}"
        _check_key(owner, self.key)
        _check_int(owner, "capacity", self.capacity)
        _check_int(owner, "amount", self.amount)
        _check_int(owner, "buckets", self.buckets, minimum=1)
        _check_bool(owner, "capped", self.capped)
        window = parse_duration(self.window)
        if window.is_calendar:
            raise InvalidLimit(f"{owner}: '{window}' has no fixed length; use s, m, h, d or w")
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "window_ms", window.milliseconds)
        object.__setattr__(self, "bucket_ms", max(1, -(-window.milliseconds // self.buckets)))
        _new_token(self)

    def with_amount(self, amount: int, capped: bool | None = None) -> SlidingWindow:
        """The same limit for a request of another size (checks only the new amount), capped
        or not when ``capped`` is given."""
        return _with_amount(self, amount, capped)


@dataclass(frozen=True, slots=True)
class SharedWindow(SlidingWindow):
    """A share of a total window: its own sliding window of ``capacity`` (the share) over the
    ``SlidingWindow`` keyed ``total_key``, which the same request also meets.

    It admits while its own window stays within the share, or, borrowing, while the total after
    the request stays at or below ``saturation`` (units, at most the total's capacity) and leaves
    room for the unused part of every other share of that total that is waiting: one whose
    request within its share found the total full, in the last total window. So below the
    saturation level anyone may use what is free; above it each share is held to its own; and
    a waiting share's unused part is never borrowed. Settling adjusts it as a window.
    Every share of one total must live in the total's Cluster slot (its hash tag).
    """

    total_key: str = ""
    saturation: int = 0

    def __post_init__(self) -> None:
        SlidingWindow.__post_init__(self)
        owner = f"shared window {self.name or self.key!r}"
        _check_key(f"{owner}: total", self.total_key)
        if self.total_key == self.key:
            raise InvalidLimit(f"{owner}: total_key must name another window")
        _check_int(owner, "saturation", self.saturation)
        _new_token(self)

    def with_amount(self, amount: int, capped: bool | None = None) -> SharedWindow:
        return _with_amount(self, amount, capped)


@dataclass(frozen=True, slots=True)
class Concurrency:
    """At most ``capacity`` requests in flight; each holds a lease that lapses after ``ttl_ms``
    unless renewed, so a crashed holder frees its slot by itself."""

    key: str
    capacity: int
    ttl_ms: int = DEFAULT_LEASE_TTL_MS
    name: str = ""
    token: object = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        owner = f"concurrency limit {self.name or self.key!r}"
        _check_key(owner, self.key)
        _check_int(owner, "capacity", self.capacity)
        _check_int(owner, "ttl_ms", self.ttl_ms, minimum=1)
        _new_token(self)

    @property
    def amount(self) -> int:
        return 1

    @property
    def measure(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Budget:
    """At most ``capacity`` (e.g. nano-dollars) per ``period``; a request holds ``amount``.

    Admission needs spent + held + amount <= capacity, so a budget is only ever passed by
    what actual costs exceed their estimates. Each period has its own counter, kept for
    ``retention_ms`` after the period ends.

    ``capped``: the request holds up to ``amount``, as a capped ``SlidingWindow`` takes: it is
    admitted while anything is left and holds at most what is left.
    """

    key: str
    capacity: int
    period: str | Duration
    amount: int
    measure: str | None = "spend"
    name: str = ""
    retention_ms: int = DEFAULT_BUDGET_RETENTION_MS
    capped: bool = False
    token: object = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        owner = f"budget {self.name or self.key!r}"
        _check_key(owner, self.key)
        _check_int(owner, "capacity", self.capacity)
        _check_int(owner, "amount", self.amount)
        _check_int(owner, "retention_ms", self.retention_ms)
        _check_bool(owner, "capped", self.capped)
        object.__setattr__(self, "period", parse_duration(self.period))
        _new_token(self)

    def with_amount(self, amount: int, capped: bool | None = None) -> Budget:
        """The same budget for a request of another cost (checks only the new amount), capped
        or not when ``capped`` is given."""
        return _with_amount(self, amount, capped)


def _with_amount(limit: Any, amount: int, capped: bool | None) -> Any:
    # The policy layer builds limits on every request; copying skips re-validating the rest.
    if not is_amount(amount):
        _check_int(f"limit {limit.name or limit.key!r}", "amount", amount)
    return copy_with(limit, amount, limit.capped if capped is None else capped)


def copy_with(limit: Any, amount: int, capped: bool) -> Any:
    """``limit`` (a sliding window, shared window or budget) holding ``amount``, ``capped``,
    unchecked: the caller has checked ``amount``. The copy keeps ``limit``'s token: a copy whose
    other fields are then changed must be given a new one."""
    return _COPIERS[type(limit)](limit, amount, capped)


@dataclass(frozen=True, slots=True)
class Gate:
    """Admits only while ``key`` does not exist: a block that takes effect in the same atomic
    step as every other limit, so no process can admit past it once it is set."""

    key: str
    name: str = ""
    token: object = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_key(f"gate {self.name or self.key!r}", self.key)
        _new_token(self)

    capacity = 1
    amount = 0
    measure = None


Limit = SlidingWindow | Concurrency | Budget | Gate
_KINDS = (SlidingWindow, Concurrency, Budget, Gate)


def validate_limits(limits: Any, *, allow_empty: bool = False) -> tuple[Limit, ...]:
    """Check a list of limits as a whole: non-empty, known kinds, no key used twice."""
    if isinstance(limits, (str, bytes)) or not hasattr(limits, "__iter__"):
        raise InvalidLimit(f"limits must be a list of limits, got {type(limits).__name__}")
    limits = tuple(limits)
    if not limits and not allow_empty:
        raise InvalidLimit("limits must not be empty: a request has to meet at least one limit")
    seen: set[str] = set()
    for limit in limits:
        if not isinstance(limit, _KINDS):
            raise InvalidLimit(
                f"unknown limit kind {type(limit).__name__}: use SlidingWindow, Concurrency, "
                "Budget or Gate"
            )
        if limit.key in seen:
            raise InvalidLimit(f"key {limit.key!r} is used by two limits of one request")
        seen.add(limit.key)
    _check_totals(limits)
    return limits


def _check_totals(limits: tuple[Limit, ...]) -> None:
    """Every shared window's total is a plain sliding window of the same request."""
    windows = {
        limit.key
        for limit in limits
        if isinstance(limit, SlidingWindow) and not isinstance(limit, SharedWindow)
    }
    for limit in limits:
        if isinstance(limit, SharedWindow) and limit.total_key not in windows:
            raise InvalidLimit(
                f"shared window {limit.name or limit.key!r}: its total {limit.total_key!r} "
                "must be a SlidingWindow of the same request"
            )


def _slot_names(cls: type) -> tuple[str, ...]:
    # a subclass's __slots__ lists only its own fields
    return tuple(n for c in reversed(cls.__mro__) for n in getattr(c, "__slots__", ()))


def _copier(cls: type) -> Any:
    """A function copying a ``cls`` with another amount and capped, one line per slot set
    through its descriptor: a third of the time of a loop over the slots, and a request's
    limits are copied for every request. Written from the class's slots, so a field added
    to it is copied too."""
    names = _slot_names(cls)
    given = {"amount": "amount", "capped": "capped"}
    body = "".join(f"    _{n}(clone, {given.get(n, f'limit.{n}')})\n" for n in names)
    source = f"def copy(limit, amount, capped):\n    clone = _new(_cls)\n{body}    return clone\n"
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    namespace.update({f"_{n}": getattr(cls, n).__set__ for n in names})
    exec(source, namespace)  # the source holds only the class's own slot names
    return namespace["copy"]


_COPIERS = {cls: _copier(cls) for cls in (SlidingWindow, SharedWindow, Budget)}
