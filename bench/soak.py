#!/usr/bin/env python3
"""Soak: many Modbus TCP clients and one OPC UA client against `modbus-bridge demo` for minutes.

The bridge runs as the real command (``python -m bridge demo --modbus-port P --opcua-port Q``,
free ports, simulated meters on ptys in the same process; units 1, 2, 11, 12) in its own
process. This process waits for its banner and for every unit to answer, then runs, under
uvloop:

* ``--clients`` (default 50) Modbus TCP clients, raw asyncio streams with hand-built MBAP
  frames, one request in flight each, each pausing 10–50 ms (uniform) between requests. The
  mix: valid FC4 reads of every unit (random sub-ranges of the registers the bridge serves,
  whole intervals, single measurements), reads that must give exceptions (a gap or FC3 → 0x02,
  an unknown unit → 0x0A, count 0 or 126 → 0x03, function 0x2B → 0x01), a few FC6 writes to the
  writable unit 12 (``--writes-per-second``, default 1, shared by all clients; the meter echoes
  them over the bus), and a reconnect every 200–500 requests. About 1 iteration in 500 is a
  malformed frame on a throwaway connection instead (a valid read first, which must be
  answered, then a frame whose MBAP header cannot be Modbus: the server must close the
  connection without answering), and about 1 in 10,000 an incomplete frame that the server
  must close after ``modbus_tcp.frame_timeout`` (5 s).
* one OPC UA client (asyncua, SecurityPolicy None) reading four measurements every second
  (status Good, plausible values), reconnecting every 60 s.

Every reply is checked: transaction id, protocol id, unit, and the PDU: a normal FC4 reply has
the right function code and byte count (and voltages and frequencies in it are plausible), an
exception is exactly the expected one, a write is echoed. Anything else (another exception, a
timeout, a lost connection, a refused connection) is an error.

The bridge's RSS (/proc/PID/status VmRSS), CPU time (/proc/PID/stat), open file descriptors
and threads are sampled every 10 s. After ``--warmup`` seconds of load (default: 10 % of the
soak, at most 30 s) the measured window of ``--minutes`` (default 10) begins. At the end the
clients stop, and the bridge gets SIGTERM and must exit with status 0 within 5 s. Its log
(stderr) is checked: no ERROR or traceback, and one "closing" line per malformed frame.

    .venv/bin/python bench/soak.py [--minutes 10] [--clients 50] [--json out.json]

Output: a Markdown table on stdout, progress on stderr. Exits 1 on any error.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shlex
import struct
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from benchlib import (
    HOST,
    NOISY_PCT,
    REQUEST_TIMEOUT,
    TERM_TIMEOUT,
    BridgeProcess,
    Conn,
    OtherCpu,
    arg_parser,
    command_line,
    emit,
    fmt,
    free_port,
    git_describe,
    latency_ms,
    log,
    machine_info,
    mib,
    new_uvloop,
    proc_cpu_seconds,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MBAP = struct.Struct(">HHHB")  # transaction id, protocol id, length, unit id: for frames that must be refused
SAMPLE_PERIOD = 10.0  # seconds between samples of the bridge process
# the demo mirrors the first 80 input registers of the "incomer" meter (bridge/demo.py)
DEMO_MIRRORED = {"incomer": (0, 80)}
UNKNOWN_UNITS = (3, 99, 200)
PLAUSIBLE = {"voltage": (215.0, 245.0), "voltage_l1": (215.0, 245.0), "voltage_l2": (215.0, 245.0),
             "voltage_l3": (215.0, 245.0), "frequency": (49.5, 50.5)}
OPCUA_POINTS = [("incomer.voltage_l1", 215.0, 245.0), ("hvac.frequency", 49.5, 50.5),
                ("lighting.current", 0.1, 41.0), ("sockets.active_power", 1.0, 10_000.0)]
OPCUA_RECONNECT = 60.0

# iteration mix (weights); malformed frames and partial frames use throwaway connections
MIX = [
    ("read", 0.9000),
    ("gap", 0.0300),
    ("fc3", 0.0100),
    ("unit", 0.0300),
    ("count", 0.0100),
    ("function", 0.0100),
    ("malformed", 0.0020),
    ("partial", 0.0001),
]
KIND_LABELS = {  # kind -> (table label, what is expected)
    "read u1": ("FC4 read, unit 1", "normal reply, 2 × count bytes"),
    "read u2": ("FC4 read, unit 2", "normal reply, 2 × count bytes"),
    "read u11": ("FC4 read, unit 11", "normal reply, 2 × count bytes"),
    "read u12": ("FC4 read, unit 12", "normal reply, 2 × count bytes"),
    "gap": ("FC4 read of a gap or across an interval end", "exception 0x02"),
    "fc3": ("FC3 read (no holding registers served)", "exception 0x02"),
    "unit": ("read of unit 3, 99 or 200", "exception 0x0A"),
    "count": ("FC4 read of count 0 or 126", "exception 0x03"),
    "function": ("function 0x2B", "exception 0x01"),
    "write": ("FC6 write, unit 12 (over the bus)", "echo"),
    "malformed": ("malformed MBAP header, throwaway connection", "connection closed, no reply"),
    "partial": ("incomplete frame, throwaway connection", "closed after frame_timeout"),
}
THROWAWAY_AT_ONCE = 6  # throwaway connections open at once (the bridge accepts 64 in all)


# ====================================================================== the demo's registers
@dataclass
class UnitLayout:
    unit: int
    name: str
    intervals: list[tuple[int, int]]  # served input registers [start, end), merged
    checks: list[tuple[int, str, float, float]]  # (address, name, lo, hi) of plausible float32 values
    gaps: list[tuple[int, int]] = field(default_factory=list)  # (address, count) reads that must give 0x02


def _merge(intervals):
    out: list[tuple[int, int]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def demo_layout() -> dict[int, UnitLayout]:
    """The input registers each demo unit serves, from the demo layout and the profiles' register maps."""
    from bridge.demo import DEMO_LAYOUT
    from bridge.config.profiles import get_builtin

    units = {}
    for meters in DEMO_LAYOUT.values():
        for name, _slave, unit, profile_name in meters:
            profile = get_builtin(profile_name)
            raw = [(m.address, m.address + 2) for m in profile.measurements]
            assert all(m.function.value == 4 and m.dtype.value == "float32" for m in profile.measurements)
            if name in DEMO_MIRRORED:
                raw.append(DEMO_MIRRORED[name])
            intervals = _merge(raw)
            checks = [(m.address, m.name, *PLAUSIBLE[m.name]) for m in profile.measurements if m.name in PLAUSIBLE]
            served = set()
            for s, e in intervals:
                served.update(range(s, e))
            gaps = set()
            for s, e in intervals:
                if e not in served and e <= 0xFFFF:
                    gaps.add((e, 1))  # just past an interval
                    gaps.add((e - 1, 2))  # across its end
                if s > 0 and s - 1 not in served:
                    gaps.add((s - 1, 2))  # across its start
            gaps |= {(0x8000, 10), (0xFFFF, 2)}  # far away; beyond the address space
            units[unit] = UnitLayout(unit, name, intervals, checks, sorted(gaps))
    return units


