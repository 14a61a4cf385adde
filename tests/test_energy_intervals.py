"""bridge.energy.intervals: readings -> clock-aligned intervals, checked against an independent oracle
(property-based) and on worked examples a billing clerk would recognise."""
from __future__ import annotations

import bisect
import json
import math
import struct
from dataclasses import dataclass, field
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.energy.intervals import MICRO, MeterIntervals, micro
from bridge.energy.types import COMPLETE, ESTIMATED, RESET, ROLLOVER, STATUSES, Counter, Evidence, Interval, Reading

IMP, EXP = "import_active_energy", "export_active_energy"
T0 = 1_699_999_200  # a multiple of 60 and of 900
FLOAT = Counter()
UINT32_WH = Counter(wrap=2**32 * 0.001, resolution=0.001)  # uint32 register, scale 0.001: wraps at 4294967.296


def restored(m: MeterIntervals, counters: dict[str, Counter], **kwargs) -> MeterIntervals:
    """A new process continuing from ``m``'s state, as stored on disk (JSON)."""
    state = json.loads(json.dumps(m.state()))
    kwargs.setdefault("max_gap", m.max_gap)
    return MeterIntervals(m.meter, kwargs.pop("interval_s", m.interval_s), counters, state=state, **kwargs)


def feed(m: MeterIntervals, readings) -> list[Interval]:
    out: list[Interval] = []
    for r in readings:
        out += m.add(r)
    return out


def steady(start: float, seconds: int, rate: float, value0: float = 1000.0, q: str = IMP, mono0: float = 0.0,
           every: float = 1.0):
    """A meter at a constant ``rate`` (kWh per second) polled every ``every`` s."""
    n = int(seconds / every)
    return [Reading(start + i * every, mono0 + i * every, {q: value0 + rate * i * every}) for i in range(n + 1)]


def total(intervals: list[Interval], q: str = IMP) -> int:
    """The energy of ``intervals`` in micro-units, summed exactly."""
    return sum(micro(iv.energy[q]) for iv in intervals)


def assert_contiguous(intervals: list[Interval], size: int) -> None:
    for iv in intervals:
        assert iv.start % size == 0 and iv.end == iv.start + size
    for a, b in zip(intervals, intervals[1:]):
        assert b.start == a.end


# ---------------------------------------------------------------------------------------------------------
# worked examples


def test_constant_rate_every_quarter_hour_is_exact():
    m = MeterIntervals("m1", 900, {IMP: FLOAT}, max_gap=10)
    out = feed(m, steady(T0 + 123.4, 4 * 3600, 3.6 / 3600))  # 3.6 kW, first poll mid-interval
    assert [iv.start for iv in out] == [T0 + 900 * k for k in range(1, 16)]  # the first slot only opens
    assert_contiguous(out, 900)
    for iv in out:
        assert iv.status == COMPLETE and not iv.clock_step
        assert iv.energy[IMP] == pytest.approx(0.9, abs=2e-6)
        assert iv.demand == pytest.approx(3600.0, abs=0.01)
        before, after = iv.evidence[IMP][0].before, iv.evidence[IMP][0].after
        assert before[0] < iv.start <= after[0] and after[0] - before[0] == 1.0
    assert total(out) == micro(out[-1].end_values[IMP]) - micro(out[0].start_values[IMP])
    assert m.closed_until == out[-1].end


def test_first_reading_on_a_boundary_gives_its_value():
    m = MeterIntervals("m1", 60, {IMP: FLOAT}, max_gap=10)
    out = feed(m, steady(T0, 125, 0.01))
    assert [iv.start for iv in out] == [T0, T0 + 60]
    assert out[0].start_values[IMP] == 1000.0 and out[0].energy[IMP] == pytest.approx(0.6)
    assert out[0].evidence[IMP][0] == Evidence(None, (T0, 1000.0))
    assert out[0].status == COMPLETE


def test_nothing_before_the_first_reading_and_nothing_until_a_boundary_is_passed():
    m = MeterIntervals("m1", 60, {IMP: FLOAT}, max_gap=10)
    assert m.closed_until is None
    assert feed(m, steady(T0 + 1, 58, 0.01)) == []  # inside one slot: nothing to close
    assert m.closed_until is None
    assert feed(m, [Reading(T0 + 61, 60, {IMP: 1000.6})]) == []  # passes T0+60: opens it, closes nothing
    out = m.add(Reading(T0 + 121, 120, {IMP: 1001.2}))
    assert [(iv.start, iv.end) for iv in out] == [(T0 + 60, T0 + 120)]
    assert out[0].energy[IMP] == pytest.approx(0.6) and m.closed_until == T0 + 120


