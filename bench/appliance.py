#!/usr/bin/env python3
"""Appliance footprint: RSS and CPU of `modbus-bridge run` with 8 segments of simulated meters.

The issue asks for 8 segments × 32 meters at 1 s polling. That cannot be configured: every meter
needs its own Modbus TCP unit id across the bridge (``unit``, 1..247, defaulting to the slave
address, checked even when Modbus TCP is off), so a bridge holds at most 247 meters. The default
here is the closest uniform layout, **8 segments × 30 meters = 240 meters** (units 1..240);
``--segments`` and ``--meters`` change it, and a layout above 247 meters is refused.

Three processes:

* **Simulator** (this script with ``--simulate N_SEGMENTS N_METERS``, uvloop): N_SEGMENTS
  ``SimulatedBus`` objects on pseudo-terminals, each with N_METERS Eastron SDM120 ``SimMeter``s
  at slaves 1..N_METERS (animated: values move on every request). No wire-time emulation unless
  ``--emulate-wire``: the ptys deliver at once. It prints the pty paths, then answers ``snap`` on
  its stdin with its counters (requests answered, polls seen per meter and the intervals between
  them, repeated requests) and exits on EOF.
* **Bridge**, the process measured: ``python -m bridge run -c CONFIG`` (uvloop), with a
  configuration written to a temporary directory: one segment per pty (9600 8N1, timeout 0.5 s,
  retries 1), every meter ``eastron-sdm120`` at ``poll_interval: 1.0``, ``stale_after: 10``,
  Modbus TCP and OPC UA (SecurityPolicy None) on free ports of 127.0.0.1, no HTTP.
* **This process** (uvloop): waits for the bridge's "Modbus TCP listening" and "OPC UA listening"
  log lines and for every unit to answer, then runs a light Modbus TCP client: one connection,
  once a second one FC4 read of the voltage (2 registers at 0) of one unit per segment, rotating
  through every unit (each checked: normal reply, plausible voltage). After ``--warmup`` (20 s)
  it samples the bridge's VmRSS (/proc/PID/status) and CPU time (utime + stime, /proc/PID/stat)
  every ``--sample-period`` (5 s) for ``--seconds`` (120 s). Bridge-side counters (requests,
  errors, timeouts, cycle time and utilisation per segment; every meter's Online flag) are read
  over OPC UA just before and just after the window, with one OPC UA session held open through it
  (no subscriptions). The script waits up to ``--wait-quiet`` (30 s) for a quiet machine first and
  reports other processes' CPU use over the window.

With 2 or more CPUs, the bridge is pinned to the last CPU and the simulator and this process to
the first (``--no-pin`` turns this off). At the end the bridge gets SIGTERM and must exit with
status 0 within 5 s; its log must hold no ERROR or traceback, and no meter may go stale or
offline.

    .venv/bin/python bench/appliance.py                       # about 3 minutes
    .venv/bin/python bench/appliance.py --seconds 20 --warmup 5 --json out.json

Output: a Markdown table on stdout, progress on stderr. Exit status 1 on any error; with
``--strict``, 2 when a target is missed (peak RSS < 150 MB, mean CPU < 25 % of one core).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import select
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from benchlib import (
    HOST,
    NOISY_PCT,
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
    log,
    machine_info,
    mib,
    new_uvloop,
    percentile,
    proc_cpu_seconds,
    wait_quiet,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROFILE = "eastron-sdm120"
MAX_UNITS = 247  # config: unit 1..247, unique across the bridge
VOLTAGE = (0x0000, 2, 215.0, 245.0)  # SDM120 voltage: address, registers, plausible range
POLL_GAP = 0.3  # s: a request to a meter after this much quiet (and not a repeat) starts a new poll
TARGET_RSS_BYTES = 150e6  # "under 150 MB": decimal megabytes, 143.1 MiB
TARGET_CPU_PCT = 25.0  # "under 25 % of one core": mean over the window
WIRE_BOUND_9600_S = 0.1749  # bench/bus.py: one SDM120 poll (3 blocks) at 9600 8N1, 5 ms turnaround


def meter_name(seg: int, slave: int) -> str:
    return f"s{seg + 1}-m{slave:02d}"


def unit_of(seg: int, slave: int, n_meters: int) -> int:
    return seg * n_meters + slave


# ====================================================================== simulator process
def simulate_main(n_segments: int, n_meters: int, emulate_wire: bool, baudrate: int, turnaround: float) -> None:
    with asyncio.Runner(loop_factory=new_uvloop) as runner:
        runner.run(_simulate(n_segments, n_meters, emulate_wire, baudrate, turnaround))


async def _simulate(n_segments: int, n_meters: int, emulate_wire: bool, baudrate: int, turnaround: float) -> None:
    from bridge.config.profiles import get_builtin
    from bridge.south.simulator import SimMeter, SimulatedBus

    class CountingMeter(SimMeter):
        """A SimMeter that also counts polls (bursts of requests) and repeated requests."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.last_rx = -math.inf
            self.last_pdu = b""
            self.poll_start: float | None = None
            self.polls = 0
            self.repeats = 0  # the same request twice in a row: a retry (an SDM120 poll has 3 blocks)
            self.intervals: list[float] = []  # between poll starts, since the last snap

        def handle(self, pdu: bytes) -> bytes:
            now = time.monotonic()
            if pdu == self.last_pdu:
                self.repeats += 1
            elif now - self.last_rx > POLL_GAP:
                self.polls += 1
                if self.poll_start is not None:
                    self.intervals.append(now - self.poll_start)
                self.poll_start = now
            self.last_rx, self.last_pdu = now, bytes(pdu)
            return super().handle(pdu)

    profile = get_builtin(PROFILE)
    buses = []
    for seg in range(n_segments):
        meters = [CountingMeter(slave, profile, animate=True, seed=1000 * seg + slave)
                  for slave in range(1, n_meters + 1)]
        buses.append(SimulatedBus(meters, baudrate=baudrate, emulate_wire=emulate_wire,
                                  turnaround=turnaround if emulate_wire else 0.0))
    ports = [bus.open() for bus in buses]
    print(json.dumps({"ports": ports}), flush=True)

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            if line.strip() != b"snap":
                continue
            meters = [m for bus in buses for m in bus.meters.values()]
            intervals = sorted(i for m in meters for i in m.intervals)
            for m in meters:
                m.intervals.clear()
            snap = {
                "t": time.monotonic(),
                "requests": sum(b.stats.requests for b in buses),
                "answered": sum(b.stats.answered for b in buses),
                "garbage_bytes": sum(b.stats.garbage_bytes for b in buses),
                "silence_violations": sum(b.stats.silence_violations for b in buses),
                "polls": sum(m.polls for m in meters),
                "repeats": sum(m.repeats for m in meters),
                "meter_polls": [m.polls for m in meters],
                "intervals": {"n": len(intervals),
                              "mean": sum(intervals) / len(intervals) if intervals else math.nan,
                              "p50": percentile(intervals, 0.5), "p99": percentile(intervals, 0.99),
                              "max": intervals[-1] if intervals else math.nan,
                              "min": intervals[0] if intervals else math.nan},
            }
            print(json.dumps(snap), flush=True)
    finally:
        for bus in buses:
            bus.close()