# ====================================================================== the bridge process
class Bridge(BridgeProcess):
    """``python -m bridge demo`` on free ports: started, waited for, stopped with SIGTERM."""

    def __init__(self, cpu: int | None):
        self.modbus_port, self.opcua_port = free_port(), free_port()
        while self.opcua_port == self.modbus_port:
            self.opcua_port = free_port()
        super().__init__(["demo", "--modbus-port", str(self.modbus_port), "--opcua-port", str(self.opcua_port),
                          "--http-port", str(free_port())], cpu, prefix="soak-bridge-")
        self.banner = ""

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{HOST}:{self.opcua_port}/bridge"

    def wait_banner(self, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.stdout_text()
            if "Modbus TCP:" in text and "OPC UA:" in text:
                time.sleep(0.2)  # the rest of the banner
                self.banner = self.stdout_text()
                m = re.search(r"Modbus TCP:\s+[\d.]+:(\d+)", self.banner)
                if not m or int(m.group(1)) != self.modbus_port:
                    raise RuntimeError(f"unexpected banner:\n{self.banner}")
                return time.monotonic() - self.t_start
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"the bridge did not start (exit {self.proc.poll()}):\n{self.log_text()[-3000:]}")


# ====================================================================== load
class Stats:
    """Counters for the whole run; ``measuring`` selects the latency samples kept."""

    def __init__(self):
        self.counts: dict[str, int] = {}  # by kind, whole run
        self.errors: dict[str, int] = {}  # by reason, whole run
        self.error_examples: list[str] = []
        self.lat: dict[str, array] = {}  # by kind, seconds, measured window only
        self.reconnects = 0
        self.measuring = False
        self.t0 = time.monotonic()
        self.snapshot: dict[str, int] = {}  # counts at the start of the measured window
        self.snapshot_errors = 0

    def ok(self, kind: str, latency: float) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.measuring:
            self.lat.setdefault(kind, array("d")).append(latency)

    def error(self, reason: str, detail: str = "") -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1
        if len(self.error_examples) < 20:
            self.error_examples.append(f"{time.monotonic() - self.t0:7.1f} s  {reason}  {detail}".rstrip())
        if sum(self.errors.values()) <= 5:
            log(f"ERROR {reason} {detail}")

    def start_measuring(self) -> None:
        self.snapshot = dict(self.counts)
        self.snapshot_errors = sum(self.errors.values())
        self.measuring = True


