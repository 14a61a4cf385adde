#!/usr/bin/env python3
"""RS485 segment: measured cycle time against the wire-time lower bound, and the cost of faults.

One segment of ``--meters`` (default 7) Eastron SDM120 meters at 9600 8N1, every meter at
``poll_interval: 0``, polled by the real ``bridge.south.segment.Segment`` over a real pseudo-terminal
(``bridge.testing.running_bridge``: the whole bridge in this process, under uvloop). The
simulated bus (``bridge.south.simulator.SimulatedBus``, ``emulate_wire=True``) delays every reply
by the characters of request and reply at the configured baud plus ``--turnaround`` (default
5 ms), and counts requests that began before 3.5 characters of quiet had passed after its
last reply (``silence_violations``; a real bus garbles those, so the count must be zero).

Lower bound: the best block plan for the SDM120 image (``bridge.core.plan.plan_meter`` with the
true turnaround in characters; an exact search), and per transaction the request and reply
characters, the meter's turnaround and the master's one 3.5-character silence. Cycle bound =
the sum over meters and blocks. Measured cycle = time between successive starts of the same
meter's poll, taken from the simulator's request log (every meter, every round in the window).

Fault run: the same segment with the last meter dead (never answers, from the start) and 5 %
(``--corrupt-rate``) of the other meters' replies carrying a bad CRC, with the bridge's
default timeout 0.5 s, retries 1, demote_after 3, demote_interval 10 s. Its window starts
once the dead meter has been demoted (the time that took is reported). The healthy meters'
rate (complete good polls per second, per meter) is compared with the same meters' rate in
the fault-free run of the same round (the mean over the healthy meters; each meter's own ratio is
shown too, but counts only ~16 polls in a 20 s window, so it moves in steps of ~6 %).

Values: every measurement of every simulated meter holds a constant that is distinct per
meter and per measurement (``1000 × slave + k``). In both runs a Modbus TCP client
(``RawModbusClient`` on the bridge's port, in this process) reads every measurement of every
meter every ``--check-interval`` (pipelined) and compares each answer with the simulator's
registers: any other data is a wrong value; exception 0x0B (gateway target failed to respond)
is counted apart. The dead meter must only ever answer 0x0B.

Instrumentation (observation only; bridge/ is not modified): the bus's ``_reply``,
``_send_later`` and ``_send``, the segment's silence wait (``Segment._wait_line_free``, or
``RtuMaster.wait_line_free`` where the segment delegates to ``bridge.south.rtu_master``) and the
image's ``mark_good`` are wrapped on their instances to time each step of every transaction.
The fault-free run splits each transaction's time beyond its ideal (turnaround + wire
characters + t3.5) into: the simulator's reply timer (sent − due), the pty to the master, the
master's work before its silence wait, the silence wait's overshoot, and the master's write to
the simulator's read.

Each round is a fault-free run then a fault run, each a fresh bridge and fresh ptys;
``--rounds`` rounds (default 2), medians over rounds. Before each run the script waits up to
``--wait-quiet`` s (default 10) for other processes to use under 10 % of a core; their CPU use in
every measured window is reported, and a window above 10 % is flagged.

    .venv/bin/python bench/bus.py                 # about 2 minutes
    .venv/bin/python bench/bus.py --seconds 10 --rounds 1 --json out.json
    .venv/bin/python bench/bus.py --loop asyncio  # the stdlib event loop instead of uvloop

Exits 1 if the run broke (nothing measured) or any wrong value was served; with ``--strict``
exits 2 when a target is missed (cycle / bound ≤ 1.05 with zero silence violations; healthy
rate under faults ≥ 80 % of the fault-free rate; zero wrong values is also a target but a
wrong value always exits 1).
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import logging
import math
import os
import random
import statistics
import struct
import sys
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.core import rtu  # noqa: E402
from bridge.core.codec import Function  # noqa: E402
from bridge.core.model import MeterConfig  # noqa: E402
from bridge.core.plan import REPLY_HEADER_CHARS, REQUEST_CHARS, plan_chars, plan_meter  # noqa: E402
from bridge.config.profiles import get_builtin  # noqa: E402
from bridge.testing import MeterSpec, RawModbusClient, running_bridge  # noqa: E402
from benchlib import (  # noqa: E402
    NOISY_PCT,
    arg_parser,
    command_line,
    emit,
    fmt,
    log,
    machine_info,
    median,
    percentile,
    user_process_ticks,
    wait_quiet,
)

PROFILE = "eastron-sdm120"
SEGMENT = "bus"
GW_TARGET_FAILED = 0x0B
TARGET_RATIO = 1.05
TARGET_RATE = 0.80


# ====================================================================== bound
def lower_bound(args) -> dict:
    """The wire-time lower bound of one round over every meter, with its per-block breakdown."""
    profile = get_builtin(PROFILE)
    char = rtu.char_time(args.baud, args.parity, args.stopbits)
    t35 = rtu.silence(args.baud, args.parity, args.stopbits)
    ta_chars = args.turnaround / char
    blocks = plan_meter(MeterConfig("bound", 1, 1, profile, poll_interval=0.0), turnaround_chars=ta_chars)
    rows = []
    for b in blocks:
        reply = REPLY_HEADER_CHARS + 2 * b.count
        wire = (REQUEST_CHARS + reply) * char
        rows.append({"function": int(b.function), "address": b.address, "count": b.count,
                     "request_chars": REQUEST_CHARS, "reply_chars": reply, "wire_ms": wire * 1e3,
                     "turnaround_ms": args.turnaround * 1e3, "t35_ms": t35 * 1e3,
                     "total_ms": (wire + args.turnaround + t35) * 1e3})
    meter_ms = sum(r["total_ms"] for r in rows)
    # the planner's own cost model is the same sum, in characters
    assert math.isclose(meter_ms, plan_chars(blocks, ta_chars) * char * 1e3 + len(blocks) * (t35 - 3.5 * char) * 1e3)
    return {"char_ms": char * 1e3, "t35_ms": t35 * 1e3, "turnaround_chars": ta_chars, "blocks": rows,
            "meter_ms": meter_ms, "transactions": len(rows) * args.meters, "cycle_ms": meter_ms * args.meters}


# ====================================================================== helpers
# ====================================================================== instrumentation
class Probe:
    """Wraps a running harness's bus, segment and image (on the instances) and records timings."""

    def __init__(self, h):
        self.bus = h.buses[SEGMENT]
        self.seg = h.segment(SEGMENT)
        self.image = h.app.image
        self.replies: list[list] = []  # [received, slave, request_len, due, sent, reply_len, crc_ok]
        pending: deque[list] = deque()  # replies scheduled, not yet sent
        self.waits: list[tuple[float, float, float, float]] = []  # entry, line_free_at, last_rx, exit
        self.good_polls: list[tuple[float, int]] = []  # (time, unit) of every complete good poll
        self.cycle_samples: list[tuple[float, float]] = []  # (time, SegmentDiagnostics.cycle_time) on change
        bus, seg, image = self.bus, self.seg, self.image
        orig_reply, orig_send, orig_send_later = bus._reply, bus._send, bus._send_later
        # the silence wait: Segment._wait_line_free, or RtuMaster.wait_line_free once the segment delegates
        # its transactions to a bridge.south.rtu_master.RtuMaster (seg._master, made when the port opens)
        line = seg if hasattr(seg, "_wait_line_free") else seg._master
        wait_name = "_wait_line_free" if line is seg else "wait_line_free"
        orig_wait, orig_good = getattr(line, wait_name), image.mark_good

        def _reply(meter, pdu, received, request_len):
            rec = [received, meter.slave, request_len, received, None, None, None]  # due: received unless delayed
            self.replies.append(rec)
            pending.append(rec)
            orig_reply(meter, pdu, received, request_len)

        def _send_later(adu, at):
            if pending:
                pending[-1][3] = at  # when the reply's last character is due to leave the emulated wire
            return orig_send_later(adu, at)

        def _send(adu):
            now = time.monotonic()
            # one transaction at a time: this is the oldest scheduled reply (a reply scheduled before
            # these wrappers were installed finds no record and is not timed)
            if pending:
                rec = pending.popleft()
                rec[4], rec[5], rec[6] = now, len(adu), rtu.crc_ok(adu)
            orig_send(adu)

        async def _wait_line_free():
            link = seg._link
            entry, free_at, last_rx = time.monotonic(), line._line_free_at, link.last_rx if link else 0.0
            await orig_wait()
            self.waits.append((entry, free_at, last_rx, time.monotonic()))

        def mark_good(unit, timestamp):
            self.good_polls.append((time.monotonic(), unit))
            orig_good(unit, timestamp)

        bus._reply, bus._send, bus._send_later = _reply, _send, _send_later
        setattr(line, wait_name, _wait_line_free)
        image.mark_good = mark_good

    async def sample_cycle_time(self) -> None:
        last = None
        while True:
            v = self.seg.diag.cycle_time
            if v != last:
                self.cycle_samples.append((time.monotonic(), v))
                last = v
            await asyncio.sleep(0.02)

    def transactions(self) -> list[list]:
        """Every answered request: [received, slave, request_len, due, sent, reply_len, crc_ok]."""
        return self.replies


