"""The upstream Modbus TCP server: a lean asyncio.Protocol over the register image.

Reads are answered synchronously from the image inside ``data_received``, so
every request in one TCP segment is answered, in order, with its own
transaction id, and a read never waits for the bus. Writes to writable meters
are handed to their segment and answered when the meter answers.

Every input boundary is bounded (docs/security.md): a header that cannot be
Modbus closes that connection; a request must arrive in full within
``frame_timeout``; an idle connection is closed after ``idle_timeout``; at most
``max_connections`` at once and ``max_pending`` bus requests per connection;
a client that does not read its answers stops being read (TCP backpressure).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import struct
import time
from collections.abc import Awaitable, Callable, Sequence

from bridge.core import mbap
from bridge.core import pdu as P
from bridge.core.errors import BridgeError, ExceptionReply, ProtocolError, TransactionError
from bridge.core.image import Change, Health, RegisterImage, RegisterTable
from bridge.core.model import Config, ConsolidatedMap, MeterConfig, ModbusTcpConfig, VirtualMeterConfig, merge_intervals
from bridge.north.modbus_virtual import LastInterval, VirtualUnits
from bridge.north.side import Staged, listen_error
from bridge.view import NorthStatus

log = logging.getLogger("bridge.modbus_tcp")

# unit, request -> the meter's reply PDU (raises TransactionError when it did not answer)
WriteRouter = Callable[[int, P.WriteRequest], Awaitable[bytes]]

SERVER_BUSY = 0x06
BROADCAST_UNITS = (0, 255)  # 0: broadcast in Modbus; 255: "no unit" for direct TCP devices
CHECK_PERIOD = 1.0  # seconds between checks of idle and slow connections


class ModbusTcpServer:
    """``ModbusTcpServer(image, write_router, cfg, meters)``: the meters are needed only for the
    consolidated unit (their order is its layout) and the virtual meters' units (``virtual``, with
    ``last``: a meter's last closed energy interval)."""

    name = "modbus_tcp"

    def __init__(self, image: RegisterImage, write_router: WriteRouter | None = None,
                 cfg: ModbusTcpConfig | None = None, meters: Sequence[MeterConfig] = (),
                 virtual: Sequence[VirtualMeterConfig] = (), last: LastInterval = lambda name: None):
        self.image = image
        self.write_router = write_router
        self.cfg = cfg or ModbusTcpConfig()
        self._allow = [ipaddress.ip_network(n) for n in self.cfg.allow]
        self._server: asyncio.AbstractServer | None = None
        self._generation = 0  # of the listener; a moved listener's connections are closed
        self.consolidated: Consolidated | None = None
        self._set_consolidated(self.cfg.consolidated, meters)
        self._last = last
        self.virtual = VirtualUnits(virtual, meters, image, last)
        self.connections: set[_Connection] = set()
        self.stats = {"requests": 0, "connections_accepted": 0, "refused": 0, "closed_bad_frame": 0, "closed_idle": 0,
                      "closed_slow": 0}
        self.exceptions: dict[int, int] = {}  # exception code -> count
        self.functions: dict[int, int] = {}  # function code -> requests

    # ------------------------------------------------------------- lifecycle
    async def start(self, host: str | None = None, port: int | None = None) -> None:
        self._server = await self._listen(self.cfg.host if host is None else host,
                                          self.cfg.port if port is None else port)
        log.info("Modbus TCP listening on %s:%d", self.cfg.host, self.port)

    async def _listen(self, host: str, port: int) -> asyncio.AbstractServer:
        generation = self._generation + 1
        try:
            return await asyncio.get_running_loop().create_server(
                lambda: _Connection(self, generation), host, port, reuse_address=True)
        except OSError as exc:
            raise BridgeError(listen_error("Modbus TCP", host, port, exc)) from None

    async def stage(self, config: Config) -> Staged:
        """New limits, allowlist and consolidated layout; a moved listener is bound here, first."""
        cfg = config.modbus_tcp
        new_server = None
        if (cfg.host, cfg.port) != (self.cfg.host, self.cfg.port):
            new_server = await self._listen(cfg.host, cfg.port)

        async def commit() -> None:
            if new_server is not None:
                old, self._server = self._server, new_server
                self._generation += 1
                if old is not None:
                    old.close()
                for conn in [c for c in self.connections if c.generation != self._generation]:
                    conn.close("the Modbus TCP listener moved (reload)")
                log.info("Modbus TCP listening on %s:%d", cfg.host, self.port)
            self.cfg = cfg
            self._allow = [ipaddress.ip_network(n) for n in cfg.allow]
            self._set_consolidated(cfg.consolidated, config.meters)
            self.virtual = VirtualUnits(config.virtual_meters, config.meters, self.image, self._last)

        async def abort() -> None:
            if new_server is not None:
                new_server.close()
        return Staged(commit, abort)

    def _set_consolidated(self, cmap: ConsolidatedMap | None, meters: Sequence[MeterConfig]) -> None:
        if self.consolidated is not None:
            self.image.unsubscribe(self.consolidated.listener)
        self.consolidated = Consolidated(cmap, meters, self.image) if cmap is not None else None
        if self.consolidated is not None:
            self.image.subscribe(self.consolidated.listener)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.consolidated is not None:
            self.image.unsubscribe(self.consolidated.listener)
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                conn.close()
            await self._server.wait_closed()
            self._server = None

    def status(self) -> NorthStatus:
        listening = self._server is not None
        return NorthStatus(
            self.name, listening, f"{self.cfg.host}:{self.port}" if listening else f"{self.cfg.host}:{self.cfg.port}",
            counters={**self.stats, "connections": len(self.connections)},
            by_label={"function": dict(self.functions), "exception": dict(self.exceptions)},
        )

    def admit(self, conn: _Connection, peer: tuple | None) -> str | None:
        """Why a new connection is refused, or None to accept it."""
        if self._allow:
            try:
                address = ipaddress.ip_address(peer[0]) if peer else None
            except ValueError:
                address = None
            if address is None or not any(address in net for net in self._allow):
                return "client address not in modbus_tcp.allow"
        if len(self.connections) >= self.cfg.max_connections:
            return f"already {len(self.connections)} connections (modbus_tcp.max_connections)"
        return None

    async def run(self) -> None:
        """Close connections that went idle, or that started a request and never finished it."""
        while True:
            await asyncio.sleep(CHECK_PERIOD)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.partial_since is not None and now - conn.partial_since > self.cfg.frame_timeout:
                    self.stats["closed_slow"] += 1
                    conn.close("request incomplete after modbus_tcp.frame_timeout")
                elif not conn.pending and now - conn.last_request > self.cfg.idle_timeout:
                    self.stats["closed_idle"] += 1
                    conn.close("idle for modbus_tcp.idle_timeout")

    # ------------------------------------------------------------- requests
    def answer_now(self, unit: int, pdu: bytes, pending: int = 0) -> bytes | P.WriteRequest:
        """The response PDU for a request, or the parsed write to carry to the bus."""
        self.stats["requests"] += 1
        function = pdu[0] if pdu else 0
        self.functions[function] = self.functions.get(function, 0) + 1
        try:
            request = P.parse_request(pdu)
            if unit in BROADCAST_UNITS:  # a gateway never fans a request out to every meter
                raise P.PduException(request.function, P.GATEWAY_PATH_UNAVAILABLE)
            if isinstance(request, P.ReadRequest):
                return P.read_response_pdu(request.function, self.read(unit, request))
            u = self.image.unit(unit)
            if u is None:
                if unit in self.virtual:  # a sum of meters: nothing to write to
                    raise P.PduException(request.function, P.ILLEGAL_FUNCTION)
                raise P.PduException(request.function, P.GATEWAY_PATH_UNAVAILABLE)
            if not u.meter.writable or self.write_router is None:
                raise P.PduException(request.function, P.ILLEGAL_FUNCTION)
            if not u.meter.may_write(request.address, len(request.values)):
                raise P.PduException(request.function, P.ILLEGAL_DATA_ADDRESS)  # outside write_ranges
            if pending >= self.cfg.max_pending:
                raise P.PduException(request.function, SERVER_BUSY)
            return request
        except P.PduException as exc:
            self.exceptions[exc.code] = self.exceptions.get(exc.code, 0) + 1
            return exc.pdu()

    def read(self, unit: int, request: P.ReadRequest) -> bytes:
        """Registers for a read, or the PduException the contract prescribes for why not (the image's
        own rules, asked one by one: this is the hot path, so one exception at most)."""
        u = self.image.unit(unit)
        if u is None:
            c = self.consolidated
            if c is not None and unit == c.cmap.unit:
                data = c.table.read(request.address, request.count)  # a stale meter is NaN, never an error
                if data is not None:
                    return data
                raise P.PduException(request.function, P.ILLEGAL_DATA_ADDRESS)
            if unit in self.virtual:
                return self.virtual.read(unit, request)
            raise P.PduException(request.function, P.GATEWAY_PATH_UNAVAILABLE)
        data = u.read(request.function, request.address, request.count)
        if data is None:
            raise P.PduException(request.function, P.ILLEGAL_DATA_ADDRESS)
        if self.image.health(unit) is not Health.FRESH:  # never read yet, stale or offline
            raise P.PduException(request.function, P.GATEWAY_TARGET_FAILED)
        return data

    async def write(self, unit: int, request: P.WriteRequest) -> bytes:
        assert self.write_router is not None
        try:
            return await self.write_router(unit, request)
        except ExceptionReply as exc:
            return P.exception_pdu(request.function, exc.code)
        except TransactionError:
            self.exceptions[P.GATEWAY_TARGET_FAILED] = self.exceptions.get(P.GATEWAY_TARGET_FAILED, 0) + 1
            return P.exception_pdu(request.function, P.GATEWAY_TARGET_FAILED)