def test_offline_across_boundaries_is_estimated_spread_and_conserved():
    m = MeterIntervals("m1", 60, {IMP: FLOAT}, max_gap=30)
    rate = 0.01
    before = steady(T0 + 5, 100, rate)  # up to T0+105
    after = steady(T0 + 345, 100, rate, value0=1000 + rate * 340, mono0=340)  # offline 240 s
    out = feed(m, before + after)
    assert_contiguous(out, 60)
    by_start = {iv.start - T0: iv for iv in out}
    gap = [by_start[s] for s in (60, 120, 180, 240, 300)]
    assert [iv.status for iv in gap] == [ESTIMATED] * 5  # each has a boundary inside the 105..345 gap
    assert by_start[360].status == COMPLETE
    for iv in gap[1:4]:  # fully inside the gap: the gap's energy spread linearly
        assert iv.energy[IMP] == pytest.approx(0.6, abs=1e-6)
        ev = iv.evidence[IMP][0]
        assert ev.before == (T0 + 105, pytest.approx(1001.0)) and ev.after == (T0 + 345, pytest.approx(1003.4))
    # conserved: the energy of the run is the counter difference, exactly
    assert total(out) == micro(out[-1].end_values[IMP]) - micro(out[0].start_values[IMP])
    assert sum(iv.energy[IMP] for iv in out) == pytest.approx(rate * (out[-1].end - out[0].start), abs=1e-6)


def test_a_gap_inside_an_interval_with_bracketed_boundaries_is_complete():
    m = MeterIntervals("m1", 60, {IMP: FLOAT}, max_gap=10)
    readings = [Reading(T0 + t, t, {IMP: 1000 + 0.01 * t}) for t in (55, 61, 62, 115, 121, 181)]
    out = feed(m, readings)
    assert [(iv.start - T0, iv.status) for iv in out] == [(60, COMPLETE), (120, ESTIMATED)]


@pytest.mark.parametrize("new_meter_starts_at", [0.0, 123.4])
def test_meter_replaced_counts_nothing_across_and_resumes(new_meter_starts_at):
    m = MeterIntervals("m1", 60, {IMP: FLOAT}, max_gap=10)
    old = steady(T0 + 1, 90, 0.01, value0=5000.0)  # last old reading T0+91: 5000.90
    new = steady(T0 + 92, 150, 0.01, value0=new_meter_starts_at, mono0=91)
    out = feed(m, old + new)
    assert_contiguous(out, 60)
    assert [iv.status for iv in out] == [RESET, COMPLETE, COMPLETE]  # the swap at T0+92 is in [T0+60, T0+120)
    reset = out[0]
    first_after = new_meter_starts_at
    expected = (micro(5000.90) - micro(reset.start_values[IMP])) + (micro(reset.end_values[IMP]) - micro(first_after))
    assert micro(reset.energy[IMP]) == expected
    assert reset.energy[IMP] == pytest.approx(0.59, abs=1e-6)  # 60 s at 0.01 but the 1 s bracket of the swap
    assert all(iv.energy[IMP] >= 0 for iv in out)
    assert reset.end_values[IMP] == pytest.approx(first_after + 0.01 * (T0 + 120 - (T0 + 92)))
    for iv in out[1:]:  # telescoping after it
        assert micro(iv.energy[IMP]) == micro(iv.end_values[IMP]) - micro(iv.start_values[IMP])


def test_a_reset_during_an_outage_counts_nothing_over_the_outage():
    m = MeterIntervals("m1", 60, {IMP: FLOAT}, max_gap=10)
    out = feed(m, steady(T0 + 1, 60, 0.01, value0=900.0) + steady(T0 + 300, 60, 0.01, value0=2.0, mono0=299))
    # the swapped meter is first read at T0+300 (exactly a boundary): the reset is in [T0+300, T0+360)
    assert [(iv.start - T0, iv.status) for iv in out] == [
        (60, ESTIMATED), (120, ESTIMATED), (180, ESTIMATED), (240, ESTIMATED), (300, RESET)]
    assert [iv.energy[IMP] for iv in out[1:4]] == [0.0, 0.0, 0.0]  # unknown: not invented
    assert out[3].end_values[IMP] == pytest.approx(900.6)  # the value before the swap holds over the outage
    assert out[3].evidence[IMP][1] == Evidence((T0 + 61, pytest.approx(900.6)), (T0 + 300, 2.0))
    assert out[4].start_values[IMP] == pytest.approx(900.6) and out[4].energy[IMP] == pytest.approx(0.6)