# ====================================================================== value checker
class Checker:
    """A Modbus TCP client reading every measurement of every meter, comparing with the simulator."""

    def __init__(self, port: int, sims: dict, dead: set[int], interval: float):
        self.port, self.sims, self.dead, self.interval = port, sims, dead, interval
        self.window: tuple[float, float] | None = None
        self.counts = {"warmup": self._zero(), "window": self._zero()}
        self.examples: list[str] = []
        self.error: str = ""
        profile = get_builtin(PROFILE)
        self.reads = [(sim.slave, m.function, m.address, m.count) for sim in sims.values()
                      for m in profile.measurements]

    @staticmethod
    def _zero() -> dict:
        return {"reads": 0, "ok": 0, "wrong": 0, "gw_healthy": 0, "gw_dead": 0, "other_exception": 0}

    def _phase(self, t: float) -> str | None:
        if self.window is None:
            return "warmup"
        return "window" if self.window[0] <= t <= self.window[1] else None

    async def run(self) -> None:
        client = await RawModbusClient.connect(self.port)
        by_slave = {sim.slave: sim for sim in self.sims.values()}
        try:
            while True:
                t = time.monotonic()
                tids = [client.send(slave, struct.pack(">BHH", int(fn), addr, count))
                        for slave, fn, addr, count in self.reads]
                for tid, (slave, fn, addr, count) in zip(tids, self.reads):
                    frame = await client.receive(timeout=5.0)
                    if frame.tid != tid:
                        raise RuntimeError(f"reply tid {frame.tid} != request tid {tid}")
                    sim = by_slave[slave]
                    table = sim.tables[Function(fn)]
                    expected = bytes((int(fn), 2 * count)) + struct.pack(
                        f">{count}H", *(table.get(addr + i, 0) for i in range(count)))
                    pdu = frame.pdu
                    if slave in self.dead:
                        kind = "gw_dead" if pdu == bytes((int(fn) | 0x80, GW_TARGET_FAILED)) else (
                            "other_exception" if len(pdu) == 2 and pdu[0] & 0x80 else "wrong")
                    elif pdu == expected:
                        kind = "ok"
                    elif pdu == bytes((int(fn) | 0x80, GW_TARGET_FAILED)):
                        kind = "gw_healthy"
                    elif len(pdu) == 2 and pdu[0] & 0x80:
                        kind = "other_exception"
                    else:
                        kind = "wrong"
                    phase = self._phase(t)
                    if phase is not None:
                        c = self.counts[phase]
                        c["reads"] += 1
                        c[kind] += 1
                    if kind in ("wrong", "other_exception") and len(self.examples) < 5:
                        self.examples.append(f"slave {slave} fn {int(fn)} addr {addr}: got {pdu.hex()}, "
                                             f"simulator holds {expected.hex()}")
                if self.interval > 0:
                    await asyncio.sleep(self.interval)
                else:
                    await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported, the run is then broken
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            await client.close()