class Simulator:
    """The ``--simulate`` child: started, asked for snapshots, stopped by closing its stdin."""

    def __init__(self, args, cpu: int | None):
        self.argv = [sys.executable, str(Path(__file__).resolve()), "--simulate", str(args.segments),
                     str(args.meters), "--baudrate", str(args.baudrate), "--turnaround", str(args.turnaround)]
        if args.emulate_wire:
            self.argv.append("--emulate-wire")
        self.stderr = tempfile.NamedTemporaryFile(prefix="appliance-sim-", suffix=".log")
        preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     cwd=ROOT, preexec_fn=preexec)
        self.pid = self.proc.pid
        self.ports: list[str] = json.loads(self._readline(30.0))["ports"]

    def _readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line:
            raise RuntimeError(f"the simulator did not answer (exit {self.proc.poll()}):\n{self.log_text()[-3000:]}")
        return line

    def snap(self) -> dict:
        self.proc.stdin.write(b"snap\n")
        self.proc.stdin.flush()
        return json.loads(self._readline(10.0))

    def log_text(self) -> str:
        return Path(self.stderr.name).read_text(errors="replace")

    def close(self) -> int | None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        return self.proc.returncode


# ====================================================================== the bridge process
def config_text(args, ports: list[str], modbus_port: int, opcua_port: int) -> str:
    lines = ["# written by bench/appliance.py: simulated SDM120 meters on pseudo-terminals", "segments:"]
    for seg, port in enumerate(ports):
        lines += [f"  - name: seg{seg + 1}", f"    port: {port}", f"    baudrate: {args.baudrate}",
                  "    timeout: 0.5", "    retries: 1", "    meters:"]
        for slave in range(1, args.meters + 1):
            lines.append(f"      - {{name: {meter_name(seg, slave)}, slave: {slave}, "
                         f"unit: {unit_of(seg, slave, args.meters)}, profile: {PROFILE}, "
                         f"poll_interval: {args.poll_interval:g}}}")
    lines += [
        "stale_after: 10.0",
        "modbus_tcp:",
        f"  listen: {HOST}:{modbus_port}",
        "opcua:",
        f"  endpoint: opc.tcp://{HOST}:{opcua_port}/bridge",
        "  security: [None]",
        "  certificate_dir: pki",
    ]
    return "\n".join(lines) + "\n"


class Bridge(BridgeProcess):
    """``python -m bridge run -c CONFIG``: started, waited for, sampled, stopped with SIGTERM."""

    def __init__(self, config_path: Path, cpu: int | None):
        super().__init__(["run", "-c", str(config_path)], cpu, prefix="appliance-bridge-")
        self.opcua_line = ""

    def wait_listening(self, timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if "Modbus TCP listening" in text and "OPC UA listening" in text:
                self.opcua_line = next(l for l in text.splitlines() if "OPC UA listening" in l)
                return time.monotonic() - self.t_start
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"the bridge did not start (exit {self.proc.poll()}):\n{self.log_text()[-3000:]}")


