"""The reload matrix: one bridge (a real subprocess, every side on: Modbus TCP, OPC UA, HTTP, MQTT to a
mosquitto started here, interval energy), reconfigured step by step with SIGHUP.

Black-box: the test only writes configuration files, sends signals, reads the JSON log on
stderr and talks to the bridge the way its users do (HTTP, OPC UA, Modbus TCP). The
meters are simulated on ptys owned by this process.

Each step writes a whole configuration (the previous step's, with one change), sends
SIGHUP and waits for the log line saying "reload applied" (or "reload refused" where the
change cannot be applied), then checks every side against the configuration that must
now be in force. A step collects every problem it sees and fails with all of them, so one
run shows what is wrong where. The steps share one bridge and run in the order listed; a
failed step does not stop the next, which applies its own whole configuration.

Waits are bounded polls on conditions (``eventually``); once a step has failed, its
further waits are shortened so a broken bridge cannot make the file take minutes.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import pytest
import pytest_asyncio
from asyncua import Client, ua

from broker import Mosquitto

from bridge.config.profiles import get_builtin
from bridge.core.model import Measurement
from bridge.south.simulator import SimMeter, SimulatedBus
from bridge.testing import RawModbusClient, free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

BRIDGE = [sys.executable, "-m", "bridge", "--log-format", "json", "run", "-c"]
NAMESPACE = "urn:modbus-bridge"  # the default namespace URI

TIMEOUT = 0.1  # segment reply timeout
POLL = 0.1  # every meter's poll_interval
STALE_AFTER = 1.0

START_TIMEOUT = 30.0  # bridge start until /readyz answers 200 (OPC UA start is slow on 2 busy cores)
RELOAD_TIMEOUT = 10.0  # SIGHUP until "reload applied" / "reload refused"
LEGACY_GRACE = 2.0  # after a "reload: ... segment(s) kept" line, how long "reload applied" may still take
WAIT = 5.0  # bounded wait for a condition
WAIT_AFTER_FAILURE = 1.0  # the same, once the step already failed
STOP_TIMEOUT = 10.0  # SIGTERM until exit

SDM120, SDM630, DDSU666 = "eastron-sdm120", "eastron-sdm630", "chint-ddsu666"
# the measurement read to prove a meter is served with its profile: each lies where (some of) the other
# profiles have no register, so a unit served with the wrong map is caught (see ``foreign_probes``)
PROBES = {SDM120: "voltage", SDM630: "voltage_l2", DDSU666: "voltage"}
VOLTAGE = (100.0, 300.0)  # plausible: the simulated meters sit near 230 V

T = TypeVar("T")


# ------------------------------------------------------------------------------- the configurations
@dataclass(frozen=True)
class Meter:
    name: str
    slave: int
    unit: int
    profile: str


@dataclass(frozen=True)
class Segment:
    name: str
    bus: str  # key of the simulated bus (pty) in ``Bridge.buses``
    meters: tuple[Meter, ...]


@dataclass(frozen=True)
class Layout:
    """One configuration file, with ports named by key (``Bridge.ports``) and buses by key."""

    segments: tuple[Segment, ...]
    modbus: str = "modbus"
    modbus_enabled: bool = True
    opcua: str = "opcua"
    http: str | None = "http"  # None: no ``http`` key at all

    @property
    def meters(self) -> list[tuple[Segment, Meter]]:
        return [(s, m) for s in self.segments for m in s.meters]

    @property
    def units(self) -> set[int]:
        return {m.unit for _, m in self.meters}


def seg(name: str, bus: str, *meters: Meter) -> Segment:
    return Segment(name, bus, meters)


# the simulated buses: slave -> profile of the (physical) meter there; "S" holds a meter that never answers
BUSES = {
    "A": {1: SDM120, 2: SDM630, 3: SDM120, 4: SDM120},
    "B": {1: SDM120},
    "C": {1: SDM120},
    "S": {1: SDM120},
}
SILENT_BUSES = {"S"}

M1 = Meter("m1", 1, 11, SDM120)
M2 = Meter("m2", 2, 12, SDM630)
M3 = Meter("m3", 1, 21, SDM120)
M4 = Meter("m4", 3, 13, SDM120)
M4B = replace(M4, name="m4b")
M5 = Meter("m5", 1, 31, SDM120)
M6 = Meter("m6", 4, 14, SDM120)  # only ever in refused configurations

L00 = Layout((seg("a", "A", M1, M2), seg("b", "B", M3)))
L01 = replace(L00, segments=(seg("a", "A", M1, M2, M4), seg("b", "B", M3)))
L02 = replace(L01, segments=(seg("a", "A", M2, M4), seg("b", "B", M3)))
L03 = replace(L02, segments=(seg("a", "A", M2, M4B), seg("b", "B", M3)))
L04 = replace(L03, segments=(seg("a", "A", replace(M2, unit=M4B.unit), replace(M4B, unit=M2.unit)),
                             seg("b", "B", M3)))
L05 = replace(L04, segments=(*L04.segments, seg("c", "C", M5)))
L06 = replace(L05, segments=(*L04.segments, seg("c2", "C", M5)))
L07 = replace(L06, segments=L04.segments)
L08 = replace(L07, segments=(L07.segments[0], seg("b", "S", M3)))  # b's port: now the pty of a silent meter
L09 = replace(L08, segments=(seg("a", "A", L08.segments[0].meters[0], replace(L08.segments[0].meters[1],
                                                                            profile=DDSU666)),
                             L08.segments[1]))
L10 = replace(L09, modbus="modbus2")
L11A = replace(L10, modbus_enabled=False)
L11B = replace(L11A, modbus_enabled=True)
L12A = replace(L11B, http="http2")
L12B = replace(L12A, http=None)
L12C = replace(L12B, http="http2")
WITH_M6 = (seg("a", "A", *L12C.segments[0].meters, M6), L12C.segments[1])
L13A = replace(L12C, segments=WITH_M6, opcua="held-opcua")
L13B = replace(L12C, segments=WITH_M6, modbus="held-modbus")


def replace_meter_model(bridge: "Bridge") -> None:
    """Step 9: the meter at slave 3 on bus A is swapped for another model (the profile change follows)."""
    bridge.buses["A"].meters[3] = SimMeter(3, get_builtin(DDSU666))


@dataclass(frozen=True)
class Step:
    id: str
    layout: Layout
    refused: bool = False  # the reload must be refused: the previous configuration stays in force
    before: Callable[["Bridge"], None] | None = None  # done to the simulated plant before the SIGHUP
    never_fresh: tuple[str, ...] = ()  # meters that must never be served fresh once the reload is applied


STEPS = [
    Step("00-start", L00),
    Step("01-add-meter", L01),
    Step("02-remove-meter", L02),
    Step("03-rename-meter", L03),
    Step("04-swap-unit-ids", L04),
    Step("05-add-segment", L05),
    Step("06-rename-segment", L06),
    Step("07-remove-segment", L07),
    Step("08-segment-port-to-silent-bus", L08, never_fresh=("m3",)),
    Step("09-change-profile", L09, before=replace_meter_model),
    Step("10-move-modbus-listener", L10),
    Step("11a-disable-modbus", L11A),
    Step("11b-enable-modbus", L11B),
    Step("12a-move-http-listener", L12A),
    Step("12b-remove-http", L12B),
    Step("12c-add-http-back", L12C),
    Step("13a-opcua-cannot-bind", L13A, refused=True),
    Step("13b-modbus-cannot-bind", L13B, refused=True),
]


# ------------------------------------------------------------------------------- profiles and probes
@functools.cache
def probe(profile: str) -> Measurement:
    m = next(m for m in get_builtin(profile).measurements if m.name == PROBES[profile])
    assert (m.dtype.value, m.word_order.value, m.scale) == ("float32", "big", 1.0), m  # decoded below as such
    return m


def decode(m: Measurement, data: bytes) -> float:
    return struct.unpack(">f", data[: 2 * m.count])[0]


def plausible(value: Any) -> bool:
    return isinstance(value, (int, float)) and VOLTAGE[0] < value < VOLTAGE[1]


def foreign_probes(profile: str) -> list[Measurement]:
    """Other profiles' probes that touch no register of ``profile``: a unit served with ``profile`` answers
    exception 0x02 to them (and the right value when it is wrongly served with the other profile)."""
    mine = {(m.function, a) for m in get_builtin(profile).measurements for a in range(m.address, m.end)}
    return [p for p in map(probe, PROBES) if not any((p.function, a) in mine for a in range(p.address, p.end))]


# ------------------------------------------------------------------------------- the bridge's log
class Log:
    """The bridge's stderr, read as it comes: JSON entries, and any line that is not one."""

    def __init__(self, stream: asyncio.StreamReader):
        self.entries: list[dict] = []
        self.bad: list[str] = []
        self.eof = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        try:
            while line := await stream.readline():
                try:
                    entry = json.loads(line)
                    ok = isinstance(entry, dict) and {"time", "level", "logger", "message"} <= set(entry)
                except ValueError:
                    ok = False
                if ok:
                    self.entries.append(entry)
                else:
                    self.bad.append(line.decode(errors="replace").rstrip())
        finally:
            self.eof.set()

    def mark(self) -> tuple[int, int]:
        return len(self.entries), len(self.bad)

    def problems(self, since: tuple[int, int] = (0, 0)) -> list[str]:
        """Every line since ``since`` that breaks the rules (not JSON, a traceback, a restart loop), each
        kind once, with how many times it came."""
        found: dict[str, int] = {}

        def add(what: str) -> None:
            found[what] = found.get(what, 0) + 1

        for line in self.bad[since[1]:]:
            add(f"not a JSON log entry: {line[:300]!r}")
        for e in self.entries[since[0]:]:
            msg = str(e.get("message", ""))
            if "exception" in e:
                lines = str(e["exception"]).strip().splitlines()
                where = next((line.strip() for line in reversed(lines) if line.strip().startswith("File ")), "")
                add(f"entry with an exception: {msg[:200]!r}: {lines[-1][:300] if lines else ''} ({where})")
            elif "Traceback" in msg:
                add(f"traceback in a message: {msg[:300]!r}")
            if "restarting" in msg.lower():
                add(f"something is restarting: {msg[:300]!r}")
        return [f"{what} (x{n})" if n > 1 else what for what, n in found.items()]

    def tail(self, n: int = 8) -> str:
        return "\n".join(f"    {e['level']} {e['logger']}: {e['message'][:300]}" for e in self.entries[-n:])

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# ------------------------------------------------------------------------------- helpers
async def eventually(probe_: Callable[[], Awaitable[T]], accept: Callable[[T], bool], timeout: float,
                     what: str) -> T:
    """Call ``probe_`` every 50 ms until ``accept`` says yes and return that result; an AssertionError
    naming ``what`` and the last result (or exception) after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            result = await probe_()
            if accept(result):
                return result
            last = repr(result)
        except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError, ua.UaError, ValueError,
                KeyError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s; last seen {last[:1500]}")
        await asyncio.sleep(0.05)


def require(condition: Any, message: str) -> None:
    """An assertion whose message is only ``message`` (a step lists several; no rewritten-assert noise)."""
    if not condition:
        raise AssertionError(message)


def set_diff(expected: set, got: set) -> str:
    return f"missing {sorted(expected - got)}, unexpected {sorted(got - expected)} (expected {sorted(expected)})"


async def http_get(port: int, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """One GET on its own connection: (status, body)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1."):
        raise EOFError(f"no HTTP response on port {port} (got {data[:80]!r})")
    return int(head.split(b" ", 2)[1]), body