def test_uint32_register_rollover_counts_through_the_wrap():
    wrap_ticks = 2**32
    m = MeterIntervals("m1", 60, {IMP: UINT32_WH}, max_gap=10)
    ticks0 = wrap_ticks - 2_000  # 2 kWh below the wrap; 0.05 kWh (50 ticks) per second: wraps after 40 s
    readings = [Reading(T0 + 30 + i, i, {IMP: ((ticks0 + 50 * i) % wrap_ticks) * 0.001}) for i in range(200)]
    out = feed(m, readings)
    assert_contiguous(out, 60)
    assert [iv.status for iv in out] == [ROLLOVER, COMPLETE]  # the wrap at T0+70 is in [T0+60, T0+120)
    rolled = out[0]
    assert rolled.end_values[IMP] < rolled.start_values[IMP]
    assert rolled.energy[IMP] == pytest.approx(3.0, abs=1e-6)
    assert micro(rolled.energy[IMP]) == micro(rolled.end_values[IMP]) - micro(rolled.start_values[IMP]) + micro(
        UINT32_WH.wrap)
    assert micro(out[1].energy[IMP]) == micro(out[1].end_values[IMP]) - micro(out[1].start_values[IMP])


def test_a_big_drop_on_a_wrapping_register_is_a_reset_not_a_rollover():
    m = MeterIntervals("m1", 60, {IMP: UINT32_WH}, max_gap=10)
    out = feed(m, steady(T0 + 1, 90, 0.01, value0=2_000_000.0) + steady(T0 + 92, 100, 0.01, value0=5.0, mono0=91))
    assert [iv.status for iv in out] == [RESET, COMPLETE]
    assert out[0].energy[IMP] == pytest.approx(0.59, abs=1e-6)  # not 2294971 kWh through a "wrap"


@pytest.mark.parametrize("counter, scale, value, back", [
    (UINT32_WH, 0.001, 1_234_567, 1),  # one register step
    (FLOAT, 1e-6, 100_000_000_000, 50_000),  # under 1e-6 of the value
])
def test_backward_jitter_is_no_movement(counter, scale, value, back):
    m = MeterIntervals("m1", 60, {IMP: counter}, max_gap=10)
    step = round(0.01 / scale)
    values = [(value + step * i) * scale for i in range(200)]
    values[100] = values[99] - back * scale  # one reply a little below the previous one
    out = feed(m, [Reading(T0 + 1 + i, i, {IMP: v}) for i, v in enumerate(values)])
    assert [iv.status for iv in out] == [COMPLETE, COMPLETE]
    assert all(iv.energy[IMP] >= 0 for iv in out)
    assert sum(iv.energy[IMP] for iv in out) == pytest.approx(1.2, abs=1e-6)  # not lost nor counted twice


def test_float32_counter_near_100000_kwh_still_telescopes():
    def f32(x: float) -> float:
        return struct.unpack(">f", struct.pack(">f", x))[0]

    assert f32(100_000.0 + 0.004) in (100_000.0, 100_000.0078125)  # the register steps by 1/128 kWh
    m = MeterIntervals("m1", 60, {IMP: Counter(resolution=0.0)}, max_gap=10)
    rate = 2.0 / 3600  # 2 kW: about one register step every 14 s
    readings = [Reading(T0 + 7 + i, i, {IMP: f32(100_000.0 + rate * i)}) for i in range(3600)]
    readings[500] = Reading(readings[500].wall, 500, {IMP: f32(readings[499].values[IMP] - 0.0078125)})  # one step back
    out = feed(m, readings)
    assert_contiguous(out, 60)
    assert {iv.status for iv in out} == {COMPLETE}
    assert all(iv.energy[IMP] >= 0 for iv in out)
    assert total(out) == micro(out[-1].end_values[IMP]) - micro(out[0].start_values[IMP])
    for a, b in zip(out, out[1:]):
        assert a.end_values == b.start_values
    assert sum(iv.energy[IMP] for iv in out) == pytest.approx(rate * 60 * len(out), abs=2 * 0.0078125)


def test_clock_step_forward_one_hour_creates_and_loses_nothing():
    rate = 0.01
    m = MeterIntervals("m1", 60, {IMP: FLOAT}, max_gap=10)
    readings = []
    for i in range(400):  # true time i s after T0+5; the wall clock jumps +3600 s after 150 s
        wall = T0 + 5 + i + (3600 if i > 150 else 0)
        readings.append(Reading(wall, 1000.0 + i, {IMP: 500.0 + rate * i}))
    out = feed(m, readings)
    # poll i is at T0+5+i before the step, T0+3605+i after: the step is seen at i=151 (T0+3756), the
    # previous poll re-based to T0+3755: the open slot [T0+120, T0+180) moves to [T0+3720, T0+3780)
    starts = [iv.start - T0 for iv in out]
    assert starts == [60, 3720, 3780, 3840, 3900]  # no slot of the skipped hour
    assert m.closed_until == T0 + 3960
    stepped = [iv for iv in out if iv.clock_step]
    assert [iv.start - T0 for iv in stepped] == [3720]
    # it holds the energy from its predecessor's end, T0+120 (poll 115), to its own end, T0+3780 (poll 175)
    assert stepped[0].start_values == out[0].end_values
    assert stepped[0].energy[IMP] == pytest.approx(rate * ((3780 - 3605) - (120 - 5)), abs=1e-6)
    assert total(out) == micro(out[-1].end_values[IMP]) - micro(out[0].start_values[IMP])
    # all of it is real energy: the counter at the last end is the one read at that (stepped) instant
    assert out[-1].end_values[IMP] == pytest.approx(500.0 + rate * (3960 - 3605), abs=1e-6)
    assert all(iv.status == COMPLETE for iv in out)


