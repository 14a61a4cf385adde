#!/usr/bin/env python3
"""Interval energy at panel scale: a year of 15-minute intervals for 240 meters, closing intervals live,
and reading them back over HTTP and OPC UA.

Phases, one process (uvloop), everything on 127.0.0.1:

1. ``year``: one meter's year of readings (every ``--step`` s, a load that varies with the hour) through
   ``MeterIntervals`` (the real interval code), timed per reading; then that year's intervals written for
   ``--meters`` meters (each its own name and values) through ``EnergyDb.write`` one day at a time, as the
   recorder writes them: write time, and **store size per meter-year** (the SQLite file and its WAL).
2. ``close``: a real bridge (``bridge.testing.running_bridge``: ``--meters`` simulated SDM120s on 8 ptys,
   1 s polling) with ``energy`` at ``--close-seconds``-second intervals: the **event-loop time** of every
   pass of the recorder that closed an interval for all meters (``EnergyRecorder._take_readings``, timed
   around the real method), over ``--boundaries`` boundaries.
3. ``query``: a bridge with the same meters, 15-minute intervals, HTTP and OPC UA on, on the year's store:
   ``GET /api/energy/report`` for the last calendar month, all meters; ``GET /api/energy?meter=…`` for one
   meter's year, without and with ``detail=1``; OPC UA HistoryRead (asyncua client) of one meter's month of ``ImportActiveEnergy``. Each
   ``--repeat`` times; the median and the worst are reported.

    .venv/bin/python bench/energy.py                      # the issue's scale, a few minutes
    .venv/bin/python bench/energy.py --meters 24 --days 30  # quick
"""
from __future__ import annotations

import asyncio
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import arg_parser, command_line, emit, git_describe, log, machine_info, new_uvloop

from bridge.core.model import EnergyConfig
from bridge.energy.intervals import MeterIntervals
from bridge.energy.store import STORE_FILE, EnergyDb
from bridge.energy.types import Counter, Interval, Reading
from bridge.testing import MeterSpec, running_bridge

DAY = 86400
INTERVAL = 900


def load_kw(t: float, k: int) -> float:
    """A building's day: low at night, a peak in the afternoon; each meter a little different."""
    hour = (t % DAY) / 3600
    return (1.0 + 0.1 * (k % 7)) * (2.0 + 3.0 * max(0.0, math.sin(math.pi * (hour - 6) / 14)))


def one_year(days: int, step: float) -> tuple[list[Interval], dict]:
    end = int(time.time()) // INTERVAL * INTERVAL
    start = end - days * DAY
    mi = MeterIntervals("m001", INTERVAL, {"import_active_energy": Counter(None, 0.0),
                                           "export_active_energy": Counter(None, 0.0)}, max_gap=20.0)
    energy, out, t, n = 1000.0, [], float(start) - step, 0
    took = 0.0
    while t <= end + step:
        energy += load_kw(t, 1) * step / 3600
        reading = Reading(t, t, {"import_active_energy": energy, "export_active_energy": 0.0})
        t0 = time.perf_counter()
        out.extend(mi.add(reading))
        took += time.perf_counter() - t0
        n += 1
        t += step
    return out, {"readings": n, "intervals": len(out), "us_per_reading": took / n * 1e6, "seconds": took}


def clone(i: Interval, name: str, k: int) -> Interval:
    f = 1.0 + 0.1 * (k % 7)
    return Interval(name, i.start, i.end, i.status, {q: v * f for q, v in i.energy.items()},
                    {q: v * f for q, v in i.start_values.items()}, {q: v * f for q, v in i.end_values.items()},
                    i.evidence, i.clock_step)


