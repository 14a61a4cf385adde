"""The Modbus TCP server against hostile and broken clients, end to end.

Simulated meters on real ptys, real loopback sockets: malformed and lying MBAP
headers, exception paths, slow, idle and half-open connections, the connection
and pipelining caps, the allowlist, TCP backpressure, a socket fuzz round (twice),
and containment of unexpected exceptions (one client handler, one segment). Runs on
uvloop only (see conftest.py).

What is asserted is behaviour: what the server answers, which connections it closes
and why (its stats), who keeps being served. Never how fast, nor how much memory:
those are the benchmarks' (bench/). Every wait is bounded by the generous WAIT, only
so that a hang fails instead of stalling the run.
"""
from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct

import pytest
from support import WAIT, f32, fc16, until

from bridge import app as app_module
from bridge.core import codec
from bridge.core import mbap
from bridge.testing import MeterSpec, RawModbusClient, running_bridge


LAYOUT = {
    "a": [MeterSpec("a1", 1, 11), MeterSpec("w", 2, 12, writable=True, write_ranges=((0x0014, 2),))],
    "b": [MeterSpec("b1", 1, 21)],
}
VOLTS = {"a1": 231.5, "w": 229.0, "b1": 228.25}
UNIT = {"a1": 11, "w": 12, "b1": 21}
RESTART_PAUSE_BOUND = app_module.RESTART_PAUSE + WAIT


def read_pdu(function: int, address: int, count: int) -> bytes:
    return struct.pack(">BHH", function, address, count)


async def settle(h, names=tuple(VOLTS)) -> None:
    """Known voltages on the simulated meters, polled into the image."""
    for name in names:
        h.sims[name].set_value("voltage", VOLTS[name])
    for name in names:
        await h.polls(name, 2)


async def serves(c: RawModbusClient, name: str = "a1") -> None:
    """``c`` still reads the meter's true voltage."""
    reply = await c.read(UNIT[name], 4, 0x0000, 2)
    assert reply[:2] == b"\x04\x04", reply
    assert f32(reply, 2) == VOLTS[name]


async def connect(port: int) -> RawModbusClient:
    c = await RawModbusClient.connect(port)
    sock = c.writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # every write its own segment
    return c