class _Connection(asyncio.Protocol):
    def __init__(self, server: ModbusTcpServer, generation: int):
        self.server = server
        self.generation = generation  # of the listener that accepted it
        self.transport: asyncio.Transport | None = None
        self.peer = None
        self.buf = bytearray()
        self.pending: set[asyncio.Task[None]] = set()
        self.last_request = time.monotonic()
        self.partial_since: float | None = None  # when the incomplete frame in buf began
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")
        refused = self.server.admit(self, self.peer)
        if refused is not None:
            self.server.stats["refused"] += 1
            log.warning("refusing Modbus TCP connection from %s: %s", _who(self.peer), refused)
            transport.close()
            return
        self.server.connections.add(self)
        self.server.stats["connections_accepted"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for task in self.pending:
            task.cancel()
        self.transport = None

    def close(self, why: str = "") -> None:
        if why:
            log.info("closing Modbus TCP connection from %s: %s", _who(self.peer), why)
        if self.transport is not None:
            if self.transport.get_write_buffer_size():
                self.transport.abort()  # close() would wait for a client that does not read
            else:
                self.transport.close()

    def eof_received(self) -> bool:
        """The client half-closed: answer what it already asked, then close."""
        self.eof = True
        return bool(self.pending)  # True keeps the transport open for the pending writes

    # TCP backpressure: a client that sends without reading its answers stops being read
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        try:
            self._received(data)
        except Exception:  # a bug must cost this one connection, never the server
            log.exception("Modbus TCP connection from %s failed; closing it", _who(self.peer))
            self.close()

    def _received(self, data: bytes) -> None:
        self.buf += data
        out = []
        consumed = False
        try:
            while True:
                used, frame = mbap.decode(self.buf)
                if frame is None:
                    break
                del self.buf[:used]
                consumed = True
                self.last_request = time.monotonic()
                reply = self.server.answer_now(frame.unit, frame.pdu, len(self.pending))
                if isinstance(reply, bytes):
                    out.append(mbap.encode(frame.tid, frame.unit, reply))
                else:
                    task = asyncio.get_running_loop().create_task(self._write(frame, reply))
                    self.pending.add(task)
                    task.add_done_callback(self.pending.discard)
        except ProtocolError as exc:
            self.server.stats["closed_bad_frame"] += 1
            if out and self.transport is not None:
                self.transport.write(b"".join(out))
            self.close(str(exc))
            return
        if not self.buf:
            self.partial_since = None
        elif consumed or self.partial_since is None:
            self.partial_since = time.monotonic()  # a new request began arriving
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    async def _write(self, frame: mbap.Frame, request: P.WriteRequest) -> None:
        reply = await self.server.write(frame.unit, request)
        if self.transport is not None:
            self.transport.write(mbap.encode(frame.tid, frame.unit, reply))
            if self.eof and len(self.pending) <= 1:  # the last answer a half-closed client waited for
                self.close()


def _who(peer) -> str:
    return f"{peer[0]}:{peer[1]}" if peer else "?"


_FLOAT32 = struct.Struct(">f")
_NAN = _FLOAT32.pack(math.nan)


class Consolidated:
    """The consolidated unit: meter k, measurement j as float32 at base + k * stride + 2 * j, NaN while
    a meter is not fresh. Kept up to date as an image listener."""

    def __init__(self, cmap: ConsolidatedMap, meters: Sequence[MeterConfig], image: RegisterImage):
        self.cmap = cmap
        self.image = image
        self.slots: dict[int, tuple[int, MeterConfig]] = {}  # unit -> (first register, meter)
        intervals = []
        for k, meter in enumerate(meters):
            start = cmap.base + k * cmap.stride
            self.slots[meter.unit] = (start, meter)
            intervals.append((start, start + 2 * len(meter.profile.measurements)))
        self.table = RegisterTable(merge_intervals(intervals))
        for unit in self.slots:
            self.refresh(unit)

    def listener(self, change: Change | None, unit: int, health: Health) -> None:
        if unit in self.slots:
            self.refresh(unit)

    def refresh(self, unit: int) -> None:
        start, meter = self.slots[unit]
        u = self.image.unit(unit)
        fresh = u is not None and u.meter == meter and self.image.health(unit) is Health.FRESH
        data = bytearray()
        for m in meter.profile.measurements:
            if fresh:
                value = m.value(u.read(m.function, m.address, m.count))
                try:
                    data += _FLOAT32.pack(value)
                except OverflowError:  # beyond float32: say so rather than a wrong number
                    data += _FLOAT32.pack(math.copysign(math.inf, value))
            else:
                data += _NAN
        self.table.store(start, bytes(data))
