"""The bridge end to end: simulated meters on real ptys, real Modbus TCP clients on loopback."""
from __future__ import annotations

import asyncio
import struct

import pytest
from pymodbus.client import AsyncModbusTcpClient
from support import WAIT, f32, until

from bridge.core import codec
from bridge.core import mbap
from bridge.core.codec import DataType
from bridge.testing import MeterSpec, RawModbusClient, running_bridge

F32 = DataType.FLOAT32

TWO_SEGMENTS = {
    "panel-a": [MeterSpec("a1", slave=1, unit=11), MeterSpec("a2", slave=2, unit=12, writable=True)],
    "panel-b": [MeterSpec("b1", slave=1, unit=21), MeterSpec("b3", slave=3, unit=23, profile="eastron-sdm630")],
}


async def test_each_meter_under_its_remapped_unit():
    async with running_bridge(TWO_SEGMENTS) as h:
        # slave 1 on both segments, different values: the units must not be confused
        h.sims["a1"].set_value("voltage", 231.5)
        h.sims["b1"].set_value("voltage", 228.25)
        h.sims["b3"].set_value("voltage_l3", 240.5)
        for name in ("a1", "b1", "b3"):
            await h.polls(name, 2)
        client = AsyncModbusTcpClient("127.0.0.1", port=h.modbus_port)
        await client.connect()
        try:
            for unit, address, expected in ((11, 0, 231.5), (21, 0, 228.25), (23, 4, 240.5)):
                reply = await client.read_input_registers(address, count=2, device_id=unit)
                assert not reply.isError(), reply
                assert codec.decode(reply.registers, F32) == expected
        finally:
            client.close()


async def test_exception_paths():
    layout = {"s": [MeterSpec("ok", 1, 11), MeterSpec("dead", 2, 12)]}
    async with running_bridge(layout) as h:
        h.sims["dead"].faults.silent = True
        await h.polls("ok", 1)
        c = await RawModbusClient.connect(h.modbus_port)
        try:
            # measurement registers: served
            assert (await c.read(11, 4, 0x0000, 2))[:2] == b"\x04\x04"
            # between two measurements (0x0002..0x0005 is not in the image): illegal data address
            assert await c.read(11, 4, 0x0000, 4) == b"\x84\x02"
            assert await c.read(11, 4, 0x0002, 2) == b"\x84\x02"
            # the meter's function is FC4; its registers do not exist as holding registers
            assert await c.read(11, 3, 0x0000, 2) == b"\x83\x02"
            # unit without a meter: gateway path unavailable
            assert await c.read(99, 4, 0x0000, 2) == b"\x84\x0a"
            # a meter never read: gateway target failed to respond
            assert await c.read(12, 4, 0x0000, 2) == b"\x84\x0b"
            # a write to a meter that is not writable: illegal function
            assert await c.request(11, struct.pack(">BHH", 6, 0x0012, 1)) == b"\x86\x01"
            assert await c.request(11, struct.pack(">BHHBHH", 16, 0x0012, 2, 4, 1, 2)) == b"\x90\x01"
            # an unknown function code: illegal function
            assert await c.request(11, b"\x2b\x0e\x01\x00") == b"\xab\x01"
        finally:
            await c.close()


async def test_refused_write_never_reaches_the_bus():
    layout = {"s": [MeterSpec("m", 1, 11)]}
    async with running_bridge(layout) as h:
        await h.polls("m", 1)
        c = await RawModbusClient.connect(h.modbus_port)
        try:
            for _ in range(5):
                assert await c.request(11, struct.pack(">BHH", 6, 0x0012, 1)) == b"\x86\x01"
            await h.polls("m", 2)
        finally:
            await c.close()
        assert set(h.sims["m"].functions) == {4}, "only polls (FC4) may reach the bus"


async def test_write_to_writable_meter_is_carried_and_answered():
    layout = {"s": [MeterSpec("m", 1, 11, writable=True, poll_interval=0.2)]}
    async with running_bridge(layout) as h:
        sim = h.sims["m"]
        await h.polls("m", 1)
        c = await RawModbusClient.connect(h.modbus_port)
        try:
            assert await c.request(11, struct.pack(">BHH", 6, 0x0014, 7)) == struct.pack(">BHH", 6, 0x0014, 7)
            assert sim.tables[codec.Function.HOLDING][0x0014] == 7
            pdu = struct.pack(">BHHBHH", 16, 0x001C, 2, 4, 0x4000, 0x0000)
            assert await c.request(11, pdu) == struct.pack(">BHH", 16, 0x001C, 2)
            assert [sim.tables[codec.Function.HOLDING][a] for a in (0x1C, 0x1D)] == [0x4000, 0]
            # the meter's own exception is returned as it is
            sim.faults.exception = 0x03
            assert await c.request(11, struct.pack(">BHH", 6, 0x0014, 8)) == b"\x86\x03"
            sim.faults.exception = None
            # no answer at all: gateway target failed to respond
            sim.faults.silent = True
            assert await c.request(11, struct.pack(">BHH", 6, 0x0014, 9)) == b"\x86\x0b"
        finally:
            await c.close()