# ====================================================================== one run
def set_constant_values(sims: dict) -> None:
    profile = get_builtin(PROFILE)
    for sim in sims.values():
        for k, m in enumerate(profile.measurements):
            sim.set_value(m.name, float(1000 * sim.slave + k))


def poll_starts(log_entries: list[tuple[float, int, int]]) -> list[tuple[float, int]]:
    """(time, slave) of every poll's first request: a request to another slave than the one before."""
    starts, prev = [], None
    for t, slave, _ in log_entries:
        if slave != prev:
            starts.append((t, slave))
        prev = slave
    return starts


def overhead(args, probe: Probe, t0: float, t1: float, t35: float) -> dict:
    """Per-transaction time beyond the ideal, split into where it went (fault-free runs)."""
    tx = [r for r in probe.transactions() if r[4] is not None]
    waits = probe.waits
    exits = [w[3] for w in waits]
    parts = {k: [] for k in ("extra", "sim_timer", "pty_to_master", "master_before_wait",
                             "wait_overshoot", "master_write_to_sim")}
    char = rtu.char_time(args.baud, args.parity, args.stopbits)
    skipped = 0
    for cur, nxt in zip(tx, tx[1:]):
        received, _, req_len, due, sent, reply_len, ok = cur
        if not (t0 <= received and nxt[0] <= t1) or not ok:
            continue
        i = bisect.bisect_right(exits, nxt[0]) - 1  # the silence wait that preceded the next request
        if i < 0:
            skipped += 1
            continue
        entry, free_at, last_rx, exit_ = waits[i]
        if not (sent <= last_rx <= entry) or not math.isclose(free_at, last_rx + t35, abs_tol=1e-7):
            skipped += 1  # not a plain reply → silence → request sequence
            continue
        ideal = args.turnaround + (req_len + reply_len) * char + t35
        parts["extra"].append(nxt[0] - received - ideal)
        parts["sim_timer"].append(sent - due)
        parts["pty_to_master"].append(last_rx - sent)
        parts["master_before_wait"].append(entry - last_rx)
        parts["wait_overshoot"].append(exit_ - max(free_at, entry))
        parts["master_write_to_sim"].append(nxt[0] - exit_)
    out = {"transactions": len(parts["extra"]), "skipped": skipped}
    for k, v in parts.items():
        s = sorted(v)
        out[k] = {"mean_ms": statistics.fmean(v) * 1e3 if v else math.nan, "p50_ms": percentile(s, 0.5) * 1e3,
                  "p95_ms": percentile(s, 0.95) * 1e3, "min_ms": s[0] * 1e3 if s else math.nan,
                  "max_ms": s[-1] * 1e3 if s else math.nan}
    return out