async def eof_within(reader: asyncio.StreamReader, timeout: float = WAIT) -> None:
    """Wait until the server closes the connection (EOF or reset); fails after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        raise AssertionError(f"the server did not close the connection within {timeout} s") from None
    except ConnectionError:
        pass


def conn_of(server, client: RawModbusClient):
    """The server's _Connection for ``client`` (matched by the client's address)."""
    me = client.writer.get_extra_info("sockname")
    return next(c for c in server.connections if c.peer is not None and tuple(c.peer[:2]) == tuple(me[:2]))


# ------------------------------------------------------------------ 1. headers that cannot be Modbus
GOOD_READ = mbap.encode(1, 11, read_pdu(4, 0, 2))
BAD_HEADERS = {
    "protocol id 1": b"\x00\x01\x00\x01\x00\x06\x0b\x04\x00\x00\x00\x02",
    "protocol id 0xFFFF": b"\x00\x01\xff\xff\x00\x06\x0b\x04\x00\x00\x00\x02",
    "length 0": b"\x00\x01\x00\x00\x00\x00\x0b",
    "length 1 (unit, no PDU)": b"\x00\x01\x00\x00\x00\x01\x0b",
    "length 255": b"\x00\x01\x00\x00\x00\xff\x0b" + b"\x10" + b"\x00" * 253,
    "length 256 with its bytes": b"\x00\x01\x00\x00\x01\x00\x0b" + b"\x00" * 300,
    "length 0xFFFF, nothing after": b"\x00\x01\x00\x00\xff\xff\x0b",
    "ASCII garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "TLS hello": bytes.fromhex("16030100a5010000a10303") + bytes(32),
}


async def test_header_that_cannot_be_modbus_closes_only_that_connection():
    async with running_bridge(LAYOUT) as h:
        await settle(h, ("a1",))
        server = h.app.modbus
        good = await connect(h.modbus_port)
        try:
            await serves(good)
            for case, garbage in BAD_HEADERS.items():
                bad = await connect(h.modbus_port)
                closed = server.stats["closed_bad_frame"]
                try:
                    bad.writer.write(garbage)
                    await eof_within(bad.reader)
                    # closed for what it sent (at once), not by the sweep of idle or slow connections
                    assert server.stats["closed_bad_frame"] == closed + 1, f"{case}: {server.stats}"
                finally:
                    await bad.close()
                await serves(good)  # the other client notices nothing
            assert server.stats["closed_bad_frame"] == len(BAD_HEADERS)

            # answers to the valid requests in front of a bad header are still delivered, then closed
            bad = await connect(h.modbus_port)
            try:
                bad.writer.write(GOOD_READ + mbap.encode(2, 11, read_pdu(4, 6, 2)) + BAD_HEADERS["protocol id 1"])
                first, second = await bad.receive(), await bad.receive()
                assert (first.tid, second.tid) == (1, 2)
                assert f32(first.pdu, 2) == VOLTS["a1"] and second.pdu[:2] == b"\x04\x04"
                await eof_within(bad.reader)
            finally:
                await bad.close()
            await serves(good)
            assert len(server.connections) == 1
        finally:
            await good.close()


FRAME_TIMEOUT = 0.5


INCOMPLETE = {
    "length claims 6, 3 PDU bytes sent": b"\x00\x01\x00\x00\x00\x06\x0b\x04\x00",
    "length claims 254, 1 PDU byte sent": b"\x00\x01\x00\x00\x00\xfe\x0b\x10",
    "a valid request, then half a header": GOOD_READ + b"\x00\x01\x00",
    "one byte": b"\x00",
}


async def test_request_that_never_arrives_in_full_is_closed_after_frame_timeout():
    async with running_bridge(LAYOUT, modbus_options={"frame_timeout": FRAME_TIMEOUT}) as h:
        await settle(h, ("a1",))
        good = await connect(h.modbus_port)
        bad = {case: await connect(h.modbus_port) for case in INCOMPLETE}
        try:
            await serves(good)
            for case, head in INCOMPLETE.items():
                bad[case].writer.write(head)
            answered = await bad["a valid request, then half a header"].receive()
            assert f32(answered.pdu, 2) == VOLTS["a1"]
            await asyncio.gather(*(eof_within(c.reader) for c in bad.values()))
            await serves(good)
            # each closed as slow (an incomplete request is not a bad one), and only those
            assert h.app.modbus.stats["closed_slow"] == len(INCOMPLETE)
            assert h.app.modbus.stats["closed_bad_frame"] == 0
            assert len(h.app.modbus.connections) == 1
        finally:
            await good.close()
            for c in bad.values():
                await c.close()


async def test_slowloris_trickling_one_byte_per_200ms_is_closed():
    async with running_bridge(LAYOUT, modbus_options={"frame_timeout": FRAME_TIMEOUT}) as h:
        await settle(h, ("a1",))
        good = await connect(h.modbus_port)
        slow = await connect(h.modbus_port)

        async def trickle() -> None:
            for byte in GOOD_READ * 10:
                slow.writer.write(bytes((byte,)))
                await asyncio.sleep(0.2)

        trickler = asyncio.create_task(trickle())
        try:
            await eof_within(slow.reader)
            await serves(good)
            assert h.app.modbus.stats["closed_slow"] == 1
            assert len(h.app.modbus.connections) == 1
        finally:
            trickler.cancel()
            await good.close()
            await slow.close()


async def test_streaming_client_whose_segments_split_frames_is_not_closed_as_slow():
    """Each request arrives in full within 0.1 s of its first byte, but every TCP segment ends
    inside the next request. No request is slow, so the connection must stay open."""
    async with running_bridge(LAYOUT, modbus_options={"frame_timeout": FRAME_TIMEOUT}) as h:
        await settle(h, ("a1",))
        c = await connect(h.modbus_port)
        try:
            n = 20  # 2 s of streaming: past frame_timeout + CHECK_PERIOD
            stream = b"".join(mbap.encode(tid, 11, read_pdu(4, 0, 2)) for tid in range(1, n + 2))
            size = len(GOOD_READ)
            c.writer.write(stream[:size // 2])  # the first half of request 1
            for k in range(n):
                await asyncio.sleep(0.1)
                # the rest of request k + 1 and the first half of request k + 2
                c.writer.write(stream[size // 2 + k * size: size // 2 + (k + 1) * size])
                frame = await c.receive(timeout=WAIT)
                assert frame.tid == k + 1 and f32(frame.pdu, 2) == VOLTS["a1"]
            assert h.app.modbus.stats["closed_slow"] == 0
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            stats = h.app.modbus.stats
            raise AssertionError(
                f"closed after {k} complete requests, none slower than 0.1 s (stats {stats}): "
                "partial_since is not reset when a frame completes in the same chunk that starts the next"
            ) from exc
        finally:
            await c.close()


# ------------------------------------------------------------------ 2. exceptions the spec prescribes
UNKNOWN_FUNCTIONS = (0x00, 0x01, 0x02, 0x05, 0x07, 0x08, 0x0B, 0x0F, 0x11, 0x14, 0x17, 0x2B, 0x5A, 0x7F,
                     0x80, 0x81, 0x83, 0x84, 0x90, 0xAB, 0xFF)

EXCEPTION_CASES = [
    *[(f"function 0x{fc:02X}", 11, bytes((fc,)) + b"\x00\x00\x00\x01", bytes(((fc | 0x80) & 0xFF, 0x01)))
      for fc in UNKNOWN_FUNCTIONS],
    ("function 0x2B alone", 11, b"\x2b", b"\xab\x01"),
    ("FC4 count 0", 11, read_pdu(4, 0, 0), b"\x84\x03"),
    ("FC4 count 126", 11, read_pdu(4, 0, 126), b"\x84\x03"),
    ("FC4 count 0xFFFF", 11, read_pdu(4, 0, 0xFFFF), b"\x84\x03"),
    ("FC3 count 0", 11, read_pdu(3, 0, 0), b"\x83\x03"),
    ("FC3 count 126", 11, read_pdu(3, 0, 126), b"\x83\x03"),
    ("FC4 count 0 at 0xFFFF (count is checked first)", 11, read_pdu(4, 0xFFFF, 0), b"\x84\x03"),
    ("FC4 0xFFFF + 2", 11, read_pdu(4, 0xFFFF, 2), b"\x84\x02"),
    ("FC3 0xFFFF + 2", 11, read_pdu(3, 0xFFFF, 2), b"\x83\x02"),
    ("FC4 0xFF84 + 125", 11, read_pdu(4, 0xFF84, 125), b"\x84\x02"),
    ("FC4 PDU one byte short", 11, read_pdu(4, 0, 2)[:-1], b"\x84\x03"),
    ("FC4 PDU one byte long", 11, read_pdu(4, 0, 2) + b"\x00", b"\x84\x03"),
    ("FC6 PDU one byte short", 12, struct.pack(">BHH", 6, 0x14, 1)[:-1], b"\x86\x03"),
    ("FC16 byte count 3 for 2 registers", 12, fc16(0x14, [1, 2], count=2, nbytes=3), b"\x90\x03"),
    ("FC16 byte count 4, 2 bytes of data", 12, fc16(0x14, [1], count=2, nbytes=4), b"\x90\x03"),
    ("FC16 byte count 4, 6 bytes of data", 12, fc16(0x14, [1, 2, 3], count=2, nbytes=4), b"\x90\x03"),
    ("FC16 count 0", 12, fc16(0x14, []), b"\x90\x03"),
    ("FC16 count 124", 12, fc16(0x14, [0] * 10, count=124, nbytes=248), b"\x90\x03"),
    ("FC16 header only", 12, b"\x10\x00\x14\x00", b"\x90\x03"),
    ("FC16 0xFFFF + 2", 12, fc16(0xFFFF, [1, 2]), b"\x90\x02"),
    ("FC6 outside write_ranges", 12, struct.pack(">BHH", 6, 0x0016, 1), b"\x86\x02"),
    ("FC16 across the end of write_ranges", 12, fc16(0x15, [1, 2]), b"\x90\x02"),
    *[(f"broadcast unit {u}: {name}", u, pdu, bytes((pdu[0] | 0x80, 0x0A)))
      for u in (0, 255)
      for name, pdu in (("FC4 read", read_pdu(4, 0, 2)), ("FC3 read", read_pdu(3, 0x14, 1)),
                        ("FC6 write", struct.pack(">BHH", 6, 0x14, 7)),
                        ("FC16 write", fc16(0x14, [7, 8])))],
    ("unit without a meter", 99, read_pdu(4, 0, 2), b"\x84\x0a"),
]


async def test_exception_codes_and_nothing_reaches_the_bus():
    async with running_bridge(LAYOUT) as h:
        await settle(h, ("a1", "w"))
        server = h.app.modbus
        before = dict(server.exceptions)
        c = await connect(h.modbus_port)
        try:
            for case, unit, pdu, expected in EXCEPTION_CASES:
                tid = c.send(unit, pdu)
                frame = await c.receive()
                assert (frame.tid, frame.unit) == (tid, unit), case
                assert frame.pdu == expected, f"{case}: got {frame.pdu.hex()}, expected {expected.hex()}"
            # the same requests pipelined in one segment: same answers, in order
            c.writer.write(b"".join(mbap.encode(1000 + i, unit, pdu)
                                    for i, (_, unit, pdu, _) in enumerate(EXCEPTION_CASES)))
            for i, (case, _, _, expected) in enumerate(EXCEPTION_CASES):
                frame = await c.receive()
                assert (frame.tid, frame.pdu) == (1000 + i, expected), case
            await serves(c)  # an exception never costs the connection
            await h.polls("w", 1)
        finally:
            await c.close()
        # nothing but the bridge's own polls reached either meter
        assert set(h.sims["w"].functions) == {4}, h.sims["w"].functions
        assert set(h.sims["a1"].functions) == {4}
        assert {fc for _, _, fc in h.buses["a"].stats.log} == {4}
        counted = {code: n - before.get(code, 0) for code, n in server.exceptions.items()}
        expected_counts: dict[int, int] = {}
        for _, _, _, expected in EXCEPTION_CASES:
            expected_counts[expected[1]] = expected_counts.get(expected[1], 0) + 2
        assert {k: v for k, v in counted.items() if v} == expected_counts


# ------------------------------------------------------------------ 3. idle and half-open connections
async def test_idle_connection_is_closed_and_a_polling_one_is_not():
    idle_timeout = 1.0
    async with running_bridge(LAYOUT, modbus_options={"idle_timeout": idle_timeout}) as h:
        await settle(h, ("a1",))
        poller = await connect(h.modbus_port)
        silent = await connect(h.modbus_port)  # connects and never sends a byte (half-open client)
        asked = await connect(h.modbus_port)  # one request, then nothing
        try:
            await serves(asked)
            done = asyncio.Event()

            async def keep_polling() -> int:
                n = 0
                while not done.is_set():
                    await serves(poller)
                    n += 1
                    await asyncio.sleep(0.3)
                return n

            polling = asyncio.create_task(keep_polling())
            try:
                await asyncio.gather(*(eof_within(c.reader) for c in (silent, asked)))
            finally:
                done.set()
            # the sweep that closed them saw the poller, connected as long, and left it alone
            assert await polling >= 3
            await serves(poller)  # still open
            assert h.app.modbus.stats["closed_idle"] == 2
            assert len(h.app.modbus.connections) == 1
        finally:
            for c in (poller, silent, asked):
                await c.close()


async def test_client_that_half_closes_gets_its_answers_then_the_connection_ends():
    async with running_bridge(LAYOUT) as h:
        await settle(h, ("a1",))
        c = await connect(h.modbus_port)
        try:
            c.writer.write(GOOD_READ + mbap.encode(2, 99, read_pdu(4, 0, 2)))
            c.writer.write_eof()
            first, second = await c.receive(), await c.receive()
            assert f32(first.pdu, 2) == VOLTS["a1"] and second.pdu == b"\x84\x0a"
            await eof_within(c.reader)
            await until(lambda: not h.app.modbus.connections, WAIT, "connection left behind")
        finally:
            await c.close()


async def test_write_sent_before_a_half_close_is_carried_out_and_answered():
    """A read sent before shutdown(SHUT_WR) is answered (above); a write accepted the same way
    must not be silently dropped: it is carried to the meter and answered, then the connection ends."""
    layout = {"a": [MeterSpec("w", 2, 12, writable=True)]}
    async with running_bridge(layout, timeout=1.0) as h:
        sim = h.sims["w"]
        await h.polls("w", 1)
        sim.faults.delay = 0.2
        c = await connect(h.modbus_port)
        try:
            c.writer.write(mbap.encode(1, 12, struct.pack(">BHH", 6, 0x14, 5)))
            c.writer.write_eof()
            async with asyncio.timeout(WAIT):
                answer = await c.reader.read()
            await asyncio.sleep(0.5)
            assert (answer, sim.functions.count(6)) == (mbap.encode(1, 12, struct.pack(">BHH", 6, 0x14, 5)), 1), (
                f"after a half-close the accepted write got {answer.hex() or 'no answer'} and reached the meter "
                f"{sim.functions.count(6)} times: _Connection has no eof_received, so asyncio closes the transport "
                "at EOF and connection_lost cancels the pending write task"
            )
        finally:
            await c.close()


# ------------------------------------------------------------------ 4. the connection cap
async def test_connection_beyond_max_connections_is_refused():
    """Policy: the NEW connection is refused (closed right after accept); the existing ones keep going."""
    async with running_bridge(LAYOUT, modbus_options={"max_connections": 5}) as h:
        await settle(h, ("a1",))
        server = h.app.modbus
        clients = [await connect(h.modbus_port) for _ in range(5)]
        extra: list[RawModbusClient] = []
        try:
            for c in clients:
                await serves(c)
            sixth = await connect(h.modbus_port)
            extra.append(sixth)
            sixth.writer.write(GOOD_READ)
            await eof_within(sixth.reader)
            assert server.stats["refused"] == 1
            for c in clients:
                await serves(c)  # the five were not disturbed
            await clients.pop(0).close()
            await until(lambda: len(server.connections) == 4, WAIT, "the closed connection is still counted")
            seventh = await connect(h.modbus_port)
            extra.append(seventh)
            await serves(seventh)
            assert server.stats["refused"] == 1
            assert len(server.connections) == 5
        finally:
            for c in clients + extra:
                await c.close()


# ------------------------------------------------------------------ 5. the pipelining cap
async def test_pipelined_writes_beyond_max_pending_get_server_busy():
    layout = {"a": [MeterSpec("w", 2, 12, writable=True, poll_interval=0.5)]}
    async with running_bridge(layout, timeout=1.0, modbus_options={"max_pending": 2}) as h:
        sim = h.sims["w"]
        await h.polls("w", 1)
        sim.faults.delay = 0.15  # a slow meter: writes queue up behind the bus
        server = h.app.modbus
        a = await connect(h.modbus_port)
        b = await connect(h.modbus_port)
        try:
            a.writer.write(b"".join(mbap.encode(tid, 12, struct.pack(">BHH", 6, 0x14, tid)) for tid in range(1, 6)))
            # the cap is per connection: another client still has its own two
            b.writer.write(b"".join(mbap.encode(tid, 12, struct.pack(">BHH", 6, 0x15, tid)) for tid in (7, 8)))
            replies = {}
            for _ in range(5):
                frame = await a.receive(timeout=5.0)
                replies[frame.tid] = frame.pdu
            busy = [tid for tid, pdu in replies.items() if pdu == b"\x86\x06"]
            assert sorted(busy) == [3, 4, 5], replies
            assert replies[1] == struct.pack(">BHH", 6, 0x14, 1) and replies[2] == struct.pack(">BHH", 6, 0x14, 2)
            got_b = {(f := await b.receive(timeout=5.0)).tid: f.pdu for _ in range(2)}
            assert got_b == {7: struct.pack(">BHH", 6, 0x15, 7), 8: struct.pack(">BHH", 6, 0x15, 8)}
            assert sim.functions.count(6) == 4, "only the admitted writes may reach the bus"
            assert sim.tables[codec.Function.HOLDING][0x14] == 2
            assert server.exceptions.get(0x06) == 3
            # the slots are free again once the writes were answered
            assert await a.request(12, struct.pack(">BHH", 6, 0x14, 9)) == struct.pack(">BHH", 6, 0x14, 9)
        finally:
            await a.close()
            await b.close()


async def test_writes_pending_on_a_silent_meter_are_bounded_and_answered():
    layout = {"a": [MeterSpec("w", 2, 12, writable=True, poll_interval=0.5)]}
    async with running_bridge(layout, modbus_options={"max_pending": 2}) as h:
        sim = h.sims["w"]
        await h.polls("w", 1)
        sim.faults.silent = True
        c = await connect(h.modbus_port)
        try:
            c.writer.write(b"".join(mbap.encode(tid, 12, struct.pack(">BHH", 6, 0x14, tid)) for tid in range(1, 6)))
            replies = {}
            for _ in range(5):
                frame = await c.receive(timeout=5.0)
                replies[frame.tid] = frame.pdu
            assert replies == {1: b"\x86\x0b", 2: b"\x86\x0b", 3: b"\x86\x06", 4: b"\x86\x06", 5: b"\x86\x06"}
            log = h.buses["a"].stats.log
            assert sum(1 for _, _, fc in log if fc == 6) == 2 * 2  # two writes, each tried retries + 1 times
        finally:
            await c.close()


# ------------------------------------------------------------------ 6. the allowlist
@pytest.mark.parametrize("allow,admitted", [
    (("10.0.0.0/8", "192.168.0.0/16"), False),
    (("127.0.0.1/32",), True),
    (("10.0.0.0/8", "127.0.0.0/8"), True),
])
async def test_allowlist(allow, admitted):
    async with running_bridge(LAYOUT, modbus_options={"allow": allow}) as h:
        await settle(h, ("a1",))
        c = await connect(h.modbus_port)
        try:
            if admitted:
                await serves(c)
                assert h.app.modbus.stats["refused"] == 0
            else:
                c.writer.write(GOOD_READ)
                await eof_within(c.reader)
                assert h.app.modbus.stats["refused"] == 1
                assert not h.app.modbus.connections
        finally:
            await c.close()


# ------------------------------------------------------------------ 7. backpressure
def read_requests(first: int, n: int) -> bytes:
    return b"".join(mbap.encode((first + i) & 0xFFFF, 11, read_pdu(4, 0, 2)) for i in range(n))


async def flood_until_paused(server, port: int):
    """A client with a small receive window that pipelines reads and never reads an answer, until
    the server stops reading it. Returns (client, its server-side connection, requests sent)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: fills up fast
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    hog = RawModbusClient(reader, writer)
    await until(lambda: any(c.peer and c.peer[1] == sock.getsockname()[1] for c in server.connections), WAIT,
                "connection not registered")
    conn = conn_of(server, hog)
    sent = 0
    while conn.transport.is_reading():
        assert sent < 2_000_000, "the server never paused reading a client that does not read"
        writer.write(read_requests(sent, 1000))
        sent += 1000
        try:
            async with asyncio.timeout(0.05):
                await writer.drain()
        except TimeoutError:
            pass
        await asyncio.sleep(0)
    return hog, conn, sent