class Shared:
    """State shared by the clients of this process."""

    def __init__(self, args, port: int, layout: dict[int, UnitLayout], stats: Stats):
        self.port = port
        self.layout = layout
        self.units = sorted(layout)
        self.stats = stats
        self.stop = False
        self.throwaway = asyncio.Semaphore(THROWAWAY_AT_ONCE)
        self.write_period = 1.0 / args.writes_per_second if args.writes_per_second > 0 else None
        self.next_write = time.monotonic() + 1.0
        self.min_pause, self.max_pause = args.pause_ms[0] / 1e3, args.pause_ms[1] / 1e3
        self.kinds = [k for k, _ in MIX]
        self.weights = [w for _, w in MIX]


def check_read(layout: UnitLayout, address: int, count: int, reply: bytes) -> str | None:
    """Why a reply to an FC4 read of served registers is wrong, or None."""
    if len(reply) == 2 and reply[0] == 0x84:
        return f"exception 0x{reply[1]:02X}"
    if reply[:1] != b"\x04":
        return f"function {reply[:1].hex()}"
    if len(reply) != 2 + 2 * count or reply[1] != 2 * count:
        return f"byte count {reply[1] if len(reply) > 1 else None} / length {len(reply)} for {count} registers"
    for a, name, lo, hi in layout.checks:
        if address <= a and a + 2 <= address + count:
            off = 2 + 2 * (a - address)
            v = struct.unpack(">f", reply[off:off + 4])[0]
            if not lo <= v <= hi:
                return f"implausible {name} {v!r}"
    return None


