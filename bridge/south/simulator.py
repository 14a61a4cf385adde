"""Simulated meters on pseudo-terminals, for the demo and the tests.

A ``SimulatedBus`` is the slave side of one RS485 segment: it owns the master
end of a pty, answers real RTU frames (with real CRCs) for the ``SimMeter``s
on it, and can emulate wire time (each reply waits for the characters of the
request and reply at the configured baud plus a turnaround), counting any
request that arrives before the 3.5-character silence has passed. Meters can
misbehave on command so the bridge's fault handling can be shown harmless.
"""
from __future__ import annotations

import asyncio
import math
import os
import random
import time
import tty
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from bridge.core import codec
from bridge.core import pdu as P
from bridge.core import rtu
from bridge.core.codec import Function
from bridge.core.model import Profile


@dataclass
class Faults:
    """Misbehaviour on command; each field is consumed or checked per request."""

    silent: bool = False  # never answer
    exception: int | None = None  # answer every request with this exception code
    corrupt: int = 0  # the next N replies carry a bad CRC
    corrupt_rate: float = 0.0  # probability that any reply carries a bad CRC
    garbage: bytes = b""  # stray bytes sent before the next reply (once)
    delay: float = 0.0  # extra seconds before every reply
    late: int = 0  # the next N replies come ``late_by`` seconds late (after the master gave up)
    late_by: float = 0.0
    wrong_slave: int = 0  # the next N replies come from another slave address
    truncate: int = 0  # the next N replies are cut short
    wrong_function: int = 0  # the next N replies carry another function code
    wrong_length: int = 0  # the next N read replies hold one register too few