async def test_client_that_never_reads_its_answers_stops_being_read():
    # frame_timeout out of the way: a paused connection may hold half a request in its buffer, and
    # the streaming client trips the partial_since bug (see the streaming test above)
    async with running_bridge(LAYOUT, modbus_options={"frame_timeout": 60.0}) as h:
        await settle(h, ("a1",))
        server = h.app.modbus
        good = await connect(h.modbus_port)
        hog, conn, sent = await flood_until_paused(server, h.modbus_port)
        try:
            # keep pushing for a while: nothing more is taken in or buffered on the server
            peak = conn.transport.get_write_buffer_size()
            for _ in range(20):
                hog.writer.write(read_requests(sent, 1000))
                sent += 1000
                await asyncio.sleep(0.02)
                assert not conn.transport.is_reading()
                assert conn.transport.get_write_buffer_size() <= peak
                assert len(conn.buf) < mbap.HEADER + mbap.MAX_PDU + 1
            assert peak < 1_000_000, f"{peak} bytes of answers buffered for one connection"
            # everyone else is served meanwhile
            for _ in range(20):
                await serves(good)
            # once the client reads, every request is answered, in order: backpressure lost nothing
            reply = mbap.encode(0, 11, b"\x04\x04" + bytes(4))
            async with asyncio.timeout(3 * WAIT):
                data = await hog.reader.readexactly(sent * len(reply))
            for i in range(0, sent, 997):
                frame = data[i * len(reply):(i + 1) * len(reply)]
                assert struct.unpack(">H", frame[:2])[0] == i & 0xFFFF and frame[7:9] == b"\x04\x04"
                assert f32(frame, 9) == VOLTS["a1"]
        finally:
            await hog.close()
            await good.close()