async def run_once(args, faulted: bool, rnd: int, bound: dict) -> dict:
    n = args.meters
    dead = {n} if faulted else set()
    specs = [MeterSpec(f"m{s}", s, s, profile=PROFILE, poll_interval=0.0, animate=False, silent=s in dead)
             for s in range(1, n + 1)]
    bus_options = {"baudrate": args.baud, "parity": args.parity, "stopbits": args.stopbits,
                   "emulate_wire": True, "turnaround": args.turnaround}
    t35 = rtu.silence(args.baud, args.parity, args.stopbits)
    label = "faulted" if faulted else "fault-free"
    result: dict = {"run": label, "round": rnd, "dead": sorted(dead)}
    async with running_bridge(
        {SEGMENT: specs}, bus_options=bus_options, stale_after=args.stale_after, timeout=args.timeout,
        retries=args.retries, baudrate=args.baud, parity=args.parity, stopbits=args.stopbits,
        demote_after=args.demote_after, demote_interval=args.demote_interval,
    ) as h:
        started = time.monotonic()
        seg = h.segment(SEGMENT)
        while not hasattr(seg, "_wait_line_free") and getattr(seg, "_master", None) is None:
            if time.monotonic() - started > 10:
                raise RuntimeError(f"segment {SEGMENT} did not open its port within 10 s")
            await asyncio.sleep(0.001)  # the port is not open yet
        probe = Probe(h)
        sims = h.sims
        set_constant_values(sims)
        if faulted:
            for sim in sims.values():
                if sim.slave not in dead:
                    # SimMeter draws corruption from its own Random(slave): a fresh draw per round and seed
                    sim._rng = random.Random(f"{args.seed}/{rnd}/{sim.slave}")
                    sim.faults.corrupt_rate = args.corrupt_rate
        sampler = asyncio.create_task(probe.sample_cycle_time())
        seg, bus = probe.seg, probe.bus
        demoted_at: list[float] = []

        async def watch_demotion() -> None:
            while not seg.meters[n].diag.demoted:
                await asyncio.sleep(0.005)
            demoted_at.append(time.monotonic())

        watcher = asyncio.create_task(watch_demotion()) if faulted else None
        healthy = [name for name, sim in sims.items() if sim.slave not in dead]
        # two more complete polls of every healthy meter: the image holds the constants
        await asyncio.gather(*(h.polls(name, 2, timeout=30.0) for name in healthy))
        checker = Checker(h.modbus_port, sims, dead, args.check_interval) if args.check_interval >= 0 else None
        check_task = asyncio.create_task(checker.run()) if checker else None
        if watcher:
            await asyncio.wait_for(watcher, timeout=60.0)  # the dead meter must be demoted
            result["demoted_after_s"] = demoted_at[0] - started
            await asyncio.sleep(max(0.0, demoted_at[0] + 1.0 - time.monotonic()))
        else:
            await asyncio.sleep(max(0.0, args.warmup - (time.monotonic() - started)))
        # ---------------------------------------------------------------- window
        before = {"seg": seg.diag.as_dict(), "meters": {u: s.diag.as_dict() for u, s in seg.meters.items()},
                  "violations": bus.stats.silence_violations, "bus_requests": bus.stats.requests}
        ticks0, cpu0 = user_process_ticks(), time.process_time()
        t0 = time.monotonic()
        if checker:
            checker.window = (t0, t0 + args.seconds)
        await asyncio.sleep(args.seconds)
        t1 = time.monotonic()
        cpu1, ticks1 = time.process_time(), user_process_ticks()
        after = {"seg": seg.diag.as_dict(), "meters": {u: s.diag.as_dict() for u, s in seg.meters.items()},
                 "violations": bus.stats.silence_violations, "bus_requests": bus.stats.requests}
        if check_task:
            check_task.cancel()
            await asyncio.gather(check_task, return_exceptions=True)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        plans = {u: [(int(b.function), b.address, b.count) for b in s.blocks] for u, s in seg.meters.items()}
        turnarounds = {u: s.diag.turnaround for u, s in seg.meters.items()}
        all_violations = bus.stats.silence_violations
        log_entries = list(bus.stats.log)
    # ------------------------------------------------------------------ analysis
    secs = t1 - t0
    delta = {k: after["seg"][k] - before["seg"][k] for k in after["seg"] if isinstance(after["seg"][k], (int, float))}
    result.update({
        "seconds": secs,
        "requests": delta["requests"], "good": delta["good"], "crc_errors": delta["crc_errors"],
        "timeouts": delta["timeouts"], "retries": delta["retries"], "late_replies": delta["late_replies"],
        "other_errors": delta["truncated"] + delta["wrong_slave"] + delta["noise"] + delta["protocol_errors"]
        + delta["exceptions"],
        "silence_violations": after["violations"] - before["violations"],
        "silence_violations_whole_run": all_violations,
        "bus_requests": after["bus_requests"] - before["bus_requests"],
        "process_cpu_pct": 100 * (cpu1 - cpu0) / secs,
        "other_cpu_pct": 100 * sum(t - ticks0.get(p, 0) for p, t in ticks1.items() if p != os.getpid())
        / os.sysconf("SC_CLK_TCK") / secs,
        "plans": plans, "turnaround_ms": {u: (v * 1e3 if v is not None else None) for u, v in turnarounds.items()},
    })
    meter_fails = {u: after["meters"][u]["timeouts"] - before["meters"][u]["timeouts"] for u in after["meters"]}
    result["dead_timeouts"] = sum(meter_fails[u] for u in dead)
    result["healthy_demotions"] = sum(after["meters"][u]["demotions"] for u in after["meters"] if u not in dead)
    # cycle: start-to-start of each meter's polls, every meter, both starts in the window
    window_log = [e for e in log_entries if t0 <= e[0] <= t1]
    starts = poll_starts(window_log)
    by_slave: dict[int, list[float]] = {}
    for t, slave in starts:
        by_slave.setdefault(slave, []).append(t)
    cycles = sorted(b - a for s, ts in by_slave.items() if s not in dead for a, b in zip(ts, ts[1:]))
    result["cycles"] = len(cycles)
    result["cycle_p50_ms"] = percentile(cycles, 0.5) * 1e3
    result["cycle_p95_ms"] = percentile(cycles, 0.95) * 1e3
    result["cycle_max_ms"] = cycles[-1] * 1e3 if cycles else math.nan
    seg_cycles = sorted(v for t, v in probe.cycle_samples if t0 <= t <= t1 and v > 0)
    result["segment_cycle_time_p50_ms"] = percentile(seg_cycles, 0.5) * 1e3
    # transactions per round and the bound for what was actually polled
    result["transactions_per_cycle"] = len(window_log) / (secs / (result["cycle_p50_ms"] / 1e3)) if cycles else math.nan
    if not faulted:
        result["bound_ms"] = bound["cycle_ms"]
        result["ratio"] = result["cycle_p50_ms"] / bound["cycle_ms"]
        result["ratio_p95"] = result["cycle_p95_ms"] / bound["cycle_ms"]
        result["overhead"] = overhead(args, probe, t0, t1, t35)
    # rate: complete good polls per second of each healthy meter
    polls = {u: 0 for u in range(1, n + 1)}
    for t, u in probe.good_polls:
        if t0 <= t <= t1:
            polls[u] += 1
    result["polls_per_s"] = {u: c / secs for u, c in polls.items()}
    # what a corrupt reply costs: from its request to the next request, minus the clean transaction
    char = rtu.char_time(args.baud, args.parity, args.stopbits)
    tx = [r for r in probe.transactions() if r[4] is not None]
    bad_cost = []
    for cur, nxt in zip(tx, tx[1:]):
        if t0 <= cur[0] and nxt[0] <= t1 and cur[6] is False:
            ideal = args.turnaround + (cur[2] + cur[5]) * char + t35
            bad_cost.append(nxt[0] - cur[0] - ideal)
    result["corrupt_replies"] = len(bad_cost)
    result["corrupt_extra_ms_p50"] = percentile(sorted(bad_cost), 0.5) * 1e3 if bad_cost else None
    # bus time spent on the dead meter in the window: from its poll's first request to the next poll start
    dead_time = 0.0
    for (t, s), nxt in zip(starts, starts[1:] + [(t1, None)]):
        if s in dead:
            dead_time += nxt[0] - t
    result["dead_bus_share"] = dead_time / secs
    if checker:
        result["check"] = checker.counts
        result["check_examples"] = checker.examples
        result["check_error"] = checker.error
    return result


