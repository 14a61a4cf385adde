"""Virtual meters, the balance alarm, demand and the meter report (bridge.energy.report), from hand-built
intervals."""
from __future__ import annotations

import json
from datetime import datetime

import pytest

from bridge.core.model import BalanceAlarmConfig, TariffConfig
from bridge.energy.report import BalanceAlarm, combine, iso, meter_report, sliding_demand
from bridge.energy.tariffs import TariffPlan, local_day
from bridge.energy.types import COMPLETE, ESTIMATED, MISSING, RESET, ROLLOVER, Interval

Q = 900  # 15-minute intervals
IMP, EXP = "import_active_energy", "export_active_energy"
T0 = 1_774_738_800  # 2026-03-28T23:00:00Z: local midnight in Berlin starting the 23-hour day


def iv(meter: str, start: int, status: str = COMPLETE, length: int = Q, clock_step: bool = False,
       **energy: float) -> Interval:
    return Interval(meter, start, start + length, status, energy, clock_step=clock_step)


def utc(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


def test_iso():
    assert iso(1_774_746_000) == "2026-03-29T01:00:00Z"
    assert iso(0) == "1970-01-01T00:00:00Z"


# ------------------------------------------------------------------------------ combine

BALANCE = ((1, "incomer"), (-1, "f1"), (-1, "f2"))


def test_combine_sums_with_signs_over_common_quantities():
    got = combine("loss", BALANCE, {
        "incomer": iv("incomer", T0, import_active_energy=10.0, export_active_energy=1.0),
        "f1": iv("f1", T0, import_active_energy=6.0, export_active_energy=0.5),
        "f2": iv("f2", T0, import_active_energy=3.5),  # no export counter: export is left out
    })
    assert got == Interval("loss", T0, T0 + Q, COMPLETE, {IMP: 0.5})
    assert not got.start_values and not got.end_values and not got.evidence


def test_combine_needs_every_term_for_the_same_slot():
    parts = {"incomer": iv("incomer", T0, import_active_energy=1.0),
             "f1": iv("f1", T0, import_active_energy=1.0)}
    assert combine("loss", BALANCE, parts) is None  # f2 missing
    parts["f2"] = iv("f2", T0 + Q, import_active_energy=1.0)
    assert combine("loss", BALANCE, parts) is None  # f2 is the next slot
    parts["f2"] = iv("f2", T0, length=2 * Q, import_active_energy=1.0)
    assert combine("loss", BALANCE, parts) is None  # same start, other end
    assert combine("loss", (), parts) is None


def test_combine_takes_the_worst_status_and_any_clock_step():
    got = combine("loss", BALANCE, {
        "incomer": iv("incomer", T0, ESTIMATED, import_active_energy=1.0),
        "f1": iv("f1", T0, RESET, import_active_energy=0.2),
        "f2": iv("f2", T0, ROLLOVER, clock_step=True, import_active_energy=0.2),
    })
    assert got.status == RESET
    assert got.clock_step
    both = combine("sum", ((1, "a"), (1, "b")), {"a": iv("a", T0, MISSING), "b": iv("b", T0)})
    assert both.status == MISSING


def test_a_balance_may_be_negative():
    got = combine("loss", BALANCE, {
        "incomer": iv("incomer", T0, import_active_energy=1.0),
        "f1": iv("f1", T0, import_active_energy=0.7),
        "f2": iv("f2", T0, import_active_energy=0.5),  # the sub-meters read 20 % more than the incomer
    })
    assert got.energy[IMP] == pytest.approx(-0.2)
    assert got.demand == pytest.approx(-800.0)


# ------------------------------------------------------------------------------ balance alarm

ALARM = BalanceAlarmConfig(reference="incomer", above_percent=5.0, intervals=3)


def feed(alarm: BalanceAlarm, values: list[tuple[float, float]], first: int = T0) -> list[bool | None]:
    return [alarm.feed(first + i * Q, balance, reference) for i, (balance, reference) in enumerate(values)]


def test_the_alarm_rises_after_n_above_in_a_row_and_clears_at_the_first_within():
    alarm = BalanceAlarm(ALARM)
    assert feed(alarm, [(0.2, 10.0), (0.6, 10.0), (-0.6, 10.0)]) == [None, None, None]  # 2 %, 6 %, -6 %
    assert not alarm.active and alarm.since == T0 + Q
    assert alarm.feed(T0 + 3 * Q, 0.7, 10.0) is True
    assert alarm.active and alarm.since == T0 + Q
    assert alarm.last_percent == pytest.approx(7.0)
    assert alarm.feed(T0 + 4 * Q, 0.9, 10.0) is None  # still up: no new event
    assert alarm.feed(T0 + 5 * Q, 0.5, 10.0) is False  # exactly 5 % is within
    assert not alarm.active and alarm.since is None
    assert alarm.feed(T0 + 6 * Q, 0.1, 10.0) is None


def test_the_alarm_does_not_rise_before_n_in_a_row():
    alarm = BalanceAlarm(ALARM)
    assert feed(alarm, [(1.0, 10.0), (1.0, 10.0), (0.0, 10.0), (1.0, 10.0), (1.0, 10.0)]) == [None] * 5
    assert not alarm.active
    assert alarm.feed(T0 + 5 * Q, -1.0, -10.0) is True  # an exporting reference: magnitudes count


def test_a_zero_reference_with_a_balance_is_above():
    alarm = BalanceAlarm(BalanceAlarmConfig("incomer", 5.0, 1))
    assert alarm.feed(T0, 0.0, 0.0) is None  # nothing on either side: within
    assert alarm.feed(T0 + Q, 0.01, 0.0) is True
    assert alarm.last_percent is None
    assert alarm.feed(T0 + 2 * Q, 0.0, 0.0) is False


def test_an_interval_fed_again_is_ignored():
    alarm = BalanceAlarm(ALARM)
    feed(alarm, [(1.0, 10.0), (1.0, 10.0)])
    assert alarm.feed(T0 + Q, 1.0, 10.0) is None
    assert alarm.feed(T0, 1.0, 10.0) is None
    assert alarm.state()["run"] == 2


def test_the_state_survives_a_restart_through_json():
    alarm = BalanceAlarm(ALARM)
    feed(alarm, [(1.0, 10.0), (1.0, 10.0)])
    saved = json.loads(json.dumps(alarm.state()))
    restored = BalanceAlarm(ALARM, state=saved)
    assert restored.state() == alarm.state()
    assert restored.since == T0 and restored.last_percent == pytest.approx(10.0)
    assert restored.feed(T0 + 2 * Q, 1.0, 10.0) is True  # the third in a row, across the restart
    up = BalanceAlarm(ALARM, state=json.loads(json.dumps(restored.state())))
    assert up.active and up.since == T0
    assert up.feed(T0 + 3 * Q, 0.0, 10.0) is False


@pytest.mark.parametrize("state", [
    {},
    {"active": True, "run": 0, "since": None, "last_start": None, "last_percent": None},  # up with no run
    {"active": "yes", "run": 1, "since": 0, "last_start": 0, "last_percent": 1.0},
    [1, 2],
])
def test_a_bad_state_is_refused(state):
    with pytest.raises(ValueError, match="not a balance alarm state"):
        BalanceAlarm(ALARM, state=state)


# ------------------------------------------------------------------------------ demand


def test_sliding_demand_over_three_intervals():
    intervals = [iv("m", T0 + i * Q, import_active_energy=float(kwh)) for i, kwh in enumerate([1, 2, 3, 4])]
    got = sliding_demand(intervals[::-1], 3 * Q)  # any order
    assert [end for end, _ in got] == [T0 + 3 * Q, T0 + 4 * Q]
    assert [w for _, w in got] == pytest.approx([8000.0, 12000.0])  # 6 kWh and 9 kWh over 45 min


def test_sliding_demand_needs_a_fully_covered_window():
    energies = {0: 1.0, 1: 1.0, 2: 1.0, 4: 1.0, 5: 1.0, 6: 1.0, 7: 1.0, 9: 1.0, 10: 1.0, 11: 1.0}
    intervals = [iv("m", T0 + i * Q, import_active_energy=kwh) for i, kwh in energies.items()]  # gaps at 3, 8
    intervals.insert(7, iv("m", T0 + 8 * Q, export_active_energy=1.0))  # slot 8 has no import counter
    got = sliding_demand(intervals, 3 * Q)
    assert [(end - T0) // Q for end, _ in got] == [3, 7, 8, 12]
    assert all(w == pytest.approx(4000.0) for _, w in got)
    assert sliding_demand(intervals, Q)[0] == (T0 + Q, pytest.approx(4000.0))
    with pytest.raises(ValueError, match="multiple"):
        sliding_demand(intervals, 1000)
    assert sliding_demand([], 3 * Q) == []


# ------------------------------------------------------------------------------ meter report

PLAN = TariffPlan((TariffConfig("peak", None, 8 * 60, 20 * 60), TariffConfig("offpeak")), "Europe/Berlin")


def dst_day() -> tuple[tuple[int, int], list[Interval]]:
    """The 23-hour 2026-03-29 in Berlin: 92 slots, 4 of them (01:00-02:00 local) missing; 0.1 kWh a
    quarter, 1 kWh in the one starting 09:00 local (07:00 UTC), 0.05 kWh export in the evening."""
    period = local_day(T0 + 12 * 3600, "Europe/Berlin")
    peak_hit = utc("2026-03-29T09:00:00+02:00")
    intervals = []
    for start in range(*period, Q):
        if T0 + 3600 <= start < T0 + 2 * 3600:
            continue
        energy = {IMP: 1.0 if start == peak_hit else 0.1}
        if start >= utc("2026-03-29T18:00:00+02:00"):
            energy[EXP] = 0.05
        status = ESTIMATED if start == T0 else COMPLETE
        intervals.append(Interval("m", start, start + Q, status, energy))
    return period, intervals


def test_meter_report_over_a_dst_day_with_two_tariffs():
    period, intervals = dst_day()
    assert period == (T0, T0 + 23 * 3600)
    report = meter_report("m", intervals, PLAN, period, window_s=3 * Q, interval_s=Q)
    assert report["meter"] == "m"
    assert (report["from"], report["to"]) == ("2026-03-28T23:00:00Z", "2026-03-29T22:00:00Z")
    assert report["energy"] == {IMP: 9.7, EXP: 1.2}  # 87 × 0.1 + 1.0; 24 × 0.05
    assert report["by_tariff"] == {"peak": {IMP: 5.7, EXP: 0.4}, "offpeak": {IMP: 4.0, EXP: 0.8}}
    for q, total in report["energy"].items():
        assert sum(t.get(q, 0.0) for t in report["by_tariff"].values()) == pytest.approx(total)
    assert report["max_demand"] == {"w": 4000.0, "at": "2026-03-29T07:00:00Z"}
    assert report["max_sliding_demand"] == {"w": 1600.0, "at": "2026-03-29T06:30:00Z",
                                            "to": "2026-03-29T07:15:00Z"}
    assert report["statuses"] == {COMPLETE: 87, ESTIMATED: 1, ROLLOVER: 0, RESET: 0, MISSING: 4}
    assert report["intervals"] == 88
    assert json.loads(json.dumps(report)) == report


def test_meter_report_without_a_plan_or_a_window():
    period, intervals = dst_day()
    report = meter_report("m", intervals, None, period, interval_s=Q)
    assert "by_tariff" not in report and "max_sliding_demand" not in report
    assert report["energy"][IMP] == 9.7


def test_intervals_no_tariff_matches_are_untariffed():
    period, intervals = dst_day()
    peak_only = TariffPlan((TariffConfig("peak", None, 8 * 60, 20 * 60),), "Europe/Berlin")
    report = meter_report("m", intervals, peak_only, period, interval_s=Q)
    assert report["by_tariff"] == {"peak": {IMP: 5.7, EXP: 0.4}, "untariffed": {IMP: 4.0, EXP: 0.8}}


def test_an_empty_period_is_all_missing_and_outside_intervals_are_ignored():
    period = local_day(utc("2026-06-01T12:00:00+05:30"), "Asia/Kolkata")  # midnight is 18:30 UTC
    outside = [iv("m", period[0] - 1800, length=3600, import_active_energy=1.0)]
    report = meter_report("m", outside, None, period, window_s=3600, interval_s=3600)
    assert report["energy"] == {} and report["intervals"] == 0
    assert report["max_demand"] is None and report["max_sliding_demand"] is None
    assert report["statuses"][MISSING] == 24  # hourly starts 19:00 … 18:00 UTC


async def test_intervals_json_is_the_whole_document_encoded_piece_by_piece(monkeypatch):
    """The API's intervals document, encoded a few intervals at a time (so that a year does not hold the
    event loop), is byte for byte the document encoded at once."""
    monkeypatch.setattr("bridge.north.energy_api.RENDER_STEP", 2)  # several steps here
    from bridge.energy.report import interval_record
    from bridge.energy.types import Evidence
    from bridge.north.energy_api import intervals_json

    t = utc("2026-03-29T00:00:00+00:00")
    rows = [iv("main", t, import_active_energy=1.25, export_active_energy=0.0),
            iv("main", t + Q, MISSING),
            Interval("main", t + 2 * Q, t + 3 * Q, ESTIMATED, {"import_active_energy": 0.5},
                     {"import_active_energy": 10.0}, {"import_active_energy": 10.5},
                     {"import_active_energy": (Evidence((t + 2 * Q - 1.5, 9.99), (t + 2 * Q + 0.5, 10.01)),
                                               Evidence(None, (t + 3 * Q + 3.25, 10.6)))}, clock_step=True)]
    head = {"meter": "main", "interval": Q, "from": iso(t), "to": iso(t + 3 * Q)}
    for intervals in (rows, []):
        whole = json.dumps({**head, "intervals": [interval_record(i) for i in intervals]}, separators=(",", ":"))
        assert await intervals_json(head, intervals) == whole.encode()
    assert json.loads(await intervals_json(head, rows))["intervals"][2]["evidence"]["import_active_energy"]["end"]["before"] is None
