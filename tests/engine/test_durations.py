"""Duration strings and calendar-aligned budget periods."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from ratelimiter import Duration, InvalidDuration, parse_duration
from ratelimiter.engine.durations import period_bounds, time_zone


def ms(*args: int, tz: str = "UTC") -> int:
    return int(datetime(*args, tzinfo=ZoneInfo(tz)).timestamp() * 1000)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", Duration(30, "s")),
        ("30m", Duration(30, "m")),
        ("30h", Duration(30, "h")),
        ("30d", Duration(30, "d")),
        ("1w", Duration(1, "w")),
        ("1mo", Duration(1, "mo")),
        ("1y", Duration(1, "y")),
        ("daily", Duration(1, "d")),
        ("weekly", Duration(1, "w")),
        ("Monthly", Duration(1, "mo")),
        ("yearly", Duration(1, "y")),
        (" 2 mo ", Duration(2, "mo")),
    ],
)
def test_accepted_forms(text: str, expected: Duration) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "0d", "-1d", "1.5h", "3 months", "1M", "fortnightly"])
def test_bad_strings_list_the_accepted_forms(text: str) -> None:
    with pytest.raises(InvalidDuration) as raised:
        parse_duration(text)
    message = str(raised.value)
    assert repr(text) in message
    for form in ("30s", "30m", "30h", "30d", "1w", "1mo", "1y", "daily", "monthly"):
        assert form in message


def test_non_strings_are_refused() -> None:
    with pytest.raises(InvalidDuration, match="must be a string"):
        parse_duration(30)  # type: ignore[arg-type]


def test_window_lengths() -> None:
    assert parse_duration("1m").milliseconds == 60_000
    assert parse_duration("2w").milliseconds == 14 * 86_400_000
    with pytest.raises(InvalidDuration, match="no fixed length"):
        _ = parse_duration("1mo").milliseconds


def test_unknown_time_zone() -> None:
    with pytest.raises(InvalidDuration, match="unknown time zone 'Mars/Olympus'"):
        time_zone("Mars/Olympus")


UTC = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
KOLKATA = ZoneInfo("Asia/Kolkata")


def test_seconds_minutes_hours_align_on_the_epoch() -> None:
    at = ms(2027, 5, 17, 10, 15, 44)
    assert period_bounds(parse_duration("30s"), at, BERLIN) == (at - 14_000, at + 16_000)
    assert period_bounds(parse_duration("1h"), at, UTC) == (
        ms(2027, 5, 17, 10),
        ms(2027, 5, 17, 11),
    )


def test_days_turn_over_at_local_midnight() -> None:
    at = ms(2027, 5, 17, 23, 30, tz="Asia/Kolkata")
    assert period_bounds(parse_duration("daily"), at, KOLKATA) == (
        ms(2027, 5, 17, tz="Asia/Kolkata"),
        ms(2027, 5, 18, tz="Asia/Kolkata"),
    )


def test_a_daylight_saving_day_is_23_hours_long() -> None:
    at = ms(2027, 3, 28, 12, tz="Europe/Berlin")
    start, end = period_bounds(parse_duration("1d"), at, BERLIN)
    assert end - start == 23 * 3_600_000


def test_weeks_start_on_monday() -> None:
    start, end = period_bounds(parse_duration("weekly"), ms(2027, 5, 20, 9), UTC)  # a Thursday
    assert (start, end) == (ms(2027, 5, 17), ms(2027, 5, 24))
    assert datetime.fromtimestamp(start / 1000, UTC).weekday() == 0


def test_months_start_on_the_first_in_the_zone() -> None:
    at = ms(2027, 2, 28, 23, 59, tz="Europe/Berlin")
    assert period_bounds(parse_duration("monthly"), at, BERLIN) == (
        ms(2027, 2, 1, tz="Europe/Berlin"),
        ms(2027, 3, 1, tz="Europe/Berlin"),
    )


def test_three_months_are_calendar_quarters() -> None:
    assert period_bounds(parse_duration("3mo"), ms(2027, 5, 17), UTC) == (
        ms(2027, 4, 1),
        ms(2027, 7, 1),
    )


def test_years_start_on_the_first_of_january() -> None:
    assert period_bounds(parse_duration("yearly"), ms(2027, 12, 31, 23), UTC) == (
        ms(2027, 1, 1),
        ms(2028, 1, 1),
    )


def test_multi_day_periods_count_from_1970() -> None:
    start, end = period_bounds(parse_duration("30d"), ms(2027, 5, 17), UTC)
    assert end - start == 30 * 86_400_000
    assert (start - ms(1970, 1, 1)) % (30 * 86_400_000) == 0


@pytest.mark.parametrize("text", ["30s", "7h", "1d", "3d", "1w", "1mo", "5mo", "1y"])
def test_periods_tile_time_without_gaps(text: str) -> None:
    duration = parse_duration(text)
    start, end = period_bounds(duration, ms(2027, 1, 1, 3, 4, 5, tz="Europe/Berlin"), BERLIN)
    for _ in range(30):
        next_start, next_end = period_bounds(duration, end, BERLIN)
        assert next_start == end and next_end > end
        assert period_bounds(duration, end - 1, BERLIN) == (start, end)
        start, end = next_start, next_end