# ====================================================================== clients
def read_voltage_pdu() -> bytes:
    return struct.pack(">BHH", 4, VOLTAGE[0], VOLTAGE[1])


def check_voltage(reply: bytes) -> tuple[float | None, str | None]:
    """(voltage, None) for a good reply, else (None, why)."""
    if len(reply) == 2 and reply[0] == 0x84:
        return None, f"exception 0x{reply[1]:02X}"
    if len(reply) != 2 + 2 * VOLTAGE[1] or reply[:2] != bytes((4, 2 * VOLTAGE[1])):
        return None, f"reply {reply.hex()}"
    v = struct.unpack(">f", reply[2:6])[0]
    if not VOLTAGE[2] <= v <= VOLTAGE[3]:
        return None, f"implausible voltage {v!r}"
    return v, None


class ClientStats:
    def __init__(self):
        self.reads = {"warm-up": 0, "measured": 0}
        self.changed = 0  # reads whose value differs from the previous read of the same unit
        self.compared = 0
        self.latencies: list[float] = []  # measured window
        self.errors: dict[str, int] = {}
        self.examples: list[str] = []
        self.phase = "warm-up"
        self.t0 = time.monotonic()

    def error(self, reason: str, detail: str = "") -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(f"{time.monotonic() - self.t0:7.1f} s  {reason}  {detail}".rstrip())
        if sum(self.errors.values()) <= 5:
            log(f"ERROR {reason} {detail}")


async def wait_units_ready(port: int, units: list[int], timeout: float = 60.0) -> float:
    """Wait until every unit answers a plausible voltage (its first poll went through)."""
    t0 = time.monotonic()
    conn = await Conn.open(port)
    try:
        pending = set(units)
        while pending:
            for unit in sorted(pending):
                reply, _ = await conn.timed_request(unit, read_voltage_pdu())
                if check_voltage(reply)[1] is None:
                    pending.discard(unit)
            if pending:
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"{len(pending)} units not ready after {timeout:g} s: {sorted(pending)[:10]}")
                await asyncio.sleep(0.2)
    finally:
        await conn.close()
    return time.monotonic() - t0


async def modbus_client(args, port: int, stats: ClientStats, stop: asyncio.Event) -> None:
    """Once a second: one voltage read of one unit per segment, rotating through every unit."""
    last: dict[int, float] = {}
    conn: Conn | None = None
    k = 0
    next_at = time.monotonic()
    while not stop.is_set():
        if conn is None:
            try:
                conn = await Conn.open(port)
            except (OSError, asyncio.TimeoutError) as exc:
                stats.error("connect failed", repr(exc))
        if conn is not None:
            slave = k % args.meters + 1
            for seg in range(args.segments):
                unit = unit_of(seg, slave, args.meters)
                try:
                    reply, latency = await conn.timed_request(unit, read_voltage_pdu())
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
                    stats.error(f"unit {unit}: {type(exc).__name__}", repr(exc)[:200])
                    await conn.close()
                    conn = None
                    break
                value, why = check_voltage(reply)
                if why:
                    stats.error(f"unit {unit}: {why}")
                    continue
                stats.reads[stats.phase] += 1
                if stats.phase == "measured":
                    stats.latencies.append(latency)
                if unit in last:
                    stats.compared += 1
                    stats.changed += value != last[unit]
                last[unit] = value
            k += 1
        next_at += 1.0
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
        except asyncio.TimeoutError:
            pass
    if conn is not None:
        await conn.close()


class OpcUaProbe:
    """One session held through the run: segment counters, meters' Online flags, a few values."""

    SEGMENT = ("Requests", "Errors", "Timeouts", "CycleTime", "Utilisation")

    def __init__(self, args, endpoint: str):
        self.args = args
        self.endpoint = endpoint
        self.client = None
        self.ns = 0

    async def connect(self) -> None:
        import logging

        from asyncua import Client

        logging.getLogger("asyncua").setLevel(logging.ERROR)
        self.client = Client(self.endpoint, timeout=10)
        await self.client.connect()
        self.ns = await self.client.get_namespace_index("urn:modbus-bridge")

    async def _read(self, idents: list[str]) -> list:
        from asyncua import ua

        nodes = [self.client.get_node(ua.NodeId(i, self.ns)) for i in idents]
        out = []
        for i in range(0, len(nodes), 200):
            out += await self.client.read_attributes(nodes[i:i + 200])
        return out

    async def counters(self) -> dict:
        """Per segment: Requests, Errors, Timeouts, CycleTime; meters Online; one voltage per segment."""
        a = self.args
        segs = [f"seg{s + 1}" for s in range(a.segments)]
        seg_ids = [f"Segments/{s}.{c}" for s in segs for c in self.SEGMENT]
        online_ids = [f"{meter_name(s, m)}.Online" for s in range(a.segments) for m in range(1, a.meters + 1)]
        value_ids = [f"{meter_name(s, 1)}.voltage" for s in range(a.segments)]
        dvs = await self._read(seg_ids + online_ids + value_ids)
        seg_dvs, rest = dvs[:len(seg_ids)], dvs[len(seg_ids):]
        online_dvs, value_dvs = rest[:len(online_ids)], rest[len(online_ids):]
        segments = {}
        for i, s in enumerate(segs):
            segments[s] = {c: seg_dvs[i * len(self.SEGMENT) + j].Value.Value for j, c in enumerate(self.SEGMENT)}
        values_ok = sum(1 for dv in value_dvs if dv.StatusCode.is_good() and isinstance(dv.Value.Value, float)
                        and VOLTAGE[2] <= dv.Value.Value <= VOLTAGE[3])
        return {"segments": segments, "online": sum(1 for dv in online_dvs if dv.Value.Value is True),
                "meters": len(online_ids), "values_ok": values_ok, "values": len(value_ids)}

    async def close(self) -> None:
        if self.client is not None:
            try:
                await self.client.disconnect()
            except Exception:  # noqa: BLE001
                pass


