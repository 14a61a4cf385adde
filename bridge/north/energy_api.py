"""``GET /api/energy`` and ``GET /api/energy/report`` (docs/energy.md §7): query parsing and rendering.

``from`` and ``to`` take an ISO 8601 time with an offset or ``Z`` (``2026-03-01T06:00:00Z``), a date
(``2026-03-01``: local midnight in ``energy.timezone``, as a billing clerk means it), a local time without
offset (``2026-03-01T06:00``), or UTC epoch seconds. Defaults: the last 24 hours for intervals, the current
billing period for the report. Every answer is computed from the store when asked.
"""
from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import time
import zoneinfo
from collections.abc import Mapping, Sequence
from urllib.parse import parse_qs

from bridge.energy.report import interval_record, iso
from bridge.energy.tariffs import billing_period
from bridge.energy.types import QUANTITIES, Interval
from bridge.view import EnergySource

MAX_RANGE = 400 * 86400  # seconds of intervals in one answer (one meter's year at 15 min: 35,040 rows)


class BadQuery(ValueError):
    """A query the user must correct: answered 400 with this one line."""


def parse_time(text: str, tz: str) -> int:
    """UTC epoch seconds from an ISO date/time (local to ``tz`` when it has no offset) or epoch seconds."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        if len(text) == 10:
            when = dt.datetime.combine(dt.date.fromisoformat(text), dt.time())
        else:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T"))
    except ValueError:
        raise BadQuery(f"cannot read the time {text!r}: use 2026-03-01, 2026-03-01T06:00:00Z or epoch seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=zoneinfo.ZoneInfo(tz))
    return int(when.timestamp())


def query(target: str) -> dict[str, str]:
    """The query string's parameters (the last of each); BadQuery for an empty value."""
    params = parse_qs(target.partition("?")[2], keep_blank_values=True)
    return {k: v[-1] for k, v in params.items()}


def time_range(params: Mapping[str, str], tz: str, default: tuple[int, int]) -> tuple[int, int]:
    start = parse_time(params["from"], tz) if params.get("from") else default[0]
    end = parse_time(params["to"], tz) if params.get("to") else default[1]
    if end <= start:
        raise BadQuery(f"'to' ({iso(end)}) must be after 'from' ({iso(start)})")
    if end - start > MAX_RANGE:
        raise BadQuery(f"at most {MAX_RANGE // 86400} days at once")
    return start, end


async def intervals_csv(intervals: Sequence[Interval]) -> bytes:
    """The intervals as CSV, in slices of ``RENDER_SLICE`` (see ``intervals_json``)."""
    present = [q for q in QUANTITIES if any(q in i.energy for i in intervals)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["meter", "start", "end", "status", *present, "demand", "clock_step"])
    slices = _Slices()
    for n, i in enumerate(intervals, 1):
        if n % RENDER_STEP == 0:
            await slices.tick()
        demand = i.demand
        w.writerow([i.meter, iso(i.start), iso(i.end), i.status,
                    *(("" if q not in i.energy else f"{i.energy[q]:.6f}") for q in present),
                    "" if demand is None else f"{demand:.3f}", int(i.clock_step)])
    return buf.getvalue().encode()


