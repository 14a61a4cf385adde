"""Time of use, local days and billing periods across DST transitions, and the config parsers
(bridge.energy.tariffs). Deterministic: fixed instants, the system's tz database."""
from __future__ import annotations

from collections import Counter
from datetime import datetime

import pytest

from bridge.core.model import TariffConfig
from bridge.energy.tariffs import (TariffPlan, billing_period, billing_periods, local_day, parse_clock,
                                   parse_days, parse_formula)

BERLIN, NEW_YORK = "Europe/Berlin", "America/New_York"
QUARTER = 900
HOUR = 3600
WEEKDAYS = frozenset(range(5))


def utc(text: str) -> int:
    """Epoch seconds of an ISO time with its offset ("2026-03-29T12:00+02:00", "…Z")."""
    return int(datetime.fromisoformat(text).timestamp())


def slots(zone: str, local_date: str) -> range:
    """The 15-minute UTC-aligned interval starts of a local day."""
    start, end = local_day(utc(f"{local_date}T12:00:00Z"), zone)
    return range(start, end, QUARTER)


def count(plan: TariffPlan, starts: range) -> Counter:
    return Counter(plan.tariff_at(s) for s in starts)


def plan(zone: str, *tariffs: TariffConfig) -> TariffPlan:
    return TariffPlan(tariffs, zone)


PEAK = TariffConfig("peak", WEEKDAYS, 8 * 60, 20 * 60)
DAY = TariffConfig("day", None, 8 * 60, 20 * 60)
NIGHT = TariffConfig("night", None, 22 * 60, 6 * 60)
REST = TariffConfig("rest")


# ------------------------------------------------------------------------------ local days


@pytest.mark.parametrize("zone, day, hours", [
    (BERLIN, "2026-03-29", 23), (BERLIN, "2026-10-25", 25), (BERLIN, "2026-03-30", 24),
    (NEW_YORK, "2026-03-08", 23), (NEW_YORK, "2026-11-01", 25), (NEW_YORK, "2026-07-01", 24),
])
def test_a_local_day_is_23_or_25_hours_on_dst_days(zone, day, hours):
    starts = slots(zone, day)
    assert (starts.stop - starts.start) == hours * HOUR
    assert len(starts) == hours * 4  # 92 on the short day, 100 on the long one


def test_local_day_boundaries_belong_to_the_day_they_start():
    start, end = local_day(utc("2026-03-29T12:00:00+02:00"), BERLIN)
    assert (start, end) == (utc("2026-03-29T00:00:00+01:00"), utc("2026-03-30T00:00:00+02:00"))
    assert local_day(start, BERLIN) == (start, end)
    assert local_day(end - 1, BERLIN) == (start, end)
    assert local_day(end, BERLIN)[0] == end


def test_a_day_whose_midnight_is_skipped_starts_at_the_transition():
    # America/Santiago springs forward at 24:00 on 2026-09-05: 2026-09-06 begins at 01:00 -03
    start, end = local_day(utc("2026-09-06T12:00:00-03:00"), "America/Santiago")
    assert start == utc("2026-09-06T01:00:00-03:00")
    assert end - start == 23 * HOUR
    assert local_day(start - 1, "America/Santiago")[1] == start


# ------------------------------------------------------------------------------ time of use


@pytest.mark.parametrize("zone, day, expected", [
    (BERLIN, "2026-03-29", {"day": 48, "night": 28, "rest": 16}),  # 02:00-03:00 never happens
    (BERLIN, "2026-10-25", {"day": 48, "night": 36, "rest": 16}),  # 02:00-03:00 happens twice
    (NEW_YORK, "2026-03-08", {"day": 48, "night": 28, "rest": 16}),
    (NEW_YORK, "2026-11-01", {"day": 48, "night": 36, "rest": 16}),
    (BERLIN, "2026-03-28", {"day": 48, "night": 32, "rest": 16}),
])
def test_intervals_on_dst_days_get_the_local_tariff(zone, day, expected):
    assert count(plan(zone, DAY, NIGHT, REST), slots(zone, day)) == expected


@pytest.mark.parametrize("zone, normal, after_dst", [
    (BERLIN, "2026-03-23", "2026-03-30"), (BERLIN, "2026-10-19", "2026-10-26"),
    (NEW_YORK, "2026-03-02", "2026-03-09"), (NEW_YORK, "2026-10-26", "2026-11-02"),
])
def test_weekday_peak_is_48_quarters_on_either_side_of_a_transition(zone, normal, after_dst):
    p = plan(zone, PEAK, REST)
    assert count(p, slots(zone, normal))["peak"] == 48
    assert count(p, slots(zone, after_dst))["peak"] == 48


