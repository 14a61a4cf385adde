"""One meter's counter readings -> clock-aligned energy intervals. Pure: no I/O, times are passed in.

Boundaries are the multiples of ``interval_s`` in UTC epoch seconds. A boundary's counter value is
interpolated linearly between the two readings of that quantity that bracket the boundary instant; an
interval's energy is its end value minus its start value. An interval [s, e) is closed (returned by
``add``, once, ever) by the first reading at or after e; the interval holding the very first reading is
never emitted (nothing before it to interpolate from) unless that reading falls exactly on its start.

Exactness. Every value is kept in integer micro-units (1e-6 kWh/kvarh, see ``micro``), boundary values are
rounded to micro-units once, and an energy is the integer difference of two boundary values converted to
float at the very end. So ``micro(energy)`` sums exactly: over any run of consecutive intervals the sum
equals ``micro(end_values[last]) - micro(start_values[first])`` (plus the wraps and reset corrections
below). Besides the register value, each quantity keeps the energy counted so far, which never decreases:
energies are never negative.

Statuses, per interval the worst that applies over the quantities in its ``energy``:

- ``complete``: both boundaries bracketed by readings at most ``max_gap`` seconds apart.
- ``estimated``: a boundary bracketed by readings more than ``max_gap`` apart (meter or bridge offline):
  the energy across the gap is spread linearly over the intervals it covers, and conserved. A quantity
  absent from the reading that closes an interval was not advanced by it: its end value is its last
  value (estimated), and the increment shows in the interval where it is read again.
- ``rollover``: an integer register (``Counter.wrap`` set) went back by wrapping. Rule: a backward move is
  a rollover when ``new + wrap - previous < wrap / 10`` (the wrapped increment is plausible, which also
  means the previous value was in the top tenth of the range); the increment is then
  ``new + wrap - previous``. The status goes to the interval in which the interpolated counter passes
  the wrap (its end value is below its start value; ``energy = end - start + wrap``).
- ``reset``: any other backward move (meter replaced or reset; a replacement may start at any value).
  Nothing is counted between the last reading before and the first after; counting resumes from the
  first reading after. Boundaries inside that bracket take the value before, and the interval holding
  the first reading after gets the status, with energy ``(last before - start) + (end - first after)``.
  A backward move of at most the counter's resolution (for a float counter: at most 1e-6 of its value
  when larger) is jitter, not a reset: the counter is held at its previous value.
- ``missing`` is never emitted here: a slot without an interval (before the first reading, skipped by a
  forward clock step, in a silence too long to bridge, or with no quantity at both boundaries) is for
  the store/API to show as missing.

Clock steps (NTP). Between consecutive readings, ``|dwall - dmono| > clock_tolerance`` means the wall
clock stepped. A step never creates or deletes energy nor re-emits an interval: the past is re-based on
the new clock (the previous readings are moved by the same offset, so that the previous one is at
``new.wall - dmono``) and interpolation goes on from there. Closed intervals stay closed: after a
backward step the readings fall into the still-open interval until the clock reaches its end; a forward
step past the open interval's end skips the slots in between (closed without an interval), and the open
interval moves to the slot of the re-based previous reading, keeping its start values (its start_values
are then those of the last closed boundary). ``clock_step`` is set on the intervals computed from the
stepped bracket: those the step reading closes and the one it falls in. Evidence times are re-based.

Long silences. A silence longer than ``MAX_BRIDGE_S`` (31 days; a clock that was wrong when the state was
stored can fake one) is not interpolated across, which would also build every interval of it at once:
the next reading starts afresh as a first reading, and the slots in between are missing.

Duplicates. A reading whose wall time is not after the previous reading's (no clock step detected), or
whose monotonic time did not advance across a detected step, is ignored, as is a reading without any
value of ``counters`` (it has nothing to interpolate).

Restarts. ``state()`` is everything needed to continue (JSON-serialisable, integers may exceed 2**53).
After a restore the stored monotonic time is meaningless, so the first reading is compared by wall
time only (no clock step, duplicate if not later); a gap longer than ``max_gap`` since the stored
reading makes the bridged intervals ``estimated``. The caller must store the intervals returned by
``add`` and the state taken after it together, or an interval may be emitted twice or never.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

from bridge.energy.types import COMPLETE, ESTIMATED, RESET, ROLLOVER, STATUSES, Counter, Evidence, Interval, Reading

MICRO = 1_000_000  # counter values are kept in integer micro-units of kWh/kvarh
STATE_VERSION = 1
MAX_BRIDGE_S = 31 * 86400  # a longer silence is not interpolated across (see the module docstring)
_ROLLOVER_SHARE = 10  # a wrapped increment below wrap / 10 is a rollover, else a reset
_HOLD = "hold"  # a backward move within jitter: the counter is held
_NORMAL = "normal"


def micro(value: float) -> int:
    """A counter value or energy in integer micro-units: the exact form to sum or compare them in."""
    return round(value * MICRO)


@dataclass(slots=True)
class _Point:
    """A quantity at its last reading."""
    t: float  # wall time, re-based by later clock steps
    count: int  # energy counted so far (micro): never decreases, through rollovers and resets
    reg: int  # register value (micro), as used (jitter holds the previous value)
    seg: int  # resets so far


@dataclass(slots=True)
class _Bound:
    """A quantity at a boundary instant, and how it was found."""
    count: int
    reg: int
    seg: int
    estimated: bool  # not bracketed by readings at most max_gap apart
    before: tuple[float, int] | None  # (t, reg) of the readings either side
    after: tuple[float, int] | None

    def evidence(self) -> Evidence:
        def side(point: tuple[float, int] | None) -> tuple[float, float] | None:
            return None if point is None else (point[0], point[1] / MICRO)
        return Evidence(side(self.before), side(self.after))


def _worst(a: str, b: str) -> str:
    return a if STATUSES.index(a) >= STATUSES.index(b) else b


class MeterIntervals:
    """The interval energy of one meter, fed its good readings in arrival order."""

    def __init__(self, meter: str, interval_s: int, counters: Mapping[str, Counter], *, max_gap: float,
                 clock_tolerance: float = 2.0, state: Mapping | None = None):
        if int(interval_s) != interval_s or interval_s <= 0:
            raise ValueError(f"interval_s must be a positive whole number of seconds, not {interval_s!r}")
        if not max_gap > 0:
            raise ValueError(f"max_gap must be positive, not {max_gap!r}")
        self.meter = meter
        self.interval_s = int(interval_s)
        self.max_gap = float(max_gap)
        self.clock_tolerance = float(clock_tolerance)
        self._counters = dict(counters)
        self._wrap = {q: micro(c.wrap) if c.wrap else None for q, c in self._counters.items()}
        self._resolution = {q: micro(c.resolution) for q, c in self._counters.items()}
        self._last_wall: float | None = None  # the last accepted reading
        self._last_mono: float | None = None  # None after a restore: not comparable with a new process
        self._points: dict[str, _Point] = {}
        self._open: int | None = None  # start of the open interval (its start values may be pending)
        self._start: dict[str, _Bound] = {}  # the open interval's start values
        self._closed_until: int | None = None
        self._clock_step = False  # the open interval holds a stepped bracket
        if state is not None:
            self._restore(state)

    @property
    def closed_until(self) -> int | None:
        """End of the last closed interval (UTC epoch s); None before any."""
        return self._closed_until

    def add(self, reading: Reading) -> list[Interval]:
        """Take a good reading; return the intervals it closes, in time order."""
        values = {q: v for q, v in reading.values.items() if q in self._counters and math.isfinite(v)}
        wall = reading.wall
        if not values or not math.isfinite(wall):
            return []
        stepped = False
        if self._last_wall is not None:
            elapsed = wall - self._last_wall
            if self._last_mono is not None and math.isfinite(reading.mono):
                d_mono = reading.mono - self._last_mono
                stepped = abs(elapsed - d_mono) > self.clock_tolerance
                elapsed = d_mono if stepped else elapsed
            if elapsed <= 0:
                return []  # the same reply again, or an older one
            if elapsed > MAX_BRIDGE_S:
                self._forget()
                stepped = False
            elif stepped:
                self._rebase(wall - elapsed)
        if self._last_wall is None:  # a first reading: opens the next boundary
            self._open = self._ceil(wall) if self._closed_until is None else max(self._ceil(wall), self._closed_until)
        self._last_wall, self._last_mono = wall, reading.mono if math.isfinite(reading.mono) else None
        bounds: dict[int, dict[str, _Bound]] = {}
        for q, value in values.items():
            self._advance(q, micro(value), wall, bounds)
        return self._close(wall, bounds, stepped)

    def state(self) -> dict:
        """Everything needed to continue after a restart; JSON-serialisable."""
        return {
            "version": STATE_VERSION, "meter": self.meter, "interval_s": self.interval_s,
            "last_wall": self._last_wall, "last_mono": self._last_mono, "open": self._open,
            "closed_until": self._closed_until, "clock_step": self._clock_step,
            "points": {q: [p.t, p.count, p.reg, p.seg] for q, p in self._points.items()},
            "start": {q: [b.count, b.reg, b.seg, b.estimated, b.before, b.after] for q, b in self._start.items()},
        }

    # -- internals

    def _floor(self, t: float) -> int:
        """The last boundary at or before t."""
        return math.floor(t) // self.interval_s * self.interval_s

    def _ceil(self, t: float) -> int:
        """The first boundary at or after t."""
        return -(-math.ceil(t) // self.interval_s) * self.interval_s

    def _forget(self) -> None:
        """Drop the readings: the next one starts afresh, as a first reading."""
        self._last_wall = self._last_mono = None
        self._points, self._start, self._clock_step = {}, {}, False

    def _rebase(self, previous: float) -> None:
        """The wall clock stepped: move the past so that the previous reading was at ``previous``."""
        shift = previous - self._last_wall
        for point in self._points.values():
            point.t += shift
        if not self._start:  # not opened yet: open afresh after the re-based previous reading
            after = self._floor(previous) + self.interval_s
            self._open = after if self._closed_until is None else max(after, self._closed_until)
        elif previous >= self._open + self.interval_s:  # forward past the open interval: skip those slots
            self._open = self._closed_until = self._floor(previous)
        self._clock_step = True

    def _classify(self, q: str, last: _Point, reg: int) -> tuple[str, int, int, int]:
        """How the register moved since ``last``: (kind, count, reg as used, seg)."""
        delta = reg - last.reg
        if delta >= 0:
            return _NORMAL, last.count + delta, reg, last.seg
        wrap = self._wrap[q]
        jitter = self._resolution[q] if wrap else max(self._resolution[q], abs(last.reg) // MICRO)
        if -delta <= jitter:
            return _HOLD, last.count, last.reg, last.seg
        if wrap and 0 <= (delta + wrap) * _ROLLOVER_SHARE < wrap:
            return ROLLOVER, last.count + delta + wrap, reg, last.seg
        return RESET, last.count, reg, last.seg + 1

    def _advance(self, q: str, reg: int, t: float, bounds: dict[int, dict[str, _Bound]]) -> None:
        """Move quantity q to its new reading, computing the boundaries it brackets."""
        last = self._points.get(q)
        if last is None:
            self._points[q] = _Point(t, reg, reg, 0)
            if t == self._ceil(t) >= self._open:  # a first reading exactly on a boundary gives its value
                bounds.setdefault(int(t), {})[q] = _Bound(reg, reg, 0, False, None, (t, reg))
            return
        kind, count, reg, seg = self._classify(q, last, reg)
        point = _Point(t, count, reg, seg)
        estimated = t - last.t > self.max_gap
        b = max(self._open, self._floor(last.t) + self.interval_s)
        while b <= t:
            bounds.setdefault(b, {})[q] = self._interpolate(last, point, b, kind, estimated, q)
            b += self.interval_s
        self._points[q] = point

    def _interpolate(self, last: _Point, point: _Point, b: int, kind: str, estimated: bool, q: str) -> _Bound:
        before, after = (last.t, last.reg), (point.t, point.reg)
        if point.count == last.count:  # nothing counted across (also a reset: it counts nothing)
            return _Bound(last.count, last.reg, last.seg, estimated, before, after)
        share = (Fraction(b) - Fraction(last.t)) / (Fraction(point.t) - Fraction(last.t))
        count = last.count + round((point.count - last.count) * share)
        reg = last.reg + count - last.count
        if kind == ROLLOVER and reg >= self._wrap[q]:
            reg -= self._wrap[q]
        return _Bound(count, reg, last.seg, estimated, before, after)

    def _carried(self, b: int, known: dict[str, _Bound]) -> dict[str, _Bound]:
        """The values at boundary b: those computed, plus, for a quantity last read before b but absent
        from the reading that reached b, its last value (not advanced, so estimated)."""
        values = dict(known)
        for q, p in self._points.items():
            if q not in values and p.t < b:
                values[q] = _Bound(p.count, p.reg, p.seg, True, (p.t, p.reg), None)
        return values

    def _close(self, wall: float, bounds: dict[int, dict[str, _Bound]], stepped: bool) -> list[Interval]:
        if wall >= self._open and self._start.keys() != self._points.keys():  # its start reached: fill the rest
            for q, bound in self._carried(self._open, bounds.get(self._open, {})).items():
                self._start.setdefault(q, bound)
        closed = []
        while self._open + self.interval_s <= wall:
            start, end = self._open, self._open + self.interval_s
            ends = self._carried(end, bounds.get(end, {}))
            interval = self._interval(start, end, ends)
            if interval is not None:
                closed.append(interval)
            self._start, self._open, self._closed_until = ends, end, end
            self._clock_step = stepped  # the next interval also holds part of a stepped bracket
        return closed

    def _interval(self, start: int, end: int, ends: dict[str, _Bound]) -> Interval | None:
        energy, start_values, end_values, evidence = {}, {}, {}, {}
        status = COMPLETE
        for q in self._counters:
            a, z = self._start.get(q), ends.get(q)
            if a is None or z is None:
                continue
            energy[q] = (z.count - a.count) / MICRO
            start_values[q], end_values[q] = a.reg / MICRO, z.reg / MICRO
            evidence[q] = (a.evidence(), z.evidence())
            if a.seg != z.seg:
                status = _worst(status, RESET)
            elif z.count - a.count != z.reg - a.reg:
                status = _worst(status, ROLLOVER)
            elif a.estimated or z.estimated:
                status = _worst(status, ESTIMATED)
        if not energy:
            return None
        return Interval(self.meter, start, end, status, energy, start_values, end_values, evidence,
                        clock_step=self._clock_step)

    def _restore(self, state: Mapping) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown interval state version {state.get('version')!r}")
        if state["meter"] != self.meter:
            raise ValueError(f"interval state of meter {state['meter']!r}, not {self.meter!r}")

        def side(pair: list | None) -> tuple[float, int] | None:
            return None if pair is None else (pair[0], pair[1])

        self._last_wall = state["last_wall"]
        self._closed_until = state["closed_until"]
        self._points = {q: _Point(*p) for q, p in state["points"].items() if q in self._counters}
        if state["interval_s"] == self.interval_s:
            self._open, self._clock_step = state["open"], state["clock_step"]
            self._start = {q: _Bound(c, r, s, e, side(b), side(a))
                           for q, (c, r, s, e, b, a) in state["start"].items() if q in self._counters}
        elif self._last_wall is not None:  # another interval length: open afresh after the last reading
            after = self._floor(self._last_wall) + self.interval_s
            self._open = after if self._closed_until is None else max(after, self._ceil(self._closed_until))
