"""Virtual meters, the balance alarm, demand and the per-meter report. Pure: intervals in, values out."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from bridge.core.model import BalanceAlarmConfig
from bridge.energy.intervals import MICRO, micro
from bridge.energy.tariffs import TariffPlan
from bridge.energy.types import DEMAND_QUANTITY, MISSING, QUANTITIES, STATUSES, Interval

UNTARIFFED = "untariffed"  # by_tariff key of the intervals no tariff matched
_KWH_DIGITS = 6
_W_DIGITS = 3  # demand is kWh × 3.6e6 / s: round away the float noise of that product (mW is plenty)


def iso(utc: int) -> str:
    """ISO 8601 UTC with a 'Z': 1774746000 -> "2026-03-29T01:00:00Z"."""
    return datetime.fromtimestamp(utc, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ordered(quantities: set[str]) -> list[str]:
    """Known quantities in QUANTITIES order, then any others by name: a stable JSON shape."""
    return [q for q in QUANTITIES if q in quantities] + sorted(quantities.difference(QUANTITIES))


def _worst(statuses: Sequence[str]) -> str:
    return max(statuses, key=STATUSES.index)


# ------------------------------------------------------------------------------ virtual meters


def combine(name: str, terms: Sequence[tuple[int, str]],
            intervals: Mapping[str, Interval]) -> Interval | None:
    """The virtual meter ``name``'s interval for one slot: Σ sign × energy of its terms' intervals.

    None unless every term has an interval and they all cover the same [start, end). Only quantities
    every term has are summed. Unlike a real meter's, this energy may be negative: a balance such as
    ``incomer - feeder1 - feeder2`` goes below zero when a sub-meter reads more than the incomer (a
    wrong CT ratio, a meter reading too much) and hiding that would hide the fault. The status is the
    worst of the terms' (an estimated term makes the sum estimated); there are no counter values nor
    evidence, since a virtual meter has no counter.
    """
    if not terms:
        return None
    parts: list[tuple[int, Interval]] = []
    for sign, meter in terms:
        interval = intervals.get(meter)
        if interval is None:
            return None
        parts.append((sign, interval))
    first = parts[0][1]
    if any((iv.start, iv.end) != (first.start, first.end) for _, iv in parts):
        return None
    common = set(first.energy).intersection(*(iv.energy for _, iv in parts[1:]))
    energy = {q: math.fsum(sign * iv.energy[q] for sign, iv in parts) for q in _ordered(common)}
    return Interval(meter=name, start=first.start, end=first.end,
                    status=_worst([iv.status for _, iv in parts]), energy=energy,
                    clock_step=any(iv.clock_step for _, iv in parts))


class BalanceAlarm:
    """Raises when a virtual meter's balance stays beyond a share of a reference meter's energy.

    Fed one closed interval at a time, in order. An interval is *above* when |balance| exceeds
    ``above_percent`` % of |reference| (so a zero reference with any non-zero balance is above). The
    alarm rises after ``intervals`` above in a row and clears at the first interval back within. An
    interval that is never fed (a term missing) neither extends nor breaks the run: unknown is not
    within. An interval fed twice (a restart re-feeding the last one) is ignored, so the count is not
    inflated.
    """

    def __init__(self, cfg: BalanceAlarmConfig, *, state: Mapping[str, Any] | None = None):
        self.cfg = cfg
        self._active = False
        self._run = 0  # above intervals in a row, up to and including the last fed
        self._since: int | None = None
        self._last_start: int | None = None
        self._last_percent: float | None = None
        if state is not None:
            self._restore(state)

    @property
    def active(self) -> bool:
        return self._active

    @property
    def since(self) -> int | None:
        """Start of the first interval of the current run of above intervals (raised or not yet); None
        when the last interval was within."""
        return self._since

    @property
    def last_percent(self) -> float | None:
        """The last balance as a signed percentage of |reference| (negative: the terms subtracted read
        more); None before any interval or when the reference was 0."""
        return self._last_percent

    def feed(self, start: int, balance_kwh: float, reference_kwh: float) -> bool | None:
        """One closed interval: True when the alarm rises, False when it clears, None when unchanged."""
        if self._last_start is not None and start <= self._last_start:
            return None
        self._last_start = start
        self._last_percent = 100.0 * balance_kwh / abs(reference_kwh) if reference_kwh else None
        if abs(balance_kwh) > self.cfg.above_percent / 100.0 * abs(reference_kwh):
            if self._run == 0:
                self._since = start
            self._run += 1
            # >= rather than ==: a restored run may already be past a lowered threshold
            if not self._active and self._run >= self.cfg.intervals:
                self._active = True
                return True
            return None
        self._run, self._since = 0, None
        if self._active:
            self._active = False
            return False
        return None

    def state(self) -> dict[str, Any]:
        """What a restart needs, JSON-serialisable; pass it back as ``state=``."""
        return {"active": self._active, "run": self._run, "since": self._since,
                "last_start": self._last_start, "last_percent": self._last_percent}

    def _restore(self, state: Mapping[str, Any]) -> None:
        try:
            active, run = state["active"], state["run"]
            since, last_start, last_percent = state["since"], state["last_start"], state["last_percent"]
        except (KeyError, TypeError):
            raise ValueError(f"not a balance alarm state: {state!r}") from None
        if not (isinstance(active, bool) and isinstance(run, int) and run >= 0 and (run > 0 or not active)
                and all(v is None or isinstance(v, int) for v in (since, last_start))
                and (last_percent is None or isinstance(last_percent, (int, float)))):
            raise ValueError(f"not a balance alarm state: {state!r}")
        self._active, self._run, self._since = active, run, since
        self._last_start = last_start
        self._last_percent = None if last_percent is None else float(last_percent)


# ------------------------------------------------------------------------------ demand and reports


def sliding_demand(intervals: Sequence[Interval], window_s: int) -> list[tuple[int, float]]:
    """(window end, average import power in W over [end - window_s, end)) at every interval end where the
    window is covered, without a gap, by intervals that have the demand quantity. ``window_s`` must be a
    multiple of the interval length."""
    ordered = sorted(intervals, key=lambda iv: iv.start)
    if window_s <= 0 or (ordered and window_s % (ordered[0].end - ordered[0].start)):
        raise ValueError(f"the demand window ({window_s} s) must be a positive multiple of the interval")
    index = {iv.start: i for i, iv in enumerate(ordered)}
    result: list[tuple[int, float]] = []
    run_begin = 0  # index of the first interval of the gap-free run (with the quantity) ending at i
    for i, iv in enumerate(ordered):
        if DEMAND_QUANTITY not in iv.energy:
            run_begin = i + 1
            continue
        if i > run_begin and ordered[i - 1].end != iv.start:
            run_begin = i
        first = index.get(iv.end - window_s)
        if first is not None and first >= run_begin:
            kwh = math.fsum(ordered[k].energy[DEMAND_QUANTITY] for k in range(first, i + 1))
            result.append((iv.end, kwh * 3_600_000.0 / window_s))
    return result


@dataclass
class Sums:
    """One meter's intervals over a period, summed: what its report is made of (the store sums them in
    SQL, ``sums_of`` in Python; both exactly, in integer micro-units)."""
    energy: dict[str, int] = field(default_factory=dict)  # quantity -> micro-units
    by_tariff: dict[str, dict[str, int]] = field(default_factory=dict)  # tariff -> quantity -> micro-units
    statuses: dict[str, int] = field(default_factory=dict)
    count: int = 0  # intervals (each its own start)
    best: tuple[float, int] | None = None  # (W, start) of the highest block demand, the earliest of equals


def sums_of(intervals: Sequence[Interval], tariff_at: Callable[[int], str] | None) -> Sums:
    """``intervals`` (each its own start) summed, in time order."""
    out = Sums()
    for iv in sorted(intervals, key=lambda iv: iv.start):
        out.count += 1
        out.statuses[iv.status] = out.statuses.get(iv.status, 0) + 1
        bucket = out.by_tariff.setdefault(tariff_at(iv.start), {}) if tariff_at is not None else None
        for q, kwh in iv.energy.items():
            e = micro(kwh)
            out.energy[q] = out.energy.get(q, 0) + e
            if bucket is not None:
                bucket[q] = bucket.get(q, 0) + e
        demand = iv.demand
        if demand is not None and (out.best is None or demand > out.best[0]):
            out.best = demand, iv.start
    return out


def tariff_function(plan: TariffPlan | None) -> Callable[[int], str] | None:
    """The tariff of an interval by its start (UNTARIFFED where no tariff matches); None without tariffs."""
    return None if plan is None else (lambda start: plan.tariff_at(start) or UNTARIFFED)


def meter_report(meter: str, intervals: Sequence[Interval], plan: TariffPlan | None,
                 period: tuple[int, int], *, window_s: int = 0, interval_s: int) -> dict[str, Any]:
    """One meter's energy over ``period`` = [from, to), JSON-ready, from its intervals (see ``report``)."""
    begin, end = period
    chosen = [iv for iv in intervals if begin <= iv.start < end]
    return report(meter, sums_of(chosen, tariff_function(plan)), plan, period, interval_s=interval_s,
                  sliding=sliding_demand(chosen, window_s) if window_s else None, window_s=window_s)


