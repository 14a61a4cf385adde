"""The MQTT side's store-and-forward queue: what could not be sent yet, kept on disk, replayed in order.

While the broker is unreachable (or the Sparkplug primary host is offline) every message the bridge would
have sent is written here; on reconnect it is read back oldest first (``peek``), and a record leaves the
queue only when the broker acknowledged it (``ack`` after the PUBACK). Delivery is at least once: a record
handed out but not acknowledged before a crash is handed out again.

Storage
    One SQLite file, ``<state_dir>/mqtt-queue.sqlite3`` (stdlib ``sqlite3``), in WAL mode. One table,
    ``queue(id INTEGER PRIMARY KEY AUTOINCREMENT, stream, topic, payload BLOB, qos, retain, created REAL)``:
    ``id`` is the order (AUTOINCREMENT: never reused, even after the table emptied), ``stream`` the flavour
    ("json", "sparkplug"; indexed, so a peek of one stream does not scan the other's records), ``created``
    the wall time the message was made (indexed, for the age bound). ``PRAGMA user_version`` is the schema
    version; ``_MIGRATIONS`` takes an older file forward. A file that is not usable — not a database,
    corrupt, a schema newer than this code or not ours — is moved aside to ``<name>.corrupt-<UTC time>``
    (with its ``-wal``; a stale WAL must never be applied to a new file), a new one is made, and it is
    counted (``corrupt``) and told (``last_error``, one warning in the log).

Bounds
    Enforced in the same transaction as every ``put`` (and the age bound also before every ``peek``):
    records older than ``max_age`` seconds (by ``created``) are dropped, then the oldest records until the
    queued bytes are within ``max_bytes``. Queued bytes are the sum of topic (UTF-8) and payload lengths:
    the file itself is larger (SQLite pages, the two indexes; about 1.3x for 300-byte messages, plus a WAL
    of at most a few MB) and does not shrink when records leave — freed pages are reused, so it stays at
    its high-water mark. Every record dropped by a bound is counted (``dropped``); the first drop after the
    queue was last empty is logged once.

Durability (the fsync policy): ``synchronous=NORMAL`` in WAL mode, the default here.
    A commit appends the transaction to the WAL with ``write()`` — it is in the kernel's page cache when
    ``put`` returns — and SQLite fsyncs only at checkpoints (every ~4 MB of WAL). So a ``kill -9`` of the
    bridge (or any crash of the process) loses nothing that was queued: the kernel still writes it out.
    A power cut or kernel crash can lose the transactions committed since the last checkpoint — up to the
    last ~4 MB of queued messages, a minute or so of a busy bridge's outage — but does not corrupt the
    file (WAL frames are checksummed; a torn tail is ignored on recovery), given storage that honours
    fsync. ``synchronous="FULL"`` fsyncs the WAL at every commit: nothing ``put`` has returned from is
    lost even on a power cut, at the cost of one fsync per ``put`` call (a batch) — cheap on a server SSD,
    often several to tens of ms (not measured here) and flash wear on an SD card, for a queue that only
    fills while the broker is away.
    Measured on the development VM (virtio disk, a raw fsync 0.17 ms; a busy machine): a put of 240
    messages of ~300 bytes takes 1.2-2.0 ms with NORMAL, 1.6-1.9 ms with FULL; single-message puts run at
    5,000-13,000/s with NORMAL, 3,200-3,600/s with FULL. The trade favours NORMAL: the queue guards
    against a broker outage, and what it risks on a power cut is the last minute or so of an outage's
    telemetry, which the same power cut also stops producing. ``open`` takes ``synchronous="FULL"`` for a
    deployment that wants it.

Errors
    A full disk or an I/O error is a normal event: ``put`` never raises for it — it counts the records it
    could not keep (``dropped_disk_full``), sets ``last_error``, logs a warning once per episode (and an
    info line when writing works again) and simply tries again on the next call. An ``ack`` that cannot
    write keeps the ids in memory — ``peek`` no longer hands them out — and deletes them with the next
    ``ack`` or ``put`` that works. A ``peek`` that cannot read returns ``[]`` and sets ``last_error``. A file
    found corrupt while running is set aside like one found at open (what it held is counted in
    ``dropped_corrupt``) and the next call starts a new one. ``open`` raises ``OSError`` only for what the
    operator must fix (the file or its folder not writable, another process holding the lock); when it
    cannot write for lack of space it returns a queue that retries on every call.

Threads
    Every SQLite call runs in ONE worker thread owned by the queue (a single-thread executor; the
    connection is created there and, with ``check_same_thread``, can be used nowhere else); the async
    methods only wait for it, so they never block the event loop, and calls run in the order they were made.
    ``stats()`` is synchronous: it reads counters the worker publishes after each call.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from bridge.core.mqtt_types import Publish

log = logging.getLogger("bridge.mqtt.queue")

T = TypeVar("T")

Record = tuple[str, Publish, float]  # (stream, message, created: wall time)
Peeked = tuple[int, Publish, float, str]  # (id, message, created, stream)

SCHEMA_VERSION = 1
SYNCHRONOUS = ("NORMAL", "FULL")
BUSY_TIMEOUT = 5.0  # seconds: another connection (an operator's sqlite3 shell) holding the write lock
WAL_LIMIT = 8 * 1024 * 1024  # journal_size_limit: the WAL is truncated back to this after a big transaction
_CHUNK = 500  # ids per DELETE ... IN (...)

_COLUMNS = ("id", "stream", "topic", "payload", "qos", "retain", "created")
_SIZE = "length(CAST(topic AS BLOB)) + length(payload)"  # the bytes a record counts for (topic as UTF-8)


def _create_v1(db: sqlite3.Connection) -> None:
    db.execute("""CREATE TABLE queue (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        stream TEXT NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        created REAL NOT NULL)""")
    db.execute("CREATE INDEX queue_created ON queue(created)")
    db.execute("CREATE INDEX queue_stream ON queue(stream)")  # (stream, rowid): a stream's records in order


# user_version N -> the step to N + 1, each run in one transaction with the version bump
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {0: _create_v1}


class _Unusable(sqlite3.DatabaseError):
    """The file is a database, but not one this code can use (not ours, or a newer schema)."""


def _code(exc: BaseException) -> int:
    """The primary SQLite result code of an error (-1 when it carries none)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else -1


