"""The energy recorder: the image's good polls in, closed intervals out to the store, for every meter
whose profile has energy counters, and for the virtual meters made of them.

It has the shape of a north side (start / run / stage / stop / status) and reads only the read model.
The serial side never waits on it: the image's listener only marks a meter; ``run`` takes the meters'
new readings every ``TICK``, and every SQLite call runs in the store's own thread. Closed intervals and
the open states they came from are written together (see ``store``), at the latest ``FLUSH`` seconds
after an interval closed, and the open states every ``STATE_EVERY`` seconds: a ``kill -9`` costs at
most that many seconds of readings, bridged by interpolation when the bridge runs again.

For the north sides (through ``BridgeView.energy``): the intervals of a meter over a time range with
the slots that have none filled in as ``missing``, the billing report, the last closed interval of
each meter and the balance alarms.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bridge.core.errors import BridgeError
from bridge.core.image import Change, Health
from bridge.core.model import Config, EnergyConfig, MeterConfig, VirtualMeterConfig
from bridge.energy.intervals import MeterIntervals
from bridge.energy.meters import counters_of
from bridge.energy.report import BalanceAlarm, combine, report, sliding_demand, tariff_function
from bridge.energy.store import STORE_FILE, EnergyDb, EnergyStore
from bridge.energy.tariffs import TariffPlan
from bridge.energy.types import MISSING, QUANTITIES, Counter, Interval, Reading
from bridge.north.side import Staged
from bridge.view import BridgeView, NorthStatus

log = logging.getLogger("bridge.energy")

TICK = 0.25  # seconds between two looks at the meters that polled
SWEEP = 1.0  # seconds between two looks at every meter: a meter whose values do not change (no load, so
# no energy counted) tells the image's listeners nothing, yet each of its polls is a reading
FLUSH = 1.0  # seconds a closed interval may wait before it is written
STATE_EVERY = 10.0  # seconds between two writes of the open states (what a kill -9 can cost)
PRUNE_EVERY = 6 * 3600.0  # seconds between two retention passes
ALARM_PREFIX = "alarm:"


def recorded_interval(states: Mapping[str, Any]) -> int | None:
    """The interval length the running (or last) bridge records with, from its stored open states."""
    for state in states.values():
        if isinstance(state, dict) and isinstance(state.get("key"), list) and state["key"]:
            return int(state["key"][0])
    return None


def max_gap(config: Config) -> float:
    energy = config.energy
    return energy.max_gap if energy is not None and energy.max_gap > 0 else 2.0 * config.stale_after


class EnergyRecorder:
    name = "energy"

    def __init__(self, config: Config, view: BridgeView):
        self.view = view
        self.store: EnergyStore | None = None
        self._dirty: set[int] = set()
        self._wake = asyncio.Event()
        self._closed: list[Interval] = []
        self._last_mono: dict[str, float] = {}  # meter -> monotonic time of the last poll taken
        self._last: dict[str, Interval] = {}  # meter -> its last closed interval
        self._pending_virtual: dict[int, dict[str, Interval]] = {}  # slot start -> term meter -> interval
        self._virtual_done: dict[int, set[str]] = {}  # slot start -> virtual meters closed for it
        self.closed_total = 0
        self.write_errors = 0
        self.last_error = ""
        self._states_written = 0.0
        self._build(config, {})

    def _build(self, config: Config, states: Mapping[str, Any]) -> None:
        self.config = config
        self.cfg: EnergyConfig = config.energy
        self.interval_s = self.cfg.interval_s
        self.timezone, self.billing_day = self.cfg.timezone, self.cfg.billing_day
        gap = max_gap(config)
        self.meters: dict[str, MeterIntervals] = {}
        self._counters: dict[str, dict[str, Counter]] = {}
        self.units: dict[int, MeterConfig] = {}
        for meter in config.meters:
            counters = counters_of(meter)
            if counters:
                self._counters[meter.name] = counters
                kept = states.get(meter.name)  # valid only for the same interval length and counters
                same = isinstance(kept, dict) and kept.get("key") == self._key(counters)
                try:
                    self.meters[meter.name] = MeterIntervals(meter.name, self.interval_s, counters, max_gap=gap,
                                                             state=kept["open"] if same else None)
                except ValueError:  # a state of another version: this meter starts afresh (one interval lost)
                    log.warning("energy: the stored open interval of %s is unusable; starting afresh", meter.name)
                    self.meters[meter.name] = MeterIntervals(meter.name, self.interval_s, counters, max_gap=gap)
                self.units[meter.unit] = meter
        self.virtual = {v.name: v for v in self.cfg.virtual if all(t in self.meters for _, t in v.terms)}
        self.alarms = {v.name: _alarm(v.alarm, states.get(ALARM_PREFIX + v.name))
                       for v in self.virtual.values() if v.alarm is not None}
        self.plan = TariffPlan(self.cfg.tariffs, self.cfg.timezone) if self.cfg.tariffs else None

    def _key(self, counters: Mapping[str, Counter]) -> list:
        """What a stored open state is valid for (as it reads back from JSON: lists, not tuples)."""
        return [self.interval_s, sorted([q, c.wrap] for q, c in counters.items())]

    def _states(self) -> dict[str, Any]:
        states: dict[str, Any] = {name: {"key": self._key(self._counters[name]), "open": mi.state()}
                                  for name, mi in self.meters.items()}
        states.update({ALARM_PREFIX + n: a.state() for n, a in self.alarms.items()})
        return states

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        path = Path(self.config.state_dir or ".") / STORE_FILE
        try:
            self.store = await EnergyStore.open(path)
            states = await self.store.call("states")
        except Exception as exc:
            raise _store_error(path, exc) from None
        self._build(self.config, states)
        self.view.image.subscribe(self.listener)
        self._dirty.update(self.units)

    async def run(self) -> None:
        next_prune = 0.0
        last_flush = last_sweep = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self._wake.wait()
            await asyncio.sleep(TICK)  # gather the polls that end together
            self._wake.clear()
            now = time.monotonic()
            if now - last_sweep >= SWEEP:
                last_sweep = now
                self._dirty.update(self.units)
            self._take_readings()
            if (self._closed and now - last_flush >= FLUSH) or now - self._states_written >= STATE_EVERY:
                await self.flush()
                last_flush = now
            if now >= next_prune:
                next_prune = now + PRUNE_EVERY
                await self._prune()

    async def stage(self, config: Config) -> Staged:
        async def commit() -> None:
            await self.flush()
            self._build(config, self._states())
            self._pending_virtual.clear()
            self._virtual_done.clear()
            self._dirty.update(self.units)
        return Staged(commit)

    async def stop(self) -> None:
        self.view.image.unsubscribe(self.listener)
        if self.store is not None:
            self._take_readings()
            await self.flush()
            await self.store.close()
            self.store = None

    def status(self) -> NorthStatus:
        active = {name: float(a.active) for name, a in self.alarms.items()}
        return NorthStatus(self.name, True, str(Path(self.config.state_dir or ".") / STORE_FILE),
                           counters={"intervals_closed": self.closed_total, "write_errors": self.write_errors,
                                     "meters": len(self.meters) + len(self.virtual),
                                     "alarms_active": sum(active.values())},
                           by_label={"alarm": active}, note=self.last_error)

    # ------------------------------------------------------------ readings in, intervals out
    def listener(self, change: Change | None, unit: int, health: Health) -> None:
        if unit in self.units:
            self._dirty.add(unit)
            self._wake.set()

    def _take_readings(self) -> None:
        units, self._dirty = self._dirty, set()
        by_unit = {mv.unit: mv for mv in self.view.meters() if mv.unit in units}
        for unit in units:
            mv, meter = by_unit.get(unit), self.units.get(unit)
            if mv is None or meter is None or mv.last_good_wall is None or mv.last_good is None:
                continue
            if self._last_mono.get(meter.name) == mv.last_good:
                continue  # no new good poll (told by the monotonic clock: the wall clock may step back)
            self._last_mono[meter.name] = mv.last_good
            values = {m.name: float(v) for m, v in mv.readings() if m.name in QUANTITIES and v is not None}
            for interval in self.meters[meter.name].add(Reading(mv.last_good_wall, mv.last_good, values)):
                self._close(interval)

    def _close(self, interval: Interval) -> None:
        self._closed.append(interval)
        self._last[interval.meter] = interval
        self.closed_total += 1
        if any(t == interval.meter for v in self.virtual.values() for _, t in v.terms):
            self._pending_virtual.setdefault(interval.start, {})[interval.meter] = interval
            self._close_virtual()

    def _close_virtual(self) -> None:
        """Each virtual meter's slot closes once all its terms' intervals for that slot have (in slot order:
        a term that was offline closes its slots late, all at once)."""
        for start in sorted(self._pending_virtual):
            slot = self._pending_virtual[start]
            done = self._virtual_done.setdefault(start, set())
            for v in self.virtual.values():
                if v.name not in done and all(t in slot for _, t in v.terms):
                    done.add(v.name)
                    combined = combine(v.name, v.terms, slot)
                    if combined is not None:
                        self._closed.append(combined)
                        self._last[v.name] = combined
                        self._alarm(v, combined, slot)
            if len(done) == len(self.virtual):
                del self._pending_virtual[start], self._virtual_done[start]

    def _alarm(self, v, combined: Interval, slot: Mapping) -> None:
        alarm = self.alarms.get(v.name)
        if alarm is None:
            return
        q = "import_active_energy"
        reference = slot.get(v.alarm.reference)
        if q not in combined.energy or reference is None or q not in reference.energy:
            return
        change = alarm.feed(combined.start, combined.energy[q], reference.energy[q])
        if change is True:
            log.warning("energy balance %s (%s) is %.1f %% of %s for %d interval(s) in a row: above %g %%",
                        v.name, v.formula, alarm.last_percent or 0.0, v.alarm.reference, v.alarm.intervals,
                        v.alarm.above_percent)
        elif change is False:
            log.info("energy balance %s is back within %g %% of %s", v.name, v.alarm.above_percent,
                     v.alarm.reference)

    async def flush(self) -> None:
        """Closed intervals and the open states, in one transaction; kept for the next try on failure."""
        if self.store is None:
            return
        batch = list(self._closed)
        states = self._states()
        try:
            await self.store.call("write", batch, states, time.time())
        except Exception as exc:  # a full disk is a normal event: keep them, say it once, try again
            self.write_errors += 1
            if not self.last_error:
                log.warning("energy store: cannot write (%s); intervals kept in memory, retrying", exc)
            self.last_error = f"cannot write the energy store: {exc}"
            return
        del self._closed[:len(batch)]
        if self.last_error:
            log.info("energy store: writing works again")
        self.last_error = ""
        self._states_written = time.monotonic()

    async def _prune(self) -> None:
        before = int(time.time()) - self.cfg.retention_days * 86400
        with contextlib.suppress(Exception):
            removed = await self.store.call("prune", before)
            if removed:
                log.info("energy store: %d interval(s) older than %d days removed", removed, self.cfg.retention_days)

    # ------------------------------------------------------------ for the north sides
    def meter_names(self) -> list[str]:
        return [*self.meters, *self.virtual]

    def virtual_names(self) -> list[str]:
        return list(self.virtual)

    def virtual_meters(self) -> list[VirtualMeterConfig]:
        return list(self.virtual.values())

    def last(self, meter: str) -> Interval | None:
        return self._last.get(meter)

    def alarm_state(self) -> dict[str, dict]:
        return {name: {"active": a.active, "since": a.since, "percent": a.last_percent}
                for name, a in self.alarms.items()}

    async def intervals(self, meter: str, start: int, end: int, detail: bool = False) -> list[Interval]:
        """The intervals of ``meter`` starting in [start, end), ``missing`` where a slot that has ended has
        none; with boundary values and evidence when ``detail``."""
        await self.flush()
        stored = await self.store.call("intervals", meter, start, end, detail)
        return fill_missing(meter, stored, start, min(end, int(time.time())), self.interval_s)

    async def report(self, start: int, end: int, meters: list[str]) -> list[dict]:
        await self.flush()
        return await self.store.run(build_reports, self.cfg, meters, start, end)


def fill_missing(meter: str, stored: list[Interval], start: int, until: int, interval_s: int) -> list[Interval]:
    """``stored`` (in time order) with a ``missing`` interval for every slot in [start, until) without one."""
    first = -(-start // interval_s) * interval_s
    have = {i.start: i for i in stored}
    out = []
    t = first
    while t + interval_s <= until:
        out.append(have.pop(t, None) or Interval(meter, t, t + interval_s, MISSING, {}))
        t += interval_s
    out.extend(have.values())  # any stored beyond ``until`` (a clock that went back)
    out.sort(key=lambda i: i.start)
    return out


def build_reports(db: EnergyDb, cfg: EnergyConfig, meters: list[str], start: int, end: int) -> list[dict]:
    """Per meter, the billing report for [start, end) (synchronous: the store's thread, or the CLI), summed
    by the store. A period that has not ended is reported up to the last boundary passed: slots still to
    come are not missing. Sliding demand (``demand_window``) needs each interval's energy: only then are
    the intervals read."""
    plan = TariffPlan(cfg.tariffs, cfg.timezone) if cfg.tariffs else None
    interval_s = cfg.interval_s
    window_s = cfg.demand_window * 60
    end = max(start, min(end, int(time.time()) // interval_s * interval_s))
    sums = db.sums(meters, start, end, interval_s, tariff_function(plan))
    return [report(m, sums[m], plan, (start, end), interval_s=interval_s, window_s=window_s,
                   sliding=sliding_demand(db.intervals(m, start, end), window_s) if window_s else None)
            for m in meters]


def _alarm(cfg, state) -> BalanceAlarm:
    try:
        return BalanceAlarm(cfg, state=state)
    except ValueError:  # a state from another version or another alarm: start the count afresh
        return BalanceAlarm(cfg)


def _store_error(path: Path, exc: Exception) -> Exception:
    return BridgeError(f"energy: cannot open the store {path}: {exc}")
