"""The energy store: closed intervals and each meter's open state, in SQLite, off the event loop.

One file, ``<state_dir>/energy.sqlite3``, WAL mode, ``synchronous=NORMAL``: a ``kill -9`` loses
nothing committed; a power cut can lose the last transactions since a checkpoint but never corrupts
the file and never double-counts, because the intervals and the state they were closed from are
written in ONE transaction (the recorder continues from the state that matches what is stored).

Tables (``PRAGMA user_version`` is the schema version; ``MIGRATIONS`` takes an older file forward):
- ``meters(id, name)``: each meter name once; intervals refer to it by ``id`` (a name in every row was
  a tenth of the file);
- ``intervals(meter, start, end, status, clock_step, <one column per quantity>, detail)``, key (meter,
  start), WITHOUT ROWID. The energies are INTEGER micro-units (1e-6 kWh/kvarh: the exact form
  ``bridge.energy.intervals`` computes them in), NULL where the meter has no such quantity, so a report
  is summed in SQL, exactly, without reading anything else. ``detail`` is what an auditor asks for and
  a report never does: compact JSON, per quantity (by column name) the boundary counter values and the
  readings either side of each boundary, values in micro-units, times in ms from the boundary;
- ``meter_state(meter, state, updated)``: the recorder's open interval per meter (``MeterIntervals.state``),
  and the balance alarms' run counts (key ``alarm:<virtual meter>``).

Threads: every call runs in ONE worker thread (a single-thread executor owns the connection). The
synchronous ``EnergyDb`` is also what ``modbus-bridge energy report`` reads, read-only, while the
bridge runs (WAL lets a reader in beside the writer).
"""
from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bridge.energy.intervals import MICRO, micro
from bridge.energy.report import Sums
from bridge.energy.types import DEMAND_QUANTITY, QUANTITIES, Evidence, Interval

STORE_FILE = "energy.sqlite3"
SCHEMA_VERSION = 2
COLUMNS = ("ia", "ea", "ir", "er", "ta", "tr")  # the energy columns, in QUANTITIES order
COLUMN = dict(zip(QUANTITIES, COLUMNS))
QUANTITY = dict(zip(COLUMNS, QUANTITIES))
_V2_TABLES = (
    "CREATE TABLE meters (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
    "CREATE TABLE intervals (meter INTEGER NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL, "
    "status TEXT NOT NULL, clock_step INTEGER NOT NULL DEFAULT 0, "
    + ", ".join(f"{c} INTEGER" for c in COLUMNS) + ", detail TEXT, PRIMARY KEY (meter, start)) WITHOUT ROWID",
)
_ROW = "meter, start, end, status, clock_step, " + ", ".join(COLUMNS)


def _v1_to_v2(db: sqlite3.Connection) -> None:
    """Version 1 kept every interval as one JSON document beside the meter's name: energies move to
    integer columns, the rest to ``detail``, names to ``meters``."""
    db.execute("ALTER TABLE intervals RENAME TO intervals_v1")
    for statement in _V2_TABLES:
        db.execute(statement)
    ids: dict[str, int] = {}
    rows = db.execute("SELECT meter, start, end, status, clock_step, data FROM intervals_v1 ORDER BY meter, start")
    while batch := rows.fetchmany(10_000):
        out = []
        for row in batch:
            interval = _from_v1(row)
            if interval.meter not in ids:
                ids[interval.meter] = db.execute("INSERT INTO meters (name) VALUES (?)", (interval.meter,)).lastrowid
            out.append(to_row(interval, ids[interval.meter]))
        db.executemany(f"INSERT INTO intervals VALUES ({', '.join('?' * (len(COLUMNS) + 6))})", out)
    db.execute("DROP TABLE intervals_v1")


