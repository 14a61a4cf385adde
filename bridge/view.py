"""The read model: what the north sides and the service know about the bridge, from one place.

Per segment and meter: decoded, scaled values (``Measurement.value``), quality by the image's one
rule, timestamps, counters, turnaround and utilisation (``SegmentDiagnostics.utilisation``, the one
definition); and for the whole bridge: readiness and health, the one notion behind ``/readyz``, the
systemd watchdog and the status line. Everything is read live from the image, the segments'
diagnostics and the north sides' own status when asked, so nothing here outlives a reload: the
App ``attach``es the parts in force after every start and reload.

North sides get this object, never the App, and never another part's private attributes.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bridge.core.diagnostics import MeterDiagnostics, SegmentDiagnostics
from bridge.core.image import Health, RegisterImage, UnitImage
from bridge.core.model import Measurement, MeterConfig, SegmentConfig, VirtualMeterConfig
from bridge.energy.meters import virtual_live

# a part that failed this often within RESTART_LOOP_WINDOW seconds is unhealthy: a restart of the
# whole process (the systemd watchdog's answer) may clear what restarting the part did not
RESTART_LOOP_FAILURES = 3
RESTART_LOOP_WINDOW = 60.0

QUALITY = {Health.FRESH: "good", Health.STALE: "stale", Health.OFFLINE: "offline", Health.NEVER_READ: "unread"}
WORST_FIRST = ("unread", "offline", "stale", "good")  # a virtual meter's quality: the worst of its terms'


class SegmentSource(Protocol):
    """What the read model needs of a running segment."""

    cfg: SegmentConfig
    diag: SegmentDiagnostics

    @property
    def ready(self) -> bool: ...


@dataclass(frozen=True)
class NorthStatus:
    """One north side as the status page, metrics and readiness see it."""

    name: str  # "modbus_tcp", "opcua", "http", ...
    listening: bool
    address: str  # where it listens, as a client would write it
    counters: Mapping[str, float] = field(default_factory=dict)  # plain numbers
    by_label: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # e.g. requests by function
    note: str = ""  # the last error, for people: "" while all is well


class NorthSource(Protocol):
    name: str

    def status(self) -> NorthStatus: ...


class EnergySource(Protocol):
    """Interval energy as the north sides read it (the energy recorder, when ``energy:`` is on)."""

    interval_s: int
    timezone: str  # IANA: what a date without an offset means
    billing_day: int

    def meter_names(self) -> list[str]: ...  # real meters with energy counters, then virtual ones
    def virtual_names(self) -> list[str]: ...
    def virtual_meters(self) -> list[VirtualMeterConfig]: ...  # those with intervals (every term has counters)
    def last(self, meter: str) -> Any: ...  # its last closed interval (bridge.energy.types.Interval) or None
    def alarm_state(self) -> dict[str, dict]: ...
    async def intervals(self, meter: str, start: int, end: int, detail: bool = False) -> list[Any]: ...
    async def report(self, start: int, end: int, meters: list[str]) -> list[dict]: ...


@dataclass
class PartState:
    """A supervised task of the App: what it is doing and how often it failed."""

    name: str
    running: bool = False
    failures: deque = field(default_factory=lambda: deque(maxlen=RESTART_LOOP_FAILURES))  # monotonic times
    last_error: str = ""

    def in_restart_loop(self, now: float) -> bool:
        return (len(self.failures) == RESTART_LOOP_FAILURES
                and now - self.failures[0] <= RESTART_LOOP_WINDOW)


class MeterView:
    """One meter, read live."""

    __slots__ = ("image", "meter", "segment", "_unit")

    def __init__(self, image: RegisterImage, meter: MeterConfig, segment: SegmentConfig):
        self.image = image
        self.meter = meter
        self.segment = segment
        self._unit: UnitImage = image.unit(meter.unit)

    name = property(lambda self: self.meter.name)
    unit = property(lambda self: self.meter.unit)

    @property
    def health(self) -> Health:
        return self.image.health_of(self._unit)

    @property
    def quality(self) -> str:
        """good | stale | offline | unread."""
        return QUALITY[self.health]

    @property
    def diag(self) -> MeterDiagnostics:
        return self._unit.diag

    @property
    def last_good(self) -> float | None:
        """Monotonic time of the last fully good poll."""
        return self._unit.last_good

    @property
    def last_good_wall(self) -> float | None:
        """Wall-clock time of the last fully good poll's reply: the values' timestamp."""
        return self._unit.last_good_wall

    @property
    def last_error(self) -> str:
        return self._unit.last_error

    def value(self, m: Measurement) -> float | int | None:
        """The measurement's last value (kept while stale or offline); None if never read."""
        if self._unit.last_good_wall is None:
            return None
        raw = self._unit.read(m.function, m.address, m.count)
        return None if raw is None else m.value(raw)

    def readings(self) -> list[tuple[Measurement, float | int | None]]:
        return [(m, self.value(m)) for m in self.meter.profile.measurements]


