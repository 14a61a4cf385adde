"""Modbus RTU framing and line timing. Pure, no I/O.

RTU has no transaction id and no length field, so both sides work out a
frame's length from its function code. The master knows which reply it waits
for (slave, function, exact length); ``find_reply`` scans the receive buffer
for exactly that frame with a valid CRC, skipping stray bytes, so line noise
and leftovers are never taken for an answer.
"""
from __future__ import annotations

from dataclasses import dataclass

from bridge.core import pdu as P


def _make_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _make_table()


def crc16(data: bytes | bytearray | memoryview) -> int:
    crc = 0xFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def frame(slave: int, pdu: bytes) -> bytes:
    """An RTU ADU: slave address, PDU, CRC (low byte first)."""
    body = bytes((slave,)) + pdu
    crc = crc16(body)
    return body + bytes((crc & 0xFF, crc >> 8))


def crc_ok(adu: bytes | bytearray | memoryview) -> bool:
    return len(adu) >= 4 and crc16(adu[:-2]) == adu[-2] | (adu[-1] << 8)


# ---------------------------------------------------------------- line timing

def char_time(baudrate: int, parity: str = "N", stopbits: int = 1, bytesize: int = 8) -> float:
    """Seconds one character occupies on the wire (start bit + data + parity + stop)."""
    bits = 1 + bytesize + (0 if parity == "N" else 1) + stopbits
    return bits / baudrate


def silence(baudrate: int, parity: str = "N", stopbits: int = 1, bytesize: int = 8) -> float:
    """The inter-frame gap t3.5; fixed at 1.75 ms above 19200 baud (Modbus serial line spec)."""
    if baudrate > 19200:
        return 0.00175
    return 3.5 * char_time(baudrate, parity, stopbits, bytesize)


# ------------------------------------------------------------ master (client)

@dataclass(frozen=True)
class ReplyScan:
    """Result of scanning the receive buffer for the awaited reply."""

    pdu: bytes | None  # the reply PDU (normal or exception) when found
    end: int  # bytes of the buffer consumed (through the frame, or garbage before a candidate)
    crc_errors: int = 0  # candidate frames (right slave+function+length) with a bad CRC
    skipped: int = 0  # stray bytes skipped before the frame
    pending: bool = False  # a candidate has begun but not yet arrived in full


def find_reply(buf: bytes | bytearray, slave: int, request: P.Request) -> ReplyScan:
    """Look for the reply to ``request`` from ``slave`` in ``buf``.

    A candidate starts with the slave address and the function code (or its
    exception form) and must have the exact expected length and a valid CRC.
    Stray bytes before it are skipped; a candidate with a bad CRC is counted
    and skipped, since a true reply may still follow it.
    """
    fc = request.function
    normal_len = 1 + P.expected_response_length(request) + 2
    crc_errors = 0
    pending = None  # first candidate still arriving: keep it, but look on for a complete frame
    i = 0
    n = len(buf)
    while i + 1 < n:
        if buf[i] == slave and buf[i + 1] in (fc, fc | 0x80):
            length = 5 if buf[i + 1] & 0x80 else normal_len
            if i + length > n:
                if pending is None:
                    pending = i
            else:
                candidate = bytes(buf[i:i + length])
                if crc_ok(candidate):
                    return ReplyScan(candidate[1:-2], i + length, crc_errors, i)
                crc_errors += 1
        i += 1
    end = pending if pending is not None else i
    return ReplyScan(None, end, crc_errors, end, pending is not None)


def classify_failure(buf: bytes | bytearray, slave: int, request: P.Request) -> str:
    """Why no reply to ``request`` was found in ``buf`` once the wait is over.

    One of "timeout" (nothing came), "wrong_function" or "wrong_length" (a
    well-formed frame from our slave that does not answer this request),
    "wrong_slave" (a well-formed frame from another address), "truncated" (our
    reply began but never ended), "crc" (our reply with a bad CRC) or "noise"
    (bytes that make no frame).
    """
    if not buf:
        return "timeout"
    addresses = {addr: fc for addr, fc in _whole_frames(buf)}
    if slave in addresses:
        fc = addresses[slave]
        return "wrong_length" if fc in (request.function, request.function | 0x80) else "wrong_function"
    if addresses:
        return "wrong_slave"
    scan = find_reply(buf, slave, request)
    if scan.pending:
        return "truncated"
    if scan.crc_errors:
        return "crc"
    return "noise"


def _whole_frames(buf: bytes | bytearray) -> list[tuple[int, int]]:
    """(address, function) of every CRC-valid reply frame in ``buf``, by the length it declares."""
    found = []
    n = len(buf)
    for i in range(n - 4):
        fc = buf[i + 1]
        if fc & 0x80:
            length = 5
        elif fc in (1, 2, 3, 4):
            length = 5 + buf[i + 2]
        elif fc in (5, 6, 15, 16):
            length = 8
        else:
            continue
        if i + length <= n and crc_ok(buf[i:i + length]):
            found.append((buf[i], fc))
    return found


def max_reply_length(request: P.Request) -> int:
    return 1 + P.expected_response_length(request) + 2


# ------------------------------------------------------------- slave (server)

def request_length(buf: bytes | bytearray) -> int | None:
    """Length of the request ADU starting at buf[0], None if not yet known, 0 if unknown function."""
    if len(buf) < 2:
        return None
    fc = buf[1]
    if fc in (1, 2, 3, 4, 5, 6):
        return 8
    if fc in (15, 16):
        if len(buf) < 7:
            return None
        return 9 + buf[6]
    return 0


def decode_request(buf: bytes | bytearray) -> tuple[int, tuple[int, bytes] | None]:
    """Slave side: (bytes consumed, (slave, pdu) | None).

    Garbage and frames with a bad CRC are consumed one byte at a time until a
    valid frame lines up, which is how a slave resynchronises on a noisy line.
    """
    start = 0
    while True:
        rest = buf[start:]
        length = request_length(rest)
        if length is None:
            return start, None
        if length and len(rest) < length:
            return start, None
        if length and crc_ok(rest[:length]):
            return start + length, (rest[0], bytes(rest[1:length - 2]))
        start += 1


# --- the master's timing decisions, as pure functions of the clock (tested with made-up times) ----

def reply_over_at(deadline: float, last_rx: float | None, crc_errors: bool, pending: bool,
                  silence: float, quiet_gap: float) -> float:
    """When to stop waiting for a reply. Nothing received (``last_rx`` None): at the deadline. Bytes
    that formed no reply yet: once the line has been quiet for ``quiet_gap`` (which covers USB
    adapters' latency timers), or for only two silences after a whole frame of the awaited length
    with a bad CRC (``crc_errors`` and nothing ``pending``); never after the deadline."""
    if last_rx is None:
        return deadline
    gap = 2 * silence if crc_errors and not pending else quiet_gap
    return min(deadline, last_rx + gap)


def line_free_after_failure(now: float, request: P.Request, got_nothing: bool, char: float,
                            silence: float) -> float:
    """When the next frame may start after a failed transaction. After a timeout the reply may
    still be on its way: the line is held for the longest possible reply, so that a late reply is
    dropped rather than taken for the answer to the next request."""
    hold = max_reply_length(request) * char if got_nothing else 0.0
    return now + hold + silence


def turnaround_estimate(sent: float, first_rx: float, first_rx_len: int, request_len: int, char: float) -> float:
    """Seconds from the end of our request to the reply's first byte: ``first_rx`` is when the first
    chunk of ``first_rx_len`` bytes was read, so it began ``first_rx_len`` characters earlier."""
    return max(0.0, first_rx - first_rx_len * char - sent - request_len * char)
