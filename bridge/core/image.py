"""The register image: every meter's last polled registers, their time, their health.

Pure and synchronous: the serial side writes whole blocks, the servers read.
Because no method awaits, a block update is atomic for every reader on the
event loop. Listeners are told what changed; they never poll the image.
"""
from __future__ import annotations

import bisect
import enum
import math
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bridge.core.codec import Function
from bridge.core.diagnostics import MeterDiagnostics, SegmentDiagnostics
from bridge.core.model import ConsolidatedMap, MeterConfig
from bridge.core import codec
from bridge.core import pdu as P


class Health(enum.Enum):
    NEVER_READ = "never_read"  # no good poll yet
    FRESH = "fresh"  # last good poll within stale_after
    STALE = "stale"  # no good poll for stale_after; last values kept
    OFFLINE = "offline"  # declared offline by its segment (failures, port lost)


def _merge(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class _Table:
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
    tables: dict[Function, _Table]
    health: Health = Health.NEVER_READ
    last_good: float | None = None  # monotonic time of the last fully good poll
    last_good_wall: float | None = None  # the same moment as wall-clock time (for timestamps)
    last_error: str = ""
    diag: MeterDiagnostics = field(default_factory=MeterDiagnostics)  # updated by its segment


@dataclass(frozen=True)
class Change:
    """Registers of one unit changed (``start``..``end`` in ``function``), replied at ``timestamp``."""

    unit: int
    function: Function
    start: int
    end: int
    timestamp: float  # wall-clock time of the poll reply


Listener = Callable[[Change | None, int, Health], None]


def served_intervals(meter: MeterConfig) -> dict[Function, list[tuple[int, int]]]:
    """The registers a unit serves, per table: its measurements and mirrored ranges, merged."""
    raw: dict[Function, list[tuple[int, int]]] = {}
    for m in meter.profile.measurements:
        raw.setdefault(m.function, []).append((m.address, m.end))
    for r in meter.all_ranges:
        raw.setdefault(r.function, []).append((r.start, r.end))
    return {fn: _merge(iv) for fn, iv in raw.items()}


def _new_unit(meter: MeterConfig) -> UnitImage:
    return UnitImage(meter, {fn: _Table(iv) for fn, iv in served_intervals(meter).items()})


class RegisterImage:
    def __init__(self, meters: Iterable[MeterConfig], clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._units: dict[int, UnitImage] = {meter.unit: _new_unit(meter) for meter in meters}
        self._listeners: list[Listener] = []
        self.segments: dict[str, SegmentDiagnostics] = {}  # registered by each segment task
        self._consolidated: _Consolidated | None = None

    def reconfigure(self, meters: Iterable[MeterConfig], consolidated: ConsolidatedMap | None = None) -> None:
        """A new configuration: units whose meter is unchanged keep their registers, time and health;
        new or changed meters start unread; removed ones are gone."""
        units = {}
        for meter in meters:
            old = self._units.get(meter.unit)
            units[meter.unit] = old if old is not None and old.meter == meter else _new_unit(meter)
        self._units = units
        self._consolidated = None
        if consolidated is not None:
            self.add_consolidated(consolidated)

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def add_consolidated(self, cmap: ConsolidatedMap) -> None:
        """Serve every meter's values as float32 under one more unit (meters in configuration order)."""
        self._consolidated = _Consolidated(cmap, [u.meter for u in self._units.values()])
        for unit in self._units:
            self._consolidated.refresh(self, unit)

    def register_segment(self, name: str, units: Iterable[int]) -> SegmentDiagnostics:
        """The diagnostics record of a segment, linked to its meters' records."""
        diag = SegmentDiagnostics(meters={u: self._units[u].diag for u in units})
        self.segments[name] = diag
        return diag

    # ---------------------------------------------------------------- queries
    def units(self) -> list[int]:
        return sorted(self._units)

    def unit(self, unit: int) -> UnitImage | None:
        return self._units.get(unit)

    def health(self, unit: int) -> Health:
        u = self._units[unit]
        if u.health is Health.FRESH and self._clock() - u.last_good > u.meter.stale_after:
            return Health.STALE
        return u.health

    def read(self, unit: int, function: int, address: int, count: int) -> bytes:
        """Registers for a Modbus TCP read, or PduException with the code SPEC §5 prescribes."""
        u = self._units.get(unit)
        if u is None:
            c = self._consolidated
            if c is not None and unit == c.cmap.unit and function in P.READ_FUNCTIONS:
                data = c.table.read(address, count)  # stale meters' values are NaN, never an error
                if data is None:
                    raise P.PduException(function, P.ILLEGAL_DATA_ADDRESS)
                return data
            raise P.PduException(function, P.GATEWAY_PATH_UNAVAILABLE)
        table = u.tables.get(Function(function))
        data = table.read(address, count) if table is not None else None
        if data is None:
            raise P.PduException(function, P.ILLEGAL_DATA_ADDRESS)
        if self.health(unit) is not Health.FRESH:
            raise P.PduException(function, P.GATEWAY_TARGET_FAILED)
        return data

    def value_registers(self, unit: int, function: Function, address: int, count: int) -> bytes | None:
        """Raw bytes regardless of health (for OPC UA, which reports health as status)."""
        table = self._units[unit].tables.get(function)
        return table.read(address, count) if table is not None else None

    # ---------------------------------------------------------------- updates
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def store_block(self, unit: int, function: Function, address: int, data: bytes, timestamp: float) -> bool:
        """Store one polled block atomically; tell listeners if the served registers changed."""
        u = self._units[unit]
        table = u.tables.get(function)
        changed = table.store(address, data) if table is not None else False
        if changed:
            if self._consolidated is not None:
                self._consolidated.refresh(self, unit)
            change = Change(unit, function, address, address + len(data) // 2, timestamp)
            for listener in self._listeners:
                listener(change, unit, self.health(unit))
        return changed

    def mark_good(self, unit: int, timestamp: float) -> None:
        """A complete poll of the unit succeeded (every block stored)."""
        u = self._units[unit]
        before = self.health(unit)
        u.last_good = self._clock()
        u.last_good_wall = timestamp
        u.health = Health.FRESH
        u.last_error = ""
        if before is not Health.FRESH:
            self._notify_health(unit)

    def mark_failed(self, unit: int, error: str, offline: bool) -> None:
        """A poll failed; ``offline`` when the segment declares the meter offline."""
        u = self._units[unit]
        before = self.health(unit)
        u.last_error = error
        if offline:
            u.health = Health.OFFLINE
        if self.health(unit) is not before:
            self._notify_health(unit)

    def sweep(self) -> list[int]:
        """Notify units that went stale by the passing of time; return them. Call periodically."""
        went_stale = []
        for unit, u in self._units.items():
            if u.health is Health.FRESH and self.health(unit) is Health.STALE:
                u.health = Health.STALE
                went_stale.append(unit)
                self._notify_health(unit)
        return went_stale

    def _notify_health(self, unit: int) -> None:
        health = self.health(unit)
        if self._consolidated is not None:
            self._consolidated.refresh(self, unit)
        for listener in self._listeners:
            listener(None, unit, health)


_FLOAT32 = struct.Struct(">f")
_NAN = _FLOAT32.pack(math.nan)


class _Consolidated:
    """The consolidated unit: meter k, measurement j as float32 at base + k * stride + 2 * j."""

    def __init__(self, cmap: ConsolidatedMap, meters: list[MeterConfig]):
        self.cmap = cmap
        self.slots: dict[int, tuple[int, list]] = {}  # unit -> (first register, its measurements)
        intervals = []
        for k, meter in enumerate(meters):
            start = cmap.base + k * cmap.stride
            self.slots[meter.unit] = (start, [(m, codec.decoder(m.dtype, m.word_order))
                                              for m in meter.profile.measurements])
            intervals.append((start, start + 2 * len(meter.profile.measurements)))
        self.table = _Table(_merge(intervals))

    def refresh(self, image: RegisterImage, unit: int) -> None:
        start, points = self.slots[unit]
        fresh = image.health(unit) is Health.FRESH
        data = bytearray()
        for m, decode in points:
            if fresh:
                value = decode(image.value_registers(unit, m.function, m.address, m.count)) * m.scale
                try:
                    data += _FLOAT32.pack(value)
                except OverflowError:  # beyond float32: say so rather than a wrong number
                    data += _FLOAT32.pack(math.copysign(math.inf, value))
            else:
                data += _NAN
        self.table.store(start, bytes(data))
