"""The register image: every meter's last polled registers, their time, their health.

Pure and synchronous: the serial side writes whole blocks, the servers read.
Because no method awaits, a block update is atomic for every reader on the
event loop. Listeners are told what changed; they never poll the image.
"""
from __future__ import annotations

import bisect
import enum
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field

from bridge.core.codec import Function
from bridge.core.diagnostics import MeterDiagnostics
from bridge.core.errors import NoSuchUnit, NotFresh, OutsideImage
from bridge.core.model import MeterConfig, merge_intervals, served_intervals


class Health(enum.Enum):
    NEVER_READ = "never_read"  # no good poll yet
    FRESH = "fresh"  # last good poll within stale_after
    STALE = "stale"  # no good poll for stale_after; last values kept
    OFFLINE = "offline"  # declared offline by its segment (failures, port lost)


class RegisterTable:
    """One register table (holding or input) of one unit: maximal intervals of served registers."""

    __slots__ = ("starts", "ends", "data")

    def __init__(self, intervals: list[tuple[int, int]]):
        self.starts = [s for s, _ in intervals]
        self.ends = [e for _, e in intervals]
        self.data = [bytearray(2 * (e - s)) for s, e in intervals]

    def locate(self, address: int, count: int) -> int | None:
        """Index of the interval holding [address, address+count) entirely, or None."""
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0 and address + count <= self.ends[i]:
            return i
        return None

    def read(self, address: int, count: int) -> bytes | None:
        i = self.locate(address, count)
        if i is None:
            return None
        off = 2 * (address - self.starts[i])
        return bytes(self.data[i][off:off + 2 * count])

    def store(self, address: int, data: bytes) -> bool:
        """Copy the parts of a polled block that the image serves; True if any byte changed."""
        end = address + len(data) // 2
        changed = False
        i = max(bisect.bisect_right(self.starts, address) - 1, 0)
        while i < len(self.starts) and self.starts[i] < end:
            lo, hi = max(address, self.starts[i]), min(end, self.ends[i])
            if lo < hi:
                src = data[2 * (lo - address):2 * (hi - address)]
                dst = self.data[i]
                a, b = 2 * (lo - self.starts[i]), 2 * (hi - self.starts[i])
                if dst[a:b] != src:
                    dst[a:b] = src
                    changed = True
            i += 1
        return changed


@dataclass
class UnitImage:
    meter: MeterConfig
    tables: dict[Function, RegisterTable]
    health: Health = Health.NEVER_READ
    last_good: float | None = None  # monotonic time of the last fully good poll
    last_good_wall: float | None = None  # the same moment as wall-clock time (for timestamps)
    last_error: str = ""
    diag: MeterDiagnostics = field(default_factory=MeterDiagnostics)  # updated by its segment
    bus: Hashable = None  # what the meter is read through; a unit read on another bus starts unread

    def read(self, function: int, address: int, count: int) -> bytes | None:
        """Raw registers regardless of health, or None outside the image."""
        table = self.tables.get(function)
        return table.read(address, count) if table is not None else None


@dataclass(frozen=True)
class Change:
    """Registers of one unit changed (``start``..``end`` in ``function``), replied at ``timestamp``."""

    unit: int
    function: Function
    start: int
    end: int
    timestamp: float  # wall-clock time of the poll reply


Listener = Callable[[Change | None, int, Health], None]
ListenerFailed = Callable[[Listener, Exception], None]


def _new_unit(meter: MeterConfig, bus: Hashable = None) -> UnitImage:
    return UnitImage(meter, {fn: RegisterTable(iv) for fn, iv in served_intervals(meter).items()}, bus=bus)