def plan_read(rng: random.Random, layout: UnitLayout) -> tuple[int, int]:
    """(address, count) of a valid read: a random sub-range, a whole interval, or one measurement."""
    lengths = [e - s for s, e in layout.intervals]
    s, e = rng.choices(layout.intervals, weights=lengths)[0]
    r = rng.random()
    if r < 0.25:
        return s, min(e - s, 125)
    if r < 0.5:
        a = s + 2 * rng.randrange((e - s) // 2)
        return a, 2
    a = rng.randrange(s, e)
    return a, rng.randint(1, min(125, e - a))


async def throwaway(shared: Shared, rng: random.Random, kind: str) -> None:
    """A valid read on a new connection (proves it was admitted), then a frame the server must reject."""
    st = shared.stats
    async with shared.throwaway:
        t0 = time.perf_counter()
        try:
            conn = await Conn.open(shared.port)
        except (OSError, asyncio.TimeoutError) as exc:
            st.error(f"{kind}: connect failed", repr(exc))
            return
        try:
            unit = rng.choice(shared.units)
            address, count = plan_read(rng, shared.layout[unit])
            try:
                reply, _ = await conn.timed_request(unit, struct.pack(">BHH", 4, address, count))
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
                st.error(f"{kind}: the valid read before it failed", repr(exc))
                return
            why = check_read(shared.layout[unit], address, count, reply)
            if why:
                st.error(f"{kind}: the valid read before it: {why}")
                return
            if kind == "malformed":
                v = rng.randrange(5)
                tid = rng.randrange(0x10000)
                if v == 0:
                    frame = MBAP.pack(tid, 1, 6, unit) + struct.pack(">BHH", 4, 0, 2)  # protocol id 1
                elif v == 1:
                    frame = MBAP.pack(tid, 0, 0, unit)  # length 0
                elif v == 2:
                    frame = MBAP.pack(tid, 0, 1, unit)  # length 1: no function code
                elif v == 3:
                    frame = MBAP.pack(tid, 0, 300, unit) + bytes(20)  # longer than any Modbus PDU
                else:
                    frame = bytes((rng.randrange(256), rng.randrange(256), 0x47, 0x45, 0x54, 0x20, 0x2F))  # "GET /"
                wait = REQUEST_TIMEOUT
            else:
                frame = MBAP.pack(rng.randrange(0x10000), 0, 6, unit) + b"\x04\x00"  # 4 of its 6 bytes missing
                wait = 10.0  # frame_timeout 5 s + the janitor's 1 s period + margin
            conn.writer.write(frame)
            try:
                data = await asyncio.wait_for(conn.reader.read(1024), wait)
            except asyncio.TimeoutError:
                st.error(f"{kind}: connection not closed", f"after {wait:g} s")
                return
            except ConnectionError:
                data = b""  # reset: closed as well
            if data:
                st.error(f"{kind}: server replied", data.hex())
                return
            st.ok(kind, time.perf_counter() - t0)
        finally:
            await conn.close()


async def client(shared: Shared, i: int, seed: int) -> None:
    rng = random.Random(seed * 1000 + i)
    st = shared.stats
    conn: Conn | None = None
    until_reconnect = rng.randint(200, 500)
    await asyncio.sleep(rng.uniform(0, shared.max_pause))  # spread the starts
    while not shared.stop:
        if conn is None:
            try:
                conn = await Conn.open(shared.port)
            except (OSError, asyncio.TimeoutError) as exc:
                st.error("connect failed", repr(exc))
                await asyncio.sleep(1.0)
                continue
        await asyncio.sleep(rng.uniform(shared.min_pause, shared.max_pause))
        if shared.stop:
            break
        now = time.monotonic()
        if shared.write_period is not None and now >= shared.next_write:
            shared.next_write = max(shared.next_write + shared.write_period, now)
            kind = "write"
        else:
            kind = rng.choices(shared.kinds, weights=shared.weights)[0]
        if kind in ("malformed", "partial"):
            await throwaway(shared, rng, kind)
            continue
        unit = rng.choice(shared.units)
        expect: bytes | None = None  # the exact reply PDU, when it is known
        if kind == "read":
            address, count = plan_read(rng, shared.layout[unit])
            pdu = struct.pack(">BHH", 4, address, count)
            kind = f"read u{unit}"
        elif kind == "gap":
            address, count = rng.choice(shared.layout[unit].gaps)
            pdu, expect = struct.pack(">BHH", 4, address, count), b"\x84\x02"
        elif kind == "fc3":
            address, count = plan_read(rng, shared.layout[unit])
            pdu, expect = struct.pack(">BHH", 3, address, count), b"\x83\x02"
        elif kind == "unit":
            unit = rng.choice(UNKNOWN_UNITS)
            pdu, expect = struct.pack(">BHH", 4, 0, 2), b"\x84\x0A"
        elif kind == "count":
            pdu, expect = struct.pack(">BHH", 4, 0, rng.choice((0, 126))), b"\x84\x03"
        elif kind == "function":
            pdu, expect = bytes((0x2B, 0x0E, 0x01, 0x00)), b"\xAB\x01"
        else:  # write
            unit = 12
            pdu = struct.pack(">BHH", 6, 0x0100 + i, rng.randrange(0x10000))
            expect = pdu
        try:
            reply, latency = await conn.timed_request(unit, pdu)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            reason = {asyncio.TimeoutError: "timeout", asyncio.IncompleteReadError: "connection closed by server",
                      ValueError: "bad reply header"}.get(type(exc), "connection error")
            st.error(f"{kind}: {reason}", repr(exc)[:200])
            await conn.close()
            conn = None
            continue
        if expect is not None:
            why = None if reply == expect else f"reply {reply.hex()} instead of {expect.hex()}"
        else:
            why = check_read(shared.layout[unit], address, count, reply)
        if why:
            st.error(f"{kind}: {why}", f"request {pdu.hex()}")
        else:
            st.ok(kind, latency)
        until_reconnect -= 1
        if until_reconnect <= 0:
            await conn.close()
            conn = None
            st.reconnects += 1
            until_reconnect = rng.randint(200, 500)
    if conn is not None:
        await conn.close()


async def opcua_client(shared: Shared, endpoint: str) -> None:
    """Read a few measurements once a second; reconnect every OPCUA_RECONNECT seconds."""
    import logging

    from asyncua import Client, ua

    logging.getLogger("asyncua").setLevel(logging.ERROR)  # "Requested session timeout ... got ..."
    st = shared.stats
    while not shared.stop:
        client = Client(endpoint, timeout=5)
        try:
            await client.connect()
        except Exception as exc:  # noqa: BLE001: anything is an error here
            st.error("opcua: connect failed", repr(exc)[:200])
            await asyncio.sleep(1.0)
            continue
        st.counts["opcua connect"] = st.counts.get("opcua connect", 0) + 1
        try:
            ns = await client.get_namespace_index("urn:modbus-bridge")
            nodes = [client.get_node(ua.NodeId(ident, ns)) for ident, _, _ in OPCUA_POINTS]
            until = time.monotonic() + OPCUA_RECONNECT
            while not shared.stop and time.monotonic() < until:
                t0 = time.perf_counter()
                values = await client.read_attributes(nodes)
                latency = time.perf_counter() - t0
                bad = []
                for (ident, lo, hi), dv in zip(OPCUA_POINTS, values):
                    if not dv.StatusCode.is_good():
                        bad.append(f"{ident} status {dv.StatusCode.name}")
                    elif not (isinstance(dv.Value.Value, float) and lo <= dv.Value.Value <= hi):
                        bad.append(f"{ident} = {dv.Value.Value!r}")
                if bad:
                    st.error("opcua: bad value", "; ".join(bad))
                else:
                    st.ok("opcua read", latency)
                await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - t0)))
        except Exception as exc:  # noqa: BLE001
            st.error("opcua: read failed", repr(exc)[:200])
        finally:
            try:
                await client.disconnect()
            except Exception as exc:  # noqa: BLE001
                st.error("opcua: disconnect failed", repr(exc)[:200])


