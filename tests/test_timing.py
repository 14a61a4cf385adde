"""The bus engine's decisions as pure functions of a made-up clock: the poll schedule
(bridge.core.schedule) and the RTU master's waits (bridge.core.rtu). No ptys, no sleeps."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.core import pdu as P
from bridge.core import rtu
from bridge.core.schedule import PollSchedule


def schedule(intervals: dict[str, float], demote_interval: float = 10.0, demoted: set[str] | None = None):
    demoted = demoted if demoted is not None else set()
    return PollSchedule(intervals.items(), demote_interval, lambda key: key in demoted), demoted


def run(sched: PollSchedule, until: float, cost: float) -> list[tuple[float, str]]:
    """Simulate the segment's loop: wait for the meter due first, poll it (``cost`` s each)."""
    now, polls = 0.0, []
    sched.start(now)
    while now < until:
        key, due = sched.next()
        now = max(now, due)
        polls.append((now, key))
        now += cost
        sched.polled(key, now)
    return polls


def test_earliest_deadline_first_keeps_each_interval_start_to_start():
    sched, _ = schedule({"fast": 0.5, "slow": 2.0})
    polls = run(sched, until=10.0, cost=0.1)
    fast = [t for t, k in polls if k == "fast"]
    slow = [t for t, k in polls if k == "slow"]
    assert all(b - a == pytest.approx(0.5) for a, b in zip(fast, fast[1:]))
    assert all(b - a == pytest.approx(2.0) for a, b in zip(slow, slow[1:]))


def test_an_overrun_is_not_caught_up_in_a_burst():
    sched, _ = schedule({"m": 1.0})
    sched.start(0.0)
    sched.polled("m", 3.5)  # the poll took 3.5 s: due at once, not three times
    assert sched.next() == ("m", 3.5)
    sched.polled("m", 3.6)
    assert sched.next() == ("m", 4.5)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0]), min_size=1, max_size=6), st.floats(0.01, 0.3))
def test_no_meter_starves_whatever_the_intervals(intervals, cost):
    """Even next to meters polled as fast as the bus allows (interval 0), every meter is polled
    at least once per (its interval + one round of the others)."""
    names = {f"m{i}": iv for i, iv in enumerate(intervals)}
    sched, _ = schedule(names)
    polls = run(sched, until=20.0, cost=cost)
    for name, interval in names.items():
        times = [t for t, k in polls if k == name]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert times and max(gaps, default=0.0) <= interval + len(names) * cost + 1e-9, (name, gaps)


def test_a_demoted_meter_is_polled_at_the_demote_interval_and_does_not_hold_the_round():
    sched, demoted = schedule({"ok": 0.5, "dead": 0.5}, demote_interval=10.0, demoted={"dead"})
    polls = run(sched, until=30.0, cost=0.1)
    dead = [t for t, k in polls if k == "dead"]
    assert [round(b - a, 6) for a, b in zip(dead, dead[1:])] == [10.0, 10.0]
    sched.start(0.0)
    sched.next()
    assert sched.polled("ok", 0.1) == pytest.approx(0.1)  # a round: every meter not demoted
    demoted.clear()
    assert sched.polled("ok", 0.7) is None  # "dead" is back: the round now waits for it too
    assert sched.polled("dead", 0.8) == pytest.approx(0.7)


def test_a_write_makes_its_meter_due_first():
    sched, _ = schedule({"a": 1.0, "b": 1.0})
    sched.start(0.0)
    sched.polled("a", 0.1)
    sched.polled("b", 0.2)
    sched.soon("b")
    assert sched.next() == ("b", 0.0)


# ---------------------------------------------------------------- the RTU master's waits

SILENCE, QUIET = 0.004, 0.05


def test_nothing_received_waits_for_the_deadline():
    assert rtu.reply_over_at(10.5, None, False, False, SILENCE, QUIET) == 10.5


def test_bytes_that_form_no_reply_end_after_the_quiet_gap_never_after_the_deadline():
    assert rtu.reply_over_at(10.5, 10.0, False, False, SILENCE, QUIET) == pytest.approx(10.05)
    assert rtu.reply_over_at(10.02, 10.0, False, False, SILENCE, QUIET) == 10.02


def test_a_whole_frame_with_a_bad_crc_ends_after_two_silences_unless_more_is_arriving():
    assert rtu.reply_over_at(10.5, 10.0, True, False, SILENCE, QUIET) == pytest.approx(10.008)
    assert rtu.reply_over_at(10.5, 10.0, True, True, SILENCE, QUIET) == pytest.approx(10.05)


def test_after_a_timeout_the_line_is_held_for_the_longest_possible_reply():
    read = P.ReadRequest(3, 0, 10)  # reply: slave, function, count, 20 bytes, CRC = 25 bytes
    char = rtu.char_time(9600)
    assert rtu.max_reply_length(read) == 25
    assert rtu.line_free_after_failure(1.0, read, True, char, SILENCE) == pytest.approx(1.0 + 25 * char + SILENCE)
    # a bad answer is over: only the silence
    assert rtu.line_free_after_failure(1.0, read, False, char, SILENCE) == pytest.approx(1.0 + SILENCE)


def test_turnaround_is_measured_from_the_end_of_the_request_to_the_first_reply_byte():
    char = 0.001
    # sent at 0; an 8-byte request ends at 0.008; 5 bytes read at 0.020 began at 0.015
    assert rtu.turnaround_estimate(0.0, 0.020, 5, 8, char) == pytest.approx(0.007)
    assert rtu.turnaround_estimate(0.0, 0.010, 5, 8, char) == 0.0  # never negative
