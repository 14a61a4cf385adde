"""Modbus PDU rules, both directions. Pure, no I/O.

Requests are parsed into small frozen objects, or into a ``PduException``
carrying the Modbus exception code the spec prescribes for that input.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from bridge.core.codec import Function
from bridge.core.errors import PduException

READ_HOLDING = Function.HOLDING  # the register tables are named by their read function code
READ_INPUT = Function.INPUT
WRITE_SINGLE = 6
WRITE_MULTIPLE = 16
READ_FUNCTIONS = (READ_HOLDING, READ_INPUT)
WRITE_FUNCTIONS = (WRITE_SINGLE, WRITE_MULTIPLE)

MAX_READ = 125  # registers per FC3/FC4 request
MAX_WRITE = 123  # registers per FC16 request

# Exception codes
ILLEGAL_FUNCTION = 0x01
ILLEGAL_DATA_ADDRESS = 0x02
ILLEGAL_DATA_VALUE = 0x03
SERVER_DEVICE_FAILURE = 0x04
GATEWAY_PATH_UNAVAILABLE = 0x0A
GATEWAY_TARGET_FAILED = 0x0B


@dataclass(frozen=True)
class ReadRequest:
    function: int  # 3 or 4
    address: int
    count: int

    @property
    def end(self) -> int:
        return self.address + self.count


@dataclass(frozen=True)
class WriteRequest:
    function: int  # 6 or 16
    address: int
    values: tuple[int, ...]

    @property
    def end(self) -> int:
        return self.address + len(self.values)


Request = ReadRequest | WriteRequest


def exception_pdu(function: int, code: int) -> bytes:
    return bytes(((function | 0x80) & 0xFF, code))


def parse_request(pdu: bytes) -> Request:
    """Parse a request PDU (function code first). Raises PduException."""
    if not pdu:
        raise PduException(0, ILLEGAL_FUNCTION)
    fc = pdu[0]
    if fc in READ_FUNCTIONS:
        if len(pdu) != 5:
            raise PduException(fc, ILLEGAL_DATA_VALUE)
        address, count = struct.unpack(">HH", pdu[1:5])
        if not 1 <= count <= MAX_READ:
            raise PduException(fc, ILLEGAL_DATA_VALUE)
        if address + count > 0x10000:
            raise PduException(fc, ILLEGAL_DATA_ADDRESS)
        return ReadRequest(fc, address, count)
    if fc == WRITE_SINGLE:
        if len(pdu) != 5:
            raise PduException(fc, ILLEGAL_DATA_VALUE)
        address, value = struct.unpack(">HH", pdu[1:5])
        return WriteRequest(fc, address, (value,))
    if fc == WRITE_MULTIPLE:
        if len(pdu) < 6:
            raise PduException(fc, ILLEGAL_DATA_VALUE)
        address, count, nbytes = struct.unpack(">HHB", pdu[1:6])
        if not 1 <= count <= MAX_WRITE or nbytes != 2 * count or len(pdu) != 6 + nbytes:
            raise PduException(fc, ILLEGAL_DATA_VALUE)
        if address + count > 0x10000:
            raise PduException(fc, ILLEGAL_DATA_ADDRESS)
        values = struct.unpack(f">{count}H", pdu[6:])
        return WriteRequest(fc, address, values)
    raise PduException(fc, ILLEGAL_FUNCTION)


def encode_request(request: Request) -> bytes:
    if isinstance(request, ReadRequest):
        return struct.pack(">BHH", request.function, request.address, request.count)
    if request.function == WRITE_SINGLE:
        return struct.pack(">BHH", WRITE_SINGLE, request.address, request.values[0])
    n = len(request.values)
    return struct.pack(f">BHHB{n}H", WRITE_MULTIPLE, request.address, n, 2 * n, *request.values)


def read_response_pdu(function: int, data: bytes) -> bytes:
    """Response to FC3/FC4 from raw register bytes (big-endian words)."""
    return bytes((function, len(data))) + data


def write_response_pdu(request: WriteRequest) -> bytes:
    if request.function == WRITE_SINGLE:
        return struct.pack(">BHH", WRITE_SINGLE, request.address, request.values[0])
    return struct.pack(">BHH", WRITE_MULTIPLE, request.address, len(request.values))


def expected_response_length(request: Request) -> int:
    """Length of the normal response PDU to ``request`` (exception PDUs are 2 bytes)."""
    if isinstance(request, ReadRequest):
        return 2 + 2 * request.count
    return 5


def check_response(request: Request, pdu: bytes) -> bytes:
    """Validate a response PDU against its request.

    Returns the register bytes of a read, or the PDU of a write echo. Raises
    ``ExceptionReply`` for an exception PDU and ``BadReply`` for any mismatch,
    so a reply that does not answer this exact request is never used.
    """
    from bridge.core.errors import BadReply, ExceptionReply

    fc = request.function
    if len(pdu) == 2 and pdu[0] == (fc | 0x80):
        raise ExceptionReply(pdu[1])
    if not pdu or pdu[0] != fc:
        raise BadReply("wrong_function", f"asked function {fc}, reply has {pdu[:1].hex() or 'nothing'}")
    if len(pdu) != expected_response_length(request):
        raise BadReply("wrong_length", f"reply PDU is {len(pdu)} bytes, expected {expected_response_length(request)}")
    if isinstance(request, ReadRequest):
        if pdu[1] != 2 * request.count:
            raise BadReply("wrong_length", f"byte count {pdu[1]}, expected {2 * request.count}")
        return pdu[2:]
    if pdu != write_response_pdu(request):
        raise BadReply("wrong_echo", "write reply does not echo the request")
    return pdu
