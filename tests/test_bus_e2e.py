"""The bus engine over real ptys: faults, demotion, port loss, write allowlist, timing."""
from __future__ import annotations

import asyncio
import os
import struct

from support import f32, until

from bridge.core import codec
from bridge.core.model import Config, MeterConfig, ModbusTcpConfig, OpcUaConfig, SegmentConfig
from bridge.core.plan import plan_meter
from bridge.app import App
from bridge.config.profiles import get_builtin
from bridge.south.simulator import SimMeter, SimulatedBus
from bridge.testing import MeterSpec, RawModbusClient, running_bridge


def blocks_per_poll(h, meter: str) -> int:
    """How many read requests one complete poll of ``meter`` makes: the planner decides, not the test."""
    return len(plan_meter(h.meters[meter]))


async def test_every_fault_is_counted_as_its_kind_and_never_stored():
    async with running_bridge({"s": [MeterSpec("m", 1, 11, poll_interval=0.02)]}, timeout=0.1, retries=0,
                              demote_after=100) as h:
        sim, diag = h.sims["m"], h.segment("s").meters[11].diag
        sim.set_value("voltage", 230.0)
        await h.polls("m", 1)
        stored: list[bytes] = []
        h.app.image.subscribe(lambda ch, unit, health: stored.append(
            h.app.image.value_registers(11, codec.Function.INPUT, 0, 2)) if ch else None)
        for fault, counter in (("corrupt", "crc_errors"), ("truncate", "truncated"),
                               ("wrong_slave", "wrong_slave"), ("wrong_function", "protocol_errors"),
                               ("wrong_length", "protocol_errors")):
            before = getattr(diag, counter)
            setattr(sim.faults, fault, 2)
            await until(lambda: getattr(sim.faults, fault) == 0, 3, fault)
            await h.polls("m", 1)
            assert getattr(diag, counter) == before + 2, (fault, diag)
        sim.faults.garbage = b"\x00\xff\x03"  # stray bytes before a good reply: skipped, reply used
        await until(lambda: sim.faults.garbage == b"", 3, "garbage")
        await h.polls("m", 1)
        assert diag.stray_bytes == 3
        assert all(f32(r) == 230.0 for r in stored)
        assert h.app.image.health(11).value == "fresh"


async def test_dead_meter_is_demoted_and_neighbours_keep_their_rate():
    meters = [MeterSpec(f"m{i}", i, 10 + i, poll_interval=0.0) for i in range(1, 5)]
    meters.append(MeterSpec("dead", 9, 19, poll_interval=0.0, silent=True))
    async with running_bridge({"s": meters}, timeout=0.1, retries=1, demote_after=2, demote_interval=1.0) as h:
        seg = h.segment("s")
        dead = seg.meters[19].diag
        await until(lambda: dead.demoted, 5, "demotion")
        assert dead.demotions == 1
        log = h.buses["s"].stats.log
        start, t0 = len(log), asyncio.get_running_loop().time()
        await asyncio.sleep(2.5)
        window = asyncio.get_running_loop().time() - t0
        asked = [slave for _, slave, _ in list(log)[start:]]
        # demoted: about one poll (retries + 1 = 2 requests) per demote_interval, not per cycle
        assert asked.count(9) <= 2 * (window / 1.0 + 1), asked.count(9)
        # each healthy neighbour is polled many times meanwhile: at least ten complete polls
        for slave in range(1, 5):
            blocks = blocks_per_poll(h, f"m{slave}")
            assert asked.count(slave) >= 10 * blocks, (slave, asked.count(slave), f"{blocks} blocks a poll")
        # restored on its first good reply
        h.sims["dead"].faults.silent = False
        await until(lambda: not dead.demoted, 3, "restored")
        await h.polls("dead", 1)
        assert h.app.image.health(19).value == "fresh" and dead.demotions == 1


async def test_write_allowlist():
    layout = {"s": [MeterSpec("m", 1, 11, writable=True, write_ranges=((0x0012, 2),))]}
    async with running_bridge(layout) as h:
        await h.polls("m", 1)
        c = await RawModbusClient.connect(h.modbus_port)
        try:
            # inside the allowlist: carried to the meter
            assert await c.request(11, struct.pack(">BHH", 6, 0x0013, 1)) == struct.pack(">BHH", 6, 0x0013, 1)
            # outside, or straddling its end: illegal data address, nothing on the bus
            assert await c.request(11, struct.pack(">BHH", 6, 0x0014, 1)) == b"\x86\x02"
            assert await c.request(11, struct.pack(">BHHBHH", 16, 0x0013, 2, 4, 1, 2)) == b"\x90\x02"
        finally:
            await c.close()
        assert h.sims["m"].functions.count(6) == 1 and 16 not in h.sims["m"].functions