async def test_client_that_never_reads_is_still_closed_when_idle():
    """The paused connection has answers it can never deliver. Closing it for idleness must end
    it (and free its max_connections slot), not wait forever for the client to read."""
    idle_timeout = 1.0
    async with running_bridge(LAYOUT, modbus_options={"frame_timeout": 60.0, "idle_timeout": idle_timeout,
                                                      "max_connections": 1}) as h:
        await settle(h, ("a1",))
        server = h.app.modbus
        hog, conn, _ = await flood_until_paused(server, h.modbus_port)
        late: RawModbusClient | None = None
        try:
            try:
                await until(lambda: conn not in server.connections, WAIT)
            except AssertionError:
                raise AssertionError(
                    f"{WAIT} s after it went quiet (idle_timeout {idle_timeout} s) the connection is still open "
                    f"(stats {server.stats}, {conn.transport.get_write_buffer_size()} bytes unsent): "
                    "_Connection.close() uses transport.close(), which waits for the write buffer to drain"
                ) from None
            assert server.stats["closed_idle"] == 1
            late = await connect(h.modbus_port)  # its slot is free again
            await serves(late)
        finally:
            hog.writer.transport.abort()
            await hog.close()
            if late is not None:
                await late.close()


# ------------------------------------------------------------------ 8. socket fuzz
FUZZ_UNITS = (11, 12, 21, 0, 255, 99, 1)
VALID_EXCEPTIONS = {0x01, 0x02, 0x03, 0x04, 0x06, 0x0A, 0x0B}