class SimMeter:
    """One meter: register tables built from a profile, values that move like a real load."""

    def __init__(self, slave: int, profile: Profile, *, animate: bool = True, seed: int | None = None,
                 feeds: Sequence[SimMeter] = (), extra_w: float = 0.0):
        """``feeds``: the meters downstream of this one (an incomer's sub-meters): its power is theirs plus
        ``extra_w`` (a known unmetered load), and its energy counters are the sum of theirs plus that load's,
        so an energy balance of this panel shows exactly ``extra_w``."""
        self.slave = slave
        self.profile = profile
        self.animate = animate
        self.feeds = tuple(feeds)
        self.extra_w = extra_w
        self._extra_kwh = 0.0
        self.phases = 3 if any(m.name.endswith("_l1") for m in profile.measurements) else 1
        self.active_w = self.reactive_w = 0.0
        self.faults = Faults()
        self.requests = 0
        self.functions: deque[int] = deque(maxlen=10000)  # function codes of the latest requests, in order
        self.tables: dict[Function, dict[int, int]] = {Function.HOLDING: {}, Function.INPUT: {}}
        self._defined: dict[Function, set[int]] = {Function.HOLDING: set(), Function.INPUT: set()}
        for m in profile.measurements:
            self._defined[m.function].update(range(m.address, m.end))
        for r in profile.ranges:
            self._defined[r.function].update(range(r.start, r.end))
        self._rng = random.Random(seed if seed is not None else slave)
        self._load = 5.0 + self._rng.random() * 10  # amps
        self._energy = 1000.0 * self._rng.random()
        self._last_tick = time.monotonic()
        self._phase = self._rng.random() * math.tau
        self.set_values(self._physics(0.0))

    # ----------------------------------------------------------- values
    def set_value(self, name: str, value: float) -> None:
        m = self._measurement(name)
        raw = value / m.scale
        if not m.dtype.is_float:
            raw = round(raw)
        for i, word in enumerate(codec.encode(raw, m.dtype, m.word_order)):
            self.tables[m.function][m.address + i] = word

    def set_values(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.set_value(name, value)

    def value(self, name: str) -> float:
        m = self._measurement(name)
        regs = [self.tables[m.function].get(m.address + i, 0) for i in range(m.count)]
        return codec.decode(regs, m.dtype, m.word_order) * m.scale

    def _measurement(self, name: str):
        for m in self.profile.measurements:
            if m.name == name:
                return m
        raise KeyError(f"profile {self.profile.name} has no measurement {name!r}")

    def tick(self) -> None:
        """Advance the simulated load to now (called before each answer)."""
        now = time.monotonic()
        dt, self._last_tick = now - self._last_tick, now
        if self.animate and dt > 0:
            self.set_values(self._physics(dt))

    def _physics(self, dt: float) -> dict[str, float]:
        rng = self._rng
        self._load = min(40.0, max(0.2, self._load + rng.gauss(0, 0.3) * math.sqrt(dt + 1e-9) * 3))
        self._phase += dt * 0.5
        voltage = 230.0 + 3.0 * math.sin(self._phase) + rng.gauss(0, 0.2)
        if self.feeds:  # an incomer: what its sub-meters draw, plus the unmetered load (at pf 1)
            for f in self.feeds:
                f.tick()
            active = sum(f.active_w for f in self.feeds) + self.extra_w
            reactive = sum(f.reactive_w for f in self.feeds)
            apparent = math.hypot(active, reactive)
            pf = active / apparent if apparent else 1.0
            current = apparent / (self.phases * voltage)
            self._extra_kwh += self.extra_w * dt / 3.6e6
            self._energy = sum(f._energy for f in self.feeds) + self._extra_kwh
        else:
            pf = 0.93 + 0.04 * math.sin(self._phase / 3)
            current = self._load
            apparent = self.phases * voltage * current
            active = apparent * pf
            reactive = math.sqrt(max(apparent**2 - active**2, 0.0))
            self._energy += active * dt / 3.6e6
        self.active_w, self.reactive_w = active, reactive
        base = {
            "voltage": voltage,
            "current": current,
            "active_power": active,
            "apparent_power": apparent,
            "reactive_power": reactive,
            "power_factor": pf,
            "phase_angle": math.degrees(math.acos(pf)),
            "frequency": 50.0 + 0.02 * math.sin(self._phase * 2),
            "import_active_energy": self._energy,
            "export_active_energy": 0.0,
            "import_reactive_energy": self._energy * 0.3,
            "export_reactive_energy": 0.0,
            "total_active_energy": self._energy,
            "total_reactive_energy": self._energy * 0.3,
            "neutral_current": self._load * 0.1,
        }
        values = {}
        for m in self.profile.measurements:
            if m.name.startswith("voltage_l") and m.name.count("_l") == 2:  # line-to-line
                values[m.name] = voltage * math.sqrt(3)
                continue
            stem = m.name.rsplit("_l", 1)[0] if m.name[-3:-1] == "_l" else m.name
            if stem in base:
                # a phase's share of the totals (power and energy), never of a ratio such as the power factor
                shared = stem.endswith(("_power", "_energy"))
                share = 1 / self.phases if m.name != stem and shared else 1.0
                values[m.name] = base[stem] * share
        return self._fit(values)

    def _fit(self, values: dict[str, float]) -> dict[str, float]:
        """Clamp into what each register type can hold (unsigned types cannot go negative)."""
        out = {}
        for m in self.profile.measurements:
            if m.name in values:
                v = values[m.name]
                if m.dtype.value.startswith("uint"):
                    v = max(v, 0.0)
                out[m.name] = v
        return out

    # ----------------------------------------------------------- protocol
    def handle(self, pdu: bytes) -> bytes:
        """The response PDU to a request PDU addressed to this meter."""
        self.requests += 1
        self.functions.append(pdu[0] if pdu else 0)
        if self.faults.exception is not None:
            return P.exception_pdu(pdu[0] if pdu else 0, self.faults.exception)
        try:
            request = P.parse_request(pdu)
        except P.PduException as exc:
            return exc.pdu()
        self.tick()
        if isinstance(request, P.ReadRequest):
            fn = Function(request.function)
            addresses = range(request.address, request.end)
            # like real meters: a read must touch the map (gaps inside it read as 0 unless the
            # profile says the meter refuses them)
            defined = [a in self._defined[fn] for a in addresses]
            if not any(defined) or (not self.profile.read_gaps and not all(defined)):
                return P.exception_pdu(request.function, P.ILLEGAL_DATA_ADDRESS)
            table = self.tables[fn]
            data = codec.registers_to_bytes([table.get(a, 0) for a in addresses])
            return P.read_response_pdu(request.function, data)
        for i, v in enumerate(request.values):
            self.tables[Function.HOLDING][request.address + i] = v
        return P.write_response_pdu(request)


@dataclass
class BusStats:
    requests: int = 0  # well-formed requests seen, to any slave
    answered: int = 0
    silence_violations: int = 0  # requests that began before t3.5 of quiet had passed
    garbage_bytes: int = 0
    # (time, slave, function) of the latest requests, oldest first
    log: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=10000))