MIGRATIONS: dict[int, Sequence[str] | Callable[[sqlite3.Connection], None]] = {
    # version -> what takes a file from version - 1 to it: statements, or a function of the connection
    1: ("CREATE TABLE intervals (meter TEXT NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL, "
        "status TEXT NOT NULL, clock_step INTEGER NOT NULL DEFAULT 0, data TEXT NOT NULL, "
        "PRIMARY KEY (meter, start)) WITHOUT ROWID",
        "CREATE TABLE meter_state (meter TEXT PRIMARY KEY, state TEXT NOT NULL, updated REAL NOT NULL)"),
    2: _v1_to_v2,
}


class StoreError(Exception):
    """The store cannot be used (not ours, newer than this code, not readable)."""


def _rel(point: tuple[float, float] | None, boundary: int) -> list | None:
    """A reading beside a boundary: [ms from the boundary, value in micro-units] (short, and exact enough:
    boundary values are micro-units themselves)."""
    return None if point is None else [round((point[0] - boundary) * 1000), micro(point[1])]


def _abs(point: list | None, boundary: int) -> tuple[float, float] | None:
    return None if point is None else (boundary + point[0] / 1000, point[1] / MICRO)


def _mu(value: float | None) -> int | None:
    return None if value is None else micro(value)


def to_row(i: Interval, meter_id: int) -> tuple:
    """The row of an interval: its energies in micro-units, the rest in ``detail``."""
    unknown = set(i.energy).difference(COLUMN)
    if unknown:
        raise ValueError(f"interval of {i.meter}: no column for {', '.join(sorted(unknown))}")
    detail = []
    for q in QUANTITIES:
        sv, ev = i.start_values.get(q), i.end_values.get(q)
        a, b = i.evidence.get(q, (None, None))
        if sv is None and ev is None and a is None and b is None:
            continue
        item = [COLUMN[q], _mu(sv), _mu(ev)]
        if a is not None or b is not None:
            item += [_rel(a.before, i.start) if a else None, _rel(a.after, i.start) if a else None,
                     _rel(b.before, i.end) if b else None, _rel(b.after, i.end) if b else None]
        detail.append(item)
    energies = tuple(None if q not in i.energy else micro(i.energy[q]) for q in QUANTITIES)
    return (meter_id, i.start, i.end, i.status, int(i.clock_step), *energies,
            json.dumps(detail, separators=(",", ":")) if detail else None)


def from_row(name: str, row: Sequence, detail: str | None = None) -> Interval:
    """An interval from its row (``_ROW``'s columns) and, when asked for, its ``detail``."""
    _, start, end, status, clock_step, *energies = row
    energy = {q: e / MICRO for q, e in zip(QUANTITIES, energies) if e is not None}
    if not detail:
        return Interval(name, start, end, status, energy, clock_step=bool(clock_step))
    start_values, end_values, evidence = {}, {}, {}
    for column, sv, ev, *points in json.loads(detail):
        q = QUANTITY[column]
        if sv is not None:
            start_values[q] = sv / MICRO
        if ev is not None:
            end_values[q] = ev / MICRO
        if points:
            sb, sa, eb, ea = points
            evidence[q] = (Evidence(_abs(sb, start), _abs(sa, start)), Evidence(_abs(eb, end), _abs(ea, end)))
    return Interval(name, start, end, status, energy, start_values, end_values, evidence, bool(clock_step))


def _from_v1(row: Sequence) -> Interval:
    meter, start, end, status, clock_step, text = row
    data = json.loads(text)
    bounds = data.get("b", {})
    evidence = {q: tuple(Evidence(*(tuple(p) if p else None for p in side)) for side in pair)
                for q, pair in data.get("x", {}).items()}
    return Interval(meter, start, end, status, data["e"],
                    {q: v[0] for q, v in bounds.items() if v[0] is not None},
                    {q: v[1] for q, v in bounds.items() if v[1] is not None},
                    evidence, bool(clock_step))