async def wait_units_ready(port: int, layout: dict[int, UnitLayout], timeout: float = 30.0) -> float:
    """Wait until every unit answers a normal read (its first poll went through)."""
    t0 = time.monotonic()
    conn = await Conn.open(port)
    try:
        pending = set(layout)
        while pending:
            for unit in sorted(pending):
                s, e = layout[unit].intervals[0]
                reply, _ = await conn.timed_request(unit, struct.pack(">BHH", 4, s, 2))
                if check_read(layout[unit], s, 2, reply) is None:
                    pending.discard(unit)
            if pending:
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"units {sorted(pending)} not ready after {timeout:g} s")
                await asyncio.sleep(0.2)
    finally:
        await conn.close()
    return time.monotonic() - t0


async def soak(args, bridge: Bridge, layout: dict[int, UnitLayout]) -> dict:
    stats = Stats()
    shared = Shared(args, bridge.modbus_port, layout, stats)
    ready_s = await wait_units_ready(bridge.modbus_port, layout)
    log(f"every unit answers ({ready_s:.1f} s after the banner)")
    await asyncio.sleep(1.0)
    idle = bridge.sample()
    samples: list[dict] = [dict(idle, phase="idle")]

    tasks = [asyncio.create_task(client(shared, i, args.seed)) for i in range(args.clients)]
    if not args.no_opcua:
        tasks.append(asyncio.create_task(opcua_client(shared, bridge.endpoint)))
    load_t0 = time.monotonic()
    log(f"{args.clients} clients{'' if args.no_opcua else ' + 1 OPC UA client'}: warm-up {args.warmup:g} s, "
        f"then {args.minutes * 60:g} s measured")

    async def sample_until(deadline: float, phase: str) -> None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(SAMPLE_PERIOD, left))
            if time.monotonic() < deadline - 0.5:
                s = bridge.sample()
                samples.append(dict(s, phase=phase))
                if phase == "measured":
                    served = sum(stats.counts.values()) - sum(stats.snapshot.values())
                    log(f"  {s['t'] - m_t0:5.0f} s: RSS {s['rss_kib'] / 1024:6.1f} MiB, fds {s['fds']}, "
                        f"{served:,} served, errors {sum(stats.errors.values())}")
            if bridge.proc.poll() is not None:
                raise RuntimeError(f"the bridge exited ({bridge.proc.returncode}) during the soak")

    m_t0 = load_t0 + args.warmup
    await sample_until(m_t0, "warm-up")
    stats.start_measuring()
    start = bridge.sample()
    samples.append(dict(start, phase="start"))
    self_cpu0 = proc_cpu_seconds()
    other = OtherCpu({os.getpid(), bridge.pid})
    log(f"measuring: RSS at start {start['rss_kib'] / 1024:.1f} MiB")
    m_end = m_t0 + args.minutes * 60
    await sample_until(m_end, "measured")
    end = bridge.sample()
    samples.append(dict(end, phase="end"))
    self_cpu1 = proc_cpu_seconds()
    other_pct, steal_pct = other.measure()
    counts_end = dict(stats.counts)
    errors_end = sum(stats.errors.values())
    stats.measuring = False

    shared.stop = True
    log("stopping the clients")
    done, not_done = await asyncio.wait(tasks, timeout=15)
    for t in not_done:
        t.cancel()
    for t in done:
        if t.exception() is not None:
            stats.error("client task crashed", repr(t.exception())[:200])
    if not_done:
        stats.error("client tasks did not stop", str(len(not_done)))
    await asyncio.sleep(2.0)  # let the bridge notice every close
    after = bridge.sample()
    samples.append(dict(after, phase="after clients"))
    return {
        "stats": stats, "samples": samples, "idle": idle, "start": start, "end": end, "after": after,
        "window_s": end["t"] - start["t"], "counts_end": counts_end, "errors_end": errors_end,
        "loadgen_cpu_pct": 100 * (self_cpu1 - self_cpu0) / (end["t"] - start["t"]),
        "other_cpu_pct": other_pct, "steal_pct": steal_pct, "ready_s": ready_s,
    }


