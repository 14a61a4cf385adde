"""The energy store (bridge/energy/store.py) on real SQLite files: what goes in comes back, a report's
sums in SQL equal the pure ones, a version-1 file is migrated whole, and files it cannot use are refused
with a line that says what to do."""
from __future__ import annotations

import json
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.energy.intervals import MICRO
from bridge.energy.report import sums_of
from bridge.energy.store import EnergyDb, StoreError
from bridge.energy.types import STATUSES, Evidence, Interval

IMP, EXP = "import_active_energy", "export_active_energy"
T0 = 1_774_742_400  # 2026-03-29 00:00 UTC, a multiple of 900


def interval(meter: str, start: int, imp: int, exp: int | None = 7, status: str = "complete", length: int = 900,
             detail: bool = True) -> Interval:
    energy = {IMP: imp / MICRO} | ({EXP: exp / MICRO} if exp is not None else {})
    if not detail:
        return Interval(meter, start, start + length, status, energy)
    a, z = 1000.25, 1000.25 + imp / MICRO
    return Interval(meter, start, start + length, status, energy, {IMP: a}, {IMP: z},
                    {IMP: (Evidence((start - 0.4, a - 0.001), (start + 0.6, a + 0.002)),
                           Evidence((start + length - 0.5, z - 0.001), None))}, clock_step=status == "estimated")


def test_an_interval_comes_back_as_written_its_detail_only_when_asked(tmp_path):
    db = EnergyDb(tmp_path / "e.sqlite3")
    written = [interval("incomer", T0, 1_234_567), interval("tenant-1", T0, 5, None, "estimated"),
               interval("incomer", T0 + 900, 0, 0, "reset")]
    db.write(written, {"incomer": {"open": 1}}, 1.0)
    got = db.intervals("incomer", T0, T0 + 1800, detail=True)
    assert got == [written[0], written[2]]
    plain = db.intervals("incomer", T0, T0 + 1800)
    assert [(i.start, i.end, i.status, dict(i.energy), i.clock_step) for i in plain] == \
        [(i.start, i.end, i.status, dict(i.energy), i.clock_step) for i in written[::2]]
    assert not any(i.start_values or i.end_values or i.evidence for i in plain)
    assert db.intervals("tenant-1", 0, 2**40, detail=True) == [written[1]]
    assert db.intervals("nobody", 0, 2**40) == [] and db.last_end("nobody") is None
    assert db.meters() == ["incomer", "tenant-1"] and db.last_end("incomer") == T0 + 1800
    assert db.states() == {"incomer": {"open": 1}}
    db.write([interval("incomer", T0, 99)], {}, 2.0)  # written once: a retry never changes it
    assert db.intervals("incomer", T0, T0 + 1)[0].energy[IMP] == 1_234_567 / MICRO


def test_evidence_times_are_kept_to_the_millisecond(tmp_path):
    db = EnergyDb(tmp_path / "e.sqlite3")
    iv = Interval("m", T0, T0 + 900, "complete", {IMP: 0.5}, {IMP: 10.0}, {IMP: 10.5},
                  {IMP: (Evidence((T0 - 0.123456, 9.99), (T0 + 0.876543, 10.01)), Evidence(None, None))})
    db.write([iv], {}, 0.0)
    (got,) = db.intervals("m", 0, 2**40, detail=True)
    before, after = got.evidence[IMP][0].before, got.evidence[IMP][0].after
    assert before[0] == pytest.approx(T0 - 0.123, abs=1e-6) and before[1] == 9.99
    assert after[0] == pytest.approx(T0 + 0.877, abs=1e-6) and after[1] == 10.01
    assert got.evidence[IMP][1] == Evidence(None, None)