async def http_answers(port: int) -> bool:
    """Whether anything answers HTTP on ``port`` (refused, reset, closed or silent: no)."""
    try:
        await http_get(port, "/healthz", timeout=1.0)
        return True
    except (OSError, EOFError, TimeoutError, ValueError, IndexError):
        return False


async def refuses(port: int) -> bool:
    """Whether a TCP connection to ``port`` is refused."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


METRIC_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_labels(text: str) -> tuple[set[str], set[str], set[tuple[str, str]]]:
    """Segment label values, meter label values and (segment, meter) pairs of the bridge's series."""
    segments, meters, pairs = set(), set(), set()
    for line in text.splitlines():
        if not line.startswith("modbus_bridge_") or "{" not in line:
            continue
        labels = dict(METRIC_LABEL.findall(line[line.index("{"): line.rindex("}") + 1]))
        if "segment" in labels:
            segments.add(labels["segment"])
        if "meter" in labels:
            meters.add(labels["meter"])
            pairs.add((labels.get("segment", ""), labels["meter"]))
    return segments, meters, pairs


class ModbusProbe:
    """A Modbus TCP client that reconnects when its connection broke (a reload may have closed it)."""

    def __init__(self, port: int):
        self.port = port
        self.client: RawModbusClient | None = None

    async def read(self, unit: int, function: int, address: int, count: int) -> bytes:
        if self.client is None:
            self.client = await RawModbusClient.connect(self.port)
        try:
            return await self.client.read(unit, function, address, count)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            await client.close()