def random_request(rng: random.Random, tid: int) -> bytes:
    unit = rng.choice(FUZZ_UNITS)
    kind = rng.random()
    if kind < 0.6:
        fc = rng.choice((3, 4, 4))
        address = rng.choice((0, 6, 0x0C, 0x46, 0x156, rng.randrange(0x10000)))
        count = rng.choice((2, 2, 4, 10, 125, 0, 126, rng.randrange(0x10000)))
        pdu = read_pdu(fc, address, count)
    elif kind < 0.7:
        pdu = struct.pack(">BHH", 6, rng.choice((0x14, rng.randrange(0x10000))), rng.randrange(0x10000))
    elif kind < 0.85:
        n = rng.randint(0, 8)
        count = n if rng.random() < 0.8 else rng.randrange(0x10000)
        nbytes = 2 * n if rng.random() < 0.8 else rng.randrange(256)
        pdu = fc16(rng.choice((0x14, rng.randrange(0x10000))), [rng.randrange(0x10000)] * n, count, nbytes)
    else:
        pdu = bytes((rng.randrange(256),)) + rng.randbytes(rng.randint(0, 12))
    return mbap.encode(tid, unit, pdu)


def mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    kind = rng.randrange(8)
    if kind == 0:
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # a lying length
        lie = rng.choice((0, 1, 2, 255, 0xFFFF, rng.randrange(0x10000), max(0, len(b) - 6 + rng.randint(-3, 3))))
        b[4:6] = struct.pack(">H", lie)
    elif kind == 2:
        b[2:4] = struct.pack(">H", rng.randrange(1, 0x10000))
    elif kind == 3:  # truncated
        del b[rng.randrange(1, len(b)):]
    elif kind == 4:  # extra bytes the length does not cover
        b += rng.randbytes(rng.randint(1, 20))
    elif kind == 5:
        b[6] = rng.randrange(256)
    elif kind == 6:
        b[7] = rng.randrange(256)
    else:  # a random tail on a header that claims it
        tail = rng.randbytes(rng.randint(0, 260))
        b = b[:4] + struct.pack(">H", len(tail) + 1) + b[6:7] + tail
    return bytes(b)