# ====================================================================== report

def summarise(args, runs: list[dict], bound: dict) -> dict:
    free = [r for r in runs if r["run"] == "fault-free"]
    bad = [r for r in runs if r["run"] == "faulted"]
    healthy = list(range(1, args.meters))  # the last meter is the dead one in fault runs
    rate_ratios = []
    for fr in bad:
        ref = next((r for r in free if r["round"] == fr["round"]), None)
        if ref is None:
            continue
        per_meter = [fr["polls_per_s"][u] / ref["polls_per_s"][u] for u in healthy if ref["polls_per_s"][u] > 0]
        fr["rate_ratio_min"] = min(per_meter) if per_meter else math.nan
        ref_rate = statistics.fmean(ref["polls_per_s"][u] for u in healthy)
        fr["rate_ratio"] = statistics.fmean(fr["polls_per_s"][u] for u in healthy) / ref_rate if ref_rate else math.nan
        rate_ratios.append(fr["rate_ratio"])

    def agg(rs: list[dict]) -> dict:
        def med(key):
            return median([r.get(key) for r in rs])

        rates = [statistics.fmean(r["polls_per_s"][u] for u in healthy) for r in rs]
        checks = [r.get("check") for r in rs if r.get("check")]
        return {
            "rounds": len(rs), "cycle_p50_ms": med("cycle_p50_ms"), "cycle_p95_ms": med("cycle_p95_ms"),
            "cycle_max_ms": max((r["cycle_max_ms"] for r in rs), default=None),
            "segment_cycle_time_p50_ms": med("segment_cycle_time_p50_ms"),
            "ratio": med("ratio"), "ratio_rounds": [r.get("ratio") for r in rs],
            "silence_violations": sum(r["silence_violations"] for r in rs),
            "silence_violations_whole_run": sum(r["silence_violations_whole_run"] for r in rs),
            "requests": sum(r["requests"] for r in rs), "good": sum(r["good"] for r in rs),
            "crc_errors": sum(r["crc_errors"] for r in rs), "timeouts": sum(r["timeouts"] for r in rs),
            "retries": sum(r["retries"] for r in rs), "late_replies": sum(r["late_replies"] for r in rs),
            "other_errors": sum(r["other_errors"] for r in rs),
            "healthy_polls_per_s": median(rates), "rate_ratio": med("rate_ratio"),
            "rate_ratio_min": med("rate_ratio_min"),
            "rate_ratio_rounds": [r.get("rate_ratio") for r in rs],
            "reads": sum(c["window"]["reads"] + c["warmup"]["reads"] for c in checks),
            "wrong": sum(c["window"]["wrong"] + c["warmup"]["wrong"] for c in checks),
            "other_exception": sum(c["window"]["other_exception"] + c["warmup"]["other_exception"] for c in checks),
            "gw_healthy_window": sum(c["window"]["gw_healthy"] for c in checks),
            "gw_healthy_warmup": sum(c["warmup"]["gw_healthy"] for c in checks),
            "gw_dead": sum(c["window"]["gw_dead"] + c["warmup"]["gw_dead"] for c in checks),
            "demoted_after_s": med("demoted_after_s"), "dead_bus_share": med("dead_bus_share"),
            "corrupt_extra_ms_p50": med("corrupt_extra_ms_p50"),
            "corrupt_replies": sum(r.get("corrupt_replies", 0) for r in rs),
            "healthy_demotions": sum(r.get("healthy_demotions", 0) for r in rs),
            "process_cpu_pct": med("process_cpu_pct"),
            "other_cpu_pct_max": max((r["other_cpu_pct"] for r in rs), default=None),
            "transactions_per_cycle": med("transactions_per_cycle"),
        }

    ff, fa = agg(free), agg(bad)
    # overhead: per-round means, median over rounds
    ov = {}
    for key in ("extra", "sim_timer", "pty_to_master", "master_before_wait", "wait_overshoot", "master_write_to_sim"):
        ov[key] = {stat: median([r["overhead"][key][stat] for r in free]) for stat in ("mean_ms", "p50_ms", "p95_ms")}
    ov["transactions"] = sum(r["overhead"]["transactions"] for r in free)
    ov["skipped"] = sum(r["overhead"]["skipped"] for r in free)
    targets = {
        "cycle_ratio_le_1.05": ff["ratio"] is not None and ff["ratio"] <= TARGET_RATIO,
        "zero_silence_violations": ff["silence_violations_whole_run"] == 0 and fa["silence_violations_whole_run"] == 0,
        # None: not measured (--check-interval < 0)
        "zero_wrong_values": (ff["wrong"] == 0 and fa["wrong"] == 0) if ff["reads"] and fa["reads"] else None,
        "healthy_rate_ge_0.80": fa["rate_ratio"] is not None and fa["rate_ratio"] >= TARGET_RATE,
    }
    return {"fault_free": ff, "faulted": fa, "overhead": ov, "targets": targets}


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "met" if ok else "**NOT met**"