# ====================================================================== report
def slope_mib_per_min(samples: list[dict]) -> float | None:
    """Least-squares slope of RSS over the measured window."""
    pts = [(s["t"], s["rss_kib"] / 1024) for s in samples if s["phase"] in ("start", "measured", "end")]
    if len(pts) < 3:
        return None
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    mr = sum(r for _, r in pts) / n
    den = sum((t - mt) ** 2 for t, _ in pts)
    return 60 * sum((t - mt) * (r - mr) for t, r in pts) / den if den else None


def analyse_log(text: str) -> dict:
    lines = text.splitlines()
    banner_at = next((i for i, l in enumerate(lines) if "OPC UA listening" in l), -1)
    after = lines[banner_at + 1:]
    levels = {}
    for l in after:
        m = re.match(r"\S+ \S+ (\w+)\s", l)
        if m:
            levels[m.group(1)] = levels.get(m.group(1), 0) + 1
    problems = [l for l in after if re.match(r"\S+ \S+ (ERROR|CRITICAL)\s", l) or l.startswith("Traceback")]
    warnings = [l for l in after if re.match(r"\S+ \S+ WARNING\s", l)]
    return {
        "lines": len(lines), "levels": levels,
        "bad_frame_closes": sum("closing Modbus TCP connection" in l and "frame_timeout" not in l
                                and "idle_timeout" not in l for l in after),
        "frame_timeout_closes": sum("request incomplete after modbus_tcp.frame_timeout" in l for l in after),
        "refused": sum("refusing Modbus TCP connection" in l for l in after),
        "problems": problems[:10], "n_problems": len(problems), "warnings": warnings[:10], "n_warnings": len(warnings),
    }