class SimulatedBus:
    """The meters of one segment behind one pseudo-terminal."""

    def __init__(
        self,
        meters: list[SimMeter],
        *,
        baudrate: int = 9600,
        parity: str = "N",
        stopbits: int = 1,
        emulate_wire: bool = False,
        turnaround: float = 0.0,
    ):
        self.meters = {m.slave: m for m in meters}
        self.emulate_wire = emulate_wire
        self.turnaround = turnaround
        self.char = rtu.char_time(baudrate, parity, stopbits)
        self.silence = rtu.silence(baudrate, parity, stopbits)
        self.stats = BusStats()
        self._master_fd: int | None = None
        self._slave_fd: int | None = None
        self.path = ""
        self._buf = bytearray()
        self._last_rx = 0.0
        self._line_quiet_at = 0.0  # when our last reply finished on the (emulated) wire
        self._tasks: set[asyncio.Task] = set()

    def open(self) -> str:
        """Create the pty; returns the device path the bridge opens as its serial port."""
        self._master_fd, self._slave_fd = os.openpty()
        tty.setraw(self._slave_fd)
        os.set_blocking(self._master_fd, False)
        self.path = os.ttyname(self._slave_fd)
        asyncio.get_running_loop().add_reader(self._master_fd, self._on_readable)
        return self.path

    def close(self) -> None:
        """Tear the pty down (as if the adapter were unplugged)."""
        for task in self._tasks:
            task.cancel()
        if self._master_fd is not None:
            asyncio.get_running_loop().remove_reader(self._master_fd)
            os.close(self._master_fd)
            self._master_fd = None
        if self._slave_fd is not None:
            os.close(self._slave_fd)
            self._slave_fd = None

    async def __aenter__(self) -> "SimulatedBus":
        self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master_fd, 4096)
        except BlockingIOError:
            return
        except OSError:  # nobody has the port open (EIO): nothing to read
            return
        now = time.monotonic()
        if self._buf and now - self._last_rx > max(0.05, 10 * self.silence):
            self.stats.garbage_bytes += len(self._buf)
            self._buf.clear()  # a long gap ends any partial frame, as on a real line
        if not self._buf and self.emulate_wire and now < self._line_quiet_at + self.silence:
            self.stats.silence_violations += 1
        self._last_rx = now
        self._buf += data
        while True:
            used, frame = rtu.decode_request(self._buf)
            if frame is None:
                if used:
                    self.stats.garbage_bytes += used
                    del self._buf[:used]
                break
            slave, pdu = frame
            start = used - (len(pdu) + 3)
            self.stats.garbage_bytes += start
            del self._buf[:used]
            self.stats.requests += 1
            self.stats.log.append((now, slave, pdu[0] if pdu else 0))
            meter = self.meters.get(slave)
            if meter is None or meter.faults.silent:
                continue
            self._reply(meter, pdu, now, len(pdu) + 3)

    def _reply(self, meter: SimMeter, pdu: bytes, received: float, request_len: int) -> None:
        f = meter.faults
        response = meter.handle(pdu)
        slave = meter.slave
        if f.wrong_slave:
            f.wrong_slave -= 1
            slave = (slave % 247) + 1
        if f.wrong_function:
            f.wrong_function -= 1
            response = bytes((response[0] ^ 0x07,)) + response[1:]  # 3 <-> 4, 6 -> 1, 16 -> 23
        if f.wrong_length and response[0] in (3, 4) and response[1] >= 4:
            f.wrong_length -= 1
            response = bytes((response[0], response[1] - 2)) + response[2:-2]
        adu = rtu.frame(slave, response)
        if f.corrupt or (f.corrupt_rate and meter._rng.random() < f.corrupt_rate):
            f.corrupt = max(0, f.corrupt - 1)
            adu = adu[:-1] + bytes((adu[-1] ^ 0x5A,))
        if f.truncate:
            f.truncate -= 1
            adu = adu[: len(adu) // 2]
        if f.garbage:
            adu, f.garbage = f.garbage + adu, b""
        delay = f.delay + self.turnaround
        if f.late:
            f.late -= 1
            delay += f.late_by
        if self.emulate_wire:
            # the request's own wire time (it arrived all at once over the pty) and the reply's
            delay += request_len * self.char + len(adu) * self.char
        if delay <= 0:
            self._send(adu)
        else:
            task = asyncio.get_running_loop().create_task(self._send_later(adu, received + delay))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_later(self, adu: bytes, at: float) -> None:
        # timers may fire a little early (uvloop keeps a 1 ms clock): finish the wait by yielding
        while (wait := at - time.monotonic()) > 0:
            await asyncio.sleep(wait if wait > 0.002 else 0)
        self._send(adu)

    def _send(self, adu: bytes) -> None:
        if self._master_fd is None:
            return
        try:
            os.write(self._master_fd, adu)
            self.stats.answered += 1
        except OSError:
            pass
        self._line_quiet_at = time.monotonic()  # the reply's last character has just left
