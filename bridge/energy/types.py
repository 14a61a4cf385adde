"""The values interval energy is made of (pure, shared by the core, the store and the adapters)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# the energy counters an interval is computed from, where a profile has them (kWh or kvarh)
QUANTITIES = ("import_active_energy", "export_active_energy", "import_reactive_energy",
              "export_reactive_energy", "total_active_energy", "total_reactive_energy")
DEMAND_QUANTITY = "import_active_energy"  # demand is the average active power drawn (import)

# an interval's status, from the best to the worst (a virtual meter takes the worst of its terms')
COMPLETE, ESTIMATED, ROLLOVER, RESET, MISSING = "complete", "estimated", "rollover", "reset", "missing"
STATUSES = (COMPLETE, ESTIMATED, ROLLOVER, RESET, MISSING)


@dataclass(frozen=True)
class Reading:
    """One good poll of a meter: its energy counters (kWh/kvarh, scaled) at the poll reply."""
    wall: float  # UTC epoch seconds of the reply
    mono: float  # monotonic seconds of the same reply: tells a clock step from elapsed time
    values: Mapping[str, float]  # quantity -> counter value; a quantity not read is absent


@dataclass(frozen=True)
class Counter:
    """How a quantity's register counts."""
    wrap: float | None = None  # an integer register wraps to 0 at this value (2**bits * scale); None: float
    resolution: float = 0.0  # the register's step (scale for integers; 0: a float, see docs/energy.md)


@dataclass(frozen=True)
class Evidence:
    """How one boundary value was found: the readings on either side of the boundary instant
    (wall time, counter value), for an auditor to check the interpolation."""
    before: tuple[float, float] | None
    after: tuple[float, float] | None


@dataclass(frozen=True)
class Interval:
    """One meter's energy over one clock-aligned interval [start, end)."""
    meter: str
    start: int  # UTC epoch seconds, a multiple of the interval length
    end: int
    status: str  # one of STATUSES
    energy: Mapping[str, float]  # quantity -> kWh/kvarh over the interval, never negative
    start_values: Mapping[str, float] = field(default_factory=dict)  # counters at ``start`` (interpolated)
    end_values: Mapping[str, float] = field(default_factory=dict)  # counters at ``end``
    evidence: Mapping[str, tuple[Evidence, Evidence]] = field(default_factory=dict)  # quantity -> (start, end)
    clock_step: bool = False  # the wall clock stepped (NTP) within this interval

    @property
    def demand(self) -> float | None:
        """Block demand: the average active power drawn over the interval, W."""
        kwh = self.energy.get(DEMAND_QUANTITY)
        return None if kwh is None else kwh * 1000.0 * 3600.0 / (self.end - self.start)
