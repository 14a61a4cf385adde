"""Time of use, billing periods and local days, and the parsers the configuration loader calls. Pure.

Intervals are aligned to UTC; tariffs, days and billing periods are local. Everything local is judged
with ``zoneinfo`` from a UTC instant, so DST is never guessed: a local day is 23 or 25 hours long on a
transition day, and a local time that does not exist (spring forward) is simply never seen.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Sequence
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from bridge.core.model import TariffConfig

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()
_FULL_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAYS = {**{n: i for i, n in enumerate(DAY_NAMES)}, **{n: i for i, n in enumerate(_FULL_DAY_NAMES)}}
_MINUTES_PER_DAY = 1440


class TariffPlan:
    """Which time-of-use tariff an interval falls in, judged at the interval's start in local time.

    Tariffs are tried in configuration order and the first that matches wins, so a catch-all (no days,
    no times) belongs last. A period whose end is not after its start wraps over midnight, and the part
    after midnight belongs to the day the period *started*: ``mon-fri 22:00-06:00`` covers Friday 22:00
    to Saturday 06:00 but not Monday 00:00-06:00 (that night started on Sunday). This is how a tariff
    sheet reads ("weeknights from 22:00"). ``end == start`` is a full 24 hours from ``start``.
    A missing ``start`` means midnight, a missing ``end`` means 24:00.
    """

    def __init__(self, tariffs: Sequence[TariffConfig], timezone: str):
        self.tariffs = tuple(tariffs)
        self.zone = ZoneInfo(timezone)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tariffs)

    def tariff_at(self, utc_start: int) -> str | None:
        """The tariff of the interval starting at ``utc_start``; None when none matches."""
        local = datetime.fromtimestamp(utc_start, self.zone)
        # whole minutes suffice: the bounds are whole minutes, so floor(t) >= start <=> t >= start
        minute = local.hour * 60 + local.minute
        weekday = local.weekday()
        for tariff in self.tariffs:
            if _matches(tariff, weekday, minute):
                return tariff.name
        return None


def _matches(tariff: TariffConfig, weekday: int, minute: int) -> bool:
    days = tariff.days
    start = 0 if tariff.start is None else tariff.start
    end = _MINUTES_PER_DAY if tariff.end is None else tariff.end
    if start < end:
        return start <= minute < end and (days is None or weekday in days)
    if minute >= start:  # the evening part: it started today
        return days is None or weekday in days
    if minute < end:  # the morning part: it started yesterday
        return days is None or (weekday - 1) % 7 in days
    return False


# ------------------------------------------------------------------------------ local days and periods


def _midnight(day: date, zone: ZoneInfo) -> int:
    """UTC epoch seconds of the first instant of the local ``day``.

    fold=0 takes the offset before a transition; where midnight itself is skipped (America/Santiago,
    America/Havana) that maps 00:00 to the transition instant, which is the day's first instant.
    """
    return int(datetime(day.year, day.month, day.day, tzinfo=zone).timestamp())


def local_day(utc: int, timezone: str) -> tuple[int, int]:
    """[start, end) UTC of the local calendar day containing ``utc`` (23 or 25 hours on DST days)."""
    zone = ZoneInfo(timezone)
    day = datetime.fromtimestamp(utc, zone).date()
    return _midnight(day, zone), _midnight(day + timedelta(days=1), zone)


def _check_start_day(start_day: int) -> None:
    # 29..31 do not exist every month; a period starting "on the 31st" has no good answer
    if not 1 <= start_day <= 28:
        raise ValueError(f"a billing period starts on a day of the month from 1 to 28, got {start_day}")


def _add_month(year: int, month: int, months: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + months
    return index // 12, index % 12 + 1


def billing_period(utc: int, timezone: str, start_day: int = 1) -> tuple[int, int]:
    """[start, end) UTC of the billing period containing ``utc``: local midnight of ``start_day`` of a
    month to local midnight of ``start_day`` of the next (the calendar month by default)."""
    _check_start_day(start_day)
    zone = ZoneInfo(timezone)
    local = datetime.fromtimestamp(utc, zone)
    year, month = local.year, local.month
    if local.day < start_day:  # still in the period that began last month
        year, month = _add_month(year, month, -1)
    next_year, next_month = _add_month(year, month, 1)
    return (_midnight(date(year, month, start_day), zone),
            _midnight(date(next_year, next_month, start_day), zone))


def billing_periods(from_utc: int, to_utc: int, timezone: str,
                    start_day: int = 1) -> list[tuple[int, int]]:
    """The consecutive billing periods that overlap [from_utc, to_utc), in order (empty when to <= from);
    the first may start before ``from_utc`` and the last end after ``to_utc``."""
    periods: list[tuple[int, int]] = []
    if to_utc <= from_utc:
        return periods
    period = billing_period(from_utc, timezone, start_day)
    while period[0] < to_utc:
        periods.append(period)
        period = billing_period(period[1], timezone, start_day)
    return periods


# ------------------------------------------------------------------------------ parsers for the loader

_DAYS_HINT = "use mon … sun, a range such as mon-fri (fri-mon wraps), or a list such as sat,sun"


def parse_days(text: str) -> frozenset[int]:
    """Weekdays (0 = Monday) from "mon-fri", "sat,sun", "mon", "fri-mon" (a range may wrap); any case."""
    if not text.strip():
        raise ValueError(f"no days given; {_DAYS_HINT}")
    days: set[int] = set()
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            raise ValueError(f"empty day in {text!r}; {_DAYS_HINT}")
        ends = [part.strip() for part in item.split("-")]
        if len(ends) > 2:
            raise ValueError(f"{item!r} is not a day or a range of days; {_DAYS_HINT}")
        for end in ends:
            if end not in _DAYS:
                raise ValueError(f"unknown day {end!r} in {text!r}; {_DAYS_HINT}")
        first, last = _DAYS[ends[0]], _DAYS[ends[-1]]
        days.update((first + i) % 7 for i in range((last - first) % 7 + 1))
    return frozenset(days)


_CLOCK = re.compile(r"(\d{1,2}):(\d{2})")


def parse_clock(text: str) -> int:
    """Minutes after local midnight from "HH:MM" ("08:00" -> 480, "7:30" -> 450, "24:00" -> 1440)."""
    match = _CLOCK.fullmatch(text.strip())
    if match:
        hours, minutes = int(match[1]), int(match[2])
        if minutes < 60 and (hours < 24 or (hours == 24 and minutes == 0)):
            return hours * 60 + minutes
    raise ValueError(f"expected a time of day HH:MM from 00:00 to 24:00, got {text!r}")


_OPERATOR = re.compile(r"\s+([+-])\s+")
_FORMULA_HINT = "join meter names with ' + ' and ' - ', a space on each side, e.g. 'incomer - feeder1'"


def parse_formula(text: str, meters: Collection[str]) -> tuple[tuple[int, str], ...]:
    """(sign, meter) terms from "a + b - c". The operators need a space on each side because a meter
    name may contain '-' ("a-b - c" is meter a-b minus c). The formula starts with a name, every name
    is one of ``meters`` and appears once."""
    source = text.strip()
    if not source:
        raise ValueError(f"the formula is empty; {_FORMULA_HINT}")
    if re.match(r"[+-](\s|$)", source):
        raise ValueError(f"the formula {text!r} must start with a meter name, not {source[0]!r}")
    if re.search(r"\s[+-]$", source):
        raise ValueError(f"the formula {text!r} ends with {source[-1]!r}; a meter name must follow it")
    parts = _OPERATOR.split(source)  # name, op, name, op, name …
    signs = [1] + [1 if op == "+" else -1 for op in parts[1::2]]
    terms: list[tuple[int, str]] = []
    seen: set[str] = set()
    for sign, name in zip(signs, parts[::2]):
        if re.match(r"[+-]\s", name):
            raise ValueError(f"two operators in a row in {text!r}; {_FORMULA_HINT}")
        if re.search(r"\s", name):
            raise ValueError(f"{name!r} in {text!r} is not a meter name; {_FORMULA_HINT}")
        if name not in meters:
            close = sorted(difflib.get_close_matches(name, meters, n=3, cutoff=0.6))
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"no meter named {name!r} in the formula {text!r}{hint}")
        if name in seen:
            raise ValueError(f"meter {name!r} appears twice in the formula {text!r}")
        seen.add(name)
        terms.append((sign, name))
    return tuple(terms)