def markdown(result: dict) -> str:
    m, a, b, s = result["machine"], result["args"], result["bound"], result["summary"]
    ff, fa, ov, tg = s["fault_free"], s["faulted"], s["overhead"], s["targets"]
    n = a["meters"]
    frame = f"{a['baud']} 8{a['parity']}{a['stopbits']}"
    lines = [
        f"## RS485 segment benchmark: {n} × Eastron SDM120 at {frame}, poll_interval 0, "
        f"turnaround {a['turnaround'] * 1e3:g} ms",
        "",
        f"`{result['command']}`",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu'] or 'unknown'}), Linux {m['kernel']}, Python {m['python']}, "
        f"{m['loop']} event loop (uvloop {m['uvloop']}), pyserial {m['pyserial']}, commit {m['commit'] or '?'}.",
        f"The bridge (real `Segment`, real pty via pyserial), the simulated bus (`emulate_wire=True`) and the "
        f"Modbus TCP checker share one process. Each run: warm-up, then {a['seconds']:g} s measured; "
        f"{a['rounds']} round(s) of fault-free then faulted, medians over rounds. Segment settings: timeout "
        f"{a['timeout']:g} s, retries {a['retries']}, demote_after {a['demote_after']}, demote_interval "
        f"{a['demote_interval']:g} s; stale_after {a['stale_after']:g} s. Checker: every measurement of every "
        f"meter every {a['check_interval'] * 1e3:g} ms.",
        "",
        f"### Lower bound (char {b['char_ms']:.4f} ms, t3.5 {b['t35_ms']:.3f} ms, turnaround "
        f"{a['turnaround'] * 1e3:g} ms = {b['turnaround_chars']:.2f} chars)",
        "",
        "Best plan of the SDM120 image (`plan_meter(..., turnaround_chars)`, exact); per transaction the request "
        "and reply characters, the turnaround and the master's one t3.5.",
        "",
        "| block | FC | address | registers | request chars | reply chars | wire ms | turnaround ms | t3.5 ms | ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(b["blocks"], 1):
        lines.append(f"| {i} | {r['function']} | {r['address']} | {r['count']} | {r['request_chars']} "
                     f"| {r['reply_chars']} | {r['wire_ms']:.3f} | {r['turnaround_ms']:.3f} | {r['t35_ms']:.3f} "
                     f"| {r['total_ms']:.3f} |")
    tot = {k: sum(r[k] for r in b["blocks"]) for k in ("count", "request_chars", "reply_chars", "wire_ms",
                                                         "turnaround_ms", "t35_ms")}
    lines += [
        f"| meter | | | {tot['count']} | {tot['request_chars']} | {tot['reply_chars']} | {tot['wire_ms']:.3f} "
        f"| {tot['turnaround_ms']:.3f} | {tot['t35_ms']:.3f} | {b['meter_ms']:.3f} |",
        "",
        f"Cycle bound: {n} meters × {b['meter_ms']:.3f} ms = **{b['cycle_ms']:.1f} ms** "
        f"({b['transactions']} transactions).",
    ]
    same = result.get("bridge_plan_matches_bound")
    if same is not None:
        lines.append("The bridge's own plan after warm-up: " + ("the same blocks." if same else
                     f"**different**: {result['bridge_plans']}.")
                     + f" Its measured turnaround (`MeterDiagnostics.turnaround`, p50 over meters and fault-free "
                     f"runs): {fmt(result.get('bridge_turnaround_ms'), '.2f')} ms against the simulator's "
                     f"{a['turnaround'] * 1e3:g} ms.")
    lines += [
        "",
        "### Results",
        "",
        "| run | cycle p50 ms | cycle p95 ms | bound ms | p50 / bound | silence violations | requests | good "
        "| CRC errors | timeouts | retries | healthy polls/s per meter | rate vs fault-free "
        "| values read | wrong values | 0x0B healthy (window) | 0x0B dead meter |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| fault-free | {fmt(ff['cycle_p50_ms'], '.1f')} | {fmt(ff['cycle_p95_ms'], '.1f')} | {b['cycle_ms']:.1f} "
        f"| **{fmt(ff['ratio'], '.4f')}** | **{ff['silence_violations_whole_run']}** | {ff['requests']} "
        f"| {ff['good']} | {ff['crc_errors']} | {ff['timeouts']} | {ff['retries']} "
        f"| {fmt(ff['healthy_polls_per_s'], '.3f')} | 1 | {ff['reads']:,} | **{ff['wrong']}** "
        f"| {ff['gw_healthy_window']} | – |",
        f"| faulted: {a['corrupt_rate'] * 100:g} % corrupt, meter {n} dead | {fmt(fa['cycle_p50_ms'], '.1f')} "
        f"| {fmt(fa['cycle_p95_ms'], '.1f')} | – | – | **{fa['silence_violations_whole_run']}** | {fa['requests']} "
        f"| {fa['good']} | {fa['crc_errors']} | {fa['timeouts']} | {fa['retries']} "
        f"| {fmt(fa['healthy_polls_per_s'], '.3f')} | **{fmt(fa['rate_ratio'], '.3f')}** "
        f"(worst meter {fmt(fa['rate_ratio_min'], '.3f')}) | {fa['reads']:,} | **{fa['wrong']}** "
        f"| {fa['gw_healthy_window']} | {fa['gw_dead']:,} |",
        "",
        f"Counts are summed over rounds (requests, errors: measured windows only; silence violations, values "
        f"read, wrong values: whole runs including warm-up). Rounds: fault-free p50/bound "
        f"{', '.join(fmt(x, '.4f') for x in ff['ratio_rounds'])}; faulted rate ratio "
        f"{', '.join(fmt(x, '.3f') for x in fa['rate_ratio_rounds'])} (healthy meters' mean polls/s over the "
        f"same meters' in the round's fault-free run; a 20 s window counts ~16 polls per meter, so one meter's "
        f"own ratio moves in steps of ~6 %). Segment's own `cycle_time` p50: "
        f"{fmt(ff['segment_cycle_time_p50_ms'], '.1f')} ms fault-free, {fmt(fa['segment_cycle_time_p50_ms'], '.1f')} "
        f"ms faulted. Cycles are start-to-start of each meter's poll (simulator log). Faulted cycle excludes "
        f"the dead meter, which is demoted.",
        f"Faulted run: dead meter demoted after {fmt(fa['demoted_after_s'], '.1f')} s (window starts 1 s later); "
        f"it then took {fmt(fa['dead_bus_share'] * 100 if fa['dead_bus_share'] is not None else None, '.1f')} % "
        f"of the bus time; a corrupt reply cost {fmt(fa['corrupt_extra_ms_p50'], '.1f')} ms (p50) beyond a clean "
        f"transaction ({fa['corrupt_replies']} corrupt replies); 0x0B for healthy meters during warm-up: "
        f"{fa['gw_healthy_warmup']}; other exception answers: {ff['other_exception'] + fa['other_exception']}; "
        f"healthy meters demoted: {fa['healthy_demotions']}.",
        f"CPU: this process {fmt(ff['process_cpu_pct'], '.0f')} % of a core fault-free, "
        f"{fmt(fa['process_cpu_pct'], '.0f')} % faulted; other processes at most "
        f"{fmt(max(x for x in (ff['other_cpu_pct_max'], fa['other_cpu_pct_max']) if x is not None), '.0f')} %"
        " in a measured window"
        + (f" (**noisy: > {NOISY_PCT} % in " + ", ".join(
            f"{r['run']} round {r['round'] + 1} ({r['other_cpu_pct']:.0f} %)" for r in result["runs"]
            if r["other_cpu_pct"] > NOISY_PCT) + "; re-run on a quiet machine**)"
           if max(ff["other_cpu_pct_max"] or 0, fa["other_cpu_pct_max"] or 0) > NOISY_PCT else "") + ".",
        "",
        f"### Where the time beyond the bound goes (fault-free, {ov['transactions']:,} transactions)",
        "",
        "Per transaction: from one request reaching the simulator to the next, minus the ideal "
        "(turnaround + request and reply characters + t3.5). Mean and percentiles per round, median over rounds.",
        "",
        "| component | mean ms | p50 ms | p95 ms | per cycle ms (mean × transactions) |",
        "|---|---:|---:|---:|---:|",
    ]
    names = [
        ("sim_timer", "simulator: reply sent − reply due (its asyncio timer)"),
        ("pty_to_master", "pty + master wake-up: reply sent → master's read"),
        ("master_before_wait", "master: reply read → silence wait entered (parse, store, schedule)"),
        ("wait_overshoot", "master: silence wait's end − (last byte + t3.5)"),
        ("master_write_to_sim", "master: frame + write → simulator's read of the request"),
        ("extra", "**total beyond the ideal**"),
    ]
    tx = b["transactions"]
    for key, name in names:
        v = ov[key]
        lines.append(f"| {name} | {fmt(v['mean_ms'], '.3f')} | {fmt(v['p50_ms'], '.3f')} | {fmt(v['p95_ms'], '.3f')} "
                     f"| {fmt(v['mean_ms'] * tx if v['mean_ms'] is not None else None, '.1f')} |")
    master_ms = sum(ov[k]["mean_ms"] or 0 for k in ("wait_overshoot", "master_write_to_sim"))
    lines += [
        "",
        f"(The \"master before wait\" time runs inside t3.5, so it costs nothing unless it exceeds it; the "
        f"overshoot is measured from the later of the two.) Measured cycle − bound: "
        f"{fmt(ff['cycle_p50_ms'] - b['cycle_ms'] if ff['cycle_p50_ms'] is not None else None, '.1f')} ms; "
        f"of which the master's share (overshoot + write → read) ≈ {master_ms * tx:.1f} ms per cycle.",
        "",
        "Targets: " + "; ".join([
            f"cycle / bound ≤ {TARGET_RATIO}: {'met' if tg['cycle_ratio_le_1.05'] else '**NOT met**'} "
            f"({fmt(ff['ratio'], '.4f')})",
            f"zero silence violations: {'met' if tg['zero_silence_violations'] else '**NOT met**'} "
            f"({ff['silence_violations_whole_run']} fault-free, {fa['silence_violations_whole_run']} faulted)",
            f"zero wrong values served: "
            f"{verdict(tg['zero_wrong_values'])}"
            f" ({ff['wrong'] + fa['wrong']} of {ff['reads'] + fa['reads']:,})",
            f"healthy rate under faults ≥ {TARGET_RATE:.0%}: {verdict(tg['healthy_rate_ge_0.80'])} "
            f"({fmt(fa['rate_ratio'], '.3f')}; worst meter {fmt(fa['rate_ratio_min'], '.3f')})",
        ]) + ".",
    ]
    examples = [e for r in result["runs"] for e in r.get("check_examples", [])]
    if examples:
        lines += ["", "Wrong or unexpected answers (first few): " + "; ".join(examples[:5])]
    errors = [f"{r['run']} round {r['round'] + 1}: {r['check_error']}" for r in result["runs"] if r.get("check_error")]
    if errors:
        lines += ["", "**Checker failed:** " + "; ".join(errors)]
    return "\n".join(lines)


# ====================================================================== main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = arg_parser(__doc__)
    ap.add_argument("--meters", type=int, default=7, help="SDM120 meters on the segment (default 7)")
    ap.add_argument("--baud", type=int, default=9600, help="baud rate (default 9600)")
    ap.add_argument("--parity", choices="NEO", default="N", help="parity (default N)")
    ap.add_argument("--stopbits", type=int, choices=(1, 2), default=1, help="stop bits (default 1)")
    ap.add_argument("--turnaround", type=float, default=0.005, help="simulated meter turnaround, s (default 0.005)")
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="measured seconds per run (default 20; a multiple of --demote-interval keeps the "
                         "dead meter's share of the fault run exact)")
    ap.add_argument("--warmup", type=float, default=3.0,
                    help="fault-free warm-up, s (default 3; the fault run warms up until the dead meter is "
                         "demoted, plus 1 s)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of fault-free + faulted (default 2)")
    ap.add_argument("--corrupt-rate", type=float, default=0.05, help="share of replies with a bad CRC (default 0.05)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the corrupt-reply draws (default 1; each round "
                                                         "and meter draws its own sequence from it)")
    ap.add_argument("--timeout", type=float, default=0.5, help="segment timeout, s (default 0.5, the bridge's)")
    ap.add_argument("--retries", type=int, default=1, help="segment retries (default 1, the bridge's)")
    ap.add_argument("--demote-after", type=int, default=3, help="demote_after (default 3, the bridge's)")
    ap.add_argument("--demote-interval", type=float, default=10.0, help="demote_interval, s (default 10, the bridge's)")
    ap.add_argument("--stale-after", type=float, default=10.0, help="stale_after, s (default 10, the bridge's)")
    ap.add_argument("--check-interval", type=float, default=0.05,
                    help="seconds between the checker's sweeps over every measurement (default 0.05; "
                         "0 = back to back; negative = no checker)")
    ap.add_argument("--wait-quiet", type=float, default=10.0,
                    help="before each run, wait up to this many seconds for other processes to use less "
                         f"than {NOISY_PCT} %% of a core (default 10; 0 = do not wait)")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (default uvloop)")
    ap.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-': stdout, "
                                                   "instead of the Markdown table)")
    return ap.parse_args(argv)