def test_a_version_1_file_is_migrated_whole_on_first_open(tmp_path):
    path = tmp_path / "e.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE intervals (meter TEXT NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL, "
                "status TEXT NOT NULL, clock_step INTEGER NOT NULL DEFAULT 0, data TEXT NOT NULL, "
                "PRIMARY KEY (meter, start)) WITHOUT ROWID")
    old.execute("CREATE TABLE meter_state (meter TEXT PRIMARY KEY, state TEXT NOT NULL, updated REAL NOT NULL)")
    data = {"e": {IMP: 0.25, EXP: 0.0}, "b": {IMP: [100.0, 100.25], EXP: [5.0, 5.0]},
            "x": {IMP: [[[T0 - 0.5, 99.99], [T0 + 0.5, 100.01]], [[T0 + 899.5, 100.24], None]]}}
    old.execute("INSERT INTO intervals VALUES ('incomer', ?, ?, 'estimated', 1, ?)", (T0, T0 + 900, json.dumps(data)))
    old.execute("INSERT INTO intervals VALUES ('unmetered', ?, ?, 'complete', 0, ?)",
                (T0, T0 + 900, json.dumps({"e": {IMP: -0.125}})))
    old.execute("INSERT INTO meter_state VALUES ('incomer', '{\"open\": 2}', 5.0)")
    old.execute("PRAGMA user_version = 1")
    old.commit()
    old.close()
    with pytest.raises(StoreError, match="schema version 1: start the bridge once to migrate it"):
        EnergyDb(path, read_only=True)

    db = EnergyDb(path)
    assert db.db.execute("PRAGMA user_version").fetchone()[0] == 2
    (incomer,) = db.intervals("incomer", 0, 2**40, detail=True)
    assert incomer == Interval("incomer", T0, T0 + 900, "estimated", {IMP: 0.25, EXP: 0.0},
                               {IMP: 100.0, EXP: 5.0}, {IMP: 100.25, EXP: 5.0},
                               {IMP: (Evidence((T0 - 0.5, 99.99), (T0 + 0.5, 100.01)),
                                      Evidence((T0 + 899.5, 100.24), None))}, True)
    assert db.intervals("unmetered", 0, 2**40)[0].energy == {IMP: -0.125}
    assert db.states() == {"incomer": {"open": 2}}
    db.close()
    assert EnergyDb(path, read_only=True).intervals("incomer", 0, 2**40)[0].energy[IMP] == 0.25


def test_a_newer_or_foreign_file_is_refused_and_left_alone(tmp_path):
    newer = tmp_path / "newer.sqlite3"
    c = sqlite3.connect(newer)
    c.execute("PRAGMA user_version = 9")
    c.close()
    with pytest.raises(StoreError, match="schema version 9, newer than this bridge's 2: run the newer bridge"):
        EnergyDb(newer)
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="is not an energy store"):
        EnergyDb(junk)
    theirs = tmp_path / "theirs.sqlite3"
    c = sqlite3.connect(theirs)
    c.execute("CREATE TABLE stuff (x)")
    c.close()
    with pytest.raises(StoreError, match=r"holds the tables stuff\): move it aside or give the bridge another state_dir"):
        EnergyDb(theirs)
    assert sqlite3.connect(theirs).execute("SELECT name FROM sqlite_master").fetchall() == [("stuff",)]
    with pytest.raises(StoreError, match="no energy store at .*has the bridge run with an energy section"):
        EnergyDb(tmp_path / "absent.sqlite3", read_only=True)


def tariff(start: int) -> str:
    """Peak from 08:00 to 20:00 UTC, off-peak otherwise: by the start, as a TariffPlan judges it."""
    return "peak" if 8 <= (start % 86400) // 3600 < 20 else "offpeak"


slots = st.lists(st.tuples(st.integers(0, 400),  # slot index
                           st.sampled_from([0, 0, 0, 300]),  # an offset: a start off the grid (length changed)
                           st.integers(-5_000_000, 50_000_000), st.one_of(st.none(), st.integers(0, 10**9)),
                           st.sampled_from(STATUSES), st.sampled_from(["a", "b"])), max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=slots, window=st.tuples(st.integers(0, 200), st.integers(1, 250)))
def test_sums_in_sql_equal_the_pure_sums(tmp_path_factory, rows, window):
    """The report's figures summed by SQLite (integer micro-units, tariffs by a join on the period's
    slots, the highest demand and the earliest of equals) are those summed in Python from the intervals."""
    db = EnergyDb(tmp_path_factory.mktemp("s") / "e.sqlite3")
    intervals = {}
    for k, off, imp, exp, status, meter in rows:
        start = T0 + 900 * k + off
        intervals[meter, start] = interval(meter, start, imp, exp, status, detail=False)
    db.write(intervals.values(), {}, 0.0)
    begin, end = T0 + 900 * window[0], T0 + 900 * (window[0] + window[1])
    for tariff_at in (None, tariff):
        got = db.sums(["a", "b", "c"], begin, end, 900, tariff_at)
        for meter in ("a", "b", "c"):
            mine = [iv for (m, s), iv in intervals.items() if m == meter and begin <= s < end]
            assert got[meter] == sums_of(mine, tariff_at), meter
