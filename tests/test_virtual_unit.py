"""A virtual meter with a unit of its own (``energy.virtual[].unit``) on Modbus TCP: its fixed map
(``bridge.energy.modbus_map``: live power, then the last closed interval), read over a real socket
from a bridge polling simulated meters on ptys; answered like a meter's unit (0x0B while a term is
not fresh, 0x02 outside the map, 0x01 for a write)."""
from __future__ import annotations

import asyncio
import dataclasses
import math
import struct

import pytest
from support import until
from test_energy_e2e import ENERGY, LAYOUT, RATES, UNMETERED, Counters

from bridge.energy.modbus_map import NO_STATUS, REGISTERS, virtual_registers
from bridge.energy.types import Interval
from bridge.testing import RawModbusClient, running_bridge

UNIT = 90
VIRTUAL_ENERGY = dataclasses.replace(ENERGY, virtual=(dataclasses.replace(UNMETERED, unit=UNIT),))


def floats(data: bytes) -> list[float]:
    return list(struct.unpack(f">{len(data) // 4}f", data[: len(data) // 4 * 4]))


def test_the_map_before_and_after_the_first_interval():
    before = virtual_registers({"active_power": 9000.0, "reactive_power": None}, None)
    assert len(before) == 2 * REGISTERS
    f = floats(before[:36])
    assert f[0] == 9000.0 and all(math.isnan(x) for x in f[1:])  # no reactive power, no interval yet
    assert struct.unpack(">IH", before[36:]) == (0, NO_STATUS)
    interval = Interval("unmetered", 1_800_000_000 - 900, 1_800_000_000, "estimated",
                        {"import_active_energy": 2.25, "export_active_energy": 0.0})
    after = floats(virtual_registers({"active_power": -1.5e39}, interval)[:36])  # beyond float32: -inf
    assert after[0] == -math.inf and after[2] == 2.25 and after[3] == 0.0 and math.isnan(after[4])
    assert after[8] == pytest.approx(9000.0)  # demand: 2.25 kWh in 15 minutes
    assert struct.unpack(">IH", virtual_registers({}, interval)[36:]) == (1_800_000_000, 1)  # 1: estimated


async def test_a_virtual_unit_answers_its_live_power_and_last_interval_like_a_meter(tmp_path):
    async with running_bridge(LAYOUT, energy=VIRTUAL_ENERGY, state_dir=str(tmp_path)) as h:
        task = asyncio.create_task(Counters(h.sims, RATES).run())
        client = await RawModbusClient.connect(h.modbus_port)
        try:
            recorder = h.app.north["energy"]
            await until(lambda: recorder.last("unmetered") is not None, timeout=15, what="a virtual interval")
            for function in (3, 4):  # FC3 and FC4 alike
                pdu = await client.read(UNIT, function, 0, REGISTERS)
                assert pdu[:2] == bytes((function, 2 * REGISTERS)), pdu
                values = floats(pdu[2:38])
                assert values[0] == pytest.approx(9000.0)  # 36 - 9 - 18 kW now
                end, status = struct.unpack(">IH", pdu[38:])
                last = recorder.last("unmetered")
                assert end in (last.end - 1, last.end)  # the newest closed interval (another may close meanwhile)
                assert status in (0, 1)  # complete or estimated
            pdu = await client.read(UNIT, 4, 4, 16)  # from the interval's import energy (kWh) to its end
            kwh, end = floats(pdu[2:6])[0], struct.unpack(">I", pdu[-4:])[0]
            stored = {i.end: i for i in await recorder.intervals("unmetered", end - 10, end)}
            assert kwh == pytest.approx(stored[end].energy["import_active_energy"], rel=1e-6)  # float32 of it
            assert await client.read(UNIT, 4, 20, 2) == b"\x84\x02"  # past the map
            assert await client.request(UNIT, struct.pack(">BHH", 6, 0, 1)) == b"\x86\x01"  # nothing to write to

            h.sims["sockets"].faults.silent = True  # a term not fresh: the sum is not either
            await until(lambda: h.app.image.health(21).name != "FRESH", timeout=10, what="sockets stale")
            assert await client.read(UNIT, 4, 0, 2) == b"\x84\x0b"
            h.sims["sockets"].faults.silent = False
            await until(lambda: h.app.image.health(21).name == "FRESH", timeout=10, what="sockets back")
            assert floats((await client.read(UNIT, 4, 0, 2))[2:])[0] == pytest.approx(9000.0)
        finally:
            task.cancel()
            await client.close()


async def test_a_reload_gives_a_virtual_meter_its_unit_and_takes_it_back(tmp_path):
    async with running_bridge(LAYOUT, energy=ENERGY, state_dir=str(tmp_path)) as h:
        task = asyncio.create_task(Counters(h.sims, RATES).run())
        client = await RawModbusClient.connect(h.modbus_port)
        try:
            assert await client.read(UNIT, 4, 0, 2) == b"\x84\x0a"  # no unit yet: no meter there
            old = h.app.config
            await h.app.reload(dataclasses.replace(old, energy=VIRTUAL_ENERGY))
            for meter in RATES:  # polled at their rates (the counters' first ticks came after the start)
                await h.polls(meter, 2)
            assert floats((await client.read(UNIT, 4, 0, 2))[2:])[0] == pytest.approx(9000.0)
            await h.app.reload(old)
            assert await client.read(UNIT, 4, 0, 2) == b"\x84\x0a"
        finally:
            task.cancel()
            await client.close()