def fuzz_plan(seed: int, connections: int) -> tuple[list[tuple[list[bytes], str]], int]:
    """Per connection: the chunks to send, and how it ends ("eof": half-close and read, "abort");
    and the number of frames in all."""
    rng = random.Random(seed)
    plan = []
    total = 0
    for _ in range(connections):
        frames = []
        hostility = rng.choice((0.0, 0.0, 0.02, 0.1, 0.5))  # chance that a frame is mutated or noise
        for _ in range(rng.randint(5, 40)):
            frame = random_request(rng, rng.randrange(0x10000))
            if rng.random() < hostility:
                frame = mutate(rng, frame) if rng.random() < 0.8 else rng.randbytes(rng.randint(1, 40))
            frames.append(frame)
        total += len(frames)
        stream = b"".join(frames)
        chunks, i = [], 0
        while i < len(stream):
            n = rng.choice((1, 3, 7, 12, 64, len(stream)))
            chunks.append(stream[i:i + n])
            i += n
        ending = "eof" if rng.random() < 0.85 else "abort"
        plan.append((chunks, ending))
    return plan, total


def check_answers(data: bytes) -> int:
    """Every byte the server sent is a well-formed MBAP response; returns how many."""
    n = 0
    while data:
        assert len(data) >= mbap.HEADER, f"a truncated response header: {data.hex()}"
        used, frame = mbap.decode(data)
        assert frame is not None, f"a truncated response: {data.hex()}"
        pdu = frame.pdu
        if pdu[0] & 0x80:
            assert len(pdu) == 2 and pdu[1] in VALID_EXCEPTIONS, pdu.hex()
        elif pdu[0] in (3, 4):
            assert len(pdu) == 2 + pdu[1] and pdu[1] % 2 == 0 and pdu[1] > 0, pdu.hex()
        else:
            assert pdu[0] in (6, 16) and len(pdu) == 5, pdu.hex()
        data = data[used:]
        n += 1
    return n