# ====================================================================== the run
async def run(args, bridge: Bridge, sim: Simulator, modbus_port: int, opcua_port: int) -> dict:
    units = [unit_of(s, m, args.meters) for s in range(args.segments) for m in range(1, args.meters + 1)]
    listening = bridge.sample()
    ready_s = await wait_units_ready(modbus_port, units)
    log(f"all {len(units)} units answer ({ready_s:.1f} s after listening)")
    probe = OpcUaProbe(args, f"opc.tcp://{HOST}:{opcua_port}/bridge")
    await probe.connect()
    stats = ClientStats()
    stop = asyncio.Event()
    client = asyncio.create_task(modbus_client(args, modbus_port, stats, stop))
    samples: list[dict] = [dict(listening, phase="listening")]
    loop_t0 = time.monotonic()
    log(f"warm-up {args.warmup:g} s, then {args.seconds:g} s measured, a sample every {args.sample_period:g} s")
    while (left := loop_t0 + args.warmup - time.monotonic()) > 0:
        await asyncio.sleep(min(args.sample_period, left))
        samples.append(dict(bridge.sample(), phase="warm-up"))
    # window start: counters first (OPC UA, simulator), then the bridge sample that opens the window
    ua_start = await probe.counters()
    sim_start = await asyncio.to_thread(sim.snap)
    stats.phase = "measured"
    start = bridge.sample()
    samples.append(dict(start, phase="start"))
    sim_cpu0, self_cpu0 = proc_cpu_seconds(sim.pid), proc_cpu_seconds()
    other = OtherCpu({os.getpid(), bridge.pid, sim.pid})
    log(f"measuring: RSS {start['rss_kib'] / 1024:.1f} MiB")
    t_end = start["t"] + args.seconds
    prev = start
    while (left := t_end - time.monotonic()) > 0.05:
        await asyncio.sleep(min(args.sample_period, left))
        s = dict(bridge.sample(), phase="measured")
        s["cpu_pct"] = 100 * (s["cpu_s"] - prev["cpu_s"]) / (s["t"] - prev["t"])
        samples.append(s)
        prev = s
        log(f"  {s['t'] - start['t']:5.0f} s: RSS {s['rss_kib'] / 1024:6.1f} MiB, CPU {s['cpu_pct']:5.1f} %, "
            f"reads {stats.reads['measured']}, errors {sum(stats.errors.values())}")
        if bridge.proc.poll() is not None:
            raise RuntimeError(f"the bridge exited ({bridge.proc.returncode}) during the window")
    end = samples[-1]
    end["phase"] = "end"
    sim_cpu1, self_cpu1 = proc_cpu_seconds(sim.pid), proc_cpu_seconds()
    other_pct, steal_pct = other.measure()
    stats.phase = "warm-up"  # anything after the window is not counted as measured
    sim_end = await asyncio.to_thread(sim.snap)
    ua_end = await probe.counters()
    stop.set()
    await client
    await probe.close()
    window = end["t"] - start["t"]
    return {
        "stats": stats, "samples": samples, "listening": listening, "start": start, "end": end,
        "window_s": window, "ready_s": ready_s, "ua_start": ua_start, "ua_end": ua_end,
        "sim_start": sim_start, "sim_end": sim_end,
        "sim_cpu_pct": 100 * (sim_cpu1 - sim_cpu0) / window, "self_cpu_pct": 100 * (self_cpu1 - self_cpu0) / window,
        "other_cpu_pct": other_pct, "steal_pct": steal_pct,
    }


# ====================================================================== report
def analyse_log(text: str) -> dict:
    lines = text.splitlines()
    levels: dict[str, int] = {}
    for l in lines:
        m = re.match(r"\S+ \S+ (\w+)\s", l)
        if m:
            levels[m.group(1)] = levels.get(m.group(1), 0) + 1
    problems = [l for l in lines if re.match(r"\S+ \S+ (ERROR|CRITICAL)\s", l) or l.startswith("Traceback")]
    warnings = [l for l in lines if re.match(r"\S+ \S+ WARNING\s", l)]
    return {"lines": len(lines), "levels": levels,
            "stale": sum(" stale: " in l for l in lines), "offline": sum(" offline after " in l for l in lines),
            "problems": problems[:10], "n_problems": len(problems), "warnings": warnings[:10],
            "n_warnings": len(warnings)}