def test_peak_follows_local_time_not_utc():
    p = plan(BERLIN, PEAK, REST)
    # Monday before the change: 08:00 CET is 07:00 UTC; Monday after: 08:00 CEST is 06:00 UTC
    assert p.tariff_at(utc("2026-03-23T06:45:00Z")) == "rest"
    assert p.tariff_at(utc("2026-03-23T07:00:00Z")) == "peak"
    assert p.tariff_at(utc("2026-03-30T05:45:00Z")) == "rest"
    assert p.tariff_at(utc("2026-03-30T06:00:00Z")) == "peak"
    assert p.tariff_at(utc("2026-03-30T17:45:00Z")) == "peak"  # 19:45 local, the last peak quarter
    assert p.tariff_at(utc("2026-03-30T18:00:00Z")) == "rest"
    week = range(utc("2026-03-23T00:00:00+01:00"), utc("2026-03-30T00:00:00+02:00"), QUARTER)
    assert count(p, week) == {"peak": 5 * 48, "rest": 7 * 96 - 4 - 5 * 48}  # the week is 167 h


def test_a_period_over_midnight_belongs_to_the_day_it_started():
    weeknights = TariffConfig("weeknight", WEEKDAYS, 22 * 60, 6 * 60)
    p = plan(BERLIN, weeknights, REST)
    assert p.tariff_at(utc("2026-03-27T23:00:00+01:00")) == "weeknight"  # Friday night …
    assert p.tariff_at(utc("2026-03-28T05:45:00+01:00")) == "weeknight"  # … into Saturday morning
    assert p.tariff_at(utc("2026-03-28T06:00:00+01:00")) == "rest"
    assert p.tariff_at(utc("2026-03-29T22:00:00+02:00")) == "rest"  # Sunday evening: not a weeknight
    assert p.tariff_at(utc("2026-03-30T03:00:00+02:00")) == "rest"  # Monday 03:00 started on Sunday
    assert p.tariff_at(utc("2026-03-31T03:00:00+02:00")) == "weeknight"  # Tuesday 03:00 started Monday
    assert count(p, slots(BERLIN, "2026-03-28"))["weeknight"] == 24  # Saturday 00:00-06:00


def test_end_equal_to_start_is_a_full_day_from_start():
    monday_from_8 = TariffConfig("m", frozenset({0}), 480, 480)
    p = plan(BERLIN, monday_from_8)
    assert p.tariff_at(utc("2026-03-30T07:45:00+02:00")) is None
    assert p.tariff_at(utc("2026-03-30T08:00:00+02:00")) == "m"
    assert p.tariff_at(utc("2026-03-31T07:45:00+02:00")) == "m"
    assert p.tariff_at(utc("2026-03-31T08:00:00+02:00")) is None


def test_first_match_wins_and_a_catch_all_takes_the_rest():
    only = plan(NEW_YORK, TariffConfig("flat"))
    assert count(only, slots(NEW_YORK, "2026-03-08")) == {"flat": 92}
    weekend = TariffConfig("weekend", frozenset({5, 6}))
    p = plan(BERLIN, weekend, PEAK, REST)
    assert count(p, slots(BERLIN, "2026-03-29")) == {"weekend": 92}
    assert p.names == ("weekend", "peak", "rest")


def test_no_tariff_or_no_match_is_none():
    assert plan(BERLIN).tariff_at(utc("2026-03-30T09:00:00+02:00")) is None
    p = plan(BERLIN, PEAK)
    assert p.tariff_at(utc("2026-03-29T09:00:00+02:00")) is None  # Sunday
    assert p.tariff_at(utc("2026-03-30T09:00:00+02:00")) == "peak"


# ------------------------------------------------------------------------------ billing periods


@pytest.mark.parametrize("zone, month, hours", [
    (BERLIN, "2026-03", 743), (BERLIN, "2026-10", 745), (BERLIN, "2026-04", 720),
    (NEW_YORK, "2026-03", 743), (NEW_YORK, "2026-11", 721), (NEW_YORK, "2026-02", 672),
])
def test_calendar_month_lengths(zone, month, hours):
    start, end = billing_period(utc(f"{month}-15T12:00:00Z"), zone)
    assert end - start == hours * HOUR
    assert billing_period(start, zone) == (start, end)
    assert billing_period(end - 1, zone) == (start, end)
    assert billing_period(start - 1, zone)[1] == start


def test_march_in_berlin_starts_and_ends_at_local_midnight():
    assert billing_period(utc("2026-03-29T02:30:00Z"), BERLIN) == (
        utc("2026-03-01T00:00:00+01:00"), utc("2026-04-01T00:00:00+02:00"))