def test_clock_step_backward_ten_minutes_never_reopens_a_closed_interval():
    rate = 0.01
    m = MeterIntervals("m1", 60, {IMP: FLOAT}, max_gap=10)
    readings = []
    for i in range(1000):  # the wall clock goes back 600 s after 150 s
        wall = T0 + 5 + i - (600 if i > 150 else 0)
        readings.append(Reading(wall, 1000.0 + i, {IMP: 500.0 + rate * i}))
    out = feed(m, readings)
    starts = [iv.start - T0 for iv in out]
    assert starts == sorted(set(starts))  # each slot once
    assert_contiguous(out, 60)
    assert starts[:3] == [60, 120, 180]
    stepped = [iv for iv in out if iv.clock_step]
    assert [iv.start - T0 for iv in stepped] == [120]  # open when the clock went back: holds 10 min more
    assert stepped[0].energy[IMP] == pytest.approx(rate * (60 + 600), abs=1e-6)
    assert total(out) == micro(out[-1].end_values[IMP]) - micro(out[0].start_values[IMP])
    assert sum(iv.energy[IMP] for iv in out) == pytest.approx(rate * 60 * len(out) + rate * 600, abs=1e-6)


def test_duplicates_and_late_replies_are_ignored():
    m = MeterIntervals("m1", 60, {IMP: FLOAT}, max_gap=10)
    readings = []
    for r in steady(T0 + 1, 200, 0.01):
        readings += [r, r, Reading(r.wall, r.mono + 0.5, {IMP: 0.0}), Reading(r.wall - 0.5, r.mono + 0.6, {IMP: 1.0})]
    out = feed(m, readings)
    assert [iv.status for iv in out] == [COMPLETE] * 2
    assert [iv.energy[IMP] for iv in out] == [pytest.approx(0.6, abs=1e-6)] * 2
    assert m.add(Reading(T0 + 500, 1e9, {})) == [] and m.add(Reading(T0 + 500, 1e9, {"other": 1.0})) == []
    assert m.state()["last_wall"] == T0 + 201


def test_kill_and_restart_mid_interval_continues_without_double_counting():
    readings = steady(T0 + 3, 400, 0.01)
    whole = feed(MeterIntervals("m1", 60, {IMP: FLOAT}, max_gap=10), readings)
    m = MeterIntervals("m1", 60, {IMP: FLOAT}, max_gap=10)
    first = feed(m, readings[:150])  # killed at T0+153, mid-interval, state stored with the intervals
    again = restored(m, {IMP: FLOAT})
    # a new process: another monotonic clock; the recorder replays a few readings it was not sure of
    replay = [Reading(r.wall, r.mono + 50_000, r.values) for r in readings[140:]]
    rest = feed(again, replay)
    assert first + rest == whole
    assert [iv.start for iv in first + rest] == sorted({iv.start for iv in whole})


def test_restart_after_downtime_makes_the_bridged_intervals_estimated():
    m = MeterIntervals("m1", 60, {IMP: FLOAT}, max_gap=10)
    out = feed(m, steady(T0 + 3, 100, 0.01))  # last reading T0+103
    again = restored(m, {IMP: FLOAT})
    out += feed(again, steady(T0 + 403, 100, 0.01, value0=1004.0, mono0=7.0))  # down 300 s; mono from scratch
    assert_contiguous(out, 60)
    assert [(iv.start - T0, iv.status) for iv in out] == [
        (60, ESTIMATED), (120, ESTIMATED), (180, ESTIMATED), (240, ESTIMATED), (300, ESTIMATED),
        (360, ESTIMATED), (420, COMPLETE)]
    assert not any(iv.clock_step for iv in out)  # a new process's mono is not a clock step
    assert total(out) == micro(out[-1].end_values[IMP]) - micro(out[0].start_values[IMP])
    assert sum(iv.energy[IMP] for iv in out) == pytest.approx(0.01 * 420, abs=1e-6)


def test_a_month_offline_is_bridged_but_a_longer_silence_starts_afresh():
    day = 86400
    m = MeterIntervals("m1", 900, {IMP: FLOAT}, max_gap=10)
    feed(m, steady(T0 + 3, 1000, 0.001))
    after_30_days = feed(restored(m, {IMP: FLOAT}), steady(T0 + 30 * day, 1000, 0.001, value0=5000.0))
    assert len(after_30_days) == 30 * 96 and {iv.status for iv in after_30_days} == {ESTIMATED}
    assert_contiguous(after_30_days, 900)
    # a state stored while the clock was 40 days behind: no 3840 made-up intervals, nothing twice
    late = restored(m, {IMP: FLOAT})
    assert late.add(Reading(T0 + 40 * day + 100, 5.0, {IMP: 5000.0})) == []
    assert late.closed_until is None
    out = feed(late, steady(T0 + 40 * day + 101, 2000, 0.001, value0=5000.001, mono0=6.0))
    assert [iv.start - T0 - 40 * day for iv in out] == [900]  # the first reading only opened, as a first one
    assert out[0].status == COMPLETE and out[0].energy[IMP] == pytest.approx(0.9)


