"""Test helpers that ship with the package: a bridge on simulated meters, a raw Modbus TCP client.

Used by the test suite and the benchmarks; real ptys and real loopback sockets,
nothing mocked.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from collections.abc import AsyncIterator

from bridge.core import mbap
from bridge.app import App
from bridge.core.codec import Function
from bridge.core.model import (Config, EnergyConfig, HttpConfig, MeterConfig, ModbusTcpConfig, MqttConfig,
                               OpcUaConfig, RegisterRange, SegmentConfig)
from bridge.config.profiles import get_builtin
from bridge.south.simulator import SimMeter, SimulatedBus


@dataclass
class MeterSpec:
    name: str
    slave: int
    unit: int
    profile: str = "eastron-sdm120"
    poll_interval: float = 0.1
    writable: bool = False
    animate: bool = False
    silent: bool = False  # the simulated meter never answers, from the first poll on
    write_ranges: tuple[tuple[int, int], ...] = ()  # (start, count) holding registers writes may touch


@dataclass
class Harness:
    app: App
    buses: dict[str, SimulatedBus]
    sims: dict[str, SimMeter]  # by meter name
    meters: dict[str, MeterConfig] = field(default_factory=dict)

    @property
    def opcua_endpoint(self) -> str:
        return self.app.config.opcua.endpoint

    @property
    def modbus_port(self) -> int:
        assert self.app.modbus is not None
        return self.app.modbus.port

    def segment(self, name: str):
        return self.app.segments[name]

    async def polls(self, meter: str, n: int = 1, timeout: float = 5.0) -> None:
        """Wait until ``meter`` has answered ``n`` more complete polls (image marked good)."""
        unit = self.meters[meter].unit
        seg = next(s for s in self.app.segments.values() if unit in s.meters)
        state = seg.meters[unit]
        target = state.diag.good + n * len(state.blocks)
        async with asyncio.timeout(timeout):
            while state.diag.good < target:
                await asyncio.sleep(0.005)


@asynccontextmanager
async def running_bridge(
    layout: dict[str, list[MeterSpec]],
    *,
    stale_after: float = 1.0,
    timeout: float = 0.1,
    retries: int = 1,
    opcua: bool = False,
    namespace: str = "urn:modbus-bridge",
    bus_options: dict | None = None,
    modbus_options: dict | None = None,
    opcua_options: dict | None = None,
    http: bool = False,
    mqtt: MqttConfig | None = None,
    energy: EnergyConfig | None = None,
    state_dir: str = "",
    **segment_options,
) -> AsyncIterator[Harness]:
    """Simulated buses (one pty each) and a bridge polling them, Modbus TCP on a free port
    (and OPC UA on another when ``opcua``). ``modbus_options`` override fields of the
    Modbus TCP server's config (max_connections, idle_timeout, frame_timeout, max_pending, allow);
    ``opcua_options`` those of the OPC UA server's (security, certificate_dir, trusted_clients_dir,
    anonymous, users)."""
    buses, sims, segments, meters = {}, {}, [], {}
    for seg_name, specs in layout.items():
        seg_sims = []
        seg_meters = []
        for spec in specs:
            profile = get_builtin(spec.profile)
            sim = SimMeter(spec.slave, profile, animate=spec.animate)
            sim.faults.silent = spec.silent
            sims[spec.name] = sim
            seg_sims.append(sim)
            mc = MeterConfig(
                spec.name, spec.slave, spec.unit, profile,
                poll_interval=spec.poll_interval, writable=spec.writable, stale_after=stale_after,
                write_ranges=tuple(RegisterRange(Function.HOLDING, a, n) for a, n in spec.write_ranges),
            )
            meters[spec.name] = mc
            seg_meters.append(mc)
        bus = SimulatedBus(seg_sims, **(bus_options or {}))
        buses[seg_name] = bus
        segments.append(
            SegmentConfig(seg_name, bus.open(), timeout=timeout, retries=retries, meters=tuple(seg_meters),
                          **segment_options)
        )
    config = Config(
        tuple(segments),
        stale_after=stale_after,
        modbus_tcp=replace(ModbusTcpConfig(host="127.0.0.1", port=0), **(modbus_options or {})),
        opcua=replace(OpcUaConfig(enabled=opcua, endpoint=f"opc.tcp://127.0.0.1:{free_port()}/bridge",
                                  namespace=namespace, security=("None",)), **(opcua_options or {})),
        http=HttpConfig("127.0.0.1", 0) if http else None,
        mqtt=mqtt,
        energy=energy,
        state_dir=state_dir,
    )
    try:
        async with App(config) as app:
            yield Harness(app, buses, sims, meters)
    finally:
        for bus in buses.values():
            bus.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers that cannot bind port 0 themselves)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RawModbusClient:
    """A minimal Modbus TCP client: explicit transaction ids, pipelining, raw PDUs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self._tid = 0

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> "RawModbusClient":
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    def send(self, unit: int, pdu: bytes, tid: int | None = None) -> int:
        if tid is None:
            self._tid = (self._tid + 1) & 0xFFFF
            tid = self._tid
        self.writer.write(mbap.encode(tid, unit, pdu))
        return tid

    async def receive(self, timeout: float = 2.0) -> mbap.Frame:
        async with asyncio.timeout(timeout):
            header = await self.reader.readexactly(mbap.HEADER)
            length = struct.unpack(">H", header[4:6])[0]
            body = await self.reader.readexactly(length - 1)
        _, frame = mbap.decode(header + body)
        assert frame is not None
        return frame

    async def request(self, unit: int, pdu: bytes) -> bytes:
        tid = self.send(unit, pdu)
        frame = await self.receive()
        assert frame.tid == tid, f"reply tid {frame.tid} != request tid {tid}"
        return frame.pdu

    async def read(self, unit: int, function: int, address: int, count: int) -> bytes:
        return await self.request(unit, struct.pack(">BHH", function, address, count))

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


__all__ = ["Harness", "MeterSpec", "RawModbusClient", "free_port", "running_bridge"]