def markdown(r: dict) -> str:
    m, a = r["machine"], r["args"]
    lines = [
        f"## Soak: {a['clients']} Modbus TCP clients + {'no' if a['no_opcua'] else '1'} OPC UA client against "
        f"`modbus-bridge demo`, {a['minutes']:g} min",
        "",
        f"`{r['command']}`",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu'] or 'unknown'}), Linux {m['kernel']}, Python {m['python']}, "
        f"asyncua {m['asyncua']}, uvloop {m['uvloop']}, commit {m['commit'] or '?'}.",
        f"Bridge: `{r['bridge_command']}` (units 1, 2, 11, 12; simulated meters on ptys in the same "
        f"process, no wire-time emulation; its RSS and CPU include them)"
        + (f", pinned to CPU {m['pinning']['bridge']}; load generator pinned to CPU {m['pinning']['loadgen']}"
           if m["pinning"] else ", no CPU pinning") + ".",
        f"Load: {a['clients']} connections, one request in flight each, {a['pause_ms'][0]:g}–{a['pause_ms'][1]:g} ms "
        f"pause between requests, reconnect every 200–500 requests; {a['writes_per_second']:g} write/s in all; "
        f"{a['warmup']:g} s warm-up, then {r['window_s']:.0f} s measured. RSS, CPU and fds sampled every "
        f"{SAMPLE_PERIOD:g} s.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| Modbus requests served (measured window) | {r['served']:,} ({r['served'] / r['window_s']:,.0f}/s) |",
        f"| Modbus requests served (whole run, incl. warm-up) | {r['served_total']:,} |",
        f"| reconnects (whole run) | {r['reconnects']:,} |",
        f"| OPC UA reads of 4 values / sessions (whole run) | {r['counts_total'].get('opcua read', 0):,} / "
        f"{r['counts_total'].get('opcua connect', 0):,} |",
        f"| **errors** (whole run) | **{r['errors']}** |",
        f"| latency, every Modbus request on the persistent connections: p50 / p99 / max | "
        f"{fmt(r['latency']['p50_ms'], '.3f')} / {fmt(r['latency']['p99_ms'], '.3f')} / "
        f"{fmt(r['latency']['max_ms'], '.1f')} ms |",
        f"| bridge RSS: idle (before load) / start (after warm-up) / end | {mib(r['idle']['rss_kib'])} / "
        f"{mib(r['start']['rss_kib'])} / {mib(r['end']['rss_kib'])} MiB |",
        f"| bridge RSS: end − start / max of samples / peak (VmHWM) | "
        f"{(r['end']['rss_kib'] - r['start']['rss_kib']) / 1024:+.1f} / {mib(r['rss_max_kib'])} / "
        f"{mib(r['end']['hwm_kib'])} MiB |",
        f"| bridge RSS trend over the measured window (least squares) | {fmt(r['rss_slope'], '+.3f')} MiB/min |",
        f"| bridge CPU (measured window; 100 % = one core) | {r['bridge_cpu_pct']:.1f} % "
        f"({r['bridge_cpu_us_per_req']:.0f} µs per request) |",
        f"| bridge open fds: idle / end (under load) / after the clients closed | {r['idle']['fds']} / "
        f"{r['end']['fds']} / {r['after']['fds']} |",
        f"| bridge threads: idle / end | {r['idle']['threads']} / {r['end']['threads']} |",
        f"| bridge exit on SIGTERM | {r['exit']} |",
        f"| load generator CPU / other processes' CPU / stolen | {r['loadgen_cpu_pct']:.0f} % / "
        f"{r['other_cpu_pct']:.0f} % / {r['steal_pct']:.0f} % |",
        "",
        "| kind | expected | count (measured) | count (whole run) | p50 ms | p99 ms | max ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for kind, (label, expected) in list(KIND_LABELS.items()) + [("opcua read", ("OPC UA read of 4 values",
                                                                                 "status Good, plausible"))]:
        k = r["kinds"].get(kind, {"measured": 0, "total": 0, "n": 0, "p50_ms": math.nan, "p99_ms": math.nan,
                                  "max_ms": math.nan})
        lines.append(f"| {label} | {expected} | {k['measured']:,} | {k['total']:,} | {fmt(k['p50_ms'], '.3f')} "
                     f"| {fmt(k['p99_ms'], '.3f')} | {fmt(k['max_ms'], '.1f')} |")
    lg = r["log"]
    lines += [
        "",
        "Malformed and partial frames: latency is until the server closed the connection, including the "
        "valid read before it and the connection set-up.",
        "",
        f"Bridge log after start-up: {', '.join(f'{v:,} {k}' for k, v in sorted(lg['levels'].items())) or 'empty'}; "
        f"{lg['bad_frame_closes']:,} bad-frame closes (clients sent {r['counts_total'].get('malformed', 0):,} "
        f"malformed frames), {lg['frame_timeout_closes']:,} frame_timeout closes (clients sent "
        f"{r['counts_total'].get('partial', 0):,} partial frames), {lg['refused']} refused connections.",
    ]
    if (lg["bad_frame_closes"], lg["frame_timeout_closes"]) != (r["counts_total"].get("malformed", 0),
                                                                r["counts_total"].get("partial", 0)):
        lines += ["", "**The bridge's close lines do not match the frames sent.**"]
    if lg["warnings"]:
        lines += ["", f"Bridge warnings ({lg['n_warnings']}, first {len(lg['warnings'])}):", ""]
        lines += [f"    {l}" for l in lg["warnings"]]
    if lg["problems"]:
        lines += ["", f"**Bridge errors ({lg['n_problems']}, first {len(lg['problems'])}):**", ""]
        lines += [f"    {l}" for l in lg["problems"]]
    if r["commit_at_end"] != m["commit"]:
        lines += ["", f"**The working tree changed during the run** ({m['commit']} at the "
                      f"start, {r['commit_at_end']} at the end); the bridge runs the code it loaded at the start."]
    rss = [f"{s['rss_kib'] / 1024:.1f}" for s in r["samples"] if s["phase"] in ("start", "measured", "end")]
    lines += ["", f"RSS samples over the measured window (MiB, every {SAMPLE_PERIOD:g} s): {', '.join(rss)}."]
    if r["other_cpu_pct"] > NOISY_PCT:
        lines += ["", f"**Disturbed:** other processes used {r['other_cpu_pct']:.0f} % of a core during the "
                      f"measured window."]
    if r["errors"]:
        lines += ["", f"**{r['errors']} errors:** {json.dumps(r['error_kinds'])}", ""]
        lines += [f"    {e}" for e in r["error_examples"]]
    if r["failures"]:
        lines += ["", "**FAILED:** " + "; ".join(r["failures"])]
    return "\n".join(lines)