async def test_write_goes_ahead_of_the_poll_schedule():
    # six meters polled back to back: a write must not wait for a whole round
    meters = [MeterSpec(f"m{i}", i, 10 + i, poll_interval=0.0, writable=(i == 6)) for i in range(1, 7)]
    async with running_bridge({"s": meters}) as h:
        for name in ("m1", "m6"):
            await h.polls(name, 1)
        sim = h.sims["m6"]
        c = await RawModbusClient.connect(h.modbus_port)
        try:
            log = h.buses["s"].stats.log
            before = len(log)
            assert await c.request(16, struct.pack(">BHH", 6, 0x0014, 5)) == struct.pack(">BHH", 6, 0x0014, 5)
            functions = [fc for _, _, fc in list(log)[before:]]
        finally:
            await c.close()
        assert sim.functions.count(6) == 1
        # a write waits for the block in flight at most, not for the rest of the poll (an SDM120 poll is
        # three blocks): one block, and one more begun before the server queued the write
        assert functions.index(6) <= 2, f"bus requests after submitting the write: {functions}"


async def test_value_change_reaches_client_within_one_poll():
    layout = {"s": [MeterSpec("m", 1, 11, poll_interval=0.25)]}
    async with running_bridge(layout) as h:
        await h.polls("m", 1)
        c = await RawModbusClient.connect(h.modbus_port)
        try:
            h.sims["m"].set_value("active_power", 1234.5)
            loop = asyncio.get_running_loop()
            start = loop.time()
            while f32(await c.read(11, 4, 0x000C, 2), 2) != 1234.5:
                assert loop.time() - start < 0.25 + 0.5, "change not served within one poll interval (+ slack)"
                await asyncio.sleep(0.01)
            # and structurally: one complete poll after the change is enough
            h.sims["m"].set_value("active_power", 99.0)
            await h.polls("m", 2)
            assert f32(await c.read(11, 4, 0x000C, 2), 2) == 99.0
        finally:
            await c.close()


async def test_meter_going_silent_then_coming_back():
    layout = {"s": [MeterSpec("quiet", 1, 11), MeterSpec("neighbour", 2, 12)]}
    async with running_bridge(layout, stale_after=0.5) as h:
        await h.polls("quiet", 1)
        c = await RawModbusClient.connect(h.modbus_port)
        try:
            assert (await c.read(11, 4, 0, 2))[0] == 4
            h.sims["quiet"].faults.silent = True
            loop = asyncio.get_running_loop()
            start = loop.time()
            while (await c.read(11, 4, 0, 2)) != b"\x84\x0b":
                assert loop.time() - start < WAIT, "a silent meter is still served as fresh"
                await asyncio.sleep(0.02)
            # the neighbour keeps being served meanwhile
            assert (await c.read(12, 4, 0, 2))[0] == 4
            h.sims["quiet"].faults.silent = False
            h.sims["quiet"].set_value("voltage", 219.0)
            start = loop.time()
            while (reply := await c.read(11, 4, 0, 2)) == b"\x84\x0b":
                assert loop.time() - start < 15, "meter never came back"
                await asyncio.sleep(0.05)
            assert f32(reply, 2) == 219.0
        finally:
            await c.close()


async def test_pipelined_requests_in_one_segment():
    async with running_bridge(TWO_SEGMENTS) as h:
        for name in ("a1", "b1"):
            await h.polls(name, 1)
        h.sims["a1"].set_value("voltage", 201.0)
        h.sims["b1"].set_value("voltage", 202.0)
        for name in ("a1", "b1"):
            await h.polls(name, 1)
        c = await RawModbusClient.connect(h.modbus_port)
        try:
            requests = [(100 + i, (11, 21, 99)[i % 3]) for i in range(30)]
            # all thirty in one write, so they arrive together in one or a few TCP segments
            c.writer.write(b"".join(mbap.encode(tid, unit, struct.pack(">BHH", 4, 0, 2)) for tid, unit in requests))
            replies = {}
            for _ in requests:
                frame = await c.receive()
                replies[frame.tid] = frame
            for tid, unit in requests:
                frame = replies[tid]
                assert frame.unit == unit
                if unit == 99:
                    assert frame.pdu == b"\x84\x0a"
                else:
                    assert f32(frame.pdu, 2) == {11: 201.0, 21: 202.0}[unit]
        finally:
            await c.close()


async def test_many_clients_at_once():
    async with running_bridge(TWO_SEGMENTS) as h:
        await h.polls("a1", 1)
        h.sims["a1"].set_value("current", 12.5)
        await h.polls("a1", 2)

        async def one_client() -> list[float]:
            c = await RawModbusClient.connect(h.modbus_port)
            try:
                return [f32(await c.read(11, 4, 0x0006, 2), 2) for _ in range(20)]
            finally:
                await c.close()

        results = await asyncio.gather(*(one_client() for _ in range(25)))
        assert all(v == 12.5 for values in results for v in values)