def write_store(path: Path, year: list[Interval], meters: int) -> dict:
    db = EnergyDb(path)
    names = [f"m{k:03d}" for k in range(1, meters + 1)]
    by_day: dict[int, list[Interval]] = {}
    for i in year:
        by_day.setdefault(i.start // DAY, []).append(i)
    t0 = time.perf_counter()
    worst = 0.0
    for day in sorted(by_day):
        batch = [clone(i, name, k) for k, name in enumerate(names, 1) for i in by_day[day]]
        t1 = time.perf_counter()
        db.write(batch, {}, time.time())
        worst = max(worst, time.perf_counter() - t1)
    took = time.perf_counter() - t0
    db.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = db.size()
    db.close()
    rows = len(year) * meters
    return {"rows": rows, "write_s": took, "rows_per_s": rows / took, "worst_day_batch_s": worst,
            "bytes": size, "bytes_per_row": size / rows, "mb_per_meter_year": size / meters / 1e6 * 365 / max(1, len(by_day))}


def layout(meters: int) -> dict:
    out: dict[str, list[MeterSpec]] = {}
    for k in range(meters):
        seg = f"seg{k // 30 + 1}"
        out.setdefault(seg, []).append(MeterSpec(f"m{k + 1:03d}", k % 30 + 1, k + 1, poll_interval=1.0))
    return out


async def close_phase(meters: int, seconds: int, boundaries: int) -> dict:
    from bridge.energy.recorder import EnergyRecorder
    passes: list[tuple[float, int]] = []
    original = EnergyRecorder._take_readings

    def timed(self):
        before = self.closed_total
        t0 = time.perf_counter()
        original(self)
        passes.append((time.perf_counter() - t0, self.closed_total - before))

    EnergyRecorder._take_readings = timed
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with running_bridge(layout(meters), energy=EnergyConfig(seconds=seconds, max_gap=5.0),
                                      state_dir=tmp, timeout=0.5, stale_after=5.0) as h:
                rec = h.app.north["energy"]
                deadline = time.monotonic() + seconds * (boundaries + 3) + 60
                while rec.closed_total < meters * (boundaries + 1) and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
    finally:
        EnergyRecorder._take_readings = original
    closing = sorted(t for t, n in passes if n > 0)
    many = sorted(t for t, n in passes if n >= meters // 2)
    return {"passes": len(passes), "closing_passes": len(closing), "intervals_closed": sum(n for _, n in passes),
            "ms_max_closing": 1e3 * max(closing, default=math.nan),
            "ms_median_closing": 1e3 * statistics.median(closing) if closing else math.nan,
            "ms_max_all_meters": 1e3 * max(many, default=math.nan), "passes_all_meters": len(many),
            "ms_median_other": 1e3 * statistics.median([t for t, n in passes if n == 0] or [math.nan])}


async def timed(fn, repeat: int, modbus_port: int | None = None) -> dict:
    """Median and worst of ``repeat`` calls; with ``modbus_port``, also the longest Modbus TCP answer
    meanwhile (unit 1 read every 5 ms on the bridge in this process): how long a request held the
    event loop, and with it every poll and every client."""
    took, longest = [], []  # each call's time, and the longest Modbus TCP answer during it
    worst = [0.0]
    inflight: list[float | None] = [None]  # when the probe's read now awaiting its answer was sent
    probe = None
    if modbus_port is not None:
        from bridge.testing import RawModbusClient

        client = await RawModbusClient.connect(modbus_port)

        async def watch() -> None:
            # the wait counted is from the moment the read was due (the last answer + 5 ms) to its answer:
            # a stall while the probe sleeps delays its next read as much as one while a read is out
            answered = time.perf_counter()
            while True:
                await asyncio.sleep(0.005)
                inflight[0] = answered + 0.005
                client.send(1, b"\x04\x00\x00\x00\x02")  # FC4, 2 registers from 0
                await client.receive(timeout=120.0)  # a stall of seconds is what this looks for
                answered = time.perf_counter()
                worst[0] = max(worst[0], answered - inflight[0])
                inflight[0] = None
        probe = asyncio.create_task(watch())
    try:
        for _ in range(repeat):
            worst[0] = 0.0
            t0 = time.perf_counter()
            size = await fn()
            took.append(time.perf_counter() - t0)
            while probe is not None and inflight[0] is not None:  # a read held up by this call counts here
                await asyncio.sleep(0.001)
            longest.append(worst[0])
    finally:
        if probe is not None:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
            await client.close()
    out = {"ms_median": 1e3 * statistics.median(took), "ms_max": 1e3 * max(took), "size": size}
    if modbus_port is not None:
        out["ms_longest_modbus"] = 1e3 * statistics.median(longest)
        out["ms_longest_modbus_max"] = 1e3 * max(longest)
    return out


def http_get(port: int, path: str):
    async def go() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        body = await reader.read()
        writer.close()
        head, _, payload = body.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{path}: {head[:200]!r} {payload[:300]!r}")
        return len(payload)
    return go


async def query(state: str, meters: int, repeat: int) -> dict:
    from asyncua import Client, ua

    out: dict = {}
    now = int(time.time())
    month_end = now // DAY * DAY
    month_start = month_end - 30 * DAY
    async with running_bridge(layout(meters), http=True, opcua=True, energy=EnergyConfig(),
                              state_dir=state, timeout=0.5, stale_after=5.0) as h:
        port, tcp = h.app.http.port, h.modbus_port
        await asyncio.sleep(2.0)
        out["report_month_all"] = await timed(http_get(port, f"/api/energy/report?from={month_start}&to={month_end}"),
                                              repeat, tcp)
        out["intervals_year_one"] = await timed(http_get(port, f"/api/energy?meter=m001&from={now - 365 * DAY}&to={now}"),
                                                repeat, tcp)
        out["intervals_year_one_detail"] = await timed(
            http_get(port, f"/api/energy?meter=m001&from={now - 365 * DAY}&to={now}&detail=1"), repeat, tcp)
        endpoint = h.app.config.opcua.endpoint
        async with Client(endpoint, timeout=30) as client:
            ns = await client.get_namespace_index(h.app.config.opcua.namespace)
            node = client.get_node(ua.NodeId("m001.Energy.ImportActiveEnergy", ns))

            async def history() -> int:
                values = await node.read_raw_history(
                    starttime=_dt(month_start), endtime=_dt(month_end), numvalues=0)
                return len(values)
            try:
                out["opcua_history_month_one"] = await timed(history, repeat)
            except Exception as exc:  # the node id scheme is the OPC UA side's: say it rather than guess
                out["opcua_history_month_one"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _dt(t: int):
    import datetime as dt
    return dt.datetime.fromtimestamp(t, dt.timezone.utc)


def markdown(r: dict) -> str:
    y, s, c, q, m = r["year"], r["store"], r.get("close", {}), r.get("query", {}), r["machine"]
    rows = [
        f"## Interval energy: {r['meters']} meters, 15-minute intervals, {r['days']} days",
        "", f"`{r['command']}`", "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_total_kib'] / 1024:.0f} MiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}, asyncua {m['asyncua']}, uvloop {m['uvloop']}; commit {r['commit']}.", "",
        "| target | measured | |", "|---|---|---|",
        f"| store size per meter-year (reported) | {s['mb_per_meter_year']:.2f} MB ({s['bytes_per_row']:.0f} bytes per "
        f"interval, {s['rows']:,} intervals, {s['bytes'] / 1e6:.0f} MB file) | — |",
    ]
    if c:
        ok = c["ms_max_all_meters"] < 20
        rows.append(f"| interval close for all {r['meters']} meters: event-loop time < 20 ms | max "
                    f"{c['ms_max_all_meters']:.1f} ms over {c['passes_all_meters']} closes (median of closing passes "
                    f"{c['ms_median_closing']:.1f} ms; a pass without a close {c['ms_median_other']:.2f} ms) | "
                    f"{'met' if ok else '**not met**'} |")
    for key, what in (("report_month_all", f"monthly report, all {r['meters']} meters, over HTTP < 1 s"),
                      ("intervals_year_one", "one meter's year of intervals over HTTP < 1 s"),
                      ("intervals_year_one_detail", "the same with boundaries and evidence (`&detail=1`)"),
                      ("opcua_history_month_one", "OPC UA HistoryRead of one meter's month < 1 s")):
        v = q.get(key)
        if v is None:
            continue
        if "error" in v:
            rows.append(f"| {what} | {v['error']} | **not measured** |")
        else:
            rows.append(f"| {what} | median {v['ms_median']:.0f} ms, worst {v['ms_max']:.0f} ms "
                        f"({v['size']:,} {'values' if 'opcua' in key else 'bytes'}"
                        + (f"; longest Modbus TCP answer meanwhile: median {v['ms_longest_modbus']:.0f} ms, "
                           f"worst {v['ms_longest_modbus_max']:.0f} ms"
                           if "ms_longest_modbus" in v else "") + ") | "
                        f"{'met' if v['ms_max'] < 1000 else '**not met**'} |")
    rows += ["", f"Intervals from a year of readings every {r['step']:.0f} s: {y['readings']:,} readings, "
             f"{y['intervals']:,} intervals, {y['us_per_reading']:.1f} µs per reading. Store writes: "
             f"{s['rows_per_s']:,.0f} intervals/s, the worst day's batch ({r['meters']} meters × 96) "
             f"{s['worst_day_batch_s'] * 1e3:.0f} ms (in the store's thread, not the event loop)."]
    return "\n".join(rows)


async def main_async(args) -> dict:
    r: dict = {"command": command_line(), "machine": machine_info(), "commit": git_describe(),
               "meters": args.meters, "days": args.days, "step": args.step}
    log(f"year: one meter's {args.days} days of readings every {args.step:.0f} s")
    year, r["year"] = one_year(args.days, args.step)
    with tempfile.TemporaryDirectory(prefix="bench-energy-") as tmp:
        log(f"store: {len(year):,} intervals × {args.meters} meters")
        r["store"] = write_store(Path(tmp) / STORE_FILE, year, args.meters)
        if "close" in args.phases:
            log(f"close: {args.meters} meters, {args.close_seconds} s intervals, {args.boundaries} boundaries")
            r["close"] = await close_phase(args.meters, args.close_seconds, args.boundaries)
        if "query" in args.phases:
            log("query: HTTP and OPC UA on the year's store")
            r["query"] = await query(tmp, args.meters, args.repeat)
    return r


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--meters", type=int, default=240)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--step", type=float, default=60.0, help="seconds between readings in the year phase (60)")
    ap.add_argument("--close-seconds", type=int, default=5, help="interval length of the close phase (5)")
    ap.add_argument("--boundaries", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--phases", default="close,query")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    with asyncio.Runner(loop_factory=new_uvloop) as runner:
        result = runner.run(main_async(args))
    emit(result, markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
