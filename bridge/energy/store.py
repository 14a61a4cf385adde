"""The energy store: closed intervals and each meter's open state, in SQLite, off the event loop.

One file, ``<state_dir>/energy.sqlite3``, WAL mode, ``synchronous=NORMAL``: a ``kill -9`` loses
nothing committed; a power cut can lose the last transactions since a checkpoint but never corrupts
the file and never double-counts, because the intervals and the state they were closed from are
written in ONE transaction (the recorder continues from the state that matches what is stored).

Tables (``PRAGMA user_version`` is the schema version; ``MIGRATIONS`` takes an older file forward):
- ``intervals(meter, start, end, status, clock_step, data)``, key (meter, start), WITHOUT ROWID;
  ``data`` is compact JSON: ``e`` energy per quantity, ``b`` [start, end] counter values per quantity,
  ``x`` the evidence (the readings either side of each boundary) per quantity;
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
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bridge.energy.types import Evidence, Interval

STORE_FILE = "energy.sqlite3"
SCHEMA_VERSION = 1
MIGRATIONS: dict[int, Sequence[str]] = {  # version -> statements taking a file from version - 1 to it
    1: ("CREATE TABLE intervals (meter TEXT NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL, "
        "status TEXT NOT NULL, clock_step INTEGER NOT NULL DEFAULT 0, data TEXT NOT NULL, "
        "PRIMARY KEY (meter, start)) WITHOUT ROWID",
        "CREATE TABLE meter_state (meter TEXT PRIMARY KEY, state TEXT NOT NULL, updated REAL NOT NULL)"),
}


class StoreError(Exception):
    """The store cannot be used (not ours, newer than this code, not readable)."""


def _evidence(e: Evidence) -> list:
    return [list(e.before) if e.before else None, list(e.after) if e.after else None]


def to_row(i: Interval) -> tuple:
    data: dict[str, Any] = {"e": dict(i.energy)}
    if i.start_values or i.end_values:
        data["b"] = {q: [i.start_values.get(q), i.end_values.get(q)] for q in i.energy}
    if i.evidence:
        data["x"] = {q: [_evidence(a), _evidence(b)] for q, (a, b) in i.evidence.items()}
    return (i.meter, i.start, i.end, i.status, int(i.clock_step), json.dumps(data, separators=(",", ":")))


def from_row(row: Sequence) -> Interval:
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
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not an energy store: {exc}") from None
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}, newer than this bridge's "
                             f"{SCHEMA_VERSION}: run the newer bridge, or move the file aside")
        if version < SCHEMA_VERSION:
            if read_only:
                raise StoreError(f"{self.path} has schema version {version}: start the bridge once to migrate it")
            self._migrate(version)

    def _migrate(self, version: int) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[v]:
                    self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def write(self, intervals: Iterable[Interval], states: Mapping[str, Any], now: float) -> None:
        """Closed intervals and the states they were closed from, in one transaction. An interval
        already stored is kept as it was (each is written once; a retry after a failed commit is safe)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany("INSERT OR IGNORE INTO intervals VALUES (?, ?, ?, ?, ?, ?)",
                                [to_row(i) for i in intervals])
            self.db.executemany("INSERT OR REPLACE INTO meter_state VALUES (?, ?, ?)",
                                [(k, json.dumps(v, separators=(",", ":")), now) for k, v in states.items()])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def states(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT meter, state FROM meter_state")}

    def intervals(self, meter: str, start: int, end: int) -> list[Interval]:
        """The stored intervals of ``meter`` starting in [start, end), in time order."""
        rows = self.db.execute("SELECT meter, start, end, status, clock_step, data FROM intervals "
                               "WHERE meter = ? AND start >= ? AND start < ? ORDER BY start", (meter, start, end))
        return [from_row(r) for r in rows]

    def meters(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT meter FROM intervals ORDER BY meter")]

    def last_end(self, meter: str) -> int | None:
        row = self.db.execute("SELECT max(end) FROM intervals WHERE meter = ?", (meter,)).fetchone()
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