def mb(kib) -> str:
    return fmt(kib * 1024 / 1e6 if kib is not None else None, ".1f")


def markdown(r: dict) -> str:
    m, a = r["machine"], r["args"]
    n = a["segments"] * a["meters"]
    iv = r["poll_intervals"]
    ua = r["opcua_delta"]
    lines = [
        f"## `modbus-bridge run`: {a['segments']} segments × {a['meters']} SDM120 = {n} meters at "
        f"{a['poll_interval']:g} s polling",
        "",
        f"`{r['command']}`",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu'] or 'unknown'}), {mib(m['mem_total_kib'])} MiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}, asyncua {m['asyncua']}, uvloop {m['uvloop']}, "
        f"commit {m['commit'] or '?'}.",
        f"Bridge: `{r['bridge_command']}` (uvloop)"
        + (f", pinned to CPU {m['pinning']['bridge']}; simulator and client pinned to CPU {m['pinning']['sim']}"
           if m["pinning"] else ", no CPU pinning") + ".",
        f"Configuration: {a['segments']} segments on ptys, {a['baudrate']} 8N1, timeout 0.5 s, retries 1; "
        f"{n} × {PROFILE} (units 1..{n}), poll_interval {a['poll_interval']:g} s, stale_after 10 s; "
        f"Modbus TCP and OPC UA (SecurityPolicy None) on 127.0.0.1; no HTTP.",
        f"Simulator: separate process (uvloop), animated values, "
        + (f"wire time emulated at {a['baudrate']} baud with a {a['turnaround'] * 1e3:g} ms turnaround."
           if a["emulate_wire"] else "no wire-time emulation (the ptys deliver at once).")
        + f" Client: one Modbus TCP connection, {a['segments']} voltage reads per second (one unit per "
        f"segment, rotating through all {n}); one idle OPC UA session (counters read before and after the window).",
        f"{a['warmup']:g} s warm-up after every unit answered, then {r['window_s']:.0f} s measured; the bridge "
        f"sampled every {a['sample_period']:g} s (VmRSS, utime + stime).",
        "",
        "| measure | value | target |",
        "|---|---:|---|",
        f"| start-up: `run` to \"OPC UA listening\" / to every unit answering | {r['listening_s']:.1f} s / "
        f"{r['listening_s'] + r['ready_s']:.1f} s | |",
        f"| OPC UA address space (from its log line) | {r['opcua_summary']} | |",
        f"| bridge CPU time used by start-up (until listening) | {r['listening']['cpu_s']:.1f} s | |",
        f"| RSS at listening / window start / window end | {mib(r['listening']['rss_kib'])} / "
        f"{mib(r['start']['rss_kib'])} / {mib(r['end']['rss_kib'])} MiB | |",
        f"| RSS max of window samples / peak of the whole run (VmHWM) | {mib(r['rss_max_kib'])} / "
        f"{mib(r['end']['hwm_kib'])} MiB (= {mb(r['rss_max_kib'])} / {mb(r['end']['hwm_kib'])} MB) | "
        f"peak < 150 MB: {'met' if r['rss_met'] else '**not met**'} |",
        f"| RSS at window end: anonymous / file-backed | {mib(r['end']['anon_kib'])} / {mib(r['end']['file_kib'])} "
        f"MiB | |",
        f"| RSS change over the window (end − start) | {(r['end']['rss_kib'] - r['start']['rss_kib']) / 1024:+.1f} "
        f"MiB | |",
        f"| **bridge CPU, mean over the window** (100 % = one core) | **{r['cpu_pct']:.1f} %** | "
        f"< 25 %: {'met' if r['cpu_met'] else '**not met**'} |",
        f"| bridge CPU, {a['sample_period']:g} s samples: min / median / max | {r['cpu_min']:.1f} / "
        f"{r['cpu_median']:.1f} / {r['cpu_max']:.1f} % | |",
        f"| bridge threads | {r['end']['threads']} | |",
        f"| meter polls achieved (simulator: request bursts) | {r['polls_per_s']:,.1f}/s of {r['polls_wanted']:,.0f}/s "
        f"wanted ({100 * r['polls_per_s'] / r['polls_wanted']:.1f} %) | |",
        f"| requests answered by the simulator | {r['requests_per_s']:,.1f}/s ({r['requests_per_poll']:.2f} per poll) | |",
        f"| interval between a meter's polls: p50 / p99 / max (n = {iv['n']:,}) | {iv['p50'] * 1e3:.1f} / "
        f"{iv['p99'] * 1e3:.1f} / {iv['max'] * 1e3:.1f} ms | |",
        f"| bridge's own counters over the window (OPC UA): requests / errors / timeouts | "
        f"{ua['Requests']:,} / {ua['Errors']:,} / {ua['Timeouts']:,} | |",
        f"| repeated requests seen by the simulator in the window (retries) / unanswered (whole run) | "
        f"{r['sim_repeats']:,} / {r['unanswered']:,} | |",
        f"| segment cycle time at the end (OPC UA CycleTime), min / max over segments | {r['cycle_min']:.3f} / "
        f"{r['cycle_max']:.3f} s | |",
        f"| segment utilisation at the end (OPC UA Utilisation), min / max over segments | "
        f"{100 * r['busy_min']:.0f} / {100 * r['busy_max']:.0f} % | |",
        f"| meters online at the end (OPC UA) / values Good (one per segment) | {r['ua_end']['online']} / "
        f"{r['ua_end']['meters']}; {r['ua_end']['values_ok']} / {r['ua_end']['values']} | |",
        f"| Modbus TCP client reads in the window: ok / errors (whole run) | {r['client_reads']:,} / "
        f"{r['client_errors']} | |",
        f"| … latency p50 / max; values changed since the unit's previous read | {r['client_p50_ms']:.2f} / "
        f"{r['client_max_ms']:.2f} ms; {r['client_changed']:,} / {r['client_compared']:,} | |",
        f"| bridge log: stale / offline lines; warnings; errors | {r['log']['stale']} / {r['log']['offline']}; "
        f"{r['log']['n_warnings']}; {r['log']['n_problems']} | |",
        f"| bridge exit on SIGTERM | {r['exit']} | |",
        f"| CPU of simulator / this client / other processes / stolen | {r['sim_cpu_pct']:.0f} / "
        f"{r['self_cpu_pct']:.0f} / {r['other_cpu_pct']:.0f} / {r['steal_pct']:.0f} % | |",
        "",
    ]
    per = r["cpu_samples"]
    rss = [f"{s['rss_kib'] / 1024:.1f}" for s in r["samples"] if s["phase"] in ("start", "measured", "end")]
    lines += [f"RSS over the window (MiB, every {a['sample_period']:g} s): {', '.join(rss)}.", "",
              f"Bridge CPU per sample (%): {', '.join(f'{c:.1f}' for c in per)}.", ""]
    lines.append(
        f"Unit ids: the issue's {a['segments']} × 32 = {a['segments'] * 32} meters cannot be configured; each meter "
        f"needs a unit id unique across the bridge, 1..{MAX_UNITS} (checked even with Modbus TCP off), so "
        f"{n} meters is the closest uniform layout.")
    if not a["emulate_wire"]:
        bound = a["meters"] * WIRE_BOUND_9600_S
        lines += ["", f"Wire time: the ptys carry a poll in well under a millisecond. On a real 9600-baud line one "
                      f"SDM120 poll needs ≈ {WIRE_BOUND_9600_S * 1e3:.0f} ms (bench/bus.py's bound, 5 ms turnaround), so {a['meters']} "
                      f"meters per segment need ≈ {bound:.1f} s per round: {a['poll_interval']:g} s polling of "
                      f"{a['meters']} meters per segment is only reachable with much faster lines. The figures "
                      f"here are for the full {a['poll_interval']:g} s rate, i.e. an upper bound on the "
                      f"polling work at {n} meters."]
    ratio = r["polls_per_s"] / r["polls_wanted"]
    if ratio > 1.02:
        lines += ["", f"**The pollers were still catching up with their schedule** ({100 * ratio:.1f} % of the "
                      "wanted rate): start-up leaves them behind; lengthen --warmup."]
    elif ratio < 0.98:
        lines += ["", f"**The pollers fell behind their schedule** ({100 * ratio:.1f} % of the wanted rate)."]
    if r["other_cpu_pct"] > NOISY_PCT:
        lines += ["", f"**Disturbed:** other processes used {r['other_cpu_pct']:.0f} % of a core during the window."]
    lg = r["log"]
    if lg["warnings"]:
        lines += ["", f"Bridge warnings ({lg['n_warnings']}, first {len(lg['warnings'])}):", ""]
        lines += [f"    {l}" for l in lg["warnings"]]
    if lg["problems"]:
        lines += ["", f"**Bridge errors ({lg['n_problems']}, first {len(lg['problems'])}):**", ""]
        lines += [f"    {l}" for l in lg["problems"]]
    if r["client_errors"]:
        lines += ["", f"**Client errors:** {json.dumps(r['client_error_kinds'])}", ""]
        lines += [f"    {e}" for e in r["client_error_examples"]]
    if r["commit_at_end"] != m["commit"]:
        lines += ["", f"**The working tree changed during the run** ({m['commit']} at the start, "
                      f"{r['commit_at_end']} at the end); the bridge runs the code it loaded at the start."]
    lines += ["", f"Targets: peak RSS < 150 MB: {'met' if r['rss_met'] else '**not met**'} "
                  f"({mb(r['end']['hwm_kib'])} MB); mean CPU < 25 % of one core: "
                  f"{'met' if r['cpu_met'] else '**not met**'} ({r['cpu_pct']:.1f} %)."]
    if r["failures"]:
        lines += ["", "**FAILED:** " + "; ".join(r["failures"])]
    return "\n".join(lines)