# ====================================================================== main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = arg_parser(__doc__)
    ap.add_argument("--minutes", type=float, default=10.0, help="measured minutes (default 10)")
    ap.add_argument("--clients", type=int, default=50, help="Modbus TCP clients (default 50)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds of load before the measured window (default: 10 %% of it, at most 30)")
    ap.add_argument("--pause-ms", type=lambda s: tuple(float(x) for x in s.split(",")), default=(10.0, 50.0),
                    metavar="MIN,MAX", help="pause between a client's requests, uniform (default 10,50)")
    ap.add_argument("--writes-per-second", type=float, default=1.0,
                    help="FC6 writes to unit 12, all clients together (default 1; 0: none)")
    ap.add_argument("--no-opcua", action="store_true", help="no OPC UA client")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-pin", action="store_true", help="do not pin the bridge and the load to separate CPUs")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(30.0, 6.0 * args.minutes)
    if args.clients + THROWAWAY_AT_ONCE > 60:
        ap.error("the demo bridge accepts 64 Modbus TCP connections; use at most "
                 f"{60 - THROWAWAY_AT_ONCE} clients")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    layout = demo_layout()
    cpus = sorted(os.sched_getaffinity(0))
    pinned = None
    if not args.no_pin and len(cpus) >= 2:
        pinned = {"bridge": cpus[-1], "loadgen": cpus[0]}
    command = command_line()
    machine = machine_info(len(cpus), pinned)  # the commit the bridge starts from
    bridge = Bridge(pinned["bridge"] if pinned else None)
    if pinned:
        os.sched_setaffinity(0, {pinned["loadgen"]})
    log(f"bridge: pid {bridge.pid}, Modbus TCP {bridge.modbus_port}, OPC UA {bridge.opcua_port}")
    try:
        start_s = bridge.wait_banner()
        log(f"bridge banner after {start_s:.1f} s")
        with asyncio.Runner(loop_factory=new_uvloop) as runner:
            raw = runner.run(soak(args, bridge, layout))
    except BaseException:
        bridge.terminate()
        log(bridge.log_text()[-3000:])
        bridge.close()
        raise
    bridge.terminate()
    log_info = analyse_log(bridge.log_text())
    bridge.close()

    st: Stats = raw["stats"]
    counts_total = dict(st.counts)
    measured = {k: v - st.snapshot.get(k, 0) for k, v in raw["counts_end"].items()}
    modbus_kinds = [k for k in KIND_LABELS if k not in ("malformed", "partial")]
    served = sum(measured.get(k, 0) for k in modbus_kinds)
    served_total = sum(counts_total.get(k, 0) for k in modbus_kinds)
    kinds = {}
    for k in list(KIND_LABELS) + ["opcua read"]:
        kinds[k] = {"measured": measured.get(k, 0), "total": counts_total.get(k, 0), **latency_ms(st.lat.get(k, []))}
    persistent = array("d")
    for k in modbus_kinds:
        persistent.extend(st.lat.get(k, array("d")))
    window = raw["window_s"]
    bridge_cpu = raw["end"]["cpu_s"] - raw["start"]["cpu_s"]
    rss_max = max(s["rss_kib"] for s in raw["samples"] if s["rss_kib"] is not None)
    errors = sum(st.errors.values())
    if bridge.killed:
        exit_text = f"**did not exit within {TERM_TIMEOUT:g} s; killed**"
    else:
        exit_text = f"status {bridge.exit_code} after {bridge.exit_seconds:.2f} s"
    failures = []
    if errors:
        failures.append(f"{errors} request errors")
    if bridge.killed or bridge.exit_code != 0:
        failures.append(f"bridge exit on SIGTERM: {exit_text}")
    if log_info["n_problems"]:
        failures.append(f"{log_info['n_problems']} ERROR/traceback lines in the bridge log")
    if served == 0:
        failures.append("no request served")
    if not args.no_opcua and kinds["opcua read"]["measured"] == 0:
        failures.append("no OPC UA read")
    result = {
        "command": command,
        "bridge_command": shlex.join(["python", "-m", "bridge", "demo", "--modbus-port", str(bridge.modbus_port),
                                      "--opcua-port", str(bridge.opcua_port)]),
        "machine": machine,
        "commit_at_end": git_describe(),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "window_s": window,
        "served": served, "served_total": served_total, "reconnects": st.reconnects,
        "counts_total": counts_total, "kinds": kinds,
        "errors": errors, "errors_measured": raw["errors_end"] - st.snapshot_errors,
        "error_kinds": st.errors, "error_examples": st.error_examples,
        "latency": latency_ms(persistent),
        "idle": raw["idle"], "start": raw["start"], "end": raw["end"], "after": raw["after"],
        "rss_max_kib": rss_max, "rss_slope": slope_mib_per_min(raw["samples"]),
        "bridge_cpu_pct": 100 * bridge_cpu / window,
        "bridge_cpu_us_per_req": 1e6 * bridge_cpu / served if served else math.nan,
        "loadgen_cpu_pct": raw["loadgen_cpu_pct"], "other_cpu_pct": raw["other_cpu_pct"],
        "steal_pct": raw["steal_pct"],
        "exit": exit_text, "exit_code": bridge.exit_code, "exit_seconds": bridge.exit_seconds,
        "bridge_start_s": start_s, "units_ready_s": raw["ready_s"],
        "log": log_info,
        "samples": [{k: (round(v - raw["start"]["t"], 2) if k == "t" else v) for k, v in s.items()}
                    for s in raw["samples"]],
        "failures": failures,
    }
    emit(result, markdown, args.json)
    if failures:
        log("FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
