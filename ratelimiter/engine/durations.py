"""Durations in LiteLLM's notation and the calendar periods that budgets reset on.

A budget period always contains "now" and ends exactly at a boundary, so a counter resets by
moving to the next period's key, never by a job. Boundaries:

- ``Ns``, ``Nm``, ``Nh``: fixed multiples of the length counted from the Unix epoch (UTC),
  so ``1h`` turns over on the hour and ``30s`` at :00 and :30;
- ``Nd`` (``daily`` = ``1d``): at local midnight, every N days counted from 1970-01-01;
- ``Nw`` (``weekly`` = ``1w``): at local midnight on Monday, every N weeks from 1970-01-05;
- ``Nmo`` (``monthly`` = ``1mo``): at local midnight on the 1st, every N months from
  January 1970 (``3mo`` gives calendar quarters);
- ``Ny`` (``yearly`` = ``1y``): at local midnight on 1 January, every N years from 1970.

"Local" is the configured IANA time zone, daylight saving included.

No duration is longer than 100 years (``MAX_COUNTS``): every period must start and end on a
date Python can represent, and ``policy.NEVER_RESETS`` ("100y") is the longest one we use.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..errors import InvalidDuration

__all__ = ["MAX_COUNTS", "Duration", "expiry_ms", "parse_duration", "period_bounds", "time_zone"]

_FIXED_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_NAMED = {"daily": "1d", "weekly": "1w", "monthly": "1mo", "yearly": "1y"}
_PATTERN = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w|mo|y)\s*$", re.ASCII)
# The largest count of each unit: 100 years of 365.25 days, in whole units.
MAX_COUNTS = {
    "s": 3_155_760_000,
    "m": 52_596_000,
    "h": 876_600,
    "d": 36_525,
    "w": 5_217,
    "mo": 1_200,
    "y": 100,
}
_LONGEST = ", ".join(f"{count}{unit}" for unit, count in reversed(MAX_COUNTS.items()))
_SHOWN = 64  # characters of a bad value quoted back in an error message
_EPOCH_DAY = date(1970, 1, 1)
_EPOCH_MONDAY = date(1970, 1, 5)

ACCEPTED_FORMS = (
    "a positive whole number followed by s, m, h, d, w, mo or y (e.g. 30s, 30m, 30h, 30d, "
    "1w, 1mo, 1y), or one of daily, weekly, monthly, yearly"
)


@dataclass(frozen=True, slots=True)
class Duration:
    """A count of one unit: ``Duration(30, "d")``."""

    count: int
    unit: str

    def __post_init__(self) -> None:
        if self.unit not in MAX_COUNTS:
            raise InvalidDuration(f"unknown duration unit {shown(self.unit)}: use {ACCEPTED_FORMS}")
        if not 1 <= self.count <= MAX_COUNTS[self.unit]:
            # The count itself is not quoted: str() of a huge int may be refused.
            raise InvalidDuration(
                f"a duration counts 1 to {MAX_COUNTS[self.unit]} {self.unit}: "
                f"the longest is 100 years ({_LONGEST})"
            )

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"

    @property
    def is_calendar(self) -> bool:
        """Months and years have no fixed length."""
        return self.unit in ("mo", "y")

    @property
    def milliseconds(self) -> int:
        """Fixed length, for sliding windows. Days count as 24 h here."""
        if self.is_calendar:
            raise InvalidDuration(
                f"'{self}' has no fixed length; a sliding window needs s, m, h, d or w"
            )
        return self.count * _FIXED_MS[self.unit]


def shown(value: object) -> str:
    """A client's value for an error message, cut short: a 4 MB value is not echoed."""
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}... ({len(text)} characters)"


def parse_duration(text: str | Duration) -> Duration:
    """Parse ``30s``, ``30m``, ``30h``, ``30d``, ``1w``, ``1mo``, ``1y``, ``daily`` and the like,
    up to 100 years."""
    if isinstance(text, Duration):
        return text
    if not isinstance(text, str):
        raise InvalidDuration(f"duration must be a string, got {shown(text)}; use {ACCEPTED_FORMS}")
    match = _PATTERN.match(_NAMED.get(text.strip().lower(), text))
    if not match or not match.group(1).strip("0"):
        raise InvalidDuration(f"invalid duration {shown(text)}: use {ACCEPTED_FORMS}")
    digits, unit = match.group(1).lstrip("0"), match.group(2)
    # Compare digit counts first: int() of thousands of digits is slow or refused.
    if len(digits) > len(str(MAX_COUNTS[unit])) or int(digits) > MAX_COUNTS[unit]:
        raise InvalidDuration(
            f"duration {shown(text)} is too long: the longest is 100 years ({_LONGEST})"
        )
    return Duration(int(digits), unit)


@lru_cache(maxsize=64)
def time_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidDuration(
            f"unknown time zone {name!r}: use an IANA name such as 'UTC' or 'Europe/Berlin'"
        ) from exc


def _midnight_ms(day: date, tz: ZoneInfo) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp() * 1000)


def _start_date(duration: Duration, today: date) -> date:
    n = duration.count
    if duration.unit == "d":
        return _EPOCH_DAY + timedelta(days=(today - _EPOCH_DAY).days // n * n)
    if duration.unit == "w":
        return _EPOCH_MONDAY + timedelta(weeks=(today - _EPOCH_MONDAY).days // 7 // n * n)
    if duration.unit == "mo":
        index = ((today.year - 1970) * 12 + today.month - 1) // n * n
        return date(1970 + index // 12, index % 12 + 1, 1)
    return date(1970 + (today.year - 1970) // n * n, 1, 1)


def _next_date(duration: Duration, start: date) -> date:
    n = duration.count
    if duration.unit == "d":
        return start + timedelta(days=n)
    if duration.unit == "w":
        return start + timedelta(weeks=n)
    if duration.unit == "mo":
        index = (start.year - 1970) * 12 + start.month - 1 + n
        return date(1970 + index // 12, index % 12 + 1, 1)
    return date(start.year + n, 1, 1)


def expiry_ms(duration: Duration, now_ms: int) -> int:
    """When something that lasts ``duration`` from ``now_ms`` ends: months and years on the
    same day of the month in UTC (the 31st becomes the month's last day)."""
    if not duration.is_calendar:
        return now_ms + duration.milliseconds
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    months = duration.count * (12 if duration.unit == "y" else 1)
    index = now.year * 12 + now.month - 1 + months
    year, month = divmod(index, 12)
    day = min(now.day, calendar.monthrange(year, month + 1)[1])
    return int(now.replace(year=year, month=month + 1, day=day).timestamp() * 1000)


def period_bounds(duration: Duration, at_ms: int, tz: ZoneInfo) -> tuple[int, int]:
    """Start and end (ms since the epoch) of the period of ``duration`` that contains ``at_ms``."""
    if duration.unit in ("s", "m", "h"):
        length = duration.milliseconds
        start = at_ms // length * length
        return start, start + length
    today = datetime.fromtimestamp(at_ms / 1000, tz).date()
    first = _start_date(duration, today)
    start, end = _midnight_ms(first, tz), _midnight_ms(_next_date(duration, first), tz)
    # A zone whose midnight is skipped or repeated can put at_ms a hair outside; step over.
    if at_ms < start:
        return period_bounds(duration, start - 1, tz)
    if at_ms >= end:
        return period_bounds(duration, end, tz)
    return start, end