async def test_unplugged_adapter_fails_its_meters_and_reconnects(tmp_path):
    """The port is a symlink, like /dev/serial/by-id/...: unplugging removes the pty behind it."""
    profile = get_builtin("eastron-sdm120")
    link = tmp_path / "usb-rs485"
    first = SimulatedBus([SimMeter(1, profile, animate=False)])
    os.symlink(first.open(), link)
    other = SimulatedBus([SimMeter(1, profile, animate=False)])
    config = Config(
        (SegmentConfig("usb", str(link), timeout=0.1, meters=(MeterConfig("a", 1, 11, profile, 0.05, stale_after=5.0),)),
         SegmentConfig("fixed", other.open(), timeout=0.1,
                       meters=(MeterConfig("b", 1, 21, profile, 0.05, stale_after=5.0),))),
        modbus_tcp=ModbusTcpConfig(host="127.0.0.1", port=0), opcua=OpcUaConfig(enabled=False),
    )
    second = None
    try:
        async with App(config) as app:
            usb = app.segments["usb"]
            c = await RawModbusClient.connect(app.modbus.port)
            await until(lambda: app.image.health(11).value == "fresh" and app.image.health(21).value == "fresh",
                        5, "first polls")
            # unplug: the pty and the link vanish
            first.close()
            link.unlink()
            await until(lambda: not usb.diag.port_open, 3, "port loss noticed")
            assert usb.diag.port_losses == 1
            assert await c.read(11, 4, 0, 2) == b"\x84\x0b"  # its meter: gateway target failed
            assert (await c.read(21, 4, 0, 2))[0] == 4  # the other segment never notices
            await asyncio.sleep(0.5)  # a few reopen attempts fail while nothing is there
            # plug back in (a new pty behind the same name)
            second = SimulatedBus([SimMeter(1, profile, animate=False)])
            second.meters[1].set_value("voltage", 241.0)
            os.symlink(second.open(), link)
            await until(lambda: usb.diag.port_open and app.image.health(11).value == "fresh", 8, "reconnect")
            assert f32(await c.read(11, 4, 0, 2), 2) == 241.0
            assert usb.diag.port_losses == 1
            await c.close()
    finally:
        for bus in (first, other, second):
            if bus is not None:
                bus.close()


async def test_silence_is_kept_and_turnaround_measured():
    meters = [MeterSpec(f"m{i}", i, 10 + i, poll_interval=0.0) for i in range(1, 4)]
    async with running_bridge({"s": meters}, baudrate=38400, timeout=0.2,
                              bus_options={"baudrate": 38400, "emulate_wire": True, "turnaround": 0.008}) as h:
        for name in ("m1", "m2", "m3"):
            await h.polls(name, 5)
        stats = h.buses["s"].stats
        assert stats.requests >= 30 and stats.silence_violations == 0
        for unit in (11, 12, 13):
            turnaround = h.segment("s").meters[unit].diag.turnaround
            assert turnaround is not None and 0.004 < turnaround < 0.02, turnaround


async def test_slow_meter_is_polled_at_its_interval_among_fast_ones():
    meters = [MeterSpec(f"fast{i}", i, 10 + i, poll_interval=0.0) for i in range(1, 4)]
    meters.append(MeterSpec("slow", 7, 17, poll_interval=0.5))
    async with running_bridge({"s": meters}) as h:
        await h.polls("slow", 1)
        log = h.buses["s"].stats.log
        start = len(log)
        await asyncio.sleep(2.2)
        times = [t for t, slave, _ in list(log)[start:] if slave == 7]
        polls = times[::blocks_per_poll(h, "slow")]  # the first request of each poll
        assert 4 <= len(polls) <= 6, len(polls)  # every 0.5 s: neither starved nor over-polled


async def test_consolidated_unit_serves_the_whole_panel_as_float32():
    from bridge.core.model import ConsolidatedMap

    layout = {"a": [MeterSpec("m1", 1, 11), MeterSpec("m2", 2, 12, profile="eastron-sdm630")],
              "b": [MeterSpec("m3", 1, 21, silent=True)]}
    async with running_bridge(layout, modbus_options={"consolidated": ConsolidatedMap(200, base=1000, stride=100)},
                              stale_after=5.0) as h:
        h.sims["m1"].set_value("current", 7.25)  # measurement 1 of meter 0
        h.sims["m2"].set_value("voltage_l3", 233.5)  # measurement 2 of meter 1
        await h.polls("m1", 2)
        await h.polls("m2", 2)
        c = await RawModbusClient.connect(h.modbus_port)
        try:
            reply = await c.read(200, 4, 1000, 4)  # meter 0: voltage, current
            assert f32(reply, 6) == 7.25
            reply = await c.read(200, 3, 1100 + 4, 2)  # FC3 works too: meter 1, measurement 2
            assert f32(reply, 2) == 233.5
            # the silent meter's slots read as NaN, not as an error that would fail the whole read
            reply = await c.read(200, 4, 1200, 2)
            value = f32(reply, 2)
            assert value != value
            # outside every slot: illegal data address
            assert await c.read(200, 4, 1000 + 28, 2) == b"\x84\x02"
        finally:
            await c.close()