class RegisterImage:
    """Every unit's registers; ``on_listener_error`` hears of a listener that raised (it is skipped)."""

    def __init__(self, meters: Iterable[MeterConfig], clock: Callable[[], float] = time.monotonic,
                 bus: Mapping[int, Hashable] | None = None):
        self._clock = clock
        self._units: dict[int, UnitImage] = {m.unit: _new_unit(m, (bus or {}).get(m.unit)) for m in meters}
        self._listeners: list[Listener] = []
        self.on_listener_error: ListenerFailed | None = None
        self.listener_errors = 0

    def reconfigure(self, meters: Iterable[MeterConfig], bus: Mapping[int, Hashable] | None = None) -> None:
        """A new configuration. A unit keeps its registers, time and health only if its meter and the bus
        it is read through (``bus[unit]``: segment, port, line settings) are both unchanged: values
        read on another bus are never served as this one's. New or changed units start unread."""
        bus = bus or {}
        units = {}
        for meter in meters:
            old = self._units.get(meter.unit)
            keep = old is not None and old.meter == meter and old.bus == bus.get(meter.unit)
            if keep:
                old.meter = meter  # the same settings: the new object, so views compare by identity
            units[meter.unit] = old if keep else _new_unit(meter, bus.get(meter.unit))
        self._units = units

    # ---------------------------------------------------------------- queries
    def units(self) -> list[int]:
        return sorted(self._units)

    def unit(self, unit: int) -> UnitImage | None:
        return self._units.get(unit)

    def health(self, unit: int) -> Health:
        return self.health_of(self._units[unit])

    def health_of(self, u: UnitImage) -> Health:
        """A unit image's health now, even of one a reload has since replaced (a view built before it)."""
        if u.health is Health.FRESH and self._clock() - u.last_good > u.meter.stale_after:
            return Health.STALE
        return u.health

    def read(self, unit: int, function: int, address: int, count: int) -> bytes:
        """Registers a client may be served: NoSuchUnit, OutsideImage, or NotFresh when it may not."""
        u = self._units.get(unit)
        if u is None:
            raise NoSuchUnit(unit)
        data = u.read(function, address, count)
        if data is None:
            raise OutsideImage(unit, address, count)
        if self.health(unit) is not Health.FRESH:
            raise NotFresh(unit)
        return data

    def value_registers(self, unit: int, function: Function, address: int, count: int) -> bytes | None:
        """Raw bytes regardless of health (for sides that report health as a status of their own)."""
        return self._units[unit].read(function, address, count)

    # ---------------------------------------------------------------- updates
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def store_block(self, unit: int, function: Function, address: int, data: bytes, timestamp: float) -> bool:
        """Store one polled block atomically; tell listeners if the served registers changed."""
        u = self._units.get(unit)
        if u is None:  # the unit went away in a reload while its poll was in flight
            return False
        table = u.tables.get(function)
        changed = table.store(address, data) if table is not None else False
        if changed:
            self._tell(Change(unit, function, address, address + len(data) // 2, timestamp), unit)
        return changed

    def mark_good(self, unit: int, timestamp: float) -> None:
        """A complete poll of the unit succeeded (every block stored)."""
        u = self._units.get(unit)
        if u is None:
            return
        before = self.health(unit)
        u.last_good = self._clock()
        u.last_good_wall = timestamp
        u.health = Health.FRESH
        u.last_error = ""
        if before is not Health.FRESH:
            self._tell(None, unit)

    def mark_failed(self, unit: int, error: str, offline: bool) -> None:
        """A poll failed; ``offline`` when the segment declares the meter offline."""
        u = self._units.get(unit)
        if u is None:
            return
        before = self.health(unit)
        u.last_error = error
        if offline:
            u.health = Health.OFFLINE
        if self.health(unit) is not before:
            self._tell(None, unit)

    def sweep(self) -> list[int]:
        """Notify units that went stale by the passing of time; return them. Call periodically."""
        went_stale = []
        for unit, u in self._units.items():
            if u.health is Health.FRESH and self.health(unit) is Health.STALE:
                u.health = Health.STALE
                went_stale.append(unit)
                self._tell(None, unit)
        return went_stale

    def _tell(self, change: Change | None, unit: int) -> None:
        """Every listener hears of the change; one that raises is counted and reported, never lets
        the error reach the segment that stored the block."""
        health = self.health(unit)
        for listener in list(self._listeners):
            try:
                listener(change, unit, health)
            except Exception as exc:
                self.listener_errors += 1
                if self.on_listener_error is not None:
                    self.on_listener_error(listener, exc)
