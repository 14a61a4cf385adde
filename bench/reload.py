#!/usr/bin/env python3
"""Reload memory: RSS of `modbus-bridge run` after N SIGHUP reloads against its RSS after one.

The bug this guards against: rebuilding the OPC UA server on a reload leaked 40–59 MB per reload
(ten reloads at 200 meters took the process from 134 MB to 722 MB). Memory after N reloads must be
what it was after the first.

* **Simulated meters** (in this process, uvloop): ``--segments`` (default 4) ``SimulatedBus``es on
  pseudo-terminals, no wire-time emulation (the ptys deliver at once). ``--meters`` (default 200)
  is the **total** number of meters, spread evenly over the segments (slaves 1..k on each; units
  1..M across the bridge, segment by segment), Eastron SDM630 at odd units and SDM120 at even ones,
  animated values. The last bus also holds one more SDM120 (slave k+1, unit M+1) that only
  configuration B polls. A unit is 1..247 and unique across the bridge, so M ≤ 246.
* **Bridge**, the process measured: ``python -m bridge --log-format json run -c bridge.yaml`` in a
  temporary directory (its state and certificates go there too). 9600 8N1, timeout 0.5 s,
  retries 1, ``poll_interval: 1.0``, ``stale_after: 10``; Modbus TCP, OPC UA (``security: [None]``)
  and HTTP, each on a free port of 127.0.0.1.
* **Two configurations** that both change the OPC UA address space: A is the layout above; B adds
  the extra meter to the last segment and renames the first segment (``seg1`` → ``seg1-b``). The
  bridge starts on A; reload k applies B when k is odd, A when it is even (the file is replaced,
  then SIGHUP).
* **Each reload**: SIGHUP, then wait (≤ 60 s) for the bridge's JSON log line "reload applied"
  (or "reload refused": counted, reported, a failure), then for ``/readyz`` to answer 200
  (≤ 60 s). Then one Modbus TCP read (FC4, unit 1, voltage, on the one connection held since the
  start: a reload must not drop it) and one OPC UA read in a new session (unit 1's voltage, and the
  extra meter's: Good in B, ``BadNodeIdUnknown`` in A, which shows the address space was rebuilt).
  After ``--settle`` (1 s) the bridge's VmRSS is read from /proc/PID/status.
* "Time per reload" is SIGHUP → the "reload applied" line as this process sees it (the log file is
  polled every 10 ms).
* "Longest Modbus TCP answer" around each reload: a second connection reads unit 1 every 5 ms
  for the whole run (``StallProbe``); the longest wait for one answer from SIGHUP to /readyz 200 is
  how long the bridge stood still during that reload (its garbage-collection pass, the address-space
  rebuild), against the longest between reloads.

At the end the bridge gets SIGTERM and must exit with status 0 within 5 s; the buses are closed,
also after an error. Reloading stops early if the bridge's RSS passes half of the machine's RAM.

    .venv/bin/python bench/reload.py                          # 200 meters, 20 reloads: about 2 minutes
    .venv/bin/python bench/reload.py --meters 40 --reloads 4 --json out.json

Output: a Markdown table on stdout (progress on stderr); ``--json PATH`` also writes the results,
``--json -`` prints them instead of the table. Exit status 1 when the run broke or a check failed:
the bridge did not start, died or timed out a reload, a reload was refused, a Modbus TCP or OPC UA
read failed, its log holds an ERROR line or a traceback, or it did not exit cleanly on SIGTERM.
Memory growth alone does not fail the run: the table is the result.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import re
import shlex
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import OtherCpu, dist_version, fmt, free_port, git_describe, mib, new_uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
NAMESPACE = "urn:modbus-bridge"
PROFILES = ("eastron-sdm630", "eastron-sdm120")  # odd units, even units
EXTRA_PROFILE = "eastron-sdm120"
MAX_UNITS = 247  # config: unit 1..247, unique across the bridge
RENAMED = "-b"  # config B: the first segment's name gets this suffix
POLL_INTERVAL = 1.0
STALE_AFTER = 10.0
VOLTAGE = (215.0, 245.0)  # plausible simulated voltage (both profiles hold a float32 voltage at input register 0)
START_TIMEOUT = 120.0  # s: `run` until /readyz answers 200
RELOAD_TIMEOUT = 60.0  # s: SIGHUP until "reload applied" / "reload refused"
READY_TIMEOUT = 60.0  # s: "reload applied" until /readyz answers 200
CHECK_TIMEOUT = 5.0  # s: a Modbus TCP or OPC UA read may retry (e.g. 0x0B before a meter's first poll) this long
TERM_TIMEOUT = 5.0
LOG_POLL = 0.01
RSS_LIMIT_FRACTION = 0.5  # stop reloading once the bridge holds this share of the machine's RAM
# the reload's last line: "reload applied ..."; before that wording, App.reload ended with
# "reload: N segment(s) kept, M (re)started", which is accepted too
APPLIED = re.compile(r"reload applied|^reload: \d+ segment\(s\) kept")
REFUSED = "reload refused"
UA_LISTENING = re.compile(r"OPC UA listening on \S+ \((\d+) variables, built in ([\d.]+) s\)")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ====================================================================== layout and configuration
@dataclass(frozen=True)
class Meter:
    name: str
    slave: int
    unit: int
    profile: str


@dataclass
class Layout:
    segments: list[list[Meter]]  # configuration A
    extra: Meter  # configuration B adds it to the last segment

    @property
    def first(self) -> Meter:
        return self.segments[0][0]


def make_layout(n_meters: int, n_segments: int) -> Layout:
    per, rest = divmod(n_meters, n_segments)
    segments, unit = [], 0
    for s in range(n_segments):
        seg_meters = []
        for slave in range(1, per + (s < rest) + 1):
            unit += 1
            seg_meters.append(Meter(f"m{unit:03d}", slave, unit, PROFILES[(unit - 1) % 2]))
        segments.append(seg_meters)
    extra = Meter(f"m{unit + 1:03d}", len(segments[-1]) + 1, unit + 1, EXTRA_PROFILE)
    return Layout(segments, extra)


def segment_name(index: int, variant: str) -> str:
    return f"seg{index + 1}" + (RENAMED if variant == "B" and index == 0 else "")


def voltage_of(meter: Meter) -> str:
    return "voltage_l1" if meter.profile == "eastron-sdm630" else "voltage"


def config_text(layout: Layout, variant: str, ports: list[str], tcp_port: int, ua_port: int, http_port: int) -> str:
    lines = [f"# written by bench/reload.py: configuration {variant}", "segments:"]
    for s, (meters, port) in enumerate(zip(layout.segments, ports)):
        if variant == "B" and s == len(layout.segments) - 1:
            meters = [*meters, layout.extra]
        lines += [f"  - name: {segment_name(s, variant)}", f"    port: {port}", "    baudrate: 9600",
                  "    timeout: 0.5", "    retries: 1", "    meters:"]
        lines += [f"      - {{name: {m.name}, slave: {m.slave}, unit: {m.unit}, profile: {m.profile}, "
                  f"poll_interval: {POLL_INTERVAL:g}}}" for m in meters]
    lines += [
        f"stale_after: {STALE_AFTER:g}",
        "modbus_tcp:",
        f"  listen: {HOST}:{tcp_port}",
        "opcua:",
        f"  endpoint: opc.tcp://{HOST}:{ua_port}/bridge",
        f"  namespace: {NAMESPACE}",
        "  security: [None]",
        "http:",
        f"  listen: {HOST}:{http_port}",
    ]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ====================================================================== the bridge process
def proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if this process dies without cleaning up (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Bridge:
    """``python -m bridge --log-format json run -c FILE``; its stderr (JSON lines) parsed as it grows."""

    def __init__(self, config_path: Path):
        self.argv = [sys.executable, "-m", "bridge", "--log-format", "json", "run", "-c", str(config_path)]
        self.log_path = config_path.parent / "bridge.log"
        self._log_file = open(self.log_path, "wb")
        env = {k: v for k, v in os.environ.items() if k not in ("STATE_DIRECTORY", "NOTIFY_SOCKET")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._log_file, cwd=config_path.parent, env=env,
                                     preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        self.entries: list[dict] = []  # every JSON log line so far
        self.other_lines: list[str] = []  # lines that are not JSON (a stray print, a traceback)
        self._offset = 0
        self._partial = b""
        self.exit_code: int | None = None
        self.exit_seconds: float | None = None
        self.killed = False
        self.exited_early = False  # it had exited by itself before the SIGTERM

    def alive(self) -> bool:
        return self.proc.poll() is None

    def poll_log(self) -> None:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            text = raw.decode(errors="replace").rstrip("\r")
            if not text:
                continue
            try:
                entry = json.loads(text)
                if not isinstance(entry, dict) or "message" not in entry:
                    raise ValueError
            except ValueError:
                self.other_lines.append(text)
                continue
            entry["_t"] = time.monotonic()  # when this process saw it (within LOG_POLL)
            self.entries.append(entry)

    async def until(self, match, since: int, timeout: float) -> tuple[int, dict]:
        """The first log entry from index ``since`` on for which ``match(message)`` holds."""
        deadline = time.monotonic() + timeout
        i = since
        while True:
            self.poll_log()
            while i < len(self.entries):
                if match(self.entries[i]["message"]):
                    return i, self.entries[i]
                i += 1
            if not self.alive():
                raise RuntimeError(f"the bridge exited with status {self.proc.returncode}")
            if time.monotonic() >= deadline:
                raise TimeoutError
            await asyncio.sleep(LOG_POLL)

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    async def terminate(self) -> None:
        """SIGTERM, then wait (the simulated buses keep answering meanwhile); SIGKILL after TERM_TIMEOUT."""
        if not self.alive():
            self.exit_code = self.proc.returncode
            self.exited_early = True
            return
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        while self.alive() and time.monotonic() - t0 < TERM_TIMEOUT:
            await asyncio.sleep(0.02)
        if self.alive():
            self.killed = True
            self.proc.kill()
            self.proc.wait()
        else:
            self.exit_seconds = time.monotonic() - t0
        self.exit_code = self.proc.returncode

    def close(self) -> None:
        """Last resort (also on KeyboardInterrupt): never leave the bridge running."""
        if self.alive():
            self.proc.kill()
            self.proc.wait()
            self.killed = True
            self.exit_code = self.proc.returncode
        self._log_file.close()

    def log_tail(self, n: int = 30) -> str:
        self.poll_log()
        lines = [json.dumps({k: v for k, v in e.items() if k != "_t"}) for e in self.entries[-n:]]
        return "\n".join(lines + self.other_lines[-n:])


# ====================================================================== the checks
async def http_status(port: int, path: str) -> int | None:
    try:
        async with asyncio.timeout(5.0):
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
                line = await reader.readline()
            finally:
                writer.close()
        return int(line.split()[1])
    except (OSError, TimeoutError, ValueError, IndexError):
        return None


async def wait_ready(bridge: Bridge, port: int, timeout: float) -> float:
    t0 = time.monotonic()
    while True:
        if await http_status(port, "/readyz") == 200:
            return time.monotonic() - t0
        if not bridge.alive():
            raise RuntimeError(f"the bridge exited with status {bridge.proc.returncode}")
        if time.monotonic() - t0 >= timeout:
            raise TimeoutError(f"/readyz did not answer 200 within {timeout:g} s")
        await asyncio.sleep(0.05)


class ModbusProbe:
    """One Modbus TCP connection, held from the start: a reload must keep it."""

    def __init__(self, port: int):
        self.port = port
        self.client = None
        self.reconnects = 0

    async def connect(self) -> None:
        from bridge.testing import RawModbusClient

        self.client = await RawModbusClient.connect(self.port, HOST)

    async def read_voltage(self, unit: int) -> tuple[bool, str]:
        deadline = time.monotonic() + CHECK_TIMEOUT
        detail = ""
        while True:
            try:
                pdu = await self.client.read(unit, 4, 0x0000, 2)
                if pdu[0] == 4 and len(pdu) == 6:
                    v = struct.unpack(">f", pdu[2:6])[0]
                    if VOLTAGE[0] <= v <= VOLTAGE[1]:
                        return True, f"{v:.1f} V"
                    detail = f"implausible {v!r}"
                else:
                    detail = f"reply {pdu.hex()}"
            except (OSError, asyncio.IncompleteReadError, TimeoutError, AssertionError) as exc:
                # a reload must not drop the connection: a failed check; reconnect for the next one
                self.reconnects += 1
                await self.close()
                try:
                    await self.connect()
                except OSError as exc2:
                    return False, f"connection lost ({exc!r}); cannot reconnect: {exc2!r}"
                return False, f"connection lost ({exc!r}); reconnected"
            if time.monotonic() >= deadline:
                return False, detail
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None


async def opcua_read(endpoint: str, present: str, extra: str, extra_expected: bool) -> tuple[bool, str]:
    """A new session; ``present`` must be Good and plausible, ``extra`` Good if expected, else unknown."""
    from asyncua import Client, ua

    deadline = time.monotonic() + CHECK_TIMEOUT
    detail = ""
    while True:
        client = Client(endpoint, timeout=10)
        try:
            await client.connect()
            try:
                ns = await client.get_namespace_index(NAMESPACE)
                dvs = await client.read_attributes([client.get_node(ua.NodeId(present, ns)),
                                                    client.get_node(ua.NodeId(extra, ns))])
            finally:
                await client.disconnect()
            dv, dx = dvs
            v = dv.Value.Value if dv.Value is not None else None
            ok_present = dv.StatusCode.is_good() and isinstance(v, float) and VOLTAGE[0] <= v <= VOLTAGE[1]
            if extra_expected:
                xv = dx.Value.Value if dx.Value is not None else None
                ok_extra = dx.StatusCode.is_good() and isinstance(xv, float) and VOLTAGE[0] <= xv <= VOLTAGE[1]
                extra_text = f"{xv:.1f} V" if ok_extra else f"{dx.StatusCode.name} {xv!r}"
            else:
                ok_extra = dx.StatusCode.value == ua.StatusCodes.BadNodeIdUnknown
                extra_text = "absent" if ok_extra else f"{dx.StatusCode.name} (expected BadNodeIdUnknown)"
            present_text = f"{v:.1f} V" if ok_present else f"{dv.StatusCode.name} {v!r}"
            detail = f"{present_text}; extra meter {extra_text}"
            if ok_present and ok_extra:
                return True, detail
        except Exception as exc:  # noqa: BLE001 (any failure of the OPC UA side is the finding)
            detail = f"{type(exc).__name__}: {exc}"[:200]
        if time.monotonic() >= deadline:
            return False, detail
        await asyncio.sleep(0.2)


# ====================================================================== the run
@dataclass
class Row:
    n: int
    config: str
    outcome: str = ""  # applied / refused / timeout / died
    reload_s: float | None = None  # SIGHUP -> "reload applied" (as seen here)
    ready_s: float | None = None  # "reload applied" -> /readyz 200
    modbus_ok: bool = False
    modbus: str = ""
    opcua_ok: bool = False
    opcua: str = ""
    ua_variables: int | None = None
    ua_build_s: float | None = None
    rss_kib: int | None = None
    anon_kib: int | None = None
    stall_s: float | None = None  # longest Modbus TCP answer from SIGHUP to /readyz 200
    errors: list[str] = field(default_factory=list)  # ERROR/CRITICAL lines logged during this reload
    warnings: int = 0


PROBE_PAUSE = 0.005  # seconds between two reads of the stall probe


class StallProbe:
    """A second Modbus TCP connection reading unit 1 every ``PROBE_PAUSE``: the longest wait for one answer in
    a window is the longest the bridge stood still then (any answer counts, an exception too)."""

    def __init__(self, port: int, unit: int):
        self.port, self.unit = port, unit
        self.worst = 0.0
        self.reads = 0
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        from bridge.testing import RawModbusClient

        client = await RawModbusClient.connect(self.port, HOST)
        try:
            while True:
                t0 = time.monotonic()
                await client.read(self.unit, 4, 0x0000, 2)
                self.worst = max(self.worst, time.monotonic() - t0)
                self.reads += 1
                await asyncio.sleep(PROBE_PAUSE)  # paced: a probe at full speed would load the bridge itself
        finally:
            await client.close()

    def take(self) -> float:
        """The longest wait since the last take (seconds); starts a new window."""
        if self.task is not None and self.task.done():
            self.task.result()  # the connection failed: say why
        worst, self.worst = self.worst, 0.0
        return worst


async def run(args, tmp: Path, result: dict) -> None:
    from bridge.config.profiles import get_builtin
    from bridge.south.simulator import SimMeter, SimulatedBus

    logging.getLogger("asyncua").setLevel(logging.ERROR)
    # SIGTERM to this script: stop like on Ctrl-C (cancel, so the cleanup below still runs)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    layout = make_layout(args.meters, args.segments)
    buses: list[SimulatedBus] = []
    bridge: Bridge | None = None
    probe: ModbusProbe | None = None
    stall: StallProbe | None = None
    try:
        profiles = {name: get_builtin(name) for name in {*PROFILES, EXTRA_PROFILE}}
        for s, meters in enumerate(layout.segments):
            sims = [SimMeter(m.slave, profiles[m.profile]) for m in meters]
            if s == len(layout.segments) - 1:
                sims.append(SimMeter(layout.extra.slave, profiles[layout.extra.profile]))
            bus = SimulatedBus(sims)
            bus.open()
            buses.append(bus)
        ports = [b.path for b in buses]
        tcp_port = free_port()
        ua_port = free_port()
        while ua_port == tcp_port:
            ua_port = free_port()
        http_port = free_port()
        while http_port in (tcp_port, ua_port):
            http_port = free_port()
        endpoint = f"opc.tcp://{HOST}:{ua_port}/bridge"
        config_path = tmp / "bridge.yaml"
        texts = {v: config_text(layout, v, ports, tcp_port, ua_port, http_port) for v in "AB"}
        write_atomically(config_path, texts["A"])

        t0 = time.monotonic()
        bridge = Bridge(config_path)
        result["bridge_pid"] = bridge.pid
        log(f"bridge: pid {bridge.pid}; {args.meters} meters on {args.segments} segments; Modbus TCP {tcp_port}, "
            f"OPC UA {ua_port}, HTTP {http_port}")
        try:
            ready_s = await wait_ready(bridge, http_port, START_TIMEOUT)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"the bridge did not become ready: {exc}\n{bridge.log_tail()}") from None
        result["start_s"] = time.monotonic() - t0
        bridge.poll_log()
        m = next((UA_LISTENING.search(e["message"]) for e in bridge.entries if UA_LISTENING.search(e["message"])), None)
        result["start_ua"] = {"variables": int(m.group(1)), "build_s": float(m.group(2))} if m else None
        log(f"ready after {result['start_s']:.1f} s" + (f"; OPC UA: {m.group(1)} variables built in {m.group(2)} s"
                                                         if m else ""))
        probe = ModbusProbe(tcp_port)
        await probe.connect()
        ok_m, text_m = await probe.read_voltage(layout.first.unit)
        ok_u, text_u = await opcua_read(endpoint, f"{layout.first.name}.{voltage_of(layout.first)}",
                                        f"{layout.extra.name}.voltage", False)
        await asyncio.sleep(args.settle)
        st = bridge.status()
        result["start"] = {"rss_kib": st.get("VmRSS"), "anon_kib": st.get("RssAnon"), "modbus_ok": ok_m,
                           "modbus": text_m, "opcua_ok": ok_u, "opcua": text_u}
        log(f"start: RSS {mib(st.get('VmRSS'))} MiB; Modbus TCP {text_m}; OPC UA {text_u}")
        if not (ok_m and ok_u):
            result["failures"].append("the checks failed before the first reload")

        stall = StallProbe(tcp_port, layout.first.unit)
        stall.task = asyncio.create_task(stall.run())
        await asyncio.sleep(args.settle)
        result["stall_between_s"] = []  # the longest answer in each window between two reloads
        mem_total = _mem_total_kib()
        rows: list[Row] = result["rows"]
        other = OtherCpu({os.getpid(), bridge.pid})
        t_reloads = time.monotonic()
        for n in range(1, args.reloads + 1):
            variant = "B" if n % 2 else "A"
            row = Row(n, variant)
            rows.append(row)
            write_atomically(config_path, texts[variant])
            bridge.poll_log()
            since = len(bridge.entries)
            result["stall_between_s"].append(stall.take())
            sent = time.monotonic()
            bridge.proc.send_signal(signal.SIGHUP)
            try:
                i, entry = await bridge.until(lambda msg: bool(APPLIED.search(msg)) or REFUSED in msg, since,
                                              RELOAD_TIMEOUT)
            except TimeoutError:
                row.outcome = "timeout"
                result["failures"].append(f"reload {n}: no \"reload applied\" within {RELOAD_TIMEOUT:g} s")
                _collect(bridge, row, since)
                log(f"reload {n}: timed out\n{bridge.log_tail()}")
                break
            except RuntimeError as exc:
                row.outcome = "died"
                result["failures"].append(f"reload {n}: {exc}")
                _collect(bridge, row, since)
                log(f"reload {n}: {exc}\n{bridge.log_tail()}")
                break
            row.reload_s = entry["_t"] - sent
            row.outcome = "refused" if REFUSED in entry["message"] else "applied"
            if row.outcome == "refused":
                result["failures"].append(f"reload {n} refused: {entry['message']}")
            try:
                row.ready_s = await wait_ready(bridge, http_port, READY_TIMEOUT)
            except (TimeoutError, RuntimeError) as exc:
                result["failures"].append(f"reload {n}: {exc}")
                _collect(bridge, row, since)
                log(f"reload {n}: {exc}\n{bridge.log_tail()}")
                break
            row.stall_s = stall.take()
            applied = variant if row.outcome == "applied" else ("A" if variant == "B" else "B")
            row.modbus_ok, row.modbus = await probe.read_voltage(layout.first.unit)
            row.opcua_ok, row.opcua = await opcua_read(endpoint, f"{layout.first.name}.{voltage_of(layout.first)}",
                                                       f"{layout.extra.name}.voltage", applied == "B")
            for ok, side, text in ((row.modbus_ok, "Modbus TCP", row.modbus), (row.opcua_ok, "OPC UA", row.opcua)):
                if not ok:
                    result["failures"].append(f"reload {n}: {side} read failed: {text}")
            await asyncio.sleep(args.settle)
            st = bridge.status()
            row.rss_kib, row.anon_kib = st.get("VmRSS"), st.get("RssAnon")
            _collect(bridge, row, since)
            base = rows[0].rss_kib
            log(f"reload {n} ({variant}): {row.outcome} in {fmt(row.reload_s, '.2f')} s, ready +{row.ready_s:.2f} s; "
                f"longest Modbus TCP answer {1e3 * row.stall_s:.0f} ms; "
                f"RSS {mib(row.rss_kib)} MiB ({(row.rss_kib - base) / 1024:+.1f} vs reload 1); "
                f"Modbus {'ok' if row.modbus_ok else 'FAILED'} ({row.modbus}); "
                f"OPC UA {'ok' if row.opcua_ok else 'FAILED'} ({row.opcua})"
                + (f"; {len(row.errors)} ERROR lines" if row.errors else ""))
            if not bridge.alive():
                result["failures"].append(f"the bridge exited after reload {n} (status {bridge.proc.returncode})")
                break
            if mem_total and row.rss_kib and row.rss_kib > RSS_LIMIT_FRACTION * mem_total:
                result["failures"].append(f"stopped after reload {n}: the bridge holds {mib(row.rss_kib)} MiB, over "
                                          f"{RSS_LIMIT_FRACTION:.0%} of the machine's RAM")
                break
        result["reloads_s"] = time.monotonic() - t_reloads
        result["other_cpu_pct"], result["steal_pct"] = other.measure()
        st = bridge.status()
        result["end"] = {"rss_kib": st.get("VmRSS"), "hwm_kib": st.get("VmHWM"), "threads": st.get("Threads")}
        result["modbus_reconnects"] = probe.reconnects
    finally:
        if stall is not None and stall.task is not None:
            stall.task.cancel()
            await asyncio.gather(stall.task, return_exceptions=True)
            result["stall_reads"] = stall.reads
        if probe is not None:
            await probe.close()
        if bridge is not None:
            await bridge.terminate()
            bridge.poll_log()
            result["exit"] = {"code": bridge.exit_code, "seconds": bridge.exit_seconds, "killed": bridge.killed,
                              "before_sigterm": bridge.exited_early}
            result["log"] = _log_summary(bridge)
            bridge.close()
        for bus in buses:
            bus.close()


def _collect(bridge: Bridge, row: Row, since: int) -> None:
    """This reload's log lines: ERROR/CRITICAL, warnings, and the OPC UA rebuild's size and time."""
    bridge.poll_log()
    for e in bridge.entries[since:]:
        level = str(e.get("level", "")).lower()
        if level in ("error", "critical"):
            row.errors.append(e["message"][:300])
        elif level == "warning":
            row.warnings += 1
        m = UA_LISTENING.search(e["message"])
        if m:
            row.ua_variables, row.ua_build_s = int(m.group(1)), float(m.group(2))


def _log_summary(bridge: Bridge) -> dict:
    levels: dict[str, int] = {}
    for e in bridge.entries:
        levels[str(e.get("level"))] = levels.get(str(e.get("level")), 0) + 1
    problems = [f"{e.get('level')}: {e['message'][:300]}" + (" (with traceback)" if e.get("exception") else "")
                for e in bridge.entries if str(e.get("level", "")).lower() in ("error", "critical")]
    tracebacks = [e["exception"].splitlines()[-1][:300] for e in bridge.entries if e.get("exception")]
    warnings: dict[str, int] = {}  # distinct warning messages (numbers masked), with their counts
    for e in bridge.entries:
        if str(e.get("level", "")).lower() == "warning":
            key = f"{e.get('logger')}: " + re.sub(r"\d+(\.\d+)?", "N", e["message"])[:200]
            warnings[key] = warnings.get(key, 0) + 1
    other = [l for l in bridge.other_lines if l.strip()]
    return {"lines": len(bridge.entries) + len(other), "levels": levels, "n_problems": len(problems),
            "problems": problems[:10], "tracebacks": tracebacks[:10], "warnings": warnings,
            "n_non_json": len(other), "non_json": other[:10]}


def _mem_total_kib() -> int | None:
    try:
        return int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def machine_info() -> dict:
    cpu_model = ""
    try:
        cpu_model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                          if l.startswith("model name")), "")
    except OSError:
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu_model, "mem_total_kib": _mem_total_kib(),
            "kernel": platform.release(), "python": platform.python_version(), "asyncua": dist_version("asyncua"),
            "uvloop": dist_version("uvloop"), "commit": git_describe()}


# ====================================================================== results
def summarise(result: dict) -> None:
    rows = [r for r in result["rows"] if r.rss_kib is not None]
    result["measured_reloads"] = len(rows)
    if not rows:
        return
    first = rows[0].rss_kib
    tail = rows[max(1, len(rows) - 5):] or rows  # the last 5 reloads after the first
    result["tail_reloads"] = [r.n for r in tail]
    result["rss_reload1_kib"] = first
    result["rss_tail_median_kib"] = statistics.median(r.rss_kib for r in tail)
    result["rss_growth_kib"] = result["rss_tail_median_kib"] - first
    if len(rows) >= 2:
        xs, ys = [r.n for r in rows], [r.rss_kib / 1024 for r in rows]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        result["slope_mib_per_reload"] = (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
                                          / sum((x - mx) ** 2 for x in xs))
    times = [r.reload_s for r in result["rows"] if r.reload_s is not None and r.outcome == "applied"]
    if times:
        result["reload_s_median"], result["reload_s_max"] = statistics.median(times), max(times)
    ready = [r.ready_s for r in result["rows"] if r.ready_s is not None]
    if ready:
        result["ready_s_median"], result["ready_s_max"] = statistics.median(ready), max(ready)
    stalls = [r.stall_s for r in result["rows"] if r.stall_s is not None]
    if stalls:
        result["stall_s_median"], result["stall_s_max"] = statistics.median(stalls), max(stalls)
    between = result.get("stall_between_s", [])[1:]  # the first window follows the start-up
    if between:
        result["stall_between_s_median"], result["stall_between_s_max"] = statistics.median(between), max(between)


def markdown(r: dict) -> str:
    m, a = r["machine"], r["args"]
    lay = make_layout(a["meters"], a["segments"])
    sizes = sorted({len(s) for s in lay.segments})
    n630 = sum(m_.profile == "eastron-sdm630" for s in lay.segments for m_ in s)
    rows: list[Row] = r["rows"]
    lines = [
        f"## Reload memory: {a['reloads']} SIGHUP reloads of `modbus-bridge run`, {a['meters']} meters on "
        f"{a['segments']} segments",
        "",
        f"`{r['command']}`",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu'] or 'unknown'}), {mib(m['mem_total_kib'])} MiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}, asyncua {m['asyncua']}, uvloop {m['uvloop']}, commit {m['commit'] or '?'}"
        + (f" (at the end: {r['commit_at_end']})" if r.get("commit_at_end") != m["commit"] else "") + ".",
        f"Bridge: `{r['bridge_command']}` (uvloop). Configuration A: {a['segments']} segments × "
        f"{'/'.join(map(str, sizes))} meters on ptys (no wire emulation), {n630} × SDM630 and "
        f"{a['meters'] - n630} × SDM120, units 1..{a['meters']}, poll_interval {POLL_INTERVAL:g} s; Modbus TCP, "
        f"OPC UA (security None) and HTTP on 127.0.0.1. Configuration B: A plus {lay.extra.name} (SDM120, unit "
        f"{lay.extra.unit}) on the last segment, and the first segment renamed seg1 → seg1{RENAMED}. Odd reloads "
        f"apply B, even ones A. RSS read {a['settle']:g} s after /readyz answered 200 and both reads passed.",
        "",
    ]
    st = r.get("start")
    if st:
        ua = r.get("start_ua") or {}
        lines.append(f"Start-up: ready (/readyz 200) {r['start_s']:.1f} s after `run`; OPC UA "
                     f"{fmt(ua.get('variables'), ',')} variables built in {fmt(ua.get('build_s'), '.1f')} s; "
                     f"RSS {mib(st['rss_kib'])} MiB.")
        lines.append("")
    lines += [
        "| reload | config | outcome | SIGHUP → applied | → /readyz 200 | OPC UA variables (build) | Modbus TCP | "
        "OPC UA | RSS MiB | Δ vs reload 1 | log errors |",
        "|---:|:---:|---|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    base = next((x.rss_kib for x in rows if x.rss_kib is not None), None)
    if st:
        lines.append(f"| start | A | | | | {fmt((r.get('start_ua') or {}).get('variables'), ',')} | "
                     f"{'ok' if st['modbus_ok'] else '**FAILED**'} | {'ok' if st['opcua_ok'] else '**FAILED**'} | "
                     f"{mib(st['rss_kib'])} | "
                     f"{fmt((st['rss_kib'] - base) / 1024 if base and st['rss_kib'] else None, '+.1f')} | |")
    for x in rows:
        ua = (f"{x.ua_variables:,} ({x.ua_build_s:.1f} s)" if x.ua_variables is not None else "not rebuilt")
        lines.append(
            f"| {x.n} | {x.config} | {x.outcome if x.outcome == 'applied' else '**' + x.outcome + '**'} | "
            f"{fmt(x.reload_s, '.2f')} s | {fmt(x.ready_s, '.2f')} s | {ua} | "
            f"{'ok' if x.modbus_ok else '**FAILED**'} | {'ok' if x.opcua_ok else '**FAILED**'} | {mib(x.rss_kib)} | "
            f"{fmt((x.rss_kib - base) / 1024 if base and x.rss_kib else None, '+.1f')} | {len(x.errors)} |")
    lines.append("")
    if "rss_tail_median_kib" in r:
        tail = r["tail_reloads"]
        span = f"reloads {tail[0]}–{tail[-1]}" if len(tail) > 1 else f"reload {tail[0]}"
        lines.append(f"**Median RSS of the last {len(tail)} reload{'s' if len(tail) > 1 else ''} ({span}): {mib(r['rss_tail_median_kib'])} MiB "
                     f"against {mib(r['rss_reload1_kib'])} MiB after reload 1: "
                     f"{r['rss_growth_kib'] / 1024:+.1f} MiB** "
                     f"({100 * r['rss_growth_kib'] / r['rss_reload1_kib']:+.1f} %)."
                     + (f" Least-squares trend over reloads 1–{r['measured_reloads']}: "
                        f"{r['slope_mib_per_reload']:+.2f} MiB per reload." if "slope_mib_per_reload" in r else ""))
    if "reload_s_median" in r:
        lines.append(f"Time per reload (SIGHUP → \"reload applied\"): median {r['reload_s_median']:.2f} s, max "
                     f"{r['reload_s_max']:.2f} s; then /readyz 200 after median {fmt(r.get('ready_s_median'), '.2f')} s"
                     f", max {fmt(r.get('ready_s_max'), '.2f')} s.")
    if "stall_s_median" in r:
        lines.append(f"Longest Modbus TCP answer (unit 1, read every {1e3 * PROBE_PAUSE:g} ms on a second connection, "
                     f"{fmt(r.get('stall_reads'), ',')} reads) from SIGHUP to /readyz 200: median "
                     f"{1e3 * r['stall_s_median']:.0f} ms, max {1e3 * r['stall_s_max']:.0f} ms; between reloads: median "
                     f"{1e3 * r.get('stall_between_s_median', math.nan):.1f} ms, max "
                     f"{1e3 * r.get('stall_between_s_max', math.nan):.1f} ms.")
    refused = sum(x.outcome == "refused" for x in rows)
    lines.append(f"Reloads applied / refused / not finished: {sum(x.outcome == 'applied' for x in rows)} / {refused} / "
                 f"{sum(x.outcome in ('timeout', 'died') for x in rows)} of {a['reloads']}.")
    if r.get("end", {}).get("rss_kib") is not None:
        lines.append(f"Bridge at the end: RSS {mib(r['end']['rss_kib'])} MiB, peak (VmHWM) {mib(r['end']['hwm_kib'])} "
                     f"MiB, {r['end']['threads']} threads; Modbus TCP reconnects {r.get('modbus_reconnects', 0)}.")
    lg = r.get("log")
    if lg:
        lines.append(f"Bridge log: {lg['lines']} lines ({', '.join(f'{k} {v}' for k, v in sorted(lg['levels'].items()))})"
                     f"; {lg['n_problems']} ERROR/CRITICAL, {len(lg['tracebacks'])} with a traceback, "
                     f"{lg['n_non_json']} not JSON.")
        for p in lg["problems"][:5]:
            lines.append(f"  - `{p}`")
        for w, count in list(lg["warnings"].items())[:5]:
            lines.append(f"  - warning × {count}: `{w}`")
        for t in lg["tracebacks"][:3]:
            lines.append(f"  - traceback ends: `{t}`")
        for t in lg["non_json"][:3]:
            lines.append(f"  - not JSON: `{t[:200]}`")
    ex = r.get("exit")
    if ex:
        if ex["before_sigterm"]:
            lines.append(f"Bridge exit: **it had exited by itself, status {ex['code']}**, before the SIGTERM.")
        else:
            lines.append("Bridge exit on SIGTERM: " + (f"**killed after {TERM_TIMEOUT:g} s**" if ex["killed"] else
                                                       f"status {ex['code']} after {fmt(ex['seconds'], '.2f')} s") + ".")
    if "other_cpu_pct" in r:
        lines.append(f"Other processes used {r['other_cpu_pct']:.0f} % of a core during the reloads "
                     f"({r['reloads_s']:.0f} s; stolen {r['steal_pct']:.0f} %).")
    if r["failures"]:
        lines += ["", "**FAILED:** " + "; ".join(r["failures"])]
    return "\n".join(lines)


# ====================================================================== main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meters", type=int, default=200,
                    help="meters in all (configuration A), spread over the segments; default 200, at most 246")
    ap.add_argument("--segments", type=int, default=4, help="segments (ptys), default 4")
    ap.add_argument("--reloads", type=int, default=20, help="SIGHUP reloads, alternating B and A (default 20)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds between the checks and the RSS read (default 1)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-': print them instead)")
    args = ap.parse_args(argv)
    if args.segments < 1 or args.meters < args.segments:
        ap.error("--segments must be at least 1, and --meters at least one per segment")
    if args.meters + 1 > MAX_UNITS:
        ap.error(f"--meters {args.meters}: configuration B adds one meter, and units are 1..{MAX_UNITS} across the "
                 f"bridge, so at most {MAX_UNITS - 1}")
    if args.reloads < 1:
        ap.error("--reloads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd())
                          else sys.executable] + sys.argv)
    result: dict = {
        "command": command,
        "bridge_command": shlex.join(["python", "-m", "bridge", "--log-format", "json", "run", "-c", "bridge.yaml"]),
        "machine": machine_info(),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "rows": [],
        "failures": [],
    }
    with tempfile.TemporaryDirectory(prefix="reload-bench-") as tmp:
        try:
            with asyncio.Runner(loop_factory=new_uvloop) as runner:
                runner.run(run(args, Path(tmp), result))
        except (asyncio.CancelledError, KeyboardInterrupt):
            result["failures"].append("interrupted")
            log("interrupted: the bridge and the buses were stopped")
        except Exception as exc:  # noqa: BLE001 (reported with whatever was measured)
            result["failures"].append(f"{type(exc).__name__}: {exc}".split("\n", 1)[0])
            log(f"error: {exc}")
    result["commit_at_end"] = git_describe()
    ex = result.get("exit")
    if ex and not ex["before_sigterm"] and (ex["killed"] or ex["code"] != 0):
        result["failures"].append(f"bridge exit on SIGTERM: status {result['exit']['code']}"
                                  + (" (killed)" if result["exit"]["killed"] else ""))
    if result.get("log", {}).get("n_problems"):
        result["failures"].append(f"{result['log']['n_problems']} ERROR/CRITICAL lines in the bridge log")
    summarise(result)
    out = dict(result, rows=[vars(x) for x in result["rows"]])
    if args.json == "-":
        print(json.dumps(out, indent=2, default=str))
    else:
        print(markdown(result))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    if result["failures"]:
        log("FAILED: " + "; ".join(result["failures"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