async def fuzz_connection(port: int, chunks: list[bytes], ending: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        try:
            for i, chunk in enumerate(chunks):
                writer.write(chunk)
                if i % 4 == 3:
                    await asyncio.sleep(0)
            if ending == "abort":
                writer.transport.abort()
                return 0
            writer.write_eof()
        except (ConnectionError, OSError):
            pass  # the server closed a connection that sent garbage while we were still writing
        except RuntimeError as exc:  # uvloop's way of saying the same (write on a closed handle)
            if "closed" not in str(exc):
                raise
        async with asyncio.timeout(5):
            while True:
                try:
                    data = await reader.read(65536)
                except OSError:  # reset by the server (uvloop may say ENOTCONN)
                    break
                if not data:
                    break
                received += data
    finally:
        writer.close()
    return check_answers(received)


async def fuzz_round(port: int, plan, concurrency: int = 20) -> int:
    answers = 0
    for i in range(0, len(plan), concurrency):
        batch = plan[i:i + concurrency]
        answers += sum(await asyncio.gather(*(fuzz_connection(port, chunks, end) for chunks, end in batch)))
    return answers


async def test_socket_fuzz_twice_then_valid_reads():
    async with running_bridge(LAYOUT, modbus_options={"frame_timeout": FRAME_TIMEOUT}) as h:
        await settle(h)
        server = h.app.modbus
        keeper = await connect(h.modbus_port)  # a client that stays connected through it all
        plan, frames = fuzz_plan(seed=20240611, connections=400)
        try:
            answers = await fuzz_round(h.modbus_port, plan)
            await serves(keeper)
            await until(lambda: len(server.connections) == 1, WAIT, "fuzz connections left open")
            assert frames > 5000 and answers > 3000, (frames, answers)
            assert server.stats["closed_bad_frame"] > 50, server.stats
            print(f"fuzz: {frames} frames, {answers} answers, stats {server.stats}, exceptions {server.exceptions}")
            # the same abuse again: the same (ish) answers, nothing left behind
            answers_again = await fuzz_round(h.modbus_port, plan)
            await until(lambda: len(server.connections) == 1, WAIT, "fuzz connections left open")
            assert abs(answers_again - answers) < answers * 0.05  # the same plan, the same (ish) answers
            # the bridge still answers correctly, on an old and a new connection, for every meter
            for name in ("a1", "b1", "w"):
                await h.polls(name, 1)
                await serves(keeper, name)
            fresh = await connect(h.modbus_port)
            try:
                for name in ("a1", "b1", "w"):
                    await serves(fresh, name)
            finally:
                await fresh.close()
        finally:
            await keeper.close()


# ------------------------------------------------------------------ 9. containment
async def test_exception_in_one_client_handler_closes_only_that_client(monkeypatch, caplog):
    async with running_bridge(LAYOUT) as h:
        await settle(h)
        server = h.app.modbus
        real_read = server.read

        def read(unit, request):
            if unit == 21:
                raise RuntimeError("injected: image read failed for unit 21")
            return real_read(unit, request)

        monkeypatch.setattr(server, "read", read)
        victim = await connect(h.modbus_port)
        other = await connect(h.modbus_port)
        try:
            await serves(victim)  # unit 11 still fine on this connection
            victim.send(21, read_pdu(4, 0, 2))
            await eof_within(victim.reader)
            port = victim.writer.get_extra_info("sockname")[1]
            records = [r for r in caplog.records if r.name == "bridge.modbus_tcp" and r.levelno >= logging.ERROR]
            assert len(records) == 1, [r.getMessage() for r in records]
            assert f"127.0.0.1:{port}" in records[0].getMessage()
            assert records[0].exc_info and records[0].exc_info[0] is RuntimeError
            for _ in range(3):
                await serves(other)
                await serves(other, "w")
            assert len(h.app.modbus.connections) == 1
            monkeypatch.setattr(server, "read", real_read)
            again = await connect(h.modbus_port)
            try:
                await serves(again, "b1")
            finally:
                await again.close()
        finally:
            await victim.close()
            await other.close()


async def test_segment_that_raises_is_logged_and_restarted_others_unaffected(monkeypatch, caplog):
    async with running_bridge(LAYOUT) as h:
        await settle(h)
        seg = h.segment("a")
        real_poll = seg._poll
        failed = asyncio.Event()

        async def poll_failing_once(state):
            if not failed.is_set():
                failed.set()
                raise RuntimeError("injected: unexpected bug in the poll")
            await real_poll(state)

        monkeypatch.setattr(seg, "_poll", poll_failing_once)
        await until(failed.is_set, WAIT, "the injected failure never ran")
        b_good = h.segment("b").meters[21].diag.good
        a_good = seg.meters[11].diag.good
        h.sims["a1"].set_value("voltage", 222.0)
        await h.polls("a1", 1, timeout=RESTART_PAUSE_BOUND)
        # the other segment kept polling throughout
        assert h.segment("b").meters[21].diag.good - b_good >= 5
        assert seg.meters[11].diag.good > a_good
        records = [r for r in caplog.records if r.name == "bridge.app" and r.levelno >= logging.ERROR]
        assert len(records) == 1, [r.getMessage() for r in records]
        assert "segment a" in records[0].getMessage() and "restarting" in records[0].getMessage()
        assert records[0].exc_info and records[0].exc_info[0] is RuntimeError
        # the segment's meters are served fresh again, with the value read after the restart
        c = await connect(h.modbus_port)
        try:
            await h.polls("a1", 1)
            reply = await c.read(11, 4, 0, 2)
            assert f32(reply, 2) == 222.0
            await serves(c, "b1")
            assert await c.request(12, struct.pack(">BHH", 6, 0x14, 3)) == struct.pack(">BHH", 6, 0x14, 3)
        finally:
            await c.close()

