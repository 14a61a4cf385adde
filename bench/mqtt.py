#!/usr/bin/env python3
"""MQTT north side at panel scale: latency, CPU, a broker outage, Modbus TCP alongside, and bytes on the wire.

The issue's benchmark: 240 meters × 14 measurements, all changing every second, published to a local
mosquitto as Sparkplug B and JSON, with Modbus TCP, OPC UA (SecurityPolicy None) and HTTP on too.

Processes (all on 127.0.0.1, fresh ones for every phase):

* **Simulator** (this script with ``--simulate``, uvloop): one ``SimulatedBus`` per segment on a
  pseudo-terminal, ``--meters`` Eastron SDM120 ``SimMeter``s spread over ``--segments`` (default
  8 × 30). The SDM120 profile has exactly 14 measurements, but the stock simulator keeps two of them
  (export active and reactive energy) at 0, and an import energy can stay within one float32 step at
  a small load; the meters here (``AllChangingMeter``) therefore export 0.4 kW / 0.15 kvar, start
  their energy registers below 64 kWh and keep the load at 2 A or more, so **all 14 values change on
  every poll** (the report shows how many did). It records the wall time at which each poll starts
  (the first request of a burst), which is the ground truth for "messages made". No wire-time
  emulation unless ``--emulate-wire``.
* **Bridge**, the process measured: ``python -m bridge --log-format json run -c FILE`` with Modbus
  TCP, OPC UA (security None), HTTP (``/status.json``) and ``mqtt:`` with ``sparkplug:`` (group
  ``bench``, edge node ``panel-1``) and ``json:`` (topic ``modbus-bridge/panel-1``); a fresh state
  directory per phase.
* **mosquitto** (``tests/broker.py``'s ``Mosquitto``: persistence on, a fresh directory per phase).
* **Independent subscribers**: two ``tests/mqtt_node_client/subscribe.mjs`` processes (mqtt.js +
  the Eclipse Tahu Sparkplug decoder), one on ``spBv1.0/bench/#``, one on ``modbus-bridge/panel-1/#``,
  both with a persistent session (``SUBSCRIBER_ID``), so the JSON one gets, after a broker restart,
  what arrived for it while it was reconnecting. Latency = the subscriber's ``received`` − the
  message's poll-reply time (JSON ``ts``; Sparkplug metric ``timestamp``), both this machine's clock.
* **Byte counter** (``--count-bytes``, aiomqtt, MQTT 5): a wildcard subscriber on both trees that
  counts each message's topic and payload bytes, per flavour and message type.
* **Modbus TCP probe** (``--probe``): one connection, an FC4 read of one unit's voltage every
  ``--probe-period`` (10 ms), rotating through every unit; each reply checked.

Phases (``--phases``, default all, in this order):

1. ``baseline``: the bridge without ``mqtt:`` at ``--interval``: the Modbus TCP probe for
   ``--probe-seconds``, the segments' cycle time (``/status.json`` every 2 s), the intervals between a
   meter's polls (simulator), the bridge's CPU.
2. ``mqtt``: the whole bridge at ``--interval`` for ``--seconds``: latency of every JSON message and
   every Sparkplug DDATA, bytes per flavour (aliases on), the bridge's, broker's and helpers' CPU;
   the same probe and bus figures over the window's first ``--probe-seconds``.
3. ``outage`` (on the ``mqtt`` phase's bridge): ``kill -9`` of mosquitto for ``--outage`` seconds,
   restarted on the same port with its persistence directory; ``/status.json`` (``upstream.mqtt``
   ``queue_*``) and the queue file's size every second. Then: JSON messages made (simulator polls
   since the window began) vs received (one message with a ``ts`` inside each poll), the bridge's
   reconnection delay (its log), the backlog's replay speed (seconds buffered ÷ seconds from
   reconnection to the last backlog message received), live latency while it replays, queue bytes
   per buffered minute.
4. ``fast``: the whole bridge at ``--fast-interval`` (0.5 s: 6,720 metric updates/s at 240 meters)
   for ``--seconds``: the bridge's CPU (nothing else asks it anything during the window).
5. ``noalias``: Sparkplug only, ``aliases: false``, for ``--bytes-seconds``: bytes per meter per hour.

Verdicts: latency p99 ≤ 250 ms over every message of the window (the report also shows it without the
messages published under an older poll's time); CPU < 50 % with the pollers on schedule (≥ 98 % of the
wanted polls); 0 JSON lost = every poll since the ``mqtt`` window began (one message each, as every value
changes) has a message with a ``ts`` inside it, and the queue drained; replay ≥ 10× = seconds buffered
(kill → reconnection) ÷ seconds from reconnection to the last backlog message received; live p99 ≤ 500 ms
over the messages made during the replay (not judged when none was); Modbus TCP p99 "unchanged" = the MQTT
phase's p99 ≤ the baseline's + max(0.2 ms, the spread of the baseline's 5-second p99s); bus cycle
"unchanged" = mean segment cycle time within max(1 % of the interval, 10 ms) and a meter's poll-interval
p99 ≤ max(baseline p99 + 10 ms, baseline max).

With 2 or more CPUs the bridge is pinned to the last CPU and everything else to the first
(``--no-pin`` turns this off); the helpers' CPU use is reported, since it is what delays the
subscribers and the probe. On a machine with 2 shared cores, run it at a small scale while developing:

    .venv/bin/python bench/mqtt.py --meters 10 --seconds 20 --outage 10 --warmup 5 --probe-seconds 10
    .venv/bin/python bench/mqtt.py                    # the issue's scale: about 10 minutes

Output: a Markdown table on stdout (targets, met / not met), progress on stderr; ``--json PATH``
writes the results as JSON too (``-``: JSON on stdout). Exit status 1 when something broke (a
process failed, errors in the bridge log, a probe error); with ``--strict``, 2 when a target is missed.
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import os
import re
import select
import shlex
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from benchlib import (
    HOST,
    NOISY_PCT,
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

PROFILE = "eastron-sdm120"  # 14 float32 measurements
HISTORY = "/history"  # the JSON backlog's topic suffix (bridge/north/mqtt/side.py)
N_MEASUREMENTS = 14
GROUP, NODE = "bench", "panel-1"
JSON_TOPIC = f"modbus-bridge/{NODE}"
SUBSCRIBER = ROOT / "tests" / "mqtt_node_client" / "subscribe.mjs"
PHASES = ("baseline", "mqtt", "outage", "fast", "noalias")
POLL_GAP = 0.2  # s: a request to a meter after this much quiet (and not a repeat) starts a new poll
SLACK = 0.002  # s: a poll-reply ts (whole ms) may read up to this much before the poll's first request
VOLTAGE = (0x0000, 2, 200.0, 260.0)  # SDM120 voltage: address, registers, plausible range
STATUS_PERIOD = 2.0  # s between /status.json samples of the segments while the probe runs
SUBWINDOW = 5.0  # s: the probe's p99 per sub-window, for its noise

TARGET_LATENCY_MS = 250.0
TARGET_CPU_PCT = 50.0
TARGET_REPLAY_X = 10.0
TARGET_LIVE_MS = 500.0
NOISE_FLOOR_MS = 0.2  # the probe's p99 may move this much at least before it counts as changed
CYCLE_TOLERANCE = 0.01  # the mean cycle time may move 1 % of the interval (or 10 ms)


def meter_name(unit: int) -> str:
    return f"m{unit:03d}"


def layout(n_meters: int, n_segments: int) -> list[list[int]]:
    """Units per segment, as even as possible (slave = position + 1, unit = global number)."""
    n_seg = max(1, min(n_segments, n_meters))
    base, extra = divmod(n_meters, n_seg)
    out, unit = [], 1
    for s in range(n_seg):
        k = base + (1 if s < extra else 0)
        out.append(list(range(unit, unit + k)))
        unit += k
    return out


def stats_ms(values_ms) -> dict:
    v = sorted(values_ms)
    return {"n": len(v), "p50": percentile(v, 0.5), "p99": percentile(v, 0.99),
            "max": v[-1] if v else math.nan, "mean": statistics.fmean(v) if v else math.nan}


# ====================================================================== simulator process
def simulate_main(spec: dict) -> None:
    with asyncio.Runner(loop_factory=new_uvloop) as runner:
        runner.run(_simulate(spec))


async def _simulate(spec: dict) -> None:
    from bridge.config.profiles import get_builtin
    from bridge.south.simulator import SimMeter, SimulatedBus

    class AllChangingMeter(SimMeter):
        """A SimMeter whose 14 SDM120 values all move on every poll (see the module's docstring), and
        which records when each of its polls starts (wall time)."""

        def __init__(self, name: str, *a, **kw):
            self.name = name
            self._export: list[float] | None = None  # kWh, kvarh; set on the first _physics call
            self.last_rx = -math.inf
            self.last_pdu = b""
            self.polls = 0
            self.repeats = 0
            self.poll_start: float | None = None
            self.intervals: list[float] = []
            self.poll_times: list[float] = []
            super().__init__(*a, **kw)

        def _physics(self, dt: float) -> dict[str, float]:
            if self._export is None:
                self._energy = 20.0 + 30.0 * self._rng.random()  # below 64 kWh: a float32 step < 4e-6 kWh
                self._export = [5.0 + 20.0 * self._rng.random(), 2.0 + 10.0 * self._rng.random()]
            self._load = max(self._load, 2.0)  # ≥ 0.4 kW: the import energy moves ≥ 5e-5 kWh in 0.5 s
            values = super()._physics(dt)
            self._export[0] += 0.4 * dt / 3600
            self._export[1] += 0.15 * dt / 3600
            for name, v in (("export_active_energy", self._export[0]), ("export_reactive_energy", self._export[1])):
                if name in values:
                    values[name] = v
            return values

        def handle(self, pdu: bytes) -> bytes:
            now = time.monotonic()
            if pdu == self.last_pdu and now - self.last_rx < POLL_GAP:
                self.repeats += 1
            elif now - self.last_rx > POLL_GAP:
                self.polls += 1
                self.poll_times.append(time.time())
                if self.poll_start is not None:
                    self.intervals.append(now - self.poll_start)
                self.poll_start = now
            self.last_rx, self.last_pdu = now, bytes(pdu)
            return super().handle(pdu)

    profile = get_builtin(PROFILE)
    buses = []
    for seg, units in enumerate(spec["segments"]):
        meters = [AllChangingMeter(meter_name(u), i + 1, profile, animate=True, seed=u) for i, u in enumerate(units)]
        buses.append(SimulatedBus(meters, baudrate=spec["baudrate"], emulate_wire=spec["emulate_wire"],
                                  turnaround=spec["turnaround"] if spec["emulate_wire"] else 0.0))
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
            snap = {
                "t": time.time(),
                "requests": sum(b.stats.requests for b in buses),
                "answered": sum(b.stats.answered for b in buses),
                "polls": sum(m.polls for m in meters),
                "repeats": sum(m.repeats for m in meters),
                "intervals": {"n": len(intervals), "p50": percentile(intervals, 0.5),
                              "p99": percentile(intervals, 0.99), "max": intervals[-1] if intervals else math.nan,
                              "mean": statistics.fmean(intervals) if intervals else math.nan},
                "poll_times": {m.name: [round(t, 4) for t in m.poll_times] for m in meters},
            }
            for m in meters:
                m.intervals.clear()
                m.poll_times.clear()
            print(json.dumps(snap), flush=True)
    finally:
        for bus in buses:
            bus.close()


class Simulator:
    """The ``--simulate`` child: started, asked for snapshots, stopped by closing its stdin."""

    def __init__(self, spec: dict):
        self.argv = [sys.executable, str(Path(__file__).resolve()), "--simulate", json.dumps(spec)]
        self.stderr = tempfile.NamedTemporaryFile(prefix="mqtt-sim-", suffix=".log")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     cwd=ROOT)
        self.pid = self.proc.pid
        self.ports: list[str] = json.loads(self._readline(30.0))["ports"]

    def _readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line:
            raise RuntimeError(f"the simulator did not answer (exit {self.proc.poll()}):\n"
                               f"{Path(self.stderr.name).read_text(errors='replace')[-3000:]}")
        return line

    def snap(self) -> dict:
        self.proc.stdin.write(b"snap\n")
        self.proc.stdin.flush()
        return json.loads(self._readline(30.0))

    def close(self) -> int | None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            self.stderr.close()
        return self.proc.returncode


# ====================================================================== Modbus TCP probe process
def probe_main(port: int, units: list[int], seconds: float, period: float) -> None:
    with asyncio.Runner(loop_factory=new_uvloop) as runner:
        print(json.dumps(runner.run(_probe(port, units, seconds, period))), flush=True)


async def _probe(port: int, units: list[int], seconds: float, period: float) -> dict:
    """One connection, one FC4 voltage read every ``period``, rotating through ``units``; each reply checked."""
    pdu = struct.pack(">BHH", 4, VOLTAGE[0], VOLTAGE[1])
    out = {"t": [], "ms": [], "errors": {}}

    def error(kind: str) -> None:
        out["errors"][kind] = out["errors"].get(kind, 0) + 1

    conn = await Conn.open(port)
    t0 = time.monotonic()
    k = 0
    next_at = t0
    while (now := time.monotonic()) < t0 + seconds:
        unit = units[k % len(units)]
        k += 1
        try:
            reply, latency = await conn.timed_request(unit, pdu)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            error(type(exc).__name__)
            await conn.close()
            conn = await Conn.open(port)
        else:
            if len(reply) != 2 + 2 * VOLTAGE[1] or reply[:2] != bytes((4, 2 * VOLTAGE[1])):
                error(f"reply {reply[:2].hex()}")
            elif not VOLTAGE[2] <= struct.unpack(">f", reply[2:6])[0] <= VOLTAGE[3]:
                error("implausible voltage")
            else:
                out["t"].append(round(now - t0, 4))
                out["ms"].append(latency * 1e3)
        next_at += period
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await conn.close()
    return out


class Probe:
    def __init__(self, port: int, units: list[int], seconds: float, period: float):
        argv = [sys.executable, str(Path(__file__).resolve()), "--probe", str(port), ",".join(map(str, units)),
                str(seconds), str(period)]
        self.stderr = tempfile.NamedTemporaryFile(prefix="mqtt-probe-", suffix=".log")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr,
                                     cwd=ROOT)
        self.pid = self.proc.pid
        self.seconds = seconds

    def result(self) -> dict:
        out, _ = self.proc.communicate(timeout=self.seconds + 60)
        if self.proc.returncode != 0:
            raise RuntimeError(f"the Modbus TCP probe failed ({self.proc.returncode}):\n"
                               f"{Path(self.stderr.name).read_text(errors='replace')[-3000:]}")
        self.stderr.close()
        return json.loads(out)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            self.stderr.close()


def probe_summary(raw: dict) -> dict:
    """p50/p99/max, and the p99 of each SUBWINDOW-second slice (its spread is the run's noise)."""
    out = stats_ms(raw["ms"])
    by: dict[int, list[float]] = defaultdict(list)
    for t, ms in zip(raw["t"], raw["ms"]):
        by[int(t // SUBWINDOW)].append(ms)
    subs = [percentile(sorted(v), 0.99) for _, v in sorted(by.items()) if len(v) >= 50]
    out.update(sub_p99=subs, errors=raw["errors"], n_errors=sum(raw["errors"].values()))
    return out


# ====================================================================== byte counter process
def count_bytes_main(port: int) -> None:
    with asyncio.Runner(loop_factory=new_uvloop) as runner:
        runner.run(_count_bytes(port))


def publish_packet_bytes(topic_len: int, payload_len: int, qos: int) -> int:
    """An MQTT 5 PUBLISH as the bridge sends it: fixed header, topic, packet id (QoS > 0), an empty
    property list, payload."""
    remaining = 2 + topic_len + (2 if qos else 0) + 1 + payload_len
    varint = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
    return 1 + varint + remaining


async def _count_bytes(port: int) -> None:
    """Subscribe to both trees; on ``agg T0 T1`` print per flavour/type: messages, topic bytes, payload
    bytes, MQTT PUBLISH bytes, PUBACK bytes (4 per QoS 1 message), for messages received in [T0, T1]."""
    import aiomqtt

    records: list[tuple[float, str, int, int, int]] = []
    ready = asyncio.Event()
    state = {"error": ""}

    async def subscribe() -> None:
        try:
            async with aiomqtt.Client(HOST, port, identifier=f"bench-bytes-{os.getpid()}",
                                      protocol=aiomqtt.ProtocolVersion.V5) as client:
                await client.subscribe(f"spBv1.0/{GROUP}/#", qos=1)
                await client.subscribe(f"{JSON_TOPIC}/#", qos=1)
                ready.set()
                async for message in client.messages:
                    topic = message.topic.value
                    payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
                    if topic.startswith("spBv1.0/"):
                        key = "sparkplug/" + topic.split("/")[2]
                    else:
                        key = "json/status" if topic.endswith("/status") else "json/state"
                    records.append((time.time(), key, len(topic.encode()), len(payload), int(message.qos)))
        except aiomqtt.MqttError as exc:
            state["error"] = str(exc)
            ready.set()

    task = asyncio.create_task(subscribe())
    await ready.wait()
    print(json.dumps({"ready": not state["error"], "error": state["error"]}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        parts = line.split()
        if len(parts) != 3 or parts[0] != b"agg":
            continue
        t0, t1 = float(parts[1]), float(parts[2])
        agg: dict[str, dict[str, int]] = {}
        for t, key, tl, pl, qos in records:
            if t0 <= t <= t1:
                a = agg.setdefault(key, {"n": 0, "topic": 0, "payload": 0, "packet": 0, "puback": 0, "qos1": 0})
                a["n"] += 1
                a["topic"] += tl
                a["payload"] += pl
                a["packet"] += publish_packet_bytes(tl, pl, qos)
                a["puback"] += 4 if qos else 0
                a["qos1"] += 1 if qos else 0
        print(json.dumps({"agg": agg, "error": state["error"]}), flush=True)
    task.cancel()


class ByteCounter:
    def __init__(self, port: int):
        argv = [sys.executable, str(Path(__file__).resolve()), "--count-bytes", str(port)]
        self.stderr = tempfile.NamedTemporaryFile(prefix="mqtt-bytes-", suffix=".log")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, cwd=ROOT)
        self.pid = self.proc.pid
        first = json.loads(self._readline(30.0))
        if not first.get("ready"):
            raise RuntimeError(f"the byte counter could not subscribe: {first.get('error')}")

    def _readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line:
            raise RuntimeError(f"the byte counter did not answer (exit {self.proc.poll()}):\n"
                               f"{Path(self.stderr.name).read_text(errors='replace')[-3000:]}")
        return line

    def agg(self, t0: float, t1: float) -> dict:
        self.proc.stdin.write(f"agg {t0} {t1}\n".encode())
        self.proc.stdin.flush()
        return json.loads(self._readline(30.0))["agg"]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            self.stderr.close()


# ====================================================================== the independent subscribers
class NodeSubscriber:
    """``node subscribe.mjs URL FILTER`` with a persistent session; a thread reads its lines into compact
    records: JSON states ``(received, meter, ts, status, values changed since its previous message,
    values, payload bytes)`` and Sparkplug DDATA ``(received, device, ts, metrics, historical)`` (seconds)."""

    def __init__(self, url: str, topic_filter: str, client_id: str):
        self.stderr = tempfile.NamedTemporaryFile(prefix=f"mqtt-sub-{client_id}-", suffix=".log")
        self.proc = subprocess.Popen(
            ["node", str(SUBSCRIBER), url, topic_filter], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self.stderr, cwd=SUBSCRIBER.parent,
            env={**os.environ, "NODE_NO_WARNINGS": "1", "SUBSCRIBER_ID": client_id})
        self.pid = self.proc.pid
        self.json: list[tuple] = []
        self.ddata: list[tuple] = []
        self.kinds: Counter = Counter()
        self.seq_gaps: list[float] = []
        self.problems: list[str] = []
        self._values: dict[str, tuple] = {}
        self._seq: int | None = None
        self.subscribed = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def wait_subscribed(self, timeout: float = 30.0) -> None:
        if not self.subscribed.wait(timeout):
            raise RuntimeError(f"the subscriber did not subscribe (exit {self.proc.poll()}):\n"
                               f"{Path(self.stderr.name).read_text(errors='replace')[-2000:]}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                m = json.loads(line)
                if "topic" not in m:
                    if m.get("subscribed"):
                        self.subscribed.set()
                    continue
                self._take(m)
            except Exception as exc:  # noqa: BLE001 (a line we cannot read: counted, shown)
                if len(self.problems) < 20:
                    self.problems.append(f"{type(exc).__name__}: {exc}: {line[:200]!r}")

    def _take(self, m: dict) -> None:
        topic, received = m["topic"], m["received"] / 1000
        if m.get("retain"):
            self.kinds["retained"] += 1
            return
        if topic.startswith("spBv1.0/"):
            parts = topic.split("/")
            kind = parts[2]
            self.kinds[kind] += 1
            p = m["payload"]
            if not isinstance(p, dict) or "decode_error" in p:
                raise ValueError(f"undecodable Sparkplug payload on {topic}")
            seq = p.get("seq")
            if kind == "NBIRTH":
                self._seq = seq
            elif seq is not None and kind in ("DBIRTH", "NDATA", "DDATA", "DDEATH"):
                if self._seq is not None and seq != (self._seq + 1) % 256:
                    self.seq_gaps.append(received)
                self._seq = seq
            if kind == "DDATA":
                metrics = p.get("metrics") or []
                ts = metrics[0].get("timestamp") if metrics else p.get("timestamp")
                hist = any(x.get("isHistorical") for x in metrics)
                self.ddata.append((received, parts[4], ts / 1000, len(metrics), hist))
            return
        leaf = topic[len(JSON_TOPIC) + 1:]
        if leaf == "status":
            self.kinds[f"status {m['payload']}"] += 1
            return
        hist = leaf.endswith(HISTORY)  # the backlog after an outage, beside the live states
        meter = leaf[:-len(HISTORY)] if hist else leaf
        self.kinds["history" if hist else "state"] += 1
        body = json.loads(m["payload"])
        values = tuple((body.get("values") or {}).values())
        prev = self._values.get(leaf)
        changed = sum(1 for a, b in zip(prev, values) if a != b) if prev is not None else None
        self._values[leaf] = values
        ts = body.get("ts")
        self.json.append((received, meter, None if ts is None else ts / 1000, body.get("status"), changed,
                          len(values), len(m["payload"].encode()) + len(topic.encode()), hist))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.stderr.close()


# ====================================================================== the bridge and one phase's processes
def config_text(segments: list[list[int]], ports: list[str], interval: float, p: dict, state_dir: Path,
                mqtt: str | None, broker_url: str, args) -> str:
    lines = ["# written by bench/mqtt.py: simulated SDM120 meters (all 14 values changing) on pseudo-terminals",
             "segments:"]
    for seg, (units, port) in enumerate(zip(segments, ports)):
        lines += [f"  - name: seg{seg + 1}", f"    port: {port}", f"    baudrate: {args.baudrate}",
                  "    timeout: 0.5", "    retries: 1", "    meters:"]
        for i, unit in enumerate(units):
            lines.append(f"      - {{name: {meter_name(unit)}, slave: {i + 1}, unit: {unit}, profile: {PROFILE}, "
                         f"poll_interval: {interval:g}}}")
    lines += [
        "stale_after: 10.0",
        f"state_dir: {state_dir}",
        "modbus_tcp:", f"  listen: {HOST}:{p['modbus']}",
        "opcua:", f"  endpoint: opc.tcp://{HOST}:{p['opcua']}/bridge", "  security: [None]", "  certificate_dir: pki",
        "http:", f"  listen: {HOST}:{p['http']}",
    ]
    if mqtt:
        lines += ["mqtt:", f"  brokers: [{broker_url}]", f"  client_id: {NODE}",
                  f"  sparkplug: {{group_id: {GROUP}, edge_node_id: {NODE}, aliases: {'false' if mqtt == 'noalias' else 'true'}}}"]
        if mqtt == "both":
            lines.append(f"  json: {{topic: {JSON_TOPIC}}}")
    return "\n".join(lines) + "\n"


def parse_log_time(text: str) -> float:
    """The JSON log's ``time`` (local, ms) as epoch seconds."""
    return time.mktime(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")) + int(text[20:23]) / 1000


class Bridge(BridgeProcess):
    def __init__(self, config_path: Path, cpu: int | None, name: str):
        super().__init__(["--log-format", "json", "run", "-c", str(config_path)], cpu, prefix=f"mqtt-bridge-{name}-")

    def entries(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                e = {"level": "raw", "message": line}
            out.append(e if isinstance(e, dict) else {"level": "raw", "message": line})
        return out

    def connected_times(self, link: str) -> list[float]:
        return [parse_log_time(e["time"]) for e in self.entries()
                if e.get("message", "").startswith(f"MQTT {link}: connected to") and "time" in e]


async def get_status(port: int) -> dict:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)
    try:
        writer.write(b"GET /status.json HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"/status.json: {head[:100]!r}")
    return json.loads(body)


class Stack:
    """One phase's processes: simulator, mosquitto, subscribers, byte counter, bridge."""

    def __init__(self, name: str, args, tmp: Path, interval: float, mqtt: str | None, pinned: dict | None):
        self.name, self.args, self.interval, self.mqtt, self.pinned = name, args, interval, mqtt, pinned
        self.dir = tmp / name
        self.dir.mkdir(parents=True)
        self.segments = layout(args.meters, args.segments)
        self.units = [u for seg in self.segments for u in seg]
        self.names = [meter_name(u) for u in self.units]
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        self.ports = dict(zip(("modbus", "opcua", "http"), sorted(ports)))
        self.sim: Simulator | None = None
        self.broker = None
        self.sp_sub: NodeSubscriber | None = None
        self.js_sub: NodeSubscriber | None = None
        self.counter: ByteCounter | None = None
        self.bridge: Bridge | None = None
        self.poll_times: dict[str, list[float]] = defaultdict(list)
        self.closed = False
        self.exit: dict = {}
        self.log: dict = {}

    def start(self) -> None:
        a = self.args
        self.sim = Simulator({"segments": self.segments, "emulate_wire": a.emulate_wire, "baudrate": a.baudrate,
                              "turnaround": a.turnaround})
        url = ""
        if self.mqtt:
            from broker import Mosquitto  # tests/broker.py

            self.broker = Mosquitto(self.dir / "broker", save_every_change=False).start()  # saves once a second
            url = self.broker.url
            self.sp_sub = NodeSubscriber(url, f"spBv1.0/{GROUP}/#", f"bench-sparkplug-{self.name}")
            if self.mqtt == "both":
                self.js_sub = NodeSubscriber(url, f"{JSON_TOPIC}/#", f"bench-json-{self.name}")
            for sub in (self.sp_sub, self.js_sub):
                if sub is not None:
                    sub.wait_subscribed()
            self.counter = ByteCounter(self.broker.port)
        config = self.dir / "bridge.yaml"
        config.write_text(config_text(self.segments, self.sim.ports, self.interval, self.ports,
                                      self.dir / "state", self.mqtt, url, a))
        self.bridge = Bridge(config, self.pinned["bridge"] if self.pinned else None, self.name)
        log(f"[{self.name}] bridge pid {self.bridge.pid}: {len(self.units)} meters on {len(self.segments)} segments "
            f"every {self.interval:g} s; MQTT {self.mqtt or 'off'}"
            + (f" (mosquitto pid {self.broker.proc.pid}, port {self.broker.port})" if self.broker else ""))

    def pids(self) -> set[int]:
        out = {os.getpid()}
        for p in (self.sim, self.sp_sub, self.js_sub, self.counter, self.bridge):
            if p is not None:
                out.add(p.pid)
        if self.broker is not None and self.broker.proc is not None:
            out.add(self.broker.proc.pid)
        return out

    def cpu(self) -> dict[str, float | None]:
        """CPU seconds so far of each process of the phase (and this one)."""
        def broker_pid():
            return self.broker.proc.pid if self.broker is not None and self.broker.proc is not None else None
        out = {"t": time.monotonic(), "bridge": proc_cpu_seconds(self.bridge.pid), "script": proc_cpu_seconds(),
               "simulator": proc_cpu_seconds(self.sim.pid)}
        for key, p in (("sparkplug subscriber", self.sp_sub), ("json subscriber", self.js_sub),
                       ("byte counter", self.counter)):
            if p is not None:
                out[key] = proc_cpu_seconds(p.pid)
        if broker_pid() is not None:
            out["mosquitto"] = proc_cpu_seconds(broker_pid())
        return out

    def snap(self) -> dict:
        s = self.sim.snap()
        for name, times in s.pop("poll_times").items():
            self.poll_times[name].extend(times)
        return s

    async def wait_ready(self, timeout: float) -> float:
        """Until every server listens, every meter is online, and (MQTT) every meter's first JSON state and
        Sparkplug DDATA reached the subscribers. Returns the seconds since the bridge started."""
        deadline = time.monotonic() + timeout
        needles = ["Modbus TCP listening", "OPC UA listening", "HTTP listening"]
        while not all(n in (text := self.bridge.log_text()) for n in needles):
            if self.bridge.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the bridge did not start (exit {self.bridge.proc.poll()}):\n{text[-3000:]}")
            await asyncio.sleep(0.2)
        while True:
            missing = []
            try:
                st = await get_status(self.ports["http"])
                online = {m["name"] for s in st["segments"] for m in s["meters"] if m["online"]}
                missing = [n for n in self.names if n not in online]
            except (OSError, asyncio.TimeoutError, RuntimeError, ValueError):
                missing = ["(status)"]
            if not missing and self.js_sub is not None:
                good = {r[1] for r in list(self.js_sub.json) if r[3] == "good"}
                missing = [f"json {n}" for n in self.names if n not in good]
            if not missing and self.sp_sub is not None:
                seen = {r[1] for r in list(self.sp_sub.ddata)}
                missing = [f"sparkplug {n}" for n in self.names if n not in seen]
            if not missing:
                return time.monotonic() - self.bridge.t_start
            if self.bridge.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"[{self.name}] not ready after {timeout:g} s: {len(missing)} missing, e.g. "
                                   f"{missing[:5]}\n{self.bridge.log_text()[-2000:]}")
            await asyncio.sleep(0.5)

    def close(self) -> None:
        """Stop everything (idempotent; safe on a half-started stack): the bridge first (SIGTERM), then the
        subscribers, the broker and the simulator."""
        if self.closed:
            return
        self.closed = True
        if self.bridge is not None:
            with contextlib.suppress(Exception):
                self.bridge.terminate()
                self.exit = {"code": self.bridge.exit_code, "seconds": self.bridge.exit_seconds,
                             "killed": self.bridge.killed}
                self.log = analyse_log(self.bridge.entries())
            with contextlib.suppress(Exception):
                self.bridge.close()
        for p in (self.counter, self.sp_sub, self.js_sub):
            if p is not None:
                with contextlib.suppress(Exception):
                    p.close()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                self.broker.stop()
        if self.sim is not None:
            with contextlib.suppress(Exception):
                self.sim.close()


def analyse_log(entries: list[dict]) -> dict:
    levels = Counter(e.get("level", "?") for e in entries)
    problems = [e for e in entries if e.get("level") in ("error", "critical") or "exception" in e
                or e.get("message", "").startswith("Traceback")]
    warnings = [e for e in entries if e.get("level") == "warning"]
    def short(e: dict) -> str:
        text = f"{e.get('time', '')} {e.get('level', '')} {e.get('logger', '')}: {e.get('message', '')}"[:300]
        exc = [line for line in e.get("exception", "").splitlines() if line.strip()]
        return text + ("".join(f"\n      {line[:200]}" for line in exc[-4:]) if exc else "")

    kinds = Counter(f"{e.get('logger', '')}: {re.sub(r'[0-9]+', 'N', e.get('message', ''))}"[:200] for e in warnings)
    return {"levels": dict(levels), "n_problems": len(problems), "problems": [short(e) for e in problems[:10]],
            "n_warnings": len(warnings), "warning_kinds": kinds.most_common(10)}


def cpu_delta(c0: dict, c1: dict) -> dict[str, float]:
    dt = c1["t"] - c0["t"]
    return {k: 100 * (c1[k] - c0[k]) / dt for k in c0 if k != "t" and c0[k] is not None and c1.get(k) is not None}


# ====================================================================== analysis
def coverage(poll_times: dict[str, list[float]], stamps: dict[str, list[float]], t_from: float, t_to: float) -> dict:
    """Polls whose start lies in [t_from, t_to] (and whose next poll started by t_to) that have a message
    with a poll-reply time inside them: the poll made one (every value changes), so none is lost."""
    checked, missing = 0, []
    for name, polls in poll_times.items():
        ts = stamps.get(name, [])
        for p, q in zip(polls, polls[1:]):
            if p < t_from or q > t_to:
                continue
            checked += 1
            j = bisect.bisect_left(ts, p - SLACK)
            if not (j < len(ts) and ts[j] < q - SLACK):
                missing.append((name, p))
    return {"checked": checked, "missing": len(missing),
            "examples": [f"{n} poll at {time.strftime('%H:%M:%S', time.localtime(p))}.{int(p % 1 * 1000):03d}"
                         for n, p in missing[:5]]}


def stamps_of(records, pick=lambda r: True) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r[2] is not None and pick(r):
            out[r[1]].append(r[2])
    for v in out.values():
        v.sort()
    return out


def json_quality(records) -> dict:
    """Per meter, in the order received: duplicates (the previous message's ts again with the same values:
    QoS 1 redelivery), split polls (the previous message's ts again with other values: values of a newer
    poll under an older poll's ts), ts going backwards (out of order); values changed per message."""
    last: dict[str, float] = {}
    dup = split = back = 0
    changed = [r[4] for r in records if r[4] is not None and r[3] == "good"]
    for r in records:
        if r[2] is None:
            continue
        stream = (r[1], r[7])  # live and history are two streams, each in order
        prev = last.get(stream)
        if prev is not None:
            if r[2] == prev:
                if r[4]:
                    split += 1
                else:
                    dup += 1
            elif r[2] < prev:
                back += 1
        last[stream] = r[2]
    return {"duplicates": dup, "split": split, "out_of_order": back, "messages": len(records),
            "changed_mean": statistics.fmean(changed) if changed else math.nan,
            "all_changed_pct": 100 * sum(1 for c in changed if c == N_MEASUREMENTS) / len(changed) if changed else math.nan,
            "values": statistics.fmean(r[5] for r in records) if records else math.nan}


def own_ts(records) -> list:
    """The records (in the order received) whose ts is not their meter's previous message's ts again."""
    last: dict[str, float] = {}
    out = []
    for r in records:
        if r[2] is not None and last.get(r[1]) != r[2]:
            out.append(r)
        last[r[1]] = r[2]
    return out


def latency_window(stack: Stack, w0: float, w1: float) -> dict:
    out = {}
    if stack.js_sub is not None:
        every = [r for r in list(stack.js_sub.json) if r[2] is not None and r[3] == "good" and not r[7]]
        js = [r for r in every if w0 <= r[2] <= w1]
        out["json"] = stats_ms([(r[0] - r[2]) * 1e3 for r in js])
        out["json_own_ts"] = stats_ms([(r[0] - r[2]) * 1e3 for r in own_ts(every) if w0 <= r[2] <= w1])
        out["json_quality"] = json_quality(js)
        out["json_changed_per_s"] = sum(r[4] or 0 for r in js) / (w1 - w0)
        out["json_per_s"] = len(js) / (w1 - w0)
        out["json_bytes_mean"] = statistics.fmean(r[6] for r in js) if js else math.nan
    if stack.sp_sub is not None:
        every = [r for r in list(stack.sp_sub.ddata) if not r[4]]
        dd = [r for r in every if w0 <= r[2] <= w1]
        out["sparkplug"] = stats_ms([(r[0] - r[2]) * 1e3 for r in dd])
        out["sparkplug_own_ts"] = stats_ms([(r[0] - r[2]) * 1e3 for r in own_ts(every) if w0 <= r[2] <= w1])
        out["sparkplug_metrics_mean"] = statistics.fmean(r[3] for r in dd) if dd else math.nan
        out["sparkplug_metrics_per_s"] = sum(r[3] for r in dd) / (w1 - w0)
        out["sparkplug_per_s"] = len(dd) / (w1 - w0)
        out["seq_gaps"] = sum(1 for t in stack.sp_sub.seq_gaps if w0 <= t <= w1 + 5)
    return out


def bytes_summary(agg: dict, window: float, meters: int) -> dict:
    """Per flavour: messages/s, and bytes per meter per hour (topic + payload; MQTT packets with PUBACKs)."""
    out = {}
    for flavour in ("sparkplug", "json"):
        keys = [k for k in agg if k.startswith(flavour + "/")]
        if not keys:
            continue
        tot = {f: sum(agg[k][f] for k in keys) for f in ("n", "topic", "payload", "packet", "puback")}
        data_key = "sparkplug/DDATA" if flavour == "sparkplug" else "json/state"
        d = agg.get(data_key, {"n": 0, "topic": 0, "payload": 0, "packet": 0, "puback": 0})
        per_h = 3600 / window / meters
        out[flavour] = {
            "msgs_per_s": tot["n"] / window,
            "tp_per_meter_hour": (tot["topic"] + tot["payload"]) * per_h,
            "wire_per_meter_hour": (tot["packet"] + tot["puback"]) * per_h,
            "data_msgs": d["n"], "data_topic_mean": d["topic"] / d["n"] if d["n"] else math.nan,
            "data_payload_mean": d["payload"] / d["n"] if d["n"] else math.nan,
            "data_tp_per_meter_hour": (d["topic"] + d["payload"]) * per_h,
            "by_kind": {k: agg[k] for k in sorted(keys)},
        }
    return out


def births(agg: dict) -> dict:
    """Sizes of the Sparkplug births (topic + payload), from everything the counter saw."""
    out = {}
    for kind in ("NBIRTH", "DBIRTH"):
        a = agg.get(f"sparkplug/{kind}")
        if a and a["n"]:
            out[kind] = {"n": a["n"], "mean_bytes": (a["topic"] + a["payload"]) / a["n"],
                         "mean_packet": a["packet"] / a["n"]}
    return out


# ====================================================================== phases
async def settle(stack: Stack, args, what: str) -> float:
    ready = await stack.wait_ready(args.ready_timeout)
    log(f"[{stack.name}] ready {ready:.1f} s after start; warm-up {args.warmup:g} s ({what})")
    await asyncio.sleep(args.warmup)
    return ready


async def measure_bus(stack: Stack, seconds: float, args) -> dict:
    """The Modbus TCP probe for ``seconds``; meanwhile the segments' cycle time and utilisation from
    /status.json every STATUS_PERIOD; the simulator's poll intervals over the same time."""
    stack.snap()
    probe = Probe(stack.ports["modbus"], stack.units, seconds, args.probe_period)
    cycles, busy, samples = [], [], 0
    try:
        # read its output while it runs: a full pipe (a long probe writes more than 64 KiB) would block it
        reader = asyncio.ensure_future(asyncio.to_thread(probe.result))
        while not reader.done():
            await asyncio.wait([reader], timeout=STATUS_PERIOD)
            with contextlib.suppress(OSError, asyncio.TimeoutError, RuntimeError, ValueError):
                st = await get_status(stack.ports["http"])
                samples += 1
                cycles += [s["cycle_time"] for s in st["segments"] if s["cycle_time"]]
                busy += [s["utilisation"] for s in st["segments"] if s["utilisation"] is not None]
        raw = reader.result()
    finally:
        probe.close()
    sim = stack.snap()
    return {"probe": probe_summary(raw), "cycle_mean": statistics.fmean(cycles) if cycles else math.nan,
            "cycle_max": max(cycles) if cycles else math.nan, "busy_mean": statistics.fmean(busy) if busy else math.nan,
            "status_samples": samples, "poll_intervals": sim["intervals"], "probe_seconds": seconds}


async def phase_baseline(args, stack: Stack) -> dict:
    ready = await settle(stack, args, "no MQTT")
    c0, other = stack.cpu(), OtherCpu(stack.pids())
    log(f"[{stack.name}] Modbus TCP probe {args.probe_seconds:g} s")
    bus = await measure_bus(stack, args.probe_seconds, args)
    c1 = stack.cpu()
    st = await get_status(stack.ports["http"])
    return {"ready_s": ready, "bus": bus, "cpu": cpu_delta(c0, c1), "other_cpu_pct": other.measure()[0],
            "rss_kib": stack.bridge.sample()["rss_kib"], "errors": segment_errors(st)}


def segment_errors(st: dict) -> dict:
    return {k: sum(s[k] for s in st["segments"]) for k in ("requests", "timeouts", "errors")}


async def phase_mqtt(args, stack: Stack, outage: bool) -> dict:
    ready = await settle(stack, args, "MQTT on")
    st0 = await get_status(stack.ports["http"])
    w0 = time.time()
    stack.snap()
    c0, other = stack.cpu(), OtherCpu(stack.pids())
    probe_s = min(args.probe_seconds, args.seconds)
    log(f"[{stack.name}] measuring {args.seconds:g} s (Modbus TCP probe over the first {probe_s:g} s)")
    bus = await measure_bus(stack, probe_s, args) if args.probe_seconds > 0 else None
    await asyncio.sleep(max(0.0, w0 + args.seconds - time.time()))
    w1 = time.time()
    c1 = stack.cpu()
    other_pct = other.measure()[0]
    stack.snap()
    st1 = await get_status(stack.ports["http"])
    agg = await asyncio.to_thread(stack.counter.agg, w0, w1)
    agg_all = await asyncio.to_thread(stack.counter.agg, 0, w1)
    lat = latency_window(stack, w0, w1)
    e0, e1 = segment_errors(st0), segment_errors(st1)
    n_pub = sum(a["n"] for a in agg.values())
    cpu = cpu_delta(c0, c1)
    res = {"ready_s": ready, "window_s": w1 - w0, "latency": lat, "bus": bus, "cpu": cpu, "other_cpu_pct": other_pct,
           "bytes": bytes_summary(agg, w1 - w0, len(stack.units)), "births": births(agg_all),
           "broker_us_per_msg": (cpu.get("mosquitto", math.nan) / 100 * (w1 - w0)) / n_pub * 1e6 if n_pub else math.nan,
           "published_per_s": n_pub / (w1 - w0),
           "errors": {k: e1[k] - e0[k] for k in e0}, "rss_kib": stack.bridge.sample()["rss_kib"],
           "mqtt_status": st1["upstream"].get("mqtt", {})}
    log(f"[{stack.name}] latency p99: JSON {fmt(lat.get('json', {}).get('p99'), '.1f')} ms, Sparkplug "
        f"{fmt(lat.get('sparkplug', {}).get('p99'), '.1f')} ms; bridge CPU {cpu['bridge']:.1f} %")
    if outage:
        res["outage"] = await phase_outage(args, stack, w0)
    else:
        await asyncio.sleep(2.0)
        js = stack.js_sub.json
        res["json_coverage"] = coverage(stack.poll_times, stamps_of(js), w0, w1 - 1.0)
    return res


async def phase_outage(args, stack: Stack, check_from: float) -> dict:
    stack.counter.close()  # it would lose its connection with the broker anyway
    await asyncio.sleep(1.5)  # the broker saves the subscribers' sessions (autosave every second)
    state = stack.dir / "state"
    queue_files = [state / "mqtt-queue.sqlite3", state / "mqtt-queue.sqlite3-wal"]
    samples: list[dict] = []

    async def sample() -> dict:
        s = {"t": time.time(), "file_bytes": sum(f.stat().st_size for f in queue_files if f.exists())}
        with contextlib.suppress(OSError, asyncio.TimeoutError, RuntimeError, ValueError):
            mq = (await get_status(stack.ports["http"]))["upstream"]["mqtt"]
            s.update(connected=mq.get("connected"), queued=mq.get("queue_queued"),
                     queued_bytes=mq.get("queue_queued_bytes"), dropped=mq.get("queue_dropped"))
        samples.append(s)
        return s

    t_kill = time.time()
    stack.broker.kill()
    log(f"[{stack.name}] mosquitto killed (-9) for {args.outage:g} s")
    while time.time() < t_kill + args.outage:
        await sample()
        await asyncio.sleep(max(0.0, min(1.0, t_kill + args.outage - time.time())))
    stack.broker.start()
    t_up = time.time()
    c_up = stack.cpu()  # the new mosquitto's pid
    log(f"[{stack.name}] mosquitto restarted (pid {stack.broker.proc.pid}); waiting for the backlog to drain")
    deadline = t_up + max(180.0, 3 * args.outage)
    t_drained = None
    while time.time() < deadline:
        s = await sample()
        if s.get("connected") == 1.0 and s.get("queued") == 0 and time.time() > t_up + 1.0:
            t_drained = time.time()
            break
        await asyncio.sleep(0.5)
    c_drained = stack.cpu()
    await asyncio.sleep(args.tail)
    limit = time.time() + 60.0  # the subscriber may still be working through the replay: until it is quiet
    while time.time() < limit:
        before = len(stack.js_sub.json)
        await asyncio.sleep(1.0)
        if len(stack.js_sub.json) - before <= 2 * len(stack.units) / stack.interval:
            break
    t_end = time.time()
    stack.snap()
    out = outage_analysis(stack, check_from, t_kill, t_up, t_drained, t_end, samples)
    out["cpu_until_drained"] = cpu_delta(c_up, c_drained)
    return out


def outage_analysis(stack: Stack, check_from, t_kill, t_up, t_drained, t_end, samples) -> dict:
    js = list(stack.js_sub.json)
    dd = list(stack.sp_sub.ddata)
    conn = {link: next((t for t in stack.bridge.connected_times(link) if t > t_kill), None)
            for link in ("json", "sparkplug")}
    out: dict = {"t_kill": t_kill, "outage_s": t_up - t_kill, "drained": t_drained is not None,
                 "drain_wait_s": (t_drained - t_up) if t_drained else None,
                 "reconnect_s": {k: (v - t_up if v else None) for k, v in conn.items()}}
    # every JSON message made since the measured window began (one per poll) must have arrived
    check_to = (t_drained if t_drained else t_end) - 1.0
    out["json_coverage"] = coverage(stack.poll_times, stamps_of(js), check_from, check_to)
    out["json_coverage_outage"] = coverage(stack.poll_times, stamps_of(js), t_kill, check_to)
    out["json_quality"] = json_quality([r for r in js if r[2] is not None and r[2] >= check_from])
    # JSON replay: the backlog = received after the restart, made before the bridge was back
    cj = conn["json"]
    if cj:
        backlog = [r for r in js if r[7] and r[2] is not None]  # on <topic>/<meter>/history
        if backlog:
            t_drain = max(r[0] for r in backlog)
            replay = max(t_drain - cj, 1e-3)
            buffered = cj - t_kill
            live = [(r[0] - r[2]) * 1e3 for r in js if not r[7] and r[2] is not None and cj <= r[2] <= t_drain]
            after = [(r[0] - r[2]) * 1e3 for r in js if not r[7] and r[2] is not None
                     and t_drain + 2 <= r[2] <= t_end - 2]
            out["json_replay"] = {
                "messages": len(backlog), "buffered_s": buffered, "replay_s": replay, "speed_x": buffered / replay,
                "msgs_per_s": len(backlog) / replay, "bytes": sum(r[6] for r in backlog),
                "bytes_per_min": sum(r[6] for r in backlog) / (buffered / 60),
                "live": stats_ms(live), "after": stats_ms(after),
                "first_after_reconnect_s": min(r[0] for r in backlog) - cj}
    cs = conn["sparkplug"]
    if cs:
        hist = [r for r in dd if r[4] and r[0] >= t_up - 0.5]
        out["sparkplug_history_coverage"] = coverage(stack.poll_times, stamps_of(hist), t_kill + 1.0, cs - 1.0)
        if hist:
            t_drain = max(r[0] for r in hist)
            replay = max(t_drain - cs, 1e-3)
            buffered = cs - t_kill
            live = [(r[0] - r[2]) * 1e3 for r in dd if not r[4] and cs <= r[2] <= t_drain]
            out["sparkplug_replay"] = {"messages": len(hist), "buffered_s": buffered, "replay_s": replay,
                                       "speed_x": buffered / replay, "msgs_per_s": len(hist) / replay,
                                       "live": stats_ms(live)}
    # the queue: the largest it got, per minute buffered at that moment
    peak = max((s for s in samples if s.get("queued_bytes") is not None), key=lambda s: s["queued_bytes"], default=None)
    fpeak = max(samples, key=lambda s: s["file_bytes"], default=None)
    if peak and peak["t"] > t_kill:
        minutes = (peak["t"] - t_kill) / 60
        out["queue"] = {"peak_records": peak["queued"], "peak_bytes": peak["queued_bytes"],
                        "at_s": peak["t"] - t_kill, "bytes_per_min": peak["queued_bytes"] / minutes,
                        "records_per_min": peak["queued"] / minutes,
                        "dropped": max((s.get("dropped") or 0) for s in samples)}
    if fpeak and fpeak["t"] > t_kill:
        out["queue_file"] = {"peak_bytes": fpeak["file_bytes"],
                             "bytes_per_min": fpeak["file_bytes"] / ((fpeak["t"] - t_kill) / 60)}
    out["samples"] = [{k: (round(v - t_kill, 2) if k == "t" else v) for k, v in s.items()} for s in samples]
    return out


async def phase_fast(args, stack: Stack) -> dict:
    ready = await settle(stack, args, f"{stack.interval:g} s polling")
    st0 = await get_status(stack.ports["http"])
    s0 = stack.snap()
    w0 = time.time()
    c0, other = stack.cpu(), OtherCpu(stack.pids())
    log(f"[{stack.name}] measuring the bridge's CPU for {args.seconds:g} s (nothing asks it anything meanwhile)")
    await asyncio.sleep(args.seconds)
    c1 = stack.cpu()
    w1 = time.time()
    other_pct = other.measure()[0]
    s1 = stack.snap()
    st1 = await get_status(stack.ports["http"])
    cpu = cpu_delta(c0, c1)
    lat = latency_window(stack, w0, w1)
    e0, e1 = segment_errors(st0), segment_errors(st1)
    log(f"[{stack.name}] bridge CPU {cpu['bridge']:.1f} %")
    return {"ready_s": ready, "window_s": w1 - w0, "cpu": cpu, "other_cpu_pct": other_pct, "latency": lat,
            "polls_per_s": (s1["polls"] - s0["polls"]) / (s1["t"] - s0["t"]),
            "polls_wanted": len(stack.units) / stack.interval, "poll_intervals": s1["intervals"],
            "updates_wanted": len(stack.units) * N_MEASUREMENTS / stack.interval,
            "errors": {k: e1[k] - e0[k] for k in e0}, "rss_kib": stack.bridge.sample()["rss_kib"]}


async def phase_noalias(args, stack: Stack) -> dict:
    ready = await stack.wait_ready(args.ready_timeout)
    await asyncio.sleep(min(args.warmup, 5.0))
    w0 = time.time()
    log(f"[{stack.name}] counting bytes for {args.bytes_seconds:g} s")
    await asyncio.sleep(args.bytes_seconds)
    w1 = time.time()
    agg = await asyncio.to_thread(stack.counter.agg, w0, w1)
    agg_all = await asyncio.to_thread(stack.counter.agg, 0, w1)
    return {"ready_s": ready, "window_s": w1 - w0, "bytes": bytes_summary(agg, w1 - w0, len(stack.units)),
            "births": births(agg_all), "latency": latency_window(stack, w0, w1)}


async def run_all(args, tmp: Path, pinned: dict | None, stacks: list[Stack]) -> dict:
    results: dict = {}
    plan = [p for p in PHASES if p in args.phases and p != "outage"]
    for phase in plan:
        interval = args.fast_interval if phase == "fast" else args.interval
        mqtt = None if phase == "baseline" else "noalias" if phase == "noalias" else "both"
        stack = Stack(phase, args, tmp, interval, mqtt, pinned)
        stacks.append(stack)
        try:
            await asyncio.to_thread(stack.start)
            if phase == "baseline":
                results[phase] = await phase_baseline(args, stack)
            elif phase == "mqtt":
                results[phase] = await phase_mqtt(args, stack, outage="outage" in args.phases and args.outage > 0)
            elif phase == "fast":
                results[phase] = await phase_fast(args, stack)
            else:
                results[phase] = await phase_noalias(args, stack)
            subs = [s for s in (stack.sp_sub, stack.js_sub) if s is not None]
            results[phase]["subscriber_problems"] = [p for s in subs for p in s.problems]
            results[phase]["subscriber_kinds"] = {k: v for s in subs for k, v in s.kinds.items()}
        except BaseException:
            if stack.bridge is not None:
                log(f"[{phase}] failed; the bridge's log ends with:\n{stack.bridge.log_text()[-2000:]}")
            raise
        finally:
            await asyncio.to_thread(stack.close)
        results.setdefault(phase, {})
        results[phase]["exit"] = stack.exit
        results[phase]["log"] = stack.log
        log(f"[{phase}] done: bridge exit {stack.exit.get('code')}, log: {stack.log.get('n_problems')} errors, "
            f"{stack.log.get('n_warnings')} warnings")
    return results


# ====================================================================== evaluation and report
def evaluate(r: dict, args) -> tuple[list[dict], list[str]]:
    """The targets (with met / not met / not run) and the failures (something broke)."""
    rows, failures = [], []

    def row(target, measured, met, note=""):
        rows.append({"target": target, "measured": measured, "met": met, "note": note})

    m = r.get("mqtt")
    if m:
        for flavour, label in (("sparkplug", "Sparkplug DDATA"), ("json", "JSON")):
            s, own = m["latency"].get(flavour), m["latency"].get(f"{flavour}_own_ts")
            if s:
                row(f"poll reply → subscriber latency p99 ≤ {TARGET_LATENCY_MS:g} ms, {label}",
                    f"p99 {fmt(s['p99'], '.1f')} ms (p50 {fmt(s['p50'], '.1f')}, max {fmt(s['max'], '.1f')}, "
                    f"n = {s['n']:,}; without the messages under the previous poll's ts: p99 "
                    f"{fmt(own['p99'], '.1f')} ms, n = {own['n']:,})", s["n"] > 0 and s["p99"] <= TARGET_LATENCY_MS)
    else:
        row(f"poll reply → subscriber latency p99 ≤ {TARGET_LATENCY_MS:g} ms", "not run", None)
    f = r.get("fast")
    if f:
        b = f["cpu"]["bridge"]
        row(f"{args.meters} meters every {args.fast_interval:g} s ({f['updates_wanted']:,.0f} metric updates/s), whole "
            f"bridge incl. OPC UA: CPU < {TARGET_CPU_PCT:g} % of one core",
            f"{b:.1f} % (polls {f['polls_per_s']:,.1f}/s of {f['polls_wanted']:,.0f}/s; JSON values changed "
            f"{fmt(f['latency'].get('json_changed_per_s'), ',.0f')}/s, Sparkplug metrics "
            f"{fmt(f['latency'].get('sparkplug_metrics_per_s'), ',.0f')}/s)",
            b < TARGET_CPU_PCT and f["polls_per_s"] >= 0.98 * f["polls_wanted"])
    else:
        row(f"CPU < {TARGET_CPU_PCT:g} % of one core at {args.fast_interval:g} s polling", "not run", None)
    o = (m or {}).get("outage")
    if o:
        c = o["json_coverage"]
        row(f"broker killed {o['outage_s']:.0f} s: 0 JSON messages lost",
            f"{c['missing']:,} lost of {c['checked']:,} made ({o['json_coverage_outage']['checked']:,} of them from "
            f"the kill on){'' if o['drained'] else '; **the queue never drained**'}",
            c["missing"] == 0 and c["checked"] > 0 and o["drained"])
        jr, sr = o.get("json_replay"), o.get("sparkplug_replay")
        row(f"backlog replayed ≥ {TARGET_REPLAY_X:g}× real time (JSON)",
            f"{jr['speed_x']:.1f}× ({jr['buffered_s']:.1f} s buffered, {jr['messages']:,} messages, replayed in "
            f"{jr['replay_s']:.2f} s = {jr['msgs_per_s']:,.0f} msg/s)" if jr else "no backlog seen",
            bool(jr) and jr["speed_x"] >= TARGET_REPLAY_X)
        if sr:
            row(f"… Sparkplug history (historical DDATA) ≥ {TARGET_REPLAY_X:g}×",
                f"{sr['speed_x']:.1f}× ({sr['messages']:,} messages in {sr['replay_s']:.2f} s)",
                sr["speed_x"] >= TARGET_REPLAY_X)
        for label, rep in (("Sparkplug (live DDATA beside the history)", sr),
                           ("JSON (live states beside the history topic)", jr)):
            if rep:
                lv = rep["live"]
                row(f"live p99 during the replay ≤ {TARGET_LIVE_MS:g} ms, {label}",
                    f"p99 {fmt(lv['p99'], '.0f')} ms (max {fmt(lv['max'], '.0f')}, n = {lv['n']:,})" if lv["n"]
                    else f"no live message made during a {rep['replay_s']:.2f} s replay",
                    (lv["p99"] <= TARGET_LIVE_MS) if lv["n"] else None)
        q = o.get("queue")
        row("queue bytes per buffered minute (reported)",
            (f"{q['bytes_per_min'] / 1e6:.2f} MB/min ({q['records_per_min']:,.0f} records/min, both flavours; "
             f"queue file {o['queue_file']['bytes_per_min'] / 1e6:.2f} MB/min)" if q else "no queue figures"), None)
    else:
        row("broker outage: 0 JSON lost, replay ≥ 10×, live p99 ≤ 500 ms", "not run", None)
    base = r.get("baseline")
    bus = (m or {}).get("bus")
    if base and bus:
        b0, b1 = base["bus"]["probe"], bus["probe"]
        subs = b0["sub_p99"]
        noise = max(NOISE_FLOOR_MS, (max(subs) - min(subs)) if len(subs) >= 2 else 0.0)
        row("Modbus TCP p99 unchanged (within noise) while MQTT runs",
            f"{b0['p99']:.2f} → {b1['p99']:.2f} ms (p50 {b0['p50']:.2f} → {b1['p50']:.2f}; noise: baseline "
            f"{SUBWINDOW:g} s p99s spread {noise:.2f} ms)", b1["p99"] <= b0["p99"] + noise)
        c0, c1 = base["bus"], bus
        tol = max(CYCLE_TOLERANCE * args.interval, 0.010)
        i0, i1 = c0["poll_intervals"], c1["poll_intervals"]
        row("bus cycle unchanged while MQTT runs",
            f"cycle {c0['cycle_mean'] * 1e3:.1f} → {c1['cycle_mean'] * 1e3:.1f} ms; a meter's poll interval p99 "
            f"{i0['p99'] * 1e3:.1f} → {i1['p99'] * 1e3:.1f} ms",
            abs(c1["cycle_mean"] - c0["cycle_mean"]) <= tol and i1["p99"] <= max(i0["p99"] + 0.010, i0["max"]))
    else:
        row("Modbus TCP p99 and bus cycle unchanged", "not run (needs baseline and mqtt)", None)
    by = (m or {}).get("bytes", {})
    na = (r.get("noalias") or {}).get("bytes", {}).get("sparkplug")
    parts = []
    if "sparkplug" in by:
        parts.append(f"Sparkplug {by['sparkplug']['tp_per_meter_hour'] / 1e6:.2f} MB")
    if na:
        parts.append(f"Sparkplug without aliases {na['tp_per_meter_hour'] / 1e6:.2f} MB")
    if "json" in by:
        parts.append(f"JSON {by['json']['tp_per_meter_hour'] / 1e6:.2f} MB")
    row("bytes (topic + payload) per meter per hour (reported)", "; ".join(parts) or "not run", None)

    for phase, res in r.items():
        if res.get("exit", {}).get("code") not in (0, None) or res.get("exit", {}).get("killed"):
            failures.append(f"{phase}: bridge exit {res['exit']}")
        if res.get("log", {}).get("n_problems"):
            failures.append(f"{phase}: {res['log']['n_problems']} errors in the bridge log")
        if res.get("subscriber_problems"):
            failures.append(f"{phase}: {len(res['subscriber_problems'])} subscriber lines unreadable")
        for b in (res.get("bus"),):
            if b and b["probe"]["n_errors"]:
                failures.append(f"{phase}: {b['probe']['n_errors']} Modbus TCP probe errors {b['probe']['errors']}")
        errs = res.get("errors") or {}
        if errs.get("timeouts") or errs.get("errors"):
            failures.append(f"{phase}: the bridge counted {errs.get('timeouts')} timeouts, {errs.get('errors')} errors")
    return rows, failures


def fleet(r: dict, args) -> dict | None:
    m = r.get("mqtt")
    if not m or not m.get("bytes"):
        return None
    panels, n = args.fleet_panels, args.meters
    out: dict = {"panels": panels, "meters_per_panel": n, "interval": args.interval, "flavours": {}}
    na = (r.get("noalias") or {}).get("bytes", {}).get("sparkplug")
    flavours = dict(m["bytes"])
    if na:
        flavours["sparkplug (no aliases)"] = na
    for name, b in flavours.items():
        msgs = b["msgs_per_s"] / args.meters * n * panels  # per meter, scaled to the fleet's panels
        wire = b["wire_per_meter_hour"] * n * panels / 3600  # bytes/s
        out["flavours"][name] = {"msgs_per_s": msgs, "mbit_s": wire * 8 / 1e6, "gb_day": wire * 86400 / 1e9,
                                 "tp_per_meter_hour": b["tp_per_meter_hour"], "wire_per_meter_hour": b["wire_per_meter_hour"]}
    both = [out["flavours"][k] for k in ("sparkplug", "json") if k in out["flavours"]]
    out["total_msgs_per_s"] = sum(f["msgs_per_s"] for f in both)
    out["total_mbit_s"] = sum(f["mbit_s"] for f in both)
    out["broker_cores"] = out["total_msgs_per_s"] * m["broker_us_per_msg"] / 1e6
    out["connections"] = panels * len(both)
    bi = m.get("births", {})
    if "NBIRTH" in bi and "DBIRTH" in bi:
        out["birth_burst_mb"] = panels * (bi["NBIRTH"]["mean_packet"] + n * bi["DBIRTH"]["mean_packet"]) / 1e6
    q = (m.get("outage") or {}).get("queue")
    if q:
        out["queue_mb_per_panel_hour"] = q["bytes_per_min"] * 60 / 1e6 * n / args.meters
    return out


def markdown(res: dict) -> str:
    a, m, r = res["args"], res["machine"], res["results"]
    n = a["meters"]
    segs = layout(n, a["segments"])
    lines = [
        f"## MQTT north side: {n} meters × {N_MEASUREMENTS} measurements (SDM120, all changing) at "
        f"{a['interval']:g} s polling",
        "",
        f"`{res['command']}`",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu'] or 'unknown'}), {mib(m['mem_total_kib'])} MiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}, aiomqtt {m['aiomqtt']}, asyncua {m['asyncua']}, uvloop {m['uvloop']}, "
        f"mosquitto {res['mosquitto']}, node {res['node']}, commit {m['commit'] or '?'}.",
        f"Bridge: `{res['bridge_command']}` (uvloop)"
        + (f", pinned to CPU {m['pinning']['bridge']}; simulator, broker, subscribers, probe and this script on CPU "
           f"{m['pinning']['rest']}" if m["pinning"] else ", no CPU pinning") + ".",
        f"Meters: {PROFILE} (14 float32 measurements), simulated so that all 14 change on every poll (exports "
        f"move, load ≥ 2 A, energies below 64 kWh).",
        f"Configuration: {len(segs)} segments on ptys ({', '.join(str(len(s)) for s in segs)} meters), "
        f"{a['baudrate']} 8N1, timeout 0.5 s, retries 1, stale_after 10 s; "
        + ("wire time emulated" if a["emulate_wire"] else "no wire-time emulation")
        + f"; Modbus TCP, OPC UA (None), HTTP; MQTT 5 to mosquitto with persistence; Sparkplug group `{GROUP}`, edge "
        f"node `{NODE}` (aliases on except in `noalias`), JSON topic `{JSON_TOPIC}` (max_age 60 s); queue defaults.",
        f"Phases run: {', '.join(a['phases'])}; warm-up {a['warmup']:g} s after every meter's first message; "
        f"windows {a['seconds']:g} s; Modbus TCP probe {a['probe_seconds']:g} s at one read per "
        f"{a['probe_period'] * 1e3:g} ms.",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    for row in res["targets"]:
        verdict = "—" if row["met"] is None else "met" if row["met"] else "**not met**"
        lines.append(f"| {row['target']} | {row['measured']} | {verdict} |")

    base, mq, fast, na = r.get("baseline"), r.get("mqtt"), r.get("fast"), r.get("noalias")
    if mq:
        lat = mq["latency"]
        q = lat.get("json_quality", {})
        lines += ["", f"### `mqtt`: {mq['window_s']:.0f} s at {a['interval']:g} s polling", "",
                  "| measure | value |", "|---|---:|"]
        for flavour in ("sparkplug", "json"):
            for key, label in ((flavour, f"latency {flavour}"),
                               (f"{flavour}_own_ts", "… only messages under their own poll's ts")):
                s = lat.get(key)
                if s:
                    lines.append(f"| {label}: p50 / p99 / max / mean (n) | {fmt(s['p50'], '.1f')} / "
                                 f"{fmt(s['p99'], '.1f')} / {fmt(s['max'], '.1f')} / {fmt(s['mean'], '.1f')} ms "
                                 f"({s['n']:,}) |")
        lines += [
            f"| messages/s received: Sparkplug DDATA / JSON states | {fmt(lat.get('sparkplug_per_s'), ',.1f')} / "
            f"{fmt(lat.get('json_per_s'), ',.1f')} |",
            f"| metrics per DDATA (mean); Sparkplug seq gaps | {fmt(lat.get('sparkplug_metrics_mean'), '.2f')}; "
            f"{lat.get('seq_gaps', '–')} |",
            f"| JSON values changed per message (mean of {N_MEASUREMENTS}); messages with all changed | "
            f"{fmt(q.get('changed_mean'), '.2f')}; {fmt(q.get('all_changed_pct'), '.1f')} % |",
            f"| JSON duplicates / out of order (window) | {q.get('duplicates', '–')} / {q.get('out_of_order', '–')} |",
            f"| JSON messages repeating the previous message's ts with new values (a poll published in parts, "
            f"the first parts under the previous poll's ts) | {q.get('split', '–')} of {q.get('messages', 0):,} |",
        ]
        cov = mq.get("json_coverage")
        if cov:
            lines.append(f"| JSON messages lost (polls without a message) | {cov['missing']} of {cov['checked']:,} |")
        cpu = mq["cpu"]
        lines += [
            f"| CPU (% of one core): bridge / mosquitto / subscribers (Sparkplug, JSON) / byte counter / simulator / "
            f"this script / others | {cpu['bridge']:.1f} / {fmt(cpu.get('mosquitto'), '.1f')} / "
            f"{fmt(cpu.get('sparkplug subscriber'), '.1f')}, {fmt(cpu.get('json subscriber'), '.1f')} / "
            f"{fmt(cpu.get('byte counter'), '.1f')} / {cpu['simulator']:.1f} / {cpu['script']:.1f} / "
            f"{mq['other_cpu_pct']:.1f} |",
            f"| broker: messages published/s; CPU per message (in + 2 deliveries) | {mq['published_per_s']:,.0f}; "
            f"{fmt(mq['broker_us_per_msg'], '.1f')} µs |",
            f"| bridge RSS at the end of the window | {mib(mq['rss_kib'])} MiB |",
        ]
    if base or mq:
        lines += ["", "### Modbus TCP and the bus, without and with MQTT", "",
                  "| measure | baseline (no MQTT) | with MQTT |", "|---|---:|---:|"]

        def cell(res_, f_):
            b = (res_ or {}).get("bus")
            return f_(b) if b else "–"
        rows = [
            ("probe reads (errors)", lambda b: f"{b['probe']['n']:,} ({b['probe']['n_errors']})"),
            ("probe p50 / p99 / max", lambda b: f"{b['probe']['p50']:.2f} / {b['probe']['p99']:.2f} / "
                                              f"{b['probe']['max']:.2f} ms"),
            (f"probe p99 per {SUBWINDOW:g} s", lambda b: ", ".join(f"{x:.2f}" for x in b["probe"]["sub_p99"])),
            ("segment cycle time: mean / max (status.json)", lambda b: f"{b['cycle_mean'] * 1e3:.1f} / "
                                                                      f"{b['cycle_max'] * 1e3:.1f} ms"),
            ("segment utilisation (mean)", lambda b: f"{100 * b['busy_mean']:.1f} %"),
            ("a meter's poll interval p50 / p99 / max (simulator)",
             lambda b: f"{b['poll_intervals']['p50'] * 1e3:.1f} / {b['poll_intervals']['p99'] * 1e3:.1f} / "
                       f"{b['poll_intervals']['max'] * 1e3:.1f} ms"),
        ]
        for label, f_ in rows:
            lines.append(f"| {label} | {cell(base, f_)} | {cell(mq, f_)} |")
        if base:
            lines.append(f"| bridge CPU during the probe window; others | {base['cpu']['bridge']:.1f} %; "
                         f"{base['other_cpu_pct']:.1f} % | {mq['cpu']['bridge']:.1f} % (whole window) |"
                         if mq else f"| bridge CPU during the probe window | {base['cpu']['bridge']:.1f} % | – |")
    o = (mq or {}).get("outage")
    if o:
        lines += ["", f"### Broker outage: `kill -9` for {o['outage_s']:.0f} s, restart on the same port", "",
                  "| measure | value |", "|---|---:|"]
        rc = o["reconnect_s"]
        lines.append(f"| bridge reconnected after the restart: JSON / Sparkplug (its backoff) | "
                     f"{fmt(rc.get('json'), '.1f')} / {fmt(rc.get('sparkplug'), '.1f')} s |")
        lines.append(f"| queue empty again after the restart | "
                     f"{fmt(o['drain_wait_s'], '.1f') + ' s' if o['drained'] else '**not within the limit**'} |")
        c, co = o["json_coverage"], o["json_coverage_outage"]
        lines.append(f"| JSON messages made / lost, since the window began | {c['checked']:,} / {c['missing']} |")
        lines.append(f"| … of them made from the kill on / lost | {co['checked']:,} / {co['missing']} |")
        if c["examples"]:
            lines.append(f"| … first lost | {'; '.join(c['examples'])} |")
        jq = o["json_quality"]
        lines.append(f"| JSON duplicates / split polls / out of order | {jq['duplicates']} / {jq['split']} / "
                     f"{jq['out_of_order']} |")
        for name in ("json_replay", "sparkplug_replay"):
            rep = o.get(name)
            if rep:
                flav = name.split("_")[0]
                lines.append(f"| {flav} backlog: messages / buffered / replayed in / speed | {rep['messages']:,} / "
                             f"{rep['buffered_s']:.1f} s / {rep['replay_s']:.2f} s / {rep['speed_x']:.1f}× "
                             f"({rep['msgs_per_s']:,.0f} msg/s) |")
                lv = rep["live"]
                lines.append(f"| {flav} live latency during the replay: p50 / p99 / max (n) | {fmt(lv['p50'], '.0f')} / "
                             f"{fmt(lv['p99'], '.0f')} / {fmt(lv['max'], '.0f')} ms ({lv['n']:,}) |")
        jr = o.get("json_replay")
        if jr:
            af = jr["after"]
            lines.append(f"| JSON latency once replayed: p50 / p99 (n) | {fmt(af['p50'], '.0f')} / "
                         f"{fmt(af['p99'], '.0f')} ms ({af['n']:,}) |")
            lines.append(f"| JSON backlog, topic + payload, per buffered minute | {jr['bytes_per_min'] / 1e6:.3f} MB |")
        cr = o.get("cpu_until_drained") or {}
        if cr:
            lines.append(f"| CPU from the restart until the queue was empty: bridge / mosquitto / subscribers "
                         f"(Sparkplug, JSON) | {cr['bridge']:.0f} / {fmt(cr.get('mosquitto'), '.0f')} / "
                         f"{fmt(cr.get('sparkplug subscriber'), '.0f')}, {fmt(cr.get('json subscriber'), '.0f')} % |")
        hc = o.get("sparkplug_history_coverage")
        if hc:
            lines.append(f"| Sparkplug polls while disconnected delivered as history | {hc['checked'] - hc['missing']:,} "
                         f"of {hc['checked']:,} |")
        qq, qf = o.get("queue"), o.get("queue_file")
        if qq:
            lines.append(f"| queue at its peak ({qq['at_s']:.0f} s in): records / bytes (status.json) / dropped | "
                         f"{qq['peak_records']:,} / {qq['peak_bytes'] / 1e6:.2f} MB / {qq['dropped']} |")
            lines.append(f"| **queue per buffered minute** (both flavours): bytes / records | "
                         f"**{qq['bytes_per_min'] / 1e6:.3f} MB** / {qq['records_per_min']:,.0f} |")
        if qf:
            lines.append(f"| queue file (SQLite + WAL) at its peak; per buffered minute | {qf['peak_bytes'] / 1e6:.2f} MB; "
                         f"{qf['bytes_per_min'] / 1e6:.3f} MB |")
    if fast:
        cpu = fast["cpu"]
        lat = fast["latency"]
        lines += ["", f"### `fast`: {fast['window_s']:.0f} s at {a['fast_interval']:g} s polling", "",
                  "| measure | value |", "|---|---:|",
                  f"| **bridge CPU (% of one core)** | **{cpu['bridge']:.1f} %** |",
                  f"| polls achieved / wanted | {fast['polls_per_s']:,.1f}/s / {fast['polls_wanted']:,.0f}/s |",
                  f"| metric updates wanted; JSON values changed / Sparkplug metrics received | "
                  f"{fast['updates_wanted']:,.0f}/s; {fmt(lat.get('json_changed_per_s'), ',.0f')}/s / "
                  f"{fmt(lat.get('sparkplug_metrics_per_s'), ',.0f')}/s |"]
        for flavour in ("sparkplug", "json"):
            s, own = lat.get(flavour), lat.get(f"{flavour}_own_ts")
            if s:
                lines.append(f"| latency {flavour}: p50 / p99 / max; p99 without the messages under the previous "
                             f"poll's ts | {fmt(s['p50'], '.1f')} / {fmt(s['p99'], '.1f')} / {fmt(s['max'], '.1f')} ms; "
                             f"{fmt(own['p99'], '.1f')} ms |")
        lines.append(f"| CPU: mosquitto / subscribers / byte counter / simulator / this script / others | "
                     f"{fmt(cpu.get('mosquitto'), '.1f')} / {fmt(cpu.get('sparkplug subscriber'), '.1f')}, "
                     f"{fmt(cpu.get('json subscriber'), '.1f')} / {fmt(cpu.get('byte counter'), '.1f')} / "
                     f"{cpu['simulator']:.1f} / {cpu['script']:.1f} / {fast['other_cpu_pct']:.1f} % |")
        lines.append(f"| bridge RSS | {mib(fast['rss_kib'])} MiB |")
    fl = res.get("fleet")
    flavours = dict((mq or {}).get("bytes") or {})
    if na and na.get("bytes", {}).get("sparkplug"):
        flavours["sparkplug (no aliases)"] = na["bytes"]["sparkplug"]
    if flavours:
        lines += ["", f"### Bytes on the wire (at {a['interval']:g} s polling, every value changing)", "",
                  "| flavour | messages/s per meter | data message: topic + payload (mean) | topic + payload per meter "
                  "per hour | MQTT packets (+ PUBACKs) per meter per hour |", "|---|---:|---:|---:|---:|"]
        for name, b in flavours.items():
            lines.append(f"| {name} | {b['msgs_per_s'] / n:.2f} | {b['data_topic_mean']:.0f} + "
                         f"{b['data_payload_mean']:.0f} B | {b['tp_per_meter_hour'] / 1e6:.3f} MB | "
                         f"{b['wire_per_meter_hour'] / 1e6:.3f} MB |")
        for label, src in (("", mq), (" without aliases", na)):
            bi = (src or {}).get("births", {})
            if bi:
                lines.append("")
                lines.append(f"Births{label} (once per connection): " + "; ".join(
                    f"{k} {v['mean_bytes']:,.0f} B (topic + payload)" for k, v in bi.items()) + ".")
        lines.append("")
        lines.append("Sparkplug includes the node's NDATA (segment figures, every second); JSON includes `status`. "
                     "MQTT packets: an MQTT 5 PUBLISH as the bridge sends it (fixed header, topic, packet id for "
                     "QoS 1, empty properties) plus a 4-byte PUBACK per QoS 1 message; TCP/IP headers not included.")
    if fl:
        lines += ["", f"### Sizing: {fl['panels']:,} panels × {fl['meters_per_panel']} meters at {fl['interval']:g} s "
                      f"into one broker cluster (linear extrapolation)", "",
                  "| flavour | messages/s into the cluster | Mbit/s in | GB/day in |", "|---|---:|---:|---:|"]
        for name, f_ in fl["flavours"].items():
            lines.append(f"| {name} | {f_['msgs_per_s']:,.0f} | {f_['mbit_s']:,.1f} | {f_['gb_day']:,.1f} |")
        lines.append(f"| Sparkplug + JSON | {fl['total_msgs_per_s']:,.0f} | {fl['total_mbit_s']:,.1f} | "
                     f"{fl['total_mbit_s'] / 8 * 86400 / 1e3:,.1f} |")
        lines += ["", f"- Each subscriber of a flavour receives as much again (fan-out 1 per subscriber)."
                      f" Bridge connections: {fl['connections']:,} (one per flavour and panel).",
                  f"- Broker CPU: {fmt(mq['broker_us_per_msg'], '.1f')} µs of this mosquitto's CPU per message "
                  f"(one publish in, two deliveries out) → ≈ {fl['broker_cores']:,.1f} cores of this CPU for the fleet "
                  f"(a single mosquitto is single-threaded: this needs a cluster or bridges sharded over brokers)"
                  + (f"; at this run's {mq['published_per_s']:,.0f} messages/s the broker's fixed costs (persistence "
                     f"saved every second) dominate, so this figure is only meaningful at full scale."
                     if mq["published_per_s"] < 200 else ".")]
        if "birth_burst_mb" in fl:
            lines.append(f"- After a cluster-wide reconnect every panel sends its births: ≈ {fl['birth_burst_mb']:,.1f} MB.")
        if "queue_mb_per_panel_hour" in fl:
            lines.append(f"- Store-and-forward: ≈ {fl['queue_mb_per_panel_hour']:,.1f} MB of queue per panel per hour "
                         f"of outage (the default bound, 256 MB, holds ≈ "
                         f"{256 / fl['queue_mb_per_panel_hour']:.1f} h).")
    notes = []
    for phase, rr in r.items():
        lg = rr.get("log") or {}
        if lg.get("problems"):
            notes += [f"**{phase}: bridge errors ({lg['n_problems']}):**", ""] + [f"    {p}" for p in lg["problems"]] + [""]
        if lg.get("warning_kinds"):
            notes += [f"{phase}: bridge warnings ({lg['n_warnings']}), by kind (digits as N):", ""] + \
                     [f"    {n:5d} × {w}" for w, n in lg["warning_kinds"]] + [""]
        other = rr.get("other_cpu_pct")
        if other is not None and other > NOISY_PCT:
            notes.append(f"**{phase}: disturbed:** other processes used {other:.0f} % of a core during the window.")
            notes.append("")
    splits = sum(((rr.get("outage") or {}).get("json_quality") or (rr.get("latency") or {}).get("json_quality")
                  or {}).get("split", 0) for rr in r.values())
    if splits:
        notes += [f"**Polls published in parts ({splits:,} JSON messages):** messages carrying new values under "
                  "the `ts` of the meter's previous message, i.e. part of a poll published before the poll ended, "
                  "under the previous poll's time. They count here with a latency of about one poll interval, and "
                  "their `ts` is not the time of the values they carry. The longer a poll takes, the more often it "
                  "happens: on a real 9600-baud line an SDM120 poll (3 blocks) takes ≈ 175 ms (`--emulate-wire` "
                  "shows it).", ""]
    if a["meters"] < 240:
        notes.append(f"Scale: {a['meters']} meters, not the issue's 240: the CPU and bytes-per-panel figures are for "
                     f"this scale (the sizing is scaled per meter).")
        notes.append("")
    if res["failures"]:
        notes.append("**FAILED:** " + "; ".join(res["failures"]))
    if notes:
        lines += [""] + notes
    return "\n".join(lines).rstrip() + "\n"


# ====================================================================== main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = arg_parser(__doc__)
    ap.add_argument("--meters", type=int, default=240, help="SDM120 meters (default 240; at most 247 unit ids)")
    ap.add_argument("--segments", type=int, default=8, help="segments (ptys) they are spread over (default 8)")
    ap.add_argument("--interval", type=float, default=1.0, help="poll_interval of the latency and outage phases (1.0 s)")
    ap.add_argument("--fast-interval", type=float, default=0.5, help="poll_interval of the CPU phase (0.5 s)")
    ap.add_argument("--seconds", type=float, default=120.0, help="measured seconds of the mqtt and fast phases (120)")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds after every meter's first message (20)")
    ap.add_argument("--outage", type=float, default=60.0, help="seconds the broker is down (60; 0: no outage)")
    ap.add_argument("--tail", type=float, default=5.0, help="seconds to keep receiving after the queue drained (5)")
    ap.add_argument("--probe-seconds", type=float, default=30.0, help="Modbus TCP probe window (30 s)")
    ap.add_argument("--probe-period", type=float, default=0.01, help="seconds between probe reads (0.01)")
    ap.add_argument("--bytes-seconds", type=float, default=30.0, help="window of the noalias phase (30 s)")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"comma-separated subset of {','.join(PHASES)} (outage needs mqtt)")
    ap.add_argument("--fleet-panels", type=int, default=1000, help="panels in the sizing (1000)")
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="seconds for a bridge to be ready (180)")
    ap.add_argument("--baudrate", type=int, default=9600, help="the segments' baud rate (9600)")
    ap.add_argument("--emulate-wire", action="store_true", help="the simulator holds each reply for its wire time")
    ap.add_argument("--turnaround", type=float, default=0.005, help="with --emulate-wire: seconds (0.005)")
    ap.add_argument("--wait-quiet", type=float, default=30.0, help="wait up to this long for a quiet machine (30; 0: no)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the bridge and the rest to separate CPUs")
    ap.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-': JSON on stdout)")
    ap.add_argument("--simulate", help=argparse.SUPPRESS)
    ap.add_argument("--probe", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--count-bytes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.simulate or args.probe or args.count_bytes:
        return args
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := set(args.phases) - set(PHASES):
        ap.error(f"unknown phases {sorted(unknown)}; choose from {','.join(PHASES)}")
    if "outage" in args.phases and "mqtt" not in args.phases:
        ap.error("the outage phase runs on the mqtt phase's bridge: add mqtt")
    if not 1 <= args.meters <= 247:
        ap.error("--meters must be 1..247 (a unit id each, unique across the bridge)")
    if not 0 < args.interval < 10 or not 0 < args.fast_interval < 10:
        ap.error("the poll intervals must be below stale_after (10 s)")
    return args


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "?"
    except (OSError, subprocess.SubprocessError):
        return "not found"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.simulate:
        simulate_main(json.loads(args.simulate))
        return 0
    if args.probe:
        port, units, seconds, period = args.probe
        probe_main(int(port), [int(u) for u in units.split(",")], float(seconds), float(period))
        return 0
    if args.count_bytes:
        count_bytes_main(args.count_bytes)
        return 0
    sys.path.insert(0, str(ROOT / "tests"))  # tests/broker.py: Mosquitto

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    cpus = sorted(os.sched_getaffinity(0))
    pinned = {"bridge": cpus[-1], "rest": cpus[0]} if not args.no_pin and len(cpus) >= 2 else None
    command = command_line()
    machine = machine_info(len(cpus), pinned, packages=("aiomqtt", "asyncua", "uvloop"))
    mosquitto_version = _version(["/usr/sbin/mosquitto", "-h"]).replace("mosquitto version ", "")
    node_version = _version(["node", "--version"])
    if pinned:
        os.sched_setaffinity(0, {pinned["rest"]})  # inherited by every child but the bridge
    if args.wait_quiet > 0:
        quiet = wait_quiet(args.wait_quiet)
        if quiet > NOISY_PCT:
            log(f"the machine is not quiet ({quiet:.0f} % of a core used by others): measuring anyway")
    tmp = tempfile.TemporaryDirectory(prefix="bench-mqtt-")
    stacks: list[Stack] = []
    try:
        with asyncio.Runner(loop_factory=new_uvloop) as runner:
            results = runner.run(run_all(args, Path(tmp.name), pinned, stacks))
    finally:
        for stack in stacks:
            stack.close()
        tmp.cleanup()
    out = {"command": command,
           "bridge_command": shlex.join(["python", "-m", "bridge", "--log-format", "json", "run", "-c", "bridge.yaml"]),
           "machine": machine, "mosquitto": mosquitto_version, "node": node_version, "commit_at_end": git_describe(),
           "args": {k: v for k, v in vars(args).items() if k not in ("json", "simulate", "probe", "count_bytes")},
           "results": results}
    out["targets"], out["failures"] = evaluate(results, args)
    out["fleet"] = fleet(results, args)
    emit(out, markdown, args.json)
    if out["failures"]:
        log("FAILED: " + "; ".join(out["failures"]))
        return 1
    if args.strict and any(row["met"] is False for row in out["targets"]):
        log("a target was missed (--strict)")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