def test_a_quantity_missing_from_a_reply_is_not_advanced_and_nothing_is_lost():
    m = MeterIntervals("m1", 60, {IMP: FLOAT, EXP: FLOAT}, max_gap=10)
    readings = []
    for i in range(300):
        values = {IMP: 100 + 0.01 * i, EXP: 200 + 0.02 * i}
        if 100 <= i < 140:  # EXP's block failed for 40 s, across T0+120
            del values[EXP]
        readings.append(Reading(T0 + 5 + i, i, values))
    out = feed(m, readings)
    assert_contiguous(out, 60)
    assert [iv.status for iv in out] == [ESTIMATED, ESTIMATED, COMPLETE, COMPLETE]
    assert out[0].evidence[EXP][1] == Evidence((T0 + 104, pytest.approx(201.98)), None)  # carried, not guessed
    assert out[0].energy[EXP] == pytest.approx(0.02 * (104 - 60), abs=1e-6)
    assert out[1].energy[EXP] == pytest.approx(0.02 * 60 + 0.02 * (120 - 104), abs=1e-6)  # caught up when read
    for q, rate in ((IMP, 0.01), (EXP, 0.02)):
        assert sum(micro(iv.energy[q]) for iv in out) == micro(out[-1].end_values[q]) - micro(out[0].start_values[q])
        assert sum(iv.energy[q] for iv in out) == pytest.approx(rate * 240, abs=1e-6)


def test_a_quantity_first_read_later_joins_at_the_next_boundary():
    m = MeterIntervals("m1", 60, {IMP: FLOAT, EXP: FLOAT}, max_gap=10)
    readings = [Reading(T0 + 5 + i, i, {IMP: 100 + 0.01 * i} | ({EXP: 7.0 + 0.02 * i} if i >= 80 else {}))
                for i in range(200)]
    out = feed(m, readings)
    assert [sorted(iv.energy) for iv in out] == [[IMP], [EXP, IMP]]
    assert out[1].energy[EXP] == pytest.approx(1.2)


def test_state_of_another_meter_is_refused_and_another_length_restarts_cleanly():
    m = MeterIntervals("m1", 60, {IMP: FLOAT}, max_gap=10)
    out = feed(m, steady(T0 + 3, 400, 0.01))
    with pytest.raises(ValueError):
        MeterIntervals("m2", 60, {IMP: FLOAT}, max_gap=10, state=m.state())
    longer = restored(m, {IMP: FLOAT}, interval_s=900)
    later = feed(longer, steady(T0 + 404, 2000, 0.01, value0=1004.01, mono0=401))
    assert later and later[0].start >= out[-1].end and all(iv.end - iv.start == 900 for iv in later)
    assert later[0].start == T0 + 900


@pytest.mark.parametrize("kwargs", [{"interval_s": 0}, {"interval_s": 1.5}, {"max_gap": 0}])
def test_bad_arguments(kwargs):
    args = {"interval_s": 60, "max_gap": 10} | kwargs
    with pytest.raises(ValueError):
        MeterIntervals("m1", args.pop("interval_s"), {IMP: FLOAT}, **args)


# ---------------------------------------------------------------------------------------------------------
# properties, against an oracle that knows the truth behind the readings

SIZE, MAX_GAP = 60, 30.0
W = 1_000_000  # EXP: a 0.001 kWh register wrapping at 1000 kWh, in register ticks
WRAP_COUNTER = Counter(wrap=W * 0.001, resolution=0.001)
COUNTERS = {IMP: FLOAT, EXP: WRAP_COUNTER}
W_MICRO = W * 1000


@dataclass
class Truth:
    """One accepted reading as the oracle knows it: register values, energy counted, resets so far."""
    t: float
    reg: dict[str, int]  # micro
    count: dict[str, int] = field(default_factory=dict)
    seg: dict[str, int] = field(default_factory=dict)
    rolled: bool = False