def _is_corrupt(exc: BaseException) -> bool:
    return isinstance(exc, _Unusable) or _code(exc) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _is_operator_problem(exc: BaseException) -> bool:
    """What retrying will not fix and the operator must: permissions, a read-only file, a held lock."""
    if isinstance(exc, OSError):
        return exc.errno not in _SPACE_ERRNOS
    return _code(exc) in (sqlite3.SQLITE_PERM, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN,
                          sqlite3.SQLITE_AUTH, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


_SPACE_ERRNOS = frozenset({28, 122, 27, 5})  # ENOSPC, EDQUOT, EFBIG, EIO: the disk, not the setup


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    name = getattr(exc, "sqlite_errorname", "")
    return f"{exc} ({name})" if name else str(exc)


def _size(message: Publish) -> int:
    return len(message.topic.encode()) + len(message.payload)


class DiskQueue:
    """The on-disk queue; make one with ``await DiskQueue.open(...)``, end it with ``await close()``."""

    def __init__(self, path: Path, max_bytes: int, max_age: float, *, synchronous: str = "NORMAL",
                 clock: Callable[[], float] = time.time):
        if max_bytes <= 0 or max_age <= 0:
            raise ValueError("max_bytes and max_age must be positive")
        if synchronous.upper() not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.synchronous = synchronous.upper()
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mqtt-queue")
        self._closed = False
        # below: touched by the worker thread only
        self._db: sqlite3.Connection | None = None
        self._queued = 0
        self._bytes = 0
        self._oldest: float | None = None  # min(created) of what is queued
        self._pending_acks: set[int] = set()  # acknowledged, but the delete could not be written yet
        self._dropped = 0
        self._dropped_disk_full = 0
        self._dropped_corrupt = 0
        self._corrupt = 0
        self._acked = 0
        self._last_error = ""
        self._failing = False  # writes are failing (disk full, I/O error): told once, until they work again
        self._episode_drops = 0  # records refused since writes began failing
        self._bound_told = False  # a bound dropped records since the queue was last empty
        self._published: dict[str, Any] = {}
        self._publish()

    # ------------------------------------------------------------------ the async API
    @classmethod
    async def open(cls, path: Path, max_bytes: int, max_age: float, *, synchronous: str = "NORMAL",
                   clock: Callable[[], float] = time.time) -> DiskQueue:
        """Open (create, migrate; move an unusable file aside) the queue at ``path``.

        ``OSError`` when the operator must act (file or folder not writable, the file locked by another
        process); a full disk is not that: the queue is returned and retries on every call."""
        queue = cls(path, max_bytes, max_age, synchronous=synchronous, clock=clock)
        try:
            await queue._run(queue._open)
        except BaseException:
            queue._closed = True
            queue._pool.shutdown(wait=False)
            raise
        return queue

    async def put(self, records: Sequence[Record]) -> None:
        """Append ``(stream, message, created)`` records, in order, in one transaction; then apply the bounds.
        Never raises for a full disk or an I/O error (see the module's notes): the records are counted
        in ``dropped_disk_full``."""
        if records:
            await self._run(self._put, list(records))

    async def peek(self, limit: int, stream: str | None = None, after: int = 0) -> list[Peeked]:
        """The oldest ``limit`` records (of ``stream``, or of all) with an id above ``after``, oldest
        first, as ``(id, message, created, stream)``; they stay queued until ``ack``. ``after`` lets a
        reader fetch the next batch while the previous one still awaits its acknowledgements."""
        if limit <= 0:
            return []
        return await self._run(self._peek, limit, stream, after)

    async def ack(self, ids: Iterable[int]) -> None:
        """The broker acknowledged these records: delete them (ids no longer queued are ignored)."""
        ids = [int(i) for i in ids]
        if ids:
            await self._run(self._ack, ids)

    def stats(self) -> dict[str, Any]:
        """Counters as of the last call the worker finished (synchronous, no I/O):

        ``queued`` records and ``queued_bytes`` (topic + payload), ``oldest_age`` (seconds, 0 when empty),
        ``dropped`` (by a bound), ``dropped_disk_full`` (puts that could not be written),
        ``dropped_corrupt`` (queued in a file found corrupt while running), ``corrupt`` (files moved
        aside), ``acked`` (records deleted by ``ack``: replayed and acknowledged), ``write_failing``
        (writes are failing now), ``last_error`` ("" when none yet)."""
        out = dict(self._published)
        oldest = out.pop("oldest_created")
        out["oldest_age"] = max(0.0, self._clock() - oldest) if oldest is not None and out["queued"] else 0.0
        return out

    async def close(self) -> None:
        """Finish the calls already made, checkpoint and close the file; idempotent."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        self._closed = True
        try:
            await loop.run_in_executor(self._pool, self._close)
        finally:
            self._pool.shutdown(wait=False)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError("the MQTT queue is closed")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ------------------------------------------------------------------ the worker thread
    def _publish(self) -> None:
        self._published = {  # replaced whole: stats() never sees half an update
            "queued": self._queued, "queued_bytes": self._bytes, "oldest_created": self._oldest,
            "dropped": self._dropped, "dropped_disk_full": self._dropped_disk_full,
            "dropped_corrupt": self._dropped_corrupt, "corrupt": self._corrupt, "acked": self._acked,
            "write_failing": self._failing, "last_error": self._last_error,
        }

    def _open(self) -> None:
        try:
            self._connection()
        except (sqlite3.Error, OSError) as exc:
            if _is_operator_problem(exc):
                self._drop_connection()
                raise OSError(getattr(exc, "errno", None), f"{_describe(exc)}: {self.path}") from None
            self._write_failed(exc, 0)  # no space: a queue that retries
        else:
            try:  # the bounds may have shrunk since the last run
                with self._transaction() as db:
                    dropped = self._enforce(db, self._clock())
                self._account_drops(dropped)
            except (sqlite3.Error, OSError) as exc:
                self._write_failed(exc, 0)
        self._publish()

    def _put(self, records: list[Record]) -> None:
        rows = [(stream, m.topic, m.payload, int(m.qos), int(bool(m.retain)), float(created))
                for stream, m, created in records]
        size = sum(_size(m) for _, m, _ in records)
        try:
            with self._transaction() as db:
                db.executemany("INSERT INTO queue (stream, topic, payload, qos, retain, created) "
                               "VALUES (?, ?, ?, ?, ?, ?)", rows)
                self._queued += len(rows)  # provisional: _transaction restores the counters on failure
                self._bytes += size
                first = min(created for *_, created in rows)
                self._oldest = first if self._oldest is None else min(self._oldest, first)
                dropped = self._enforce(db, self._clock())
                acked = self._delete(db, self._pending_acks) if self._pending_acks else 0
        except (sqlite3.Error, OSError) as exc:
            self._write_failed(exc, len(rows))
        else:
            self._pending_acks = set()
            self._acked += acked
            self._account_drops(dropped)
            self._write_worked()
        self._publish()

    def _peek(self, limit: int, stream: str | None, after: int = 0) -> list[Peeked]:
        try:
            if self._oldest is not None and self._oldest < self._clock() - self.max_age:
                try:
                    with self._transaction() as db:
                        dropped = self._enforce(db, self._clock())
                    self._account_drops(dropped)
                except (sqlite3.Error, OSError) as exc:
                    if _is_corrupt(exc):
                        raise
                    self._note(exc)  # cannot drop the expired ones now: hand out what is there
            db = self._connection()
            where, args = ("WHERE id > ? AND stream = ? ", (after, stream)) if stream is not None \
                else ("WHERE id > ? ", (after,))
            skip = self._pending_acks
            rows = db.execute(f"SELECT id, topic, payload, qos, retain, created, stream FROM queue {where}"
                              "ORDER BY id LIMIT ?", (*args, limit + len(skip))).fetchall()
        except (sqlite3.Error, OSError) as exc:
            self._note(exc)
            self._publish()
            return []
        self._publish()
        out = [(rid, Publish(topic, bytes(payload), qos, bool(retain)), created, st)
               for rid, topic, payload, qos, retain, created, st in rows if rid not in skip]
        return out[:limit]

    def _ack(self, ids: list[int]) -> None:
        todo = self._pending_acks | set(ids)
        try:
            with self._transaction() as db:
                acked = self._delete(db, todo)
        except (sqlite3.Error, OSError) as exc:
            self._pending_acks = todo  # peek skips them; the next ack or put that can write deletes them
            self._write_failed(exc, 0)
        else:
            self._pending_acks = set()
            self._acked += acked
            if not self._queued:
                self._bound_told = False
            self._write_worked()
        self._publish()

    def _close(self) -> None:
        if self._db is not None:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
        self._drop_connection()
        self._publish()

    # ------------------------------------------------------------------ the worker's helpers
    def _transaction(self) -> _Transaction:
        return _Transaction(self)

    def _enforce(self, db: sqlite3.Connection, now: float) -> int:
        """Apply both bounds inside the caller's transaction; the number of records dropped."""
        dropped = 0
        cutoff = now - self.max_age
        if self._oldest is not None and self._oldest < cutoff:
            count, size = db.execute(f"SELECT count(*), coalesce(sum({_SIZE}), 0) FROM queue WHERE created < ?",
                                     (cutoff,)).fetchone()
            db.execute("DELETE FROM queue WHERE created < ?", (cutoff,))
            self._queued, self._bytes, dropped = self._queued - count, self._bytes - size, dropped + count
            self._oldest = self._min_created(db)
        excess = self._bytes - self.max_bytes
        if excess > 0:
            freed = count = 0
            last = None
            cursor = db.execute(f"SELECT id, {_SIZE} FROM queue ORDER BY id")
            for last, size in cursor:
                freed, count = freed + size, count + 1
                if freed >= excess:
                    break
            cursor.close()
            if last is not None:
                db.execute("DELETE FROM queue WHERE id <= ?", (last,))
            self._queued, self._bytes, dropped = self._queued - count, self._bytes - freed, dropped + count
            self._oldest = self._min_created(db)
        return dropped

    def _delete(self, db: sqlite3.Connection, ids: set[int]) -> int:
        """Delete these records inside the caller's transaction; how many were still queued."""
        gone = gone_bytes = 0
        ordered = sorted(ids)
        for start in range(0, len(ordered), _CHUNK):
            chunk = ordered[start:start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            count, size = db.execute(f"SELECT count(*), coalesce(sum({_SIZE}), 0) FROM queue "
                                     f"WHERE id IN ({marks})", chunk).fetchone()
            db.execute(f"DELETE FROM queue WHERE id IN ({marks})", chunk)
            gone, gone_bytes = gone + count, gone_bytes + size
        self._queued -= gone
        self._bytes -= gone_bytes
        self._oldest = self._min_created(db)
        return gone

    @staticmethod
    def _min_created(db: sqlite3.Connection) -> float | None:
        return db.execute("SELECT min(created) FROM queue").fetchone()[0]  # the created index: O(log n)

    def _account_drops(self, dropped: int) -> None:
        if not dropped:
            return
        self._dropped += dropped
        if not self._bound_told:
            self._bound_told = True
            log.warning("MQTT queue %s: a bound was reached (%s MB, %s s): dropping the oldest messages "
                        "(counted)", self.path, f"{self.max_bytes / 1048576:g}", f"{self.max_age:g}")

    def _note(self, exc: BaseException) -> None:
        """Remember the error; a corrupt file is set aside (a new one is made on the next call)."""
        self._last_error = f"{self.path}: {_describe(exc)}"
        if _is_corrupt(exc):
            try:
                self._set_aside(exc)
            except OSError as move:
                self._last_error = f"{self._last_error}; {move.strerror}"

    def _write_failed(self, exc: BaseException, records: int) -> None:
        self._dropped_disk_full += records
        self._note(exc)
        if _is_corrupt(exc):
            return
        self._episode_drops += records
        if not self._failing:
            self._failing = True
            log.warning("MQTT queue: cannot write %s (%s); messages that cannot be kept are dropped and counted "
                        "until it can", self.path, _describe(exc))

    def _write_worked(self) -> None:
        if self._failing:
            self._failing = False
            log.info("MQTT queue: writing %s again (%d messages could not be kept meanwhile)",
                     self.path, self._episode_drops)
            self._episode_drops = 0

    def _connection(self) -> sqlite3.Connection:
        """The open connection, (re)opening the file when needed; an unusable file is set aside first."""
        if self._db is not None:
            return self._db
        try:
            db = self._connect()
        except sqlite3.Error as exc:
            if not _is_corrupt(exc):
                raise
            db = self._connect()  # _connect has set the unusable file aside: a new one
        self._db = db
        return db

    def _connect(self) -> sqlite3.Connection:
        # our own open first: an OSError with its errno tells "not allowed" from "no space"
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640))
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            version = self._check(db)  # before anything writes to a file that may not be ours
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("MQTT queue %s: journal mode %s, not WAL", self.path, mode)
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            self._migrate(db, version)
            # reads every leaf page of the table: a damaged one shows here, not in the middle of a replay
            count, size, oldest = db.execute(
                f"SELECT count(*), coalesce(sum({_SIZE}), 0), min(created) FROM queue").fetchone()
        except BaseException as exc:
            try:
                if _is_corrupt(exc):  # before closing it: SQLite deletes (or checkpoints) the WAL on close
                    self._set_aside(exc)
            finally:
                db.close()
            raise
        self._queued, self._bytes, self._oldest = count, size, oldest
        return db

    @staticmethod
    def _check(db: sqlite3.Connection) -> int:
        """The file's schema version; ``_Unusable`` when it is newer than this code's or not a queue."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise _Unusable(f"schema version {version} is newer than this bridge's {SCHEMA_VERSION}")
        if version == 0:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables - {"sqlite_sequence"}:
                raise _Unusable(f"a database of something else (tables {', '.join(sorted(tables))})")
        return version

    @staticmethod
    def _migrate(db: sqlite3.Connection, version: int) -> None:
        """Take the file from ``version`` to ``SCHEMA_VERSION``, one transaction per step."""
        while version < SCHEMA_VERSION:
            db.execute("BEGIN IMMEDIATE")
            try:
                _MIGRATIONS[version](db)
                db.execute(f"PRAGMA user_version = {version + 1}")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            version += 1
        columns = tuple(row[1] for row in db.execute("PRAGMA table_info(queue)"))
        if columns != _COLUMNS:
            raise _Unusable(f"table queue has columns {columns}, not {_COLUMNS}")

    def _drop_connection(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None

    def _set_aside(self, exc: BaseException) -> None:
        """Move the unusable file (and its WAL) aside, then close it; the next call makes a new one."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        try:
            os.replace(self.path, aside)
            wal = Path(f"{self.path}-wal")
            if wal.exists():
                os.replace(wal, f"{aside}-wal")
            for stale in (Path(f"{self.path}-shm"), Path(f"{self.path}-journal")):
                stale.unlink(missing_ok=True)
        except OSError as move:
            raise OSError(move.errno, f"cannot move the unusable queue aside ({move.strerror}): {self.path}") \
                from None
        finally:
            self._drop_connection()
        self._corrupt += 1
        self._dropped_corrupt += self._queued  # what it held (0 when found at open)
        self._queued, self._bytes, self._oldest, self._pending_acks = 0, 0, None, set()
        self._last_error = f"{self.path}: {_describe(exc)}; moved aside to {aside.name}, a new queue started"
        log.warning("MQTT queue: %s", self._last_error)


class _Transaction:
    """``with``: BEGIN IMMEDIATE ... COMMIT on the queue's connection; on any error, ROLLBACK and put the
    cached counters back as they were (a connection that cannot even roll back is dropped and reopened
    on the next call)."""

    def __init__(self, queue: DiskQueue):
        self.queue = queue

    def __enter__(self) -> sqlite3.Connection:
        q = self.queue
        self.saved = (q._queued, q._bytes, q._oldest)
        self.db = q._connection()
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if kind is None:
            try:
                self.db.execute("COMMIT")
                return
            except BaseException:
                self._undo()
                raise
        self._undo()

    def _undo(self) -> None:
        q = self.queue
        q._queued, q._bytes, q._oldest = self.saved
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except sqlite3.Error:
            if q._db is self.db:
                q._drop_connection()