class VirtualMeterView:
    """A virtual meter (``energy.virtual``) read live: Σ sign × its terms' values of ``energy.meters.VIRTUAL_LIVE``.
    Its quality is the worst of its terms' and its time the oldest of theirs: a sum is only as good
    and as recent as its weakest term."""

    __slots__ = ("cfg", "terms", "measurements", "_parts")

    def __init__(self, cfg: VirtualMeterConfig, terms: Sequence[tuple[int, MeterView]]):
        self.cfg = cfg
        self.terms = tuple(terms)
        self.measurements = virtual_live([mv.meter for _, mv in self.terms])
        # each live measurement: every term's own Measurement of that name, found once
        self._parts = {q: [(sign, mv, next(m for m in mv.meter.profile.measurements if m.name == q))
                           for sign, mv in self.terms] for q in self.measurements}

    name = property(lambda self: self.cfg.name)
    formula = property(lambda self: self.cfg.formula)

    @property
    def quality(self) -> str:
        return min((mv.quality for _, mv in self.terms), key=WORST_FIRST.index, default="unread")

    @property
    def last_good_wall(self) -> float | None:
        walls = [mv.last_good_wall for _, mv in self.terms]
        return None if not walls or None in walls else min(walls)

    def value(self, name: str) -> float | None:
        """Σ sign × the terms' last values of ``name`` (kept while stale, like a meter's); None if one has none."""
        total = 0.0
        for sign, mv, m in self._parts[name]:
            v = mv.value(m)
            if v is None:
                return None
            total += sign * v
        return total

    def readings(self) -> list[tuple[Measurement, float | None]]:
        """Like a meter's: each live value under its first term's Measurement (its name, unit and digits)."""
        return [(parts[0][2], self.value(q)) for q, parts in self._parts.items()]


class SegmentView:
    __slots__ = ("source", "meters")

    def __init__(self, source: SegmentSource, image: RegisterImage):
        self.source = source
        # during a reload the segments in force and the image may disagree for a moment (the image is
        # reconfigured first): a meter whose unit is gone or now another meter's is left out until then
        self.meters = [MeterView(image, m, source.cfg) for m in source.cfg.meters
                       if (u := image.unit(m.unit)) is not None and (u.meter is m or u.meter == m)]

    cfg = property(lambda self: self.source.cfg)
    name = property(lambda self: self.source.cfg.name)
    diag = property(lambda self: self.source.diag)
    ready = property(lambda self: self.source.ready)

    def utilisation(self, now: float | None = None) -> float:
        return self.source.diag.utilisation(time.monotonic() if now is None else now)


class BridgeView:
    def __init__(self, image: RegisterImage, clock: Callable[[], float] = time.monotonic):
        self.image = image
        self._clock = clock
        self.started_wall = time.time()
        self._segments: Sequence[SegmentSource] = ()
        self._north: Mapping[str, NorthSource] = {}
        self.parts: dict[str, PartState] = {}  # written by the App's supervisor
        self.listening = False  # every enabled north side listens (set by the App)
        self.energy: EnergySource | None = None  # interval energy, when configured

    def attach(self, segments: Sequence[SegmentSource], north: Mapping[str, NorthSource]) -> None:
        """The parts in force now (the App calls this after starting and after every reload)."""
        self._segments = tuple(segments)
        self._north = dict(north)
        energy = north.get("energy")
        self.energy: EnergySource | None = energy  # type: ignore[assignment]

    # ------------------------------------------------------------ bus side
    def segments(self) -> list[SegmentView]:
        return [SegmentView(s, self.image) for s in self._segments]

    def meters(self) -> Iterator[MeterView]:
        for seg in self.segments():
            yield from seg.meters

    def virtual_meters(self) -> list[VirtualMeterView]:
        """The virtual meters with intervals (interval energy on), each over its terms read live."""
        if self.energy is None:
            return []
        by_name = {mv.name: mv for mv in self.meters()}
        return [VirtualMeterView(v, [(sign, by_name[t]) for sign, t in v.terms])
                for v in self.energy.virtual_meters() if all(t in by_name for _, t in v.terms)]

    def sample(self) -> None:
        """One utilisation sample of every segment (about once a second)."""
        now = self._clock()
        for s in self._segments:
            s.diag.sample(now)

    # ------------------------------------------------------------ north sides
    def north(self) -> dict[str, NorthStatus]:
        return {name: side.status() for name, side in self._north.items()}

    # ------------------------------------------------------------ readiness and health
    def not_ready(self) -> str:
        """What holds readiness back, in one line; "" when ready."""
        missing = []
        if not self.listening:
            missing.append("servers not listening yet")
        else:
            down = [name for name, st in self.north().items() if not st.listening]
            if down:
                missing.append("not listening: " + ", ".join(down))
        waiting = [s.cfg.name for s in self._segments if not s.ready]
        if waiting:
            missing.append("segments that have not yet tried each meter: " + ", ".join(waiting))
        return "; ".join(missing)

    def problems(self) -> list[str]:
        """Why the bridge is unhealthy (empty while healthy): a part stopped or failing in a loop.
        The systemd watchdog is fed only while this is empty."""
        now = self._clock()
        out = []
        for part in self.parts.values():
            if not part.running:
                out.append(f"{part.name} is not running")
            elif part.in_restart_loop(now):
                out.append(f"{part.name} keeps failing: {part.last_error}")
        return out

    def status_line(self) -> str:
        meters = sum(len(s.cfg.meters) for s in self._segments)
        servers = ", ".join(st.address and f"{name} {st.address}" or name for name, st in self.north().items())
        line = f"serving {meters} meters on {len(self._segments)} segments ({servers or 'no servers'})"
        problems = self.problems()
        if problems:
            line += "; unhealthy: " + "; ".join(problems)
        return line