def report(meter: str, sums: Sums, plan: TariffPlan | None, period: tuple[int, int], *, interval_s: int,
           sliding: Sequence[tuple[int, float]] | None = None, window_s: int = 0) -> dict[str, Any]:
    """One meter's energy over ``period`` = [from, to), JSON-ready, from the sums of its intervals.

    An interval belongs to the period its start falls in (as its tariff is judged at its start), so
    with a zone whose midnight is not on an interval boundary the first and last slots straddle it;
    intervals starting outside the period are left out. Energies are summed exactly (integer micro-units)
    and given in kWh/kvarh to 6 decimals. ``statuses`` counts every status; "missing" adds the slots of
    the period with no interval at all to the intervals stored as missing. Demand is in W, rounded to mW;
    ``max_sliding_demand`` (only when ``window_s``; ``sliding`` from ``sliding_demand``) considers windows
    wholly within the period, and its ``at`` is the window's start like ``max_demand``'s.
    """
    if interval_s <= 0:
        raise ValueError(f"interval_s must be positive, got {interval_s}")
    begin, end = period
    statuses = dict.fromkeys(STATUSES, 0)
    for status, n in sums.statuses.items():
        statuses[status] = statuses.get(status, 0) + n
    first_slot = -(-begin // interval_s) * interval_s  # the first UTC-aligned start within the period
    slots = max(0, -(-(end - first_slot) // interval_s))
    statuses[MISSING] += max(0, slots - sums.count)

    out: dict[str, Any] = {"meter": meter, "from": iso(begin), "to": iso(end), "energy": _kwh(sums.energy)}
    if plan is not None:
        order = {name: i for i, name in enumerate((*plan.names, UNTARIFFED))}
        out["by_tariff"] = {name: _kwh(sums.by_tariff[name])
                            for name in sorted(sums.by_tariff, key=lambda n: order.get(n, len(order)))}
    best = sums.best
    out["max_demand"] = None if best is None else {"w": round(best[0], _W_DIGITS), "at": iso(best[1])}
    if window_s:
        if sliding:
            at, w = max(sliding, key=lambda p: p[1])  # max() keeps the first of equals: the earliest
            out["max_sliding_demand"] = {"w": round(w, _W_DIGITS), "at": iso(at - window_s), "to": iso(at)}
        else:
            out["max_sliding_demand"] = None
    out["statuses"] = statuses
    out["intervals"] = sums.count
    return out


def _kwh(sums: Mapping[str, int]) -> dict[str, float]:
    # + 0.0 turns the -0.0 of a zero balance into 0.0
    return {q: round(sums[q] / MICRO, _KWH_DIGITS) + 0.0 for q in _ordered(set(sums))}


def interval_record(i: Interval) -> dict:
    """One interval as the API gives it: its energies by name (kWh/kvarh), demand (W), the boundary
    counter values and the readings they were interpolated from (for an auditor)."""
    out: dict = {"meter": i.meter, "start": iso(i.start), "end": iso(i.end), "status": i.status}
    for q in QUANTITIES:
        if q in i.energy:
            out[q] = round(i.energy[q], 6)
    demand = i.demand
    out["demand"] = None if demand is None else round(demand, 3)
    if i.clock_step:
        out["clock_step"] = True
    if i.start_values or i.end_values:
        out["boundaries"] = {q: {"start": i.start_values.get(q), "end": i.end_values.get(q)} for q in i.energy}
    if i.evidence:
        out["evidence"] = {q: {"start": _ev(a), "end": _ev(b)} for q, (a, b) in i.evidence.items()}
    return out


def _ev(e) -> dict:
    return {"before": _point(e.before), "after": _point(e.after)}


def _point(p) -> dict | None:
    return None if p is None else {"time": round(p[0], 3), "value": p[1]}