def report_csv(reports: Sequence[dict]) -> bytes:
    """One row per meter and tariff (``all`` for the total), with the maximum demand and the statuses."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["meter", "from", "to", "tariff", *QUANTITIES, "max_demand_w", "max_demand_at", "intervals",
                "complete", "estimated", "reset", "rollover", "missing"])
    for r in reports:
        md = r.get("max_demand") or {}
        rows = [("all", r.get("energy", {}))] + list((r.get("by_tariff") or {}).items())
        for tariff, energy in rows:
            st = r.get("statuses", {})
            w.writerow([r["meter"], r["from"], r["to"], tariff, *(energy.get(q, "") for q in QUANTITIES),
                        md.get("w", ""), md.get("at", ""), r.get("intervals", 0),
                        *(st.get(s, 0) for s in ("complete", "estimated", "reset", "rollover", "missing"))])
    return buf.getvalue().encode()


def report_markdown(reports: Sequence[dict]) -> str:
    lines = ["| meter | from | to | tariff | import kWh | export kWh | max demand W | at | statuses |",
             "|---|---|---|---|---:|---:|---:|---|---|"]
    for r in reports:
        md = r.get("max_demand") or {}
        statuses = ", ".join(f"{k} {v}" for k, v in r.get("statuses", {}).items() if v)
        rows = [("all", r.get("energy", {}))] + list((r.get("by_tariff") or {}).items())
        for tariff, energy in rows:
            lines.append(f"| {r['meter']} | {r['from']} | {r['to']} | {tariff} | "
                         f"{_num(energy.get('import_active_energy'))} | {_num(energy.get('export_active_energy'))} | "
                         f"{_num(md.get('w')) if tariff == 'all' else ''} | {md.get('at', '') if tariff == 'all' else ''} | "
                         f"{statuses if tariff == 'all' else ''} |")
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    return "" if v is None else f"{v:.3f}"


async def answer_intervals(energy: EnergySource, params: Mapping[str, str], now: int) -> tuple[str, bytes]:
    tz = energy.timezone
    meter = params.get("meter", "")
    names = energy.meter_names()
    if meter not in names:
        raise BadQuery(f"unknown meter {meter!r}: one of {', '.join(names)}" if meter else
                       f"give meter=<name>: one of {', '.join(names)}")
    start, end = time_range(params, tz, (now - 86400, now))
    detail = params.get("detail", "0") not in ("0", "", "false", "no")
    rows = await energy.intervals(meter, start, end, detail=detail and params.get("format") != "csv")
    if params.get("format") == "csv":
        return "text/csv; charset=utf-8", await intervals_csv(rows)
    head = {"meter": meter, "interval": energy.interval_s, "from": iso(start), "to": iso(end)}
    return "application/json", await intervals_json(head, rows)


RENDER_SLICE = 0.02  # seconds of rendering between two yields to the event loop
RENDER_STEP = 64  # intervals rendered between two looks at the clock


class _Slices:
    """Yield to the event loop once ``RENDER_SLICE`` has passed: few enough yields that a year is not slowed
    down by the loop's turns in between (each turn serves the whole bridge), short enough to hold nothing up."""

    def __init__(self) -> None:
        self.since = time.perf_counter()

    async def tick(self) -> None:
        if time.perf_counter() - self.since >= RENDER_SLICE:
            await asyncio.sleep(0)
            self.since = time.perf_counter()


async def intervals_json(head: Mapping[str, object], intervals: Sequence[Interval]) -> bytes:
    """``head`` with ``"intervals": [...]`` last, compact. A year is 6 MB of JSON (27 MB with the
    detail), 0.3-2 s of Python: rendered in slices of ``RENDER_SLICE``, yielding in between, so that
    polls and clients go on meanwhile. (A thread would not do: the two would contend for the
    interpreter, and every turn of the event loop would wait for it.)"""
    text = json.dumps(head, separators=(",", ":"), allow_nan=False)
    parts = []
    slices = _Slices()
    for n in range(0, len(intervals), RENDER_STEP):
        parts.append(",".join(json.dumps(interval_record(i), separators=(",", ":"), allow_nan=False)
                              for i in intervals[n:n + RENDER_STEP]))
        await slices.tick()
    return f'{text[:-1]},"intervals":[{",".join(parts)}]}}'.encode()


async def answer_report(energy: EnergySource, params: Mapping[str, str], now: int) -> tuple[str, bytes]:
    tz = energy.timezone
    names = energy.meter_names()
    meter = params.get("meter")
    if meter is not None and meter not in names:
        raise BadQuery(f"unknown meter {meter!r}: one of {', '.join(names)}")
    start, end = time_range(params, tz, billing_period(now, tz, energy.billing_day))
    reports = await energy.report(start, end, [meter] if meter else names)
    fmt = params.get("format", "json")
    if fmt == "csv":
        return "text/csv; charset=utf-8", report_csv(reports)
    if fmt == "md":
        return "text/markdown; charset=utf-8", report_markdown(reports).encode()
    return "application/json", json.dumps({"from": iso(start), "to": iso(end), "meters": reports},
                                          separators=(",", ":"), allow_nan=False).encode()