async def run_all(args, bound: dict) -> list[dict]:
    runs = []
    for rnd in range(args.rounds):
        for faulted in (False, True):
            if args.wait_quiet > 0:
                await asyncio.to_thread(wait_quiet, args.wait_quiet)
            r = await run_once(args, faulted, rnd, bound)
            runs.append(r)
            chk = r.get("check", {})
            wrong = sum(c["wrong"] for c in chk.values()) if chk else 0
            if faulted:
                log(f"  round {rnd + 1} faulted:    demoted after {r['demoted_after_s']:.1f} s, healthy "
                    f"{statistics.fmean(r['polls_per_s'][u] for u in range(1, args.meters)):.3f} polls/s/meter, "
                    f"cycle p50 {r['cycle_p50_ms']:.1f} ms, crc {r['crc_errors']}, timeouts {r['timeouts']}, "
                    f"violations {r['silence_violations_whole_run']}, wrong values {wrong}"
                    + (f", checker error {r['check_error']}" if r.get("check_error") else ""))
            else:
                log(f"  round {rnd + 1} fault-free: cycle p50 {r['cycle_p50_ms']:.1f} ms p95 {r['cycle_p95_ms']:.1f} "
                    f"ms ({r['cycles']} cycles), p50/bound {r['ratio']:.4f}, extra/transaction "
                    f"{r['overhead']['extra']['mean_ms']:.3f} ms, violations {r['silence_violations_whole_run']}, "
                    f"{statistics.fmean(r['polls_per_s'][u] for u in range(1, args.meters)):.3f} polls/s/meter, "
                    f"wrong values {wrong}" + (f", checker error {r['check_error']}" if r.get("check_error") else ""))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.meters < 2:
        raise SystemExit("--meters must be at least 2 (one is dead in the fault run)")
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    command = command_line()
    bound = lower_bound(args)
    per_run = args.seconds + max(args.warmup, 8.0)
    log(f"bound: {args.meters} meters × {len(bound['blocks'])} blocks, {bound['cycle_ms']:.1f} ms per cycle; "
        f"{args.rounds} round(s) × 2 runs: about {args.rounds * 2 * per_run:.0f} s")
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    else:
        loop_factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runs = runner.run(run_all(args, bound))
    bound_plan = [(r["function"], r["address"], r["count"]) for r in bound["blocks"]]
    bridge_plans = {u: p for r in runs for u, p in r["plans"].items()
                    if not (r["run"] == "faulted" and u == args.meters)}  # the dead meter's plan never adapts
    result = {
        "command": command, "machine": machine_info(packages=("uvloop", "pyserial"), loop=args.loop),
        "args": vars(args), "bound": bound,
        "bridge_plan_matches_bound": all(p == bound_plan for p in bridge_plans.values()),
        "bridge_plans": {str(u): p for u, p in bridge_plans.items()},
        "bridge_turnaround_ms": median([v for r in runs if r["run"] == "fault-free"
                                        for v in r["turnaround_ms"].values()]),
        "runs": runs,
    }
    result["summary"] = summarise(args, runs, bound)
    emit(result, markdown, args.json)
    s = result["summary"]
    broken = [r for r in runs if r["cycles"] == 0 or r.get("check_error")]
    if broken or s["fault_free"]["wrong"] or s["faulted"]["wrong"]:
        log(f"FAILED: {len(broken)} broken run(s), {s['fault_free']['wrong'] + s['faulted']['wrong']} wrong values")
        return 1
    if args.strict and not all(v is not False for v in s["targets"].values()):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