@contextlib.asynccontextmanager
async def opcua_client(port: int, timeout: float):
    """A connected asyncua client (security None, anonymous), retried until ``timeout``."""
    url = f"opc.tcp://127.0.0.1:{port}/bridge"

    async def connect() -> Client:
        client = Client(url, timeout=3)
        try:
            async with asyncio.timeout(4):
                await client.connect()
        except BaseException:
            with contextlib.suppress(Exception):
                await client.disconnect_socket()
            raise
        return client

    client = await eventually(connect, lambda c: True, timeout, f"OPC UA connect to {url}")
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await client.disconnect()


def is_good(dv: ua.DataValue) -> bool:
    return dv.StatusCode is not None and dv.StatusCode.value == ua.StatusCodes.Good


# ------------------------------------------------------------------------------- the shared bridge
class Bridge:
    def __init__(self, proc: asyncio.subprocess.Process, log: Log, path, buses: dict[str, SimulatedBus],
                 ports: dict[str, int], holders: list[socket.socket]):
        self.proc, self.log, self.path = proc, log, path
        self.buses, self.ports, self.holders = buses, ports, holders
        self.current = STEPS[0].layout  # the configuration that must be in force
        self.units_seen: set[int] = set(self.current.units)  # every unit any written configuration named
        self.log_checked = (0, 0)  # the log is checked up to here (``Log.mark``)
        self.listened: dict[str, set[str]] = {"modbus": set(), "http": set()}  # port keys of applied layouts
        self.broker: Mosquitto | None = None  # the MQTT broker every configuration publishes to

    def listens(self, layout: Layout) -> None:
        """``layout`` is now in force: remember where it has the bridge listen."""
        if layout.modbus_enabled:
            self.listened["modbus"].add(layout.modbus)
        if layout.http is not None:
            self.listened["http"].add(layout.http)

    def log_problems(self) -> list[str]:
        """The log's problems since the last call: each line is judged once, by the step it came in."""
        problems = self.log.problems(self.log_checked)
        self.log_checked = self.log.mark()
        return problems

    def render(self, layout: Layout) -> str:
        out = [f"stale_after: {STALE_AFTER}", "segments:"]
        for s in layout.segments:
            out += [f"  - name: {s.name}", f"    port: {self.buses[s.bus].path}", f"    timeout: {TIMEOUT}",
                    "    meters:"]
            out += [f"      - {{name: {m.name}, slave: {m.slave}, unit: {m.unit}, profile: {m.profile}, "
                    f"poll_interval: {POLL}}}" for m in s.meters]
        out += ["modbus_tcp:", f"  enabled: {'true' if layout.modbus_enabled else 'false'}",
                f"  listen: 127.0.0.1:{self.ports[layout.modbus]}",
                "opcua:", "  enabled: true", f"  endpoint: opc.tcp://127.0.0.1:{self.ports[layout.opcua]}/bridge",
                "  security: [None]"]
        if layout.http is not None:
            out += ["http:", f"  listen: 127.0.0.1:{self.ports[layout.http]}"]
        # every side on: MQTT (both flavours, to the module's broker) and the energy recorder, in every step
        out += ["mqtt:", f"  brokers: [{self.broker.url}]", "  client_id: matrix",
                "  sparkplug: {group_id: matrix, edge_node_id: panel}", "  json: {topic: matrix/panel}",
                "energy:", "  interval: 1"]
        return "\n".join(out) + "\n"

    def write(self, layout: Layout) -> None:
        self.path.write_text(self.render(layout))
        self.units_seen |= layout.units

    def silent(self, segment: Segment, meter: Meter) -> bool:
        sim = self.buses[segment.bus].meters.get(meter.slave)
        return sim is None or sim.faults.silent

    async def reload(self) -> tuple[str, str, float | None]:
        """SIGHUP, then what the log tells: (outcome, its line, loop time it was seen); outcome is one of
        "applied", "refused", "legacy" (only the old code's "reload: ... segment(s) kept" line), "none",
        "exited". The time is when the line was seen (for "legacy", that of the legacy line)."""
        loop = asyncio.get_running_loop()
        seen = len(self.log.entries)
        self.proc.send_signal(signal.SIGHUP)
        deadline = loop.time() + RELOAD_TIMEOUT
        legacy: tuple[str, float] | None = None
        while True:
            while seen < len(self.log.entries):
                msg = self.log.entries[seen]["message"]
                seen += 1
                for outcome in ("applied", "refused"):
                    if f"reload {outcome}" in msg:
                        return outcome, msg, loop.time()
                if legacy is None and "segment(s) kept" in msg:
                    legacy = (msg, loop.time())
                    deadline = min(deadline, loop.time() + LEGACY_GRACE)
            if self.proc.returncode is not None:
                return "exited", f"exit status {self.proc.returncode}", None
            if loop.time() > deadline:
                return ("legacy", *legacy) if legacy else ("none", "", None)
            await asyncio.sleep(0.02)