@pytest.mark.parametrize("garbage", [
    b"\x00\x01\x00\x07\x00\x06\x0b\x04\x00\x00\x00\x02",  # protocol id 7
    b"\x00\x01\x00\x00\x00\x00\x0b",  # length 0
    b"\x00\x01\x00\x00\x01\x00\x0b" + b"\x00" * 300,  # length 256
])
async def test_malformed_frame_closes_only_that_connection(garbage):
    async with running_bridge({"s": [MeterSpec("m", 1, 11)]}) as h:
        await h.polls("m", 1)
        good = await RawModbusClient.connect(h.modbus_port)
        bad = await RawModbusClient.connect(h.modbus_port)
        try:
            assert (await good.read(11, 4, 0, 2))[0] == 4
            bad.writer.write(garbage)
            async with asyncio.timeout(2):
                assert await bad.reader.read() == b"", "the server must close a connection that sent garbage"
            assert (await good.read(11, 4, 0, 2))[0] == 4
        finally:
            await good.close()
            await bad.close()


async def test_reply_not_matching_its_request_is_never_stored():
    layout = {"s": [MeterSpec("m", 1, 11, poll_interval=0.05)]}
    # 2400 baud: after a timeout the line is held for the longest reply (~60 ms here), so a reply 20 ms
    # late lands well inside the hold and must be dropped as late (at 9600 baud the hold is ~13 ms and a
    # reply that late may come after the next request: indistinguishable from its answer)
    async with running_bridge(layout, timeout=0.08, retries=0, baudrate=2400) as h:
        sim = h.sims["m"]
        sim.set_value("voltage", 230.0)
        await h.polls("m", 1)
        seen: list[float] = []
        h.app.image.subscribe(lambda change, unit, health: seen.append(
            f32(h.app.image.value_registers(11, codec.Function.INPUT, 0, 2))) if change else None)
        counters = h.segment("s").diag
        # replies with the wrong slave address, a bad CRC, cut short, or too late for their request, one
        # kind after the other: each fault is sent twice and counted, then a good poll (so the meter never
        # fails three polls in a row and is demoted) before the next one is set
        sim.faults.wrong_slave = 2
        await until(lambda: sim.faults.wrong_slave == 0 and counters.wrong_slave >= 2, WAIT, "wrong slave")
        await h.polls("m", 1, timeout=WAIT)
        sim.faults.corrupt = 2
        await until(lambda: sim.faults.corrupt == 0 and counters.crc_errors >= 2, WAIT, "bad CRC")
        await h.polls("m", 1, timeout=WAIT)
        sim.faults.truncate = 2
        await until(lambda: sim.faults.truncate == 0 and counters.truncated >= 2, WAIT, "cut short")
        await h.polls("m", 1, timeout=WAIT)
        sim.faults.late, sim.faults.late_by = 2, 0.1
        await until(lambda: sim.faults.late == 0 and counters.timeouts >= 2 and counters.late_replies >= 1, WAIT,
                    "too late")
        # each kind of bad answer is recognised and counted as what it is, once
        assert (counters.wrong_slave, counters.crc_errors, counters.truncated) == (2, 2, 2)
        assert counters.timeouts == 2 and counters.late_replies >= 1
        sim.set_value("voltage", 240.0)
        await h.polls("m", 2)
        assert all(v in (230.0, 240.0) for v in seen), seen
        c = await RawModbusClient.connect(h.modbus_port)
        try:
            assert f32(await c.read(11, 4, 0, 2), 2) == 240.0
        finally:
            await c.close()


async def test_retries_and_timeout_are_honoured():
    layout = {"s": [MeterSpec("m", 1, 11, poll_interval=0.05), MeterSpec("dead", 2, 12, poll_interval=0.05)]}
    async with running_bridge(layout, timeout=0.05, retries=2) as h:
        # one garbled reply is retried and the poll still succeeds
        await h.polls("m", 1)
        h.sims["m"].faults.corrupt = 1
        await h.polls("m", 2)
        assert h.segment("s").meters[11].diag.retries >= 1
        assert h.segment("s").meters[11].diag.crc_errors == 1
        assert h.app.image.health(11).value == "fresh"
        # a silent meter is asked exactly retries + 1 times per failed poll; after 3 failed polls it
        # is offline and left alone for 10 s, so the count is exact
        await h.polls("dead", 1)
        log = h.buses["s"].stats.log
        start = len(log)
        h.sims["dead"].faults.silent = True
        dead = h.segment("s").meters[12]
        await until(lambda: dead.diag.demoted, WAIT, "demotion of the silent meter")
        await asyncio.sleep(0.3)  # and then nothing more is asked of it (left alone for 10 s)
        asked = [fc for _, slave, fc in list(log)[start:] if slave == 2]
        assert len(asked) == 3 * 3, asked
        assert dead.diag.timeouts == 9
        assert h.app.image.health(12).value == "offline"