# ====================================================================== main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = arg_parser(__doc__)
    ap.add_argument("--segments", type=int, default=8, help="segments (ptys), default 8")
    ap.add_argument("--meters", type=int, default=30, help="SDM120 meters per segment, default 30 (8 × 30 = 240 ≤ 247)")
    ap.add_argument("--poll-interval", type=float, default=1.0, help="every meter's poll_interval, default 1.0 s")
    ap.add_argument("--seconds", type=float, default=120.0, help="measured seconds (default 120)")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds after every unit answers (default 20)")
    ap.add_argument("--sample-period", type=float, default=5.0, help="seconds between samples (default 5)")
    ap.add_argument("--baudrate", type=int, default=9600, help="the segments' baud rate (default 9600)")
    ap.add_argument("--emulate-wire", action="store_true",
                    help="the simulator holds each reply for its wire time at --baudrate plus --turnaround")
    ap.add_argument("--turnaround", type=float, default=0.005, help="with --emulate-wire: seconds (default 0.005)")
    ap.add_argument("--wait-quiet", type=float, default=30.0,
                    help="wait up to this many seconds for a quiet machine before starting (default 30; 0: no)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the bridge and the simulator to separate CPUs")
    ap.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    ap.add_argument("--json", metavar="PATH", help="also write the results and every sample as JSON to PATH")
    ap.add_argument("--simulate", nargs=2, type=int, metavar=("N_SEGMENTS", "N_METERS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.simulate:
        return args
    if not 1 <= args.meters <= 247 or args.segments < 1:
        ap.error("--meters must be 1..247 (slave addresses) and --segments at least 1")
    if args.segments * args.meters > MAX_UNITS:
        ap.error(f"{args.segments} × {args.meters} = {args.segments * args.meters} meters need as many distinct "
                 f"Modbus unit ids, but a configuration allows only 1..{MAX_UNITS} (unique across the bridge); "
                 f"use at most {MAX_UNITS} meters, e.g. --segments 8 --meters 30")
    if args.poll_interval >= 10.0:
        ap.error("--poll-interval must be below stale_after (10 s)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.simulate:
        simulate_main(*args.simulate, args.emulate_wire, args.baudrate, args.turnaround)
        return 0
    cpus = sorted(os.sched_getaffinity(0))
    pinned = {"bridge": cpus[-1], "sim": cpus[0]} if not args.no_pin and len(cpus) >= 2 else None
    command = command_line()
    machine = machine_info(len(cpus), pinned)
    if pinned:
        os.sched_setaffinity(0, {pinned["sim"]})
    n = args.segments * args.meters
    quiet_pct = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    if quiet_pct is not None and quiet_pct > NOISY_PCT:
        log(f"the machine is not quiet ({quiet_pct:.0f} % of a core used by others): measuring anyway")
    sim = Simulator(args, pinned["sim"] if pinned else None)
    log(f"simulator: pid {sim.pid}, {args.segments} ptys × {args.meters} meters")
    tmp = tempfile.TemporaryDirectory(prefix="appliance-")
    modbus_port, opcua_port = free_port(), free_port()
    while opcua_port == modbus_port:
        opcua_port = free_port()
    config_path = Path(tmp.name) / "appliance.yaml"
    config_path.write_text(config_text(args, sim.ports, modbus_port, opcua_port))
    bridge = None
    try:
        bridge = Bridge(config_path, pinned["bridge"] if pinned else None)
        log(f"bridge: pid {bridge.pid}, {n} meters, Modbus TCP {modbus_port}, OPC UA {opcua_port}")
        listening_s = bridge.wait_listening()
        log(f"bridge listening after {listening_s:.1f} s: {bridge.opcua_line.split(': ', 1)[-1]}")
        with asyncio.Runner(loop_factory=new_uvloop) as runner:
            raw = runner.run(run(args, bridge, sim, modbus_port, opcua_port))
    except BaseException:
        if bridge is not None:
            bridge.terminate()
            log(bridge.log_text()[-3000:])
            bridge.close()
        sim.close()
        tmp.cleanup()
        raise
    bridge.terminate()
    log_info = analyse_log(bridge.log_text())
    bridge.close()
    sim_exit = sim.close()
    tmp.cleanup()

    window = raw["window_s"]
    s0, s1 = raw["sim_start"], raw["sim_end"]
    sim_window = s1["t"] - s0["t"]
    polls = s1["polls"] - s0["polls"]
    requests = s1["answered"] - s0["answered"]
    unanswered = s1["requests"] - s1["answered"]  # whole run; a reply in flight may be counted (one per bus)
    ua0, ua1 = raw["ua_start"]["segments"], raw["ua_end"]["segments"]
    ua_delta = {c: sum(int(ua1[s][c]) - int(ua0[s][c]) for s in ua1) for c in ("Requests", "Errors", "Timeouts")}
    cycles = [float(ua1[s]["CycleTime"]) for s in ua1]
    busy = [float(ua1[s]["Utilisation"]) for s in ua1]
    st: ClientStats = raw["stats"]
    lat = sorted(st.latencies)
    cpu_samples = [s["cpu_pct"] for s in raw["samples"] if "cpu_pct" in s]
    bridge_cpu = raw["end"]["cpu_s"] - raw["start"]["cpu_s"]
    cpu_pct = 100 * bridge_cpu / window
    window_rss = [s["rss_kib"] for s in raw["samples"] if s["phase"] in ("start", "measured", "end")]
    rss_max = max(window_rss)
    hwm = raw["end"]["hwm_kib"]
    rss_met = max(hwm, rss_max) * 1024 < TARGET_RSS_BYTES
    cpu_met = cpu_pct < TARGET_CPU_PCT
    client_errors = sum(st.errors.values())
    if bridge.killed:
        exit_text = f"**did not exit within {TERM_TIMEOUT:g} s; killed**"
    else:
        exit_text = f"status {bridge.exit_code} after {bridge.exit_seconds:.2f} s"
    m = re.search(r"\((\d+) variables, built in ([\d.]+) s\)", bridge.opcua_line)
    opcua_summary = f"{int(m.group(1)):,} variables, built in {m.group(2)} s" if m else bridge.opcua_line
    failures = []
    if client_errors:
        failures.append(f"{client_errors} Modbus TCP client errors")
    if st.reads["measured"] == 0:
        failures.append("no Modbus TCP read in the window")
    if bridge.killed or bridge.exit_code != 0:
        failures.append(f"bridge exit on SIGTERM: {exit_text}")
    if log_info["n_problems"]:
        failures.append(f"{log_info['n_problems']} ERROR/traceback lines in the bridge log")
    if log_info["stale"] or log_info["offline"]:
        failures.append(f"{log_info['stale']} stale and {log_info['offline']} offline lines in the bridge log")
    if ua_delta["Timeouts"] or ua_delta["Errors"]:
        failures.append(f"bridge counted {ua_delta['Timeouts']} timeouts and {ua_delta['Errors']} errors")
    if unanswered > (args.segments if args.emulate_wire else 0):
        failures.append(f"{unanswered} requests the simulator did not answer")
    if raw["ua_end"]["online"] != raw["ua_end"]["meters"] or raw["ua_end"]["values_ok"] != raw["ua_end"]["values"]:
        failures.append("not every meter online / value Good over OPC UA at the end")
    if sim_exit not in (0, None):
        failures.append(f"simulator exit status {sim_exit}")
    polls_wanted = n / args.poll_interval if args.poll_interval > 0 else math.nan
    result = {
        "command": command,
        "bridge_command": shlex.join(["python", "-m", "bridge", "run", "-c", "appliance.yaml"]),
        "machine": machine,
        "commit_at_end": git_describe(),
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "simulate")},
        "window_s": window,
        "listening_s": listening_s, "ready_s": raw["ready_s"], "opcua_summary": opcua_summary,
        "listening": raw["listening"], "start": raw["start"], "end": raw["end"],
        "rss_max_kib": rss_max, "rss_met": rss_met,
        "cpu_pct": cpu_pct, "cpu_met": cpu_met, "cpu_samples": cpu_samples,
        "cpu_min": min(cpu_samples), "cpu_max": max(cpu_samples),
        "cpu_median": sorted(cpu_samples)[len(cpu_samples) // 2],
        "polls_per_s": polls / sim_window, "polls_wanted": polls_wanted,
        "requests_per_s": requests / sim_window, "requests_per_poll": requests / polls if polls else math.nan,
        "poll_intervals": s1["intervals"], "sim_repeats": s1["repeats"] - s0["repeats"], "unanswered": unanswered,
        "opcua_delta": ua_delta, "cycle_min": min(cycles), "cycle_max": max(cycles),
        "busy_min": min(busy), "busy_max": max(busy),
        "ua_start": raw["ua_start"], "ua_end": raw["ua_end"],
        "sim_start": raw["sim_start"], "sim_end": raw["sim_end"],
        "client_reads": st.reads["measured"], "client_errors": client_errors,
        "client_error_kinds": st.errors, "client_error_examples": st.examples,
        "client_p50_ms": percentile(lat, 0.5) * 1e3, "client_max_ms": (lat[-1] * 1e3) if lat else math.nan,
        "client_changed": st.changed, "client_compared": st.compared,
        "sim_cpu_pct": raw["sim_cpu_pct"], "self_cpu_pct": raw["self_cpu_pct"],
        "other_cpu_pct": raw["other_cpu_pct"], "steal_pct": raw["steal_pct"],
        "exit": exit_text, "exit_code": bridge.exit_code,
        "log": log_info,
        "samples": [{k: (round(v - raw["start"]["t"], 2) if k == "t" else v) for k, v in s.items()}
                    for s in raw["samples"]],
        "failures": failures,
    }
    emit(result, markdown, args.json)
    if failures:
        log("FAILED: " + "; ".join(failures))
        return 1
    if args.strict and not (rss_met and cpu_met):
        log("a target was missed (--strict)")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