class EnergyDb:
    """The store, synchronous: for the worker thread and for the command line."""

    def __init__(self, path: Path | str, *, read_only: bool = False):
        self.path = Path(path)
        if read_only:
            if not self.path.exists():
                raise StoreError(f"no energy store at {self.path}: has the bridge run with an energy section?")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        else:
            self.db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            theirs = [r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise StoreError(f"{self.path} is not an energy store: {exc}") from None
        if version == 0 and theirs:  # another program's database: never write our tables into it
            self.db.close()
            raise StoreError(f"{self.path} is not an energy store (it holds the tables {', '.join(theirs)}): "
                             "move it aside or give the bridge another state_dir")
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}, newer than this bridge's "
                             f"{SCHEMA_VERSION}: run the newer bridge, or move the file aside")
        if not read_only:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
        if version < SCHEMA_VERSION:
            if read_only:
                raise StoreError(f"{self.path} has schema version {version}: start the bridge once to migrate it")
            self._migrate(version)
        self._ids: dict[str, int] = {}

    def _migrate(self, version: int) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for v in range(version + 1, SCHEMA_VERSION + 1):
                step = MIGRATIONS[v]
                if callable(step):
                    step(self.db)
                else:
                    for statement in step:
                        self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _id(self, name: str, *, create: bool = False) -> int | None:
        found = self._ids.get(name)
        if found is None:
            row = self.db.execute("SELECT id FROM meters WHERE name = ?", (name,)).fetchone()
            if row is None and create:
                row = (self.db.execute("INSERT INTO meters (name) VALUES (?)", (name,)).lastrowid,)
            if row is not None:
                found = self._ids[name] = row[0]
        return found

    def write(self, intervals: Iterable[Interval], states: Mapping[str, Any], now: float) -> None:
        """Closed intervals and the states they were closed from, in one transaction. An interval
        already stored is kept as it was (each is written once; a retry after a failed commit is safe)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            rows = [to_row(i, self._id(i.meter, create=True)) for i in intervals]
            self.db.executemany(f"INSERT OR IGNORE INTO intervals VALUES ({', '.join('?' * (len(COLUMNS) + 6))})",
                                rows)
            self.db.executemany("INSERT OR REPLACE INTO meter_state VALUES (?, ?, ?)",
                                [(k, json.dumps(v, separators=(",", ":")), now) for k, v in states.items()])
            self.db.execute("COMMIT")
        except BaseException:
            self._ids.clear()  # an id made in the rolled-back transaction does not exist
            self.db.execute("ROLLBACK")
            raise

    def states(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT meter, state FROM meter_state")}

    def intervals(self, meter: str, start: int, end: int, detail: bool = False) -> list[Interval]:
        """The stored intervals of ``meter`` starting in [start, end), in time order; with their boundary
        values and evidence when ``detail``."""
        meter_id = self._id(meter)
        if meter_id is None:
            return []
        rows = self.db.execute(f"SELECT {_ROW}{', detail' if detail else ''} FROM intervals "
                               "WHERE meter = ? AND start >= ? AND start < ? ORDER BY start", (meter_id, start, end))
        if detail:
            return [from_row(meter, r[:-1], r[-1]) for r in rows]
        return [from_row(meter, r) for r in rows]

    def sums(self, meters: Sequence[str], start: int, end: int, interval_s: int,
             tariff_at: Callable[[int], str] | None = None) -> dict[str, Sums]:
        """Each meter's intervals starting in [start, end), summed in SQL: energy per quantity and per
        tariff (``tariff_at(interval start)``), statuses, and the highest block demand."""
        if tariff_at is not None:  # the period's slots and their tariffs: one join instead of a call per row
            first = -(-start // interval_s) * interval_s
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS _tariff (start INTEGER PRIMARY KEY, name TEXT NOT NULL)")
            self.db.execute("DELETE FROM temp._tariff")
            self.db.executemany("INSERT INTO temp._tariff VALUES (?, ?)",
                                ((t, tariff_at(t)) for t in range(first, end, interval_s)))
        return {m: self._sums(m, start, end, tariff_at) for m in meters}

    def _sums(self, meter: str, start: int, end: int, tariff_at: Callable[[int], str] | None) -> Sums:
        out = Sums()
        meter_id = self._id(meter)
        if meter_id is None:
            return out
        args = (meter_id, start, end)
        where = "i.meter = ? AND i.start >= ? AND i.start < ?"
        sums = ", ".join(f"sum({c}), count({c})" for c in COLUMNS)
        join = "LEFT JOIN temp._tariff t ON t.start = i.start" if tariff_at else ""
        unplaced = False
        for name, status, n, *pairs in self.db.execute(
                f"SELECT {'t.name' if tariff_at else 'NULL'}, status, count(*), {sums} FROM intervals i {join} "
                f"WHERE {where} GROUP BY 1, 2", args):
            out.count += n
            out.statuses[status] = out.statuses.get(status, 0) + n
            if tariff_at and name is None:
                unplaced = True  # a start off the period's slots (the interval length changed): below
            else:
                self._add(out, name, pairs)
        if unplaced:
            for at, *pairs in self.db.execute(f"SELECT i.start, {sums} FROM intervals i {join} WHERE {where} "
                                              "AND t.name IS NULL GROUP BY i.start", args):
                self._add(out, tariff_at(at), pairs)
        demand = f"({COLUMN[DEMAND_QUANTITY]} / 1000000.0) * 1000.0 * 3600.0 / (i.end - i.start)"  # as Interval.demand
        best = self.db.execute(f"SELECT max({demand}) FROM intervals i WHERE {where}", args).fetchone()[0]
        if best is not None:
            at = self.db.execute(f"SELECT min(i.start) FROM intervals i WHERE {where} AND {demand} = ?",
                                 (*args, best)).fetchone()[0]
            out.best = (best, at)
        return out

    @staticmethod
    def _add(out: Sums, tariff: str | None, pairs: Sequence) -> None:
        bucket = out.by_tariff.setdefault(tariff, {}) if tariff is not None else None
        for q, total, n in zip(QUANTITIES, pairs[::2], pairs[1::2]):
            if n:
                out.energy[q] = out.energy.get(q, 0) + total
                if bucket is not None:
                    bucket[q] = bucket.get(q, 0) + total

    def meters(self) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT name FROM meters WHERE EXISTS (SELECT 1 FROM intervals WHERE meter = meters.id) ORDER BY name")]

    def last_end(self, meter: str) -> int | None:
        meter_id = self._id(meter)
        if meter_id is None:
            return None
        row = self.db.execute("SELECT max(end) FROM intervals WHERE meter = ?", (meter_id,)).fetchone()
        return row[0] if row else None

    def prune(self, before: int) -> int:
        """Delete intervals that ended before ``before`` (retention); returns how many."""
        return self.db.execute("DELETE FROM intervals WHERE end < ?", (before,)).rowcount

    def size(self) -> int:
        """Bytes on disk (the file and its WAL)."""
        wal = self.path.with_name(self.path.name + "-wal")
        return sum(p.stat().st_size for p in (self.path, wal) if p.exists())

    def close(self) -> None:
        self.db.close()


class EnergyStore:
    """``EnergyDb`` in its own worker thread: every call in order, never on the event loop."""

    def __init__(self, db: EnergyDb, pool: ThreadPoolExecutor):
        self._db = db
        self._pool = pool

    @classmethod
    async def open(cls, path: Path) -> EnergyStore:
        pool = ThreadPoolExecutor(1, thread_name_prefix="energy-store")
        try:
            db = await asyncio.get_running_loop().run_in_executor(pool, EnergyDb, path)
        except BaseException:
            pool.shutdown(wait=False)
            raise
        return cls(db, pool)

    async def call(self, fn_name: str, *args: Any) -> Any:
        """Run ``EnergyDb.<fn_name>(*args)`` in the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, getattr(self._db, fn_name), *args)

    async def run(self, fn, *args: Any) -> Any:
        """Run ``fn(db, *args)`` in the worker thread (a query made of several calls)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, self._db, *args)

    async def close(self) -> None:
        try:
            await self.call("close")
        finally:
            self._pool.shutdown(wait=False)