def test_a_billing_day_of_15():
    assert billing_period(utc("2026-03-20T12:00:00Z"), BERLIN, 15) == (
        utc("2026-03-15T00:00:00+01:00"), utc("2026-04-15T00:00:00+02:00"))  # 743 h: it spans the change
    start, end = billing_period(utc("2026-03-14T22:59:59Z"), BERLIN, 15)  # 23:59:59 local on the 14th
    assert (start, end) == (utc("2026-02-15T00:00:00+01:00"), utc("2026-03-15T00:00:00+01:00"))
    assert end - start == 28 * 24 * HOUR
    assert billing_period(utc("2026-03-14T23:00:00Z"), BERLIN, 15)[0] == end


def test_a_period_over_new_year():
    assert billing_period(utc("2026-12-31T23:30:00-05:00"), NEW_YORK) == (
        utc("2026-12-01T00:00:00-05:00"), utc("2027-01-01T00:00:00-05:00"))
    assert billing_period(utc("2027-01-10T00:00:00-05:00"), NEW_YORK, 15) == (
        utc("2026-12-15T00:00:00-05:00"), utc("2027-01-15T00:00:00-05:00"))


def test_billing_periods_cover_the_range():
    year = billing_periods(utc("2026-01-01T00:00:00+01:00"), utc("2027-01-01T00:00:00+01:00"), BERLIN)
    assert len(year) == 12
    assert all(a[1] == b[0] for a, b in zip(year, year[1:]))
    assert year[-1][1] - year[0][0] == 365 * 24 * HOUR
    mid = billing_periods(utc("2026-03-20T00:00:00Z"), utc("2026-05-01T00:00:00Z"), BERLIN, 15)
    assert mid == [(utc("2026-03-15T00:00:00+01:00"), utc("2026-04-15T00:00:00+02:00")),
                   (utc("2026-04-15T00:00:00+02:00"), utc("2026-05-15T00:00:00+02:00"))]
    assert billing_periods(5, 5, BERLIN) == []


@pytest.mark.parametrize("day", [0, 29, 31])
def test_a_billing_day_past_28_is_refused(day):
    with pytest.raises(ValueError, match="1 to 28"):
        billing_period(0, BERLIN, day)


# ------------------------------------------------------------------------------ parsers


@pytest.mark.parametrize("text, days", [
    ("mon-fri", {0, 1, 2, 3, 4}), ("sat,sun", {5, 6}), ("mon-sun", set(range(7))), ("mon", {0}),
    ("MON-Fri", {0, 1, 2, 3, 4}), ("fri-mon", {4, 5, 6, 0}), (" sat , sun ", {5, 6}),
    ("mon - wed", {0, 1, 2}),
    ("mon-tue,thu", {0, 1, 3}), ("sunday", {6}), ("sun-sun", {6}),
])
def test_parse_days(text, days):
    assert parse_days(text) == frozenset(days)


@pytest.mark.parametrize("text, message", [
    ("", "no days"), ("xyz", "unknown day 'xyz'"), ("mon-", "unknown day ''"), ("mon-tue-wed", "not a day"),
    ("mon,,tue", "empty day"), ("mo", "unknown day 'mo'"),
])
def test_parse_days_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_days(text)


@pytest.mark.parametrize("text, minutes", [
    ("08:00", 480), ("24:00", 1440), ("7:30", 450), ("00:00", 0), ("23:59", 1439), (" 22:00 ", 1320),
])
def test_parse_clock(text, minutes):
    assert parse_clock(text) == minutes


@pytest.mark.parametrize("text", ["24:01", "25:00", "7:60", "8", "08:00:00", "", "ab:cd", "-1:00", "008:00",
                                  "8h"])
def test_parse_clock_errors(text):
    with pytest.raises(ValueError, match="HH:MM"):
        parse_clock(text)


METERS = {"incomer", "feeder1", "feeder2", "a-b", "c", "a", "b"}


@pytest.mark.parametrize("text, terms", [
    ("a-b - c", ((1, "a-b"), (-1, "c"))),
    ("incomer - feeder1 - feeder2", ((1, "incomer"), (-1, "feeder1"), (-1, "feeder2"))),
    ("feeder1 + feeder2", ((1, "feeder1"), (1, "feeder2"))),
    ("  a   +  b - c ", ((1, "a"), (1, "b"), (-1, "c"))),
    ("incomer", ((1, "incomer"),)),
])
def test_parse_formula(text, terms):
    assert parse_formula(text, METERS) == terms


@pytest.mark.parametrize("text, message", [
    ("incomer - feeder3", r"no meter named 'feeder3'.*did you mean 'feeder1', 'feeder2'\?"),
    ("incomer - zzz", r"no meter named 'zzz' in the formula 'incomer - zzz'$"),
    ("a - b - a", "'a' appears twice"),
    ("- a", "must start with a meter name"),
    ("a -", "ends with '-'"),
    ("a -b", "'a -b' .* is not a meter name"),
    ("a + + b", "two operators in a row"),
    ("", "empty"),
    ("   ", "empty"),
])
def test_parse_formula_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_formula(text, METERS)