def hold_port() -> socket.socket:
    """A listening socket on a free loopback port, kept open so nothing else can bind that port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bridge(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reload-matrix")
    buses: dict[str, SimulatedBus] = {}
    for key, meters in BUSES.items():
        sims = [SimMeter(slave, get_builtin(profile)) for slave, profile in meters.items()]
        for sim in sims:
            sim.faults.silent = key in SILENT_BUSES
        buses[key] = SimulatedBus(sims)
        buses[key].open()
    holders = [hold_port(), hold_port()]
    ports = {"held-opcua": holders[0].getsockname()[1], "held-modbus": holders[1].getsockname()[1]}
    for key in ("modbus", "modbus2", "opcua", "http", "http2"):
        while (port := free_port()) in ports.values():
            pass
        ports[key] = port
    path = tmp / "bridge.yaml"
    proc = log = None
    broker = Mosquitto(tmp / "broker").start()
    try:
        b = Bridge(None, None, path, buses, ports, holders)  # type: ignore[arg-type]
        b.broker = broker
        b.write(STEPS[0].layout)
        proc = await asyncio.create_subprocess_exec(*BRIDGE, str(path), stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE, limit=1 << 20)
        log = Log(proc.stderr)
        b.proc, b.log = proc, log

        async def ready() -> int:
            if proc.returncode is not None:
                raise AssertionError(f"the bridge exited with status {proc.returncode}:\n{log.tail()}")
            return (await http_get(ports["http"], "/readyz"))[0]

        try:
            await eventually(ready, lambda status: status == 200, START_TIMEOUT, "start: /readyz 200")
        except AssertionError as exc:
            pytest.fail(f"the bridge did not start: {exc}\n{log.tail()}\n" + "\n".join(log.bad[-5:]),
                        pytrace=False)
        yield b
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        if log is not None:
            await log.close()
        broker.stop()
        for bus in buses.values():
            bus.close()
        for sock in holders:
            sock.close()


# ------------------------------------------------------------------------------- one step
class StepRun:
    """Applies one step and checks every side; collects the problems, fails with all of them."""

    def __init__(self, b: Bridge, step: Step):
        self.b, self.step = b, step
        self.failures: list[str] = []

    @property
    def wait(self) -> float:
        return WAIT if not self.failures else WAIT_AFTER_FAILURE

    def port(self, key: str) -> int:
        return self.b.ports[key]

    async def check(self, what: str, work: Callable[[], Awaitable[None]]) -> bool:
        """Run one check; a failure is recorded (prefixed with ``what``), not raised. True if it passed."""
        try:
            await work()
            return True
        except AssertionError as exc:
            self.failures.append(f"{what}: {exc}")
        except Exception as exc:  # an unexpected error in a check is a finding too, not a crash of the run
            self.failures.append(f"{what}: {type(exc).__name__}: {exc}")
        return False

    async def run(self) -> None:
        b, step = self.b, self.step
        assert b.proc.returncode is None, (
            f"step {step.id}: the bridge is not running (exit status {b.proc.returncode}):\n{b.log.tail()}")
        before = b.current
        if step is not STEPS[0]:
            if step.before is not None:
                step.before(b)
            b.write(step.layout)
            watch = NeverFresh(self, before, step.layout) if step.never_fresh else None
            outcome, line, done_at = await b.reload()
            if outcome == "exited":
                if watch is not None:
                    watch.task.cancel()
                pytest.fail(f"step {step.id}: the bridge exited on SIGHUP ({line}):\n{b.log.tail()}", pytrace=False)
            expected = "refused" if step.refused else "applied"
            if outcome != expected:
                got = {"none": "no reload outcome line at all; the log since:\n" + b.log.tail(6),
                       "legacy": f"only {line!r}"}.get(outcome, repr(line))
                self.failures.append(f"reload outcome: expected a log line containing 'reload {expected}' within "
                                     f"{RELOAD_TIMEOUT:g} s; got {got}")
            if not step.refused:
                b.current = step.layout  # the model moves on, whatever the bridge did
            if watch is not None:
                await self.check(f"{', '.join(step.never_fresh)} served fresh after the port changed",
                                 lambda: watch.result(done_at))
        now = b.current
        b.listens(now)
        await self.check_http(now)
        await self.check_opcua(now)
        await self.check_modbus(now)
        await self.check("log", self.check_log)
        if self.failures:
            pytest.fail(f"step {step.id}: {len(self.failures)} problem(s):\n  - " + "\n  - ".join(self.failures),
                        pytrace=False)

    # --------------------------------------------------------------------------- HTTP
    async def check_http(self, now: Layout) -> None:
        for key in sorted(self.b.listened["http"] - {now.http}):  # where an earlier configuration had it listen
            old = self.port(key)
            await self.check("HTTP", lambda old=old: eventually(
                lambda: http_answers(old), lambda answers: not answers, self.wait, f"the old port {old} still answers"))
        if now.http is None:
            return
        port = self.port(now.http)
        if not await self.check("HTTP", lambda: eventually(lambda: http_answers(port), bool, self.wait,
                                                           f"nothing answers on port {port}")):
            return
        await self.check("HTTP", lambda: eventually(lambda: http_get(port, "/readyz"), lambda r: r[0] == 200,
                                                    self.wait, "/readyz 200"))

        expected_segments = {(s.name, self.b.buses[s.bus].path) for s in now.segments}
        expected_meters = {(s.name, m.name, m.unit, m.profile) for s, m in now.meters}
        silent = {m.name for s, m in now.meters if self.b.silent(s, m)}

        async def status() -> list[str]:
            code, body = await http_get(port, "/status.json")
            if code != 200:
                return [f"HTTP {code}: {body[:200]!r}"]
            doc = json.loads(body)
            wrong = []
            mqtt = doc["upstream"].get("mqtt", {})
            if mqtt.get("connected") != 1:
                wrong.append(f"MQTT not connected to its broker: {mqtt.get('note') or mqtt}")
            energy = doc.get("energy") or {}
            if set(energy.get("meters", ())) != {m.name for _, m in now.meters}:
                wrong.append(f"energy meters {energy.get('meters')}, not the configured ones")
            got_segments = {(s["name"], s["port"]) for s in doc["segments"]}
            got_meters = {(s["name"], m["name"], m["unit"], m["profile"]) for s in doc["segments"] for m in s["meters"]}
            if got_segments != expected_segments:
                wrong.append("segments (name, port): " + set_diff(expected_segments, got_segments))
            if got_meters != expected_meters:
                wrong.append("meters (segment, name, unit, profile): " + set_diff(expected_meters, got_meters))
            for s in doc["segments"]:
                for m in s["meters"]:
                    if m["name"] in silent:
                        if m["health"] == "fresh":
                            wrong.append(f"{m['name']} is fresh, but its meter never answers")
                        continue
                    if m["health"] != "fresh":
                        wrong.append(f"{m['name']} is {m['health']}, not fresh")
                        continue
                    name = PROBES.get(m["profile"])
                    value = next((v["value"] for v in m["values"] if v["name"] == name), "absent")
                    if not plausible(value):
                        wrong.append(f"{m['name']}.{name} = {value!r}, not a plausible voltage")
            return wrong

        await self.check("HTTP", lambda: eventually(
            status, lambda wrong: not wrong, self.wait,
            "/status.json: the configured segments and meters, fresh with plausible values; MQTT connected; "
            "energy for every meter"))
        first = now.meters[0][1].name
        await self.check("HTTP", lambda: eventually(lambda: http_get(port, f"/api/energy?meter={first}"),
                                                    lambda r: r[0] == 200, self.wait, f"/api/energy?meter={first} 200"))
        await self.check("HTTP", lambda: eventually(lambda: http_get(port, "/"), lambda r: r[0] == 200, self.wait,
                                                    "GET / 200"))

        want = ({s.name for s in now.segments}, {m.name for _, m in now.meters},
                {(s.name, m.name) for s, m in now.meters})

        async def metrics() -> list[str]:
            code, body = await http_get(port, "/metrics")
            if code != 200:
                return [f"HTTP {code}"]
            got = metric_labels(body.decode())
            return [f"{what} labels: {set_diff(w, g)}"
                    for what, w, g in zip(("segment", "meter", "(segment, meter)"), want, got) if w != g]

        await self.check("HTTP", lambda: eventually(
            metrics, lambda wrong: not wrong, self.wait,
            "/metrics: series for exactly the configured segments and meters"))

    # --------------------------------------------------------------------------- OPC UA
    async def check_opcua(self, now: Layout) -> None:
        try:
            async with opcua_client(self.port(now.opcua), self.wait) as client:
                await self._check_opcua(client, now)
        except AssertionError as exc:  # could not connect
            self.failures.append(f"OPC UA: {exc}")

    async def _check_opcua(self, client: Client, now: Layout) -> None:
        ns = await client.get_namespace_index(NAMESPACE)

        def node(ident: str):
            return client.get_node(ua.NodeId(ident, ns))

        async def browse(ident: str, want: set[str]) -> None:
            got = {d.BrowseName.Name for d in await node(ident).get_children_descriptions()
                   if d.NodeClass == ua.NodeClass.Object}
            require(got == want, f"Objects/{ident.rstrip('/')}: {set_diff(want, got)}")

        await self.check("OPC UA", lambda: browse("Meters/", {m.name for _, m in now.meters}))
        await self.check("OPC UA", lambda: browse("Segments/", {s.name for s in now.segments}))

        async def properties() -> None:
            # each segment's port; each meter's unit id, profile and segment
            want: dict[str, Any] = {f"Segments/{s.name}.Port": self.b.buses[s.bus].path for s in now.segments}
            for s, m in now.meters:
                want |= {f"{m.name}.UnitId": m.unit, f"{m.name}.Profile": m.profile, f"{m.name}.Segment": s.name}
            dvs = await client.read_attributes([node(i) for i in want], ua.AttributeIds.Value)
            wrong = [f"{ident} = {dv.Value.Value if is_good(dv) else dv.StatusCode.name!r} (expected {value!r})"
                     for (ident, value), dv in zip(want.items(), dvs) if not is_good(dv) or dv.Value.Value != value]
            require(not wrong, "properties: " + "; ".join(wrong))

        await self.check("OPC UA", properties)

        async def measurements(m: Meter) -> None:
            described = await node(m.name).get_children_descriptions()
            analog = {d.BrowseName.Name for d in described if d.TypeDefinition == ua.NodeId(ua.ObjectIds.AnalogItemType)}
            want = {p.name for p in get_builtin(m.profile).measurements}
            require(analog == want, f"measurements of {m.name} ({m.profile}): {set_diff(want, analog)}")

        for _, m in now.meters:
            await self.check("OPC UA", lambda m=m: measurements(m))

        # a measurement of every meter: Good and plausible, or (meter that never answers) not Good
        points = [(self.b.silent(s, m), f"{m.name}.{probe(m.profile).name}") for s, m in now.meters]
        nodes = [node(ident) for _, ident in points]

        async def values() -> list[str]:
            wrong = []
            for (silent, ident), dv in zip(points, await client.read_attributes(nodes, ua.AttributeIds.Value)):
                if silent and is_good(dv):
                    wrong.append(f"{ident} Good ({dv.Value.Value}), but its meter never answers")
                elif not silent and not (is_good(dv) and plausible(dv.Value.Value)):
                    wrong.append(f"{ident}: {dv.StatusCode.name} {dv.Value.Value!r}")
            return wrong

        await self.check("OPC UA", lambda: eventually(
            values, lambda wrong: not wrong, self.wait,
            "measurements Good with plausible values (not Good for meters that never answer)"))

    # --------------------------------------------------------------------------- Modbus TCP
    async def check_modbus(self, now: Layout) -> None:
        current = {now.modbus} if now.modbus_enabled else set()
        for key in sorted(self.b.listened["modbus"] - current):  # where an earlier configuration had it listen
            old = self.port(key)
            await self.check("Modbus TCP", lambda old=old: eventually(
                lambda: refuses(old), bool, self.wait, f"the old port {old} does not refuse connections"))
        if not now.modbus_enabled:
            return
        client = ModbusProbe(self.port(now.modbus))
        try:
            if not await self.check("Modbus TCP", lambda: eventually(
                    lambda: client.read(min(self.b.units_seen), 4, 0, 2), lambda r: True, self.wait,
                    f"no answer on port {client.port}")):
                return
            for s, m in now.meters:
                p = probe(m.profile)

                def read(unit=m.unit, p=p):
                    return client.read(unit, p.function, p.address, p.count)

                if self.b.silent(s, m):  # never answers on its bus: never read
                    await self.check("Modbus TCP", lambda read=read, fn=p.function, m=m: eventually(
                        read, lambda r: r == bytes((fn | 0x80, 0x0B)), self.wait,
                        f"unit {m.unit} ({m.name}, its meter never answers) -> exception 0x0B"))
                else:
                    await self.check("Modbus TCP", lambda read=read, p=p, m=m: eventually(
                        read, lambda r: r[0] == p.function and r[1] == 2 * p.count and plausible(decode(p, r[2:])),
                        self.wait, f"unit {m.unit} ({m.name}, {m.profile}) FC{p.function} {p.name} @{p.address}: "
                                   f"a plausible value"))
                for f in foreign_probes(m.profile):
                    await self.check("Modbus TCP", lambda f=f, m=m: eventually(
                        lambda: client.read(m.unit, f.function, f.address, f.count),
                        lambda r: r == bytes((f.function | 0x80, 0x02)), self.wait,
                        f"unit {m.unit} ({m.name}, {m.profile}) FC{f.function} @{f.address}, outside its profile "
                        f"-> exception 0x02"))
            for unit in sorted(self.b.units_seen - now.units):
                await self.check("Modbus TCP", lambda unit=unit: eventually(
                    lambda: client.read(unit, 4, 0, 2), lambda r: r == b"\x84\x0a", self.wait,
                    f"unit {unit} (not configured) -> exception 0x0A"))
        finally:
            await client.close()

    # --------------------------------------------------------------------------- log
    async def check_log(self) -> None:
        problems = self.b.log_problems()
        require(not problems, "; ".join(problems))


class NeverFresh:
    """Watches Modbus TCP and /status.json from the SIGHUP on (OPC UA from the end of the reload) for the
    step's ``never_fresh`` meters (moved to a bus where nothing answers). Once the reload is done, for longer
    than stale_after, none may be served fresh (their values would come from the old bus), and their old bus
    may hear no more requests."""

    def __init__(self, run: StepRun, before: Layout, after: Layout):
        self.run, self.before, self.after = run, before, after
        self.loop = asyncio.get_running_loop()
        self.meters = [m for _, m in after.meters if m.name in run.step.never_fresh]
        self.seen: list[tuple[float, str]] = []  # (loop time the request was sent, what was served fresh)
        self.until = self.loop.create_future()  # the loop time to stop at, once the reload is done
        work = [self.opcua(before.opcua), self.opcua(after.opcua)] if before.opcua != after.opcua else \
            [self.opcua(after.opcua)]
        for layout in {before, after}:
            if layout.modbus_enabled:
                work.append(self.modbus(layout.modbus))
            if layout.http is not None:
                work.append(self.http(layout.http))
        self.task = asyncio.gather(*work)

    def running(self) -> bool:
        return not self.until.done() or self.loop.time() < self.until.result()

    async def result(self, done_at: float | None) -> None:
        if done_at is None:  # the reload never finished: nothing to judge
            self.until.set_result(0.0)
            await self.task
            return
        buses = {m.name: self.run.b.buses[s.bus] for s, m in self.before.meters if m.name in self.run.step.never_fresh}
        requests = {name: bus.stats.requests for name, bus in buses.items()}
        self.until.set_result(done_at + STALE_AFTER + 0.5)
        await self.task
        violations = [f"+{t - done_at:.2f} s: {what}" for t, what in self.seen if t > done_at]
        for name, bus in buses.items():
            if (polled := bus.stats.requests - requests[name]) > 0:
                violations.append(f"the old bus of {name} got {polled} request(s) after the reload")
        require(not violations, "; ".join(violations[:6]) + (f" (and {len(violations) - 6} more)"
                                                              if len(violations) > 6 else ""))

    async def modbus(self, key: str) -> None:
        client = ModbusProbe(self.run.port(key))
        try:
            while self.running():
                for m in self.meters:
                    p = probe(m.profile)
                    sent = self.loop.time()
                    with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
                        reply = await client.read(m.unit, p.function, p.address, p.count)
                        if reply[0] == p.function:
                            self.seen.append((sent, f"Modbus TCP unit {m.unit} served {m.name}'s {p.name} "
                                                    f"({decode(p, reply[2:]):.1f})"))
                await asyncio.sleep(0.02)
        finally:
            await client.close()

    async def http(self, key: str) -> None:
        names = {m.name for m in self.meters}
        while self.running():
            sent = self.loop.time()
            with contextlib.suppress(OSError, TimeoutError, EOFError, ValueError, KeyError):
                status, body = await http_get(self.run.port(key), "/status.json", timeout=1.0)
                if status == 200:
                    for s in json.loads(body)["segments"]:
                        for m in s["meters"]:
                            if m["name"] in names and m["health"] == "fresh":
                                self.seen.append((sent, f"status.json shows {m['name']} fresh"))
            await asyncio.sleep(0.05)

    async def opcua(self, key: str) -> None:
        # from the end of the reload on only: a client that reconnects while asyncua stops its server can
        # hold that stop up (BinaryServer.stop closes the connections, then waits for every connection to
        # end), which is not what this step is about
        await asyncio.shield(self.until)
        while self.running():
            with contextlib.suppress(Exception):  # not listening yet, restarted under us: try again
                async with opcua_client(self.run.port(key), 1.0) as client:
                    ns = await client.get_namespace_index(NAMESPACE)
                    nodes = [client.get_node(ua.NodeId(f"{m.name}.{probe(m.profile).name}", ns)) for m in self.meters]
                    while self.running():
                        sent = self.loop.time()
                        for m, dv in zip(self.meters, await client.read_attributes(nodes, ua.AttributeIds.Value)):
                            if is_good(dv):
                                self.seen.append((sent, f"OPC UA {m.name}.{probe(m.profile).name} Good "
                                                        f"({dv.Value.Value:.1f})"))
                        await asyncio.sleep(0.05)
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("step", STEPS, ids=[s.id for s in STEPS])
async def test_reload_step(bridge: Bridge, step: Step):
    await StepRun(bridge, step).run()


async def test_sigterm_stops_cleanly(bridge: Bridge):
    """SIGTERM: exit status 0 within STOP_TIMEOUT, and nothing wrong in the log since the last step."""
    if bridge.proc.returncode is not None:
        pytest.fail(f"the bridge is not running (exit status {bridge.proc.returncode}):\n{bridge.log.tail()}",
                    pytrace=False)
    bridge.proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_TIMEOUT):
            status = await bridge.proc.wait()
    except TimeoutError:
        pytest.fail(f"SIGTERM: the bridge did not exit within {STOP_TIMEOUT:g} s:\n{bridge.log.tail()}",
                    pytrace=False)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            await bridge.log.eof.wait()
    problems = bridge.log_problems()
    if status != 0 or problems:
        pytest.fail(f"SIGTERM: exit status {status}; log problems: {problems}\n{bridge.log.tail()}", pytrace=False)