def script():
    poll = st.integers(1, 40).map(lambda n: n / 2)  # half-seconds: some polls land on a boundary
    gap = st.one_of(st.integers(25, 400).map(float), st.just(MAX_GAP))  # MAX_GAP itself is no gap
    step = st.tuples(
        st.integers(0, 24).flatmap(lambda n: gap if n == 0 else poll),
        st.integers(0, 3_000_000),  # IMP increment, micro
        st.integers(0, 9).flatmap(lambda n: st.integers(0, W // 10 - 1) if n == 0 else st.integers(0, 5_000)),
        st.sampled_from(["reset IMP", "reset EXP"] * 2 + ["duplicate"] * 2 + [""] * 74),
        st.floats(0, 1),  # where a reset lands
        st.integers(0, 19).map(lambda n: n == 0),  # restart before this reading
    )
    return st.tuples(st.integers(0, 240).map(lambda n: T0 + n / 2), st.integers(0, 10**10),
                     st.one_of(st.integers(0, W - 1), st.integers(W - 20_000, W - 1)),
                     st.lists(step, min_size=10, max_size=120))


def build(plan) -> tuple[list[tuple[Reading, bool]], list[Truth]]:
    """Readings (with a restart flag) and the truth for the accepted ones."""
    t, imp, exp, steps = plan
    truth = [Truth(t, {IMP: imp, EXP: exp * 1000}, {IMP: imp, EXP: exp * 1000}, {IMP: 0, EXP: 0})]
    feedlist = [(Reading(t, t - T0, {IMP: imp / MICRO, EXP: exp / 1000}), False)]
    for dt, d_imp, d_exp, event, where, restart in steps:
        last = truth[-1]
        if event == "duplicate":  # the same reply again (or a stale one), with nonsense values
            feedlist.append((Reading(last.t, last.t - T0 + 0.1, {IMP: 0.0, EXP: 0.0}), restart))
            continue
        t = last.t + dt
        reg, count, seg = dict(last.reg), dict(last.count), dict(last.seg)
        reg[IMP] += d_imp
        count[IMP] += d_imp
        ticks = reg[EXP] // 1000 + d_exp
        reg[EXP], count[EXP] = (ticks % W) * 1000, count[EXP] + d_exp * 1000
        rolled = ticks >= W
        if event == "reset IMP" and last.reg[IMP] > 0:
            reg[IMP] = int(where * (last.reg[IMP] - last.reg[IMP] // MICRO - 1))  # beyond jitter: a real reset
            seg[IMP] += 1
            count[IMP] = last.count[IMP]
        elif event == "reset EXP" and last.reg[EXP] >= 2000:
            low = max(0, last.reg[EXP] // 1000 - 9 * W // 10)
            ticks = low + int(where * (last.reg[EXP] // 1000 - 2 - low))  # not a plausible wrap
            reg[EXP], seg[EXP], count[EXP] = ticks * 1000, seg[EXP] + 1, last.count[EXP]
            rolled = False
        truth.append(Truth(t, reg, count, seg, rolled))
        feedlist.append((Reading(t, t - T0, {IMP: reg[IMP] / MICRO, EXP: reg[EXP] / MICRO}), restart))
    return feedlist, truth


def run(feedlist, split: bool) -> list[Interval]:
    m = MeterIntervals("m", SIZE, COUNTERS, max_gap=MAX_GAP)
    out: list[Interval] = []
    mono = 0.0  # each process has its own monotonic clock
    for reading, restart in feedlist:
        if split and restart:
            m, mono = restored(m, COUNTERS), mono + 1e6
        out += m.add(Reading(reading.wall, reading.mono + mono, reading.values))
    return out


def expected_boundary(truth: list[Truth], times: list[float], b: int, q: str, reported: float):
    """The oracle's view of boundary ``b`` for ``q`` given the reported register value: the energy counted
    up to it, its reset segment, whether it is estimated, and its evidence. Checks it is an interpolation."""
    r = micro(reported)
    assert q == IMP or 0 <= r < W_MICRO  # a register value, within its range
    j = bisect.bisect_left(times, b)
    if j == 0:  # the first reading, exactly on the boundary
        first = truth[0]
        assert times[0] == b and r == first.reg[q]
        return first.count[q], first.seg[q], False, Evidence(None, (first.t, first.reg[q] / MICRO))
    a, z = truth[j - 1], truth[j]
    evidence = Evidence((a.t, a.reg[q] / MICRO), (z.t, z.reg[q] / MICRO))
    estimated = z.t - a.t > MAX_GAP
    if a.seg[q] != z.seg[q]:  # a reset in the bracket: nothing counted across, the value before holds
        assert r == a.reg[q]
        return a.count[q], a.seg[q], estimated, evidence
    moved = (r - a.reg[q]) % W_MICRO if q == EXP else r - a.reg[q]
    count = a.count[q] + moved
    linear = a.count[q] + (z.count[q] - a.count[q]) * (Fraction(b) - Fraction(a.t)) / (Fraction(z.t) - Fraction(a.t))
    assert a.count[q] <= count <= z.count[q] and abs(count - linear) <= 1
    return count, a.seg[q], estimated, evidence


def check_against_truth(out: list[Interval], truth: list[Truth]) -> None:
    times = [x.t for x in truth]
    first = -(-math.ceil(times[0]) // SIZE) * SIZE
    last_end = math.floor(times[-1]) // SIZE * SIZE
    assert [iv.start for iv in out] == list(range(first, last_end - SIZE + 1, SIZE))  # every slot, once
    for iv in out:
        assert iv.end == iv.start + SIZE and not iv.clock_step and set(iv.energy) == {IMP, EXP}
        status = COMPLETE
        for q in (IMP, EXP):
            c0, seg0, est0, ev0 = expected_boundary(truth, times, iv.start, q, iv.start_values[q])
            c1, seg1, est1, ev1 = expected_boundary(truth, times, iv.end, q, iv.end_values[q])
            assert iv.evidence[q] == (ev0, ev1)
            assert iv.energy[q] >= 0 and micro(iv.energy[q]) == c1 - c0
            register = micro(iv.end_values[q]) - micro(iv.start_values[q])
            if seg0 != seg1:
                status = max(status, RESET, key=STATUSES.index)
            elif c1 - c0 != register:
                assert q == EXP and (c1 - c0 - register) % W_MICRO == 0
                status = max(status, ROLLOVER, key=STATUSES.index)
            elif est0 or est1:
                status = max(status, ESTIMATED, key=STATUSES.index)
        assert iv.status == status
    for a, b in zip(out, out[1:]):  # consecutive intervals share the boundary
        assert (a.end_values, [e[1] for e in a.evidence.values()]) == (
            b.start_values, [e[0] for e in b.evidence.values()])


@settings(max_examples=120, deadline=None)
@given(script(), st.data())
def test_property_intervals_match_the_truth_and_restarts_change_nothing(plan, data):
    feedlist, truth = build(plan)
    whole = run(feedlist, split=False)
    assert run(feedlist, split=True) == whole
    check_against_truth(whole, truth)
    if not whole:
        return
    # exact telescoping over any run: the sum is the energy counted between its ends
    i = data.draw(st.integers(0, len(whole) - 1))
    j = data.draw(st.integers(i, len(whole) - 1))
    run_ = whole[i:j + 1]
    times = [x.t for x in truth]
    for q in (IMP, EXP):
        summed = sum(micro(iv.energy[q]) for iv in run_)
        c0 = expected_boundary(truth, times, run_[0].start, q, run_[0].start_values[q])[0]
        c1 = expected_boundary(truth, times, run_[-1].end, q, run_[-1].end_values[q])[0]
        assert summed == c1 - c0
        if all(iv.status in (COMPLETE, ESTIMATED) for iv in run_):
            assert summed == micro(run_[-1].end_values[q]) - micro(run_[0].start_values[q])
    # nothing but gaps in the input: only complete or estimated; estimated iff a bracket is too long
    if not any(x.rolled for x in truth) and len({tuple(x.seg.values()) for x in truth}) == 1:
        assert {iv.status for iv in whole} <= {COMPLETE, ESTIMATED}


def clock_script():
    jump = st.one_of(st.integers(-4000, -3), st.integers(-30, -3), st.integers(3, 30), st.integers(3, 4000))
    step = st.tuples(st.integers(1, 30).map(lambda n: n / 2), st.integers(0, 50_000),
                     st.integers(0, 7).map(lambda n: n == 0), jump)
    return st.tuples(st.integers(0, 120).map(lambda n: T0 + n / 2), st.lists(step, min_size=40, max_size=150))


@settings(max_examples=100, deadline=None)
@given(clock_script())
def test_property_clock_steps_create_and_lose_nothing(plan):
    t, steps = plan
    mono, offset, value = 0.0, 0.0, 10**9
    monos, values = [], []  # the truth: the counter against the monotonic clock
    m = MeterIntervals("m", SIZE, {IMP: FLOAT}, max_gap=MAX_GAP)
    out: list[Interval] = []
    flagged: set[int] = set()  # starts of the intervals that must say clock_step
    after_step = False
    first_value = value
    for dt, d_value, step, jump in steps:
        mono += dt
        value += d_value
        stepped = step and bool(monos)  # not on the first reading
        offset += jump if stepped else 0
        reading = Reading(t + mono + offset, mono, {IMP: value / MICRO})
        monos.append(mono)
        values.append(value)
        closed = m.add(reading)
        for iv in closed:  # interpolated on the re-based timeline, where a time is mono + the clock's offset now
            at = iv.end - (reading.wall - reading.mono)
            assert monos[-2] - 1e-6 < at <= monos[-1] + 1e-6
            expected = values[-2] + (values[-1] - values[-2]) * (at - monos[-2]) / (monos[-1] - monos[-2])
            assert abs(micro(iv.end_values[IMP]) - expected) <= 1
        if stepped:
            flagged |= {iv.start for iv in closed}
        elif closed and after_step:
            flagged.add(closed[0].start)
        after_step = stepped or (after_step and not closed)
        out += closed
    assert {iv.start for iv in out if iv.clock_step} == flagged
    for iv in out:
        assert iv.start % SIZE == 0 and iv.end == iv.start + SIZE
        assert iv.status == COMPLETE and iv.energy[IMP] >= 0  # a step is no gap
        assert micro(iv.energy[IMP]) == micro(iv.end_values[IMP]) - micro(iv.start_values[IMP])
    for a, b in zip(out, out[1:]):
        assert b.start >= a.end  # never twice, never back
        assert b.start == a.end or b.clock_step  # a hole only where the clock jumped
        assert b.start_values == a.end_values  # what a skipped slot held is in the next interval
    if out:  # conserved: between the first and the last boundary, every micro-unit counted once
        assert total(out) == micro(out[-1].end_values[IMP]) - micro(out[0].start_values[IMP])
        assert first_value <= micro(out[0].start_values[IMP]) <= micro(out[-1].end_values[IMP]) <= value


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20).map(float), st.integers(0, 50_000), st.integers(0, 50_000),
                          st.sampled_from([(IMP,), (EXP,), (IMP, EXP), (IMP, EXP), (IMP, EXP)])), max_size=120),
       st.integers(0, 119))
def test_property_quantities_missing_from_replies(steps, t_start):
    counters = {IMP: FLOAT, EXP: FLOAT}
    m = MeterIntervals("m", SIZE, counters, max_gap=MAX_GAP)
    t, values = float(T0 + t_start), {IMP: 10**7, EXP: 10**8}
    readings: list[tuple[float, dict[str, int]]] = []
    out: list[Interval] = []
    for dt, d_imp, d_exp, present in steps:
        t += dt
        values = {IMP: values[IMP] + d_imp, EXP: values[EXP] + d_exp}
        shown = {q: values[q] for q in present}
        readings.append((t, shown))
        out += m.add(Reading(t, t, {q: v / MICRO for q, v in shown.items()}))

    def boundary(b: int, q: str):
        """(value, estimated) of q at b as the oracle sees it, or None: taken from the first reading at or
        after b, interpolated from q's previous reading if it has q, else q's last value carried."""
        closing = next(i for i, (rt, _) in enumerate(readings) if rt >= b)
        earlier = [(rt, v[q]) for rt, v in readings[:closing] if q in v]
        rt, shown = readings[closing]
        if q in shown and rt == b and not earlier:
            return shown[q], False
        if not earlier:
            return None
        (pt, pv) = earlier[-1]
        if q not in shown:
            return pv, True
        linear = pv + (shown[q] - pv) * (Fraction(b) - Fraction(pt)) / (Fraction(rt) - Fraction(pt))
        return linear, rt - pt > MAX_GAP

    for a, b in zip(out, out[1:]):
        assert b.start == a.end
        assert {q: v for q, v in a.end_values.items() if q in b.start_values} == {
            q: v for q, v in b.start_values.items() if q in a.end_values}
    for iv in out:
        estimated = False
        for q in counters:
            start, end = boundary(iv.start, q), boundary(iv.end, q)
            assert (q in iv.energy) == (start is not None and end is not None)
            if q not in iv.energy:
                continue
            assert abs(micro(iv.start_values[q]) - start[0]) <= 1 and abs(micro(iv.end_values[q]) - end[0]) <= 1
            assert iv.energy[q] >= 0
            assert micro(iv.energy[q]) == micro(iv.end_values[q]) - micro(iv.start_values[q])
            estimated |= start[1] or end[1]
        assert iv.status == (ESTIMATED if estimated else COMPLETE)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(-100, 400, allow_nan=False), st.floats(-50, 400, allow_nan=False),
                          st.dictionaries(st.sampled_from([IMP, EXP]),
                                          st.one_of(st.floats(-10, 5000), st.integers(0, 2**32 - 1).map(
                                              lambda n: n * 0.001)), max_size=2),
                          st.integers(0, 6).map(lambda n: n == 0)), max_size=80))
def test_property_hostile_input_never_breaks_the_rules(steps):
    counters = {IMP: UINT32_WH, EXP: FLOAT}
    m = MeterIntervals("m", SIZE, counters, max_gap=MAX_GAP)
    wall, mono = float(T0), 0.0
    out: list[Interval] = []
    for d_wall, d_mono, values, restart in steps:
        wall, mono = wall + d_wall, mono + d_mono
        if restart:
            m = restored(m, counters)
        out += m.add(Reading(wall, mono, values))
        json.dumps(m.state(), allow_nan=False)
    for iv in out:
        assert iv.status in STATUSES[:4] and iv.end == iv.start + SIZE and iv.start % SIZE == 0
        assert all(e >= 0 for e in iv.energy.values())
        for q, e in iv.energy.items():
            if iv.status in (COMPLETE, ESTIMATED):
                assert micro(e) == micro(iv.end_values[q]) - micro(iv.start_values[q])
    for a, b in zip(out, out[1:]):
        assert b.start >= a.end  # each slot at most once, in order
