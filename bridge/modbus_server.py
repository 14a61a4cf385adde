"""The upstream Modbus TCP server: a lean asyncio.Protocol over the register image.

Reads are answered synchronously from the image inside ``data_received``, so
every request in one TCP segment is answered, in order, with its own
transaction id, and a read never waits for the bus. Writes to writable meters
are handed to their segment and answered when the meter answers.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from . import mbap
from . import pdu as P
from .errors import ExceptionReply, ProtocolError, TransactionError
from .image import RegisterImage

log = logging.getLogger("bridge.modbus_tcp")

# unit, request -> the meter's reply PDU (raises TransactionError when it did not answer)
WriteRouter = Callable[[int, P.WriteRequest], Awaitable[bytes]]


class ModbusTcpServer:
    def __init__(self, image: RegisterImage, write_router: WriteRouter | None = None):
        self.image = image
        self.write_router = write_router
        self._server: asyncio.AbstractServer | None = None
        self.connections: set[_Connection] = set()
        self.requests = 0

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                conn.close()
            await self._server.wait_closed()
            self._server = None

    # ------------------------------------------------------------- requests
    def answer_now(self, unit: int, pdu: bytes) -> bytes | P.WriteRequest:
        """The response PDU for a request, or the parsed write to carry to the bus."""
        self.requests += 1
        try:
            request = P.parse_request(pdu)
            if isinstance(request, P.ReadRequest):
                data = self.image.read(unit, request.function, request.address, request.count)
                return P.read_response_pdu(request.function, data)
            u = self.image.unit(unit)
            if u is None:
                raise P.PduException(request.function, P.GATEWAY_PATH_UNAVAILABLE)
            if not u.meter.writable or self.write_router is None:
                raise P.PduException(request.function, P.ILLEGAL_FUNCTION)
            if not u.meter.may_write(request.address, len(request.values)):
                raise P.PduException(request.function, P.ILLEGAL_DATA_ADDRESS)  # outside write_ranges
            return request
        except P.PduException as exc:
            return exc.pdu()

    async def write(self, unit: int, request: P.WriteRequest) -> bytes:
        assert self.write_router is not None
        try:
            return await self.write_router(unit, request)
        except ExceptionReply as exc:
            return P.exception_pdu(request.function, exc.code)
        except TransactionError:
            return P.exception_pdu(request.function, P.GATEWAY_TARGET_FAILED)


class _Connection(asyncio.Protocol):
    def __init__(self, server: ModbusTcpServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for task in self.pending:
            task.cancel()
        self.transport = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        try:
            while True:
                used, frame = mbap.decode(self.buf)
                if frame is None:
                    break
                del self.buf[:used]
                reply = self.server.answer_now(frame.unit, frame.pdu)
                if isinstance(reply, bytes):
                    out.append(mbap.encode(frame.tid, frame.unit, reply))
                else:
                    task = asyncio.get_running_loop().create_task(self._write(frame, reply))
                    self.pending.add(task)
                    task.add_done_callback(self.pending.discard)
        except ProtocolError as exc:
            peer = self.transport.get_extra_info("peername") if self.transport else None
            log.info("closing Modbus TCP connection from %s: %s", peer, exc)
            if out and self.transport is not None:
                self.transport.write(b"".join(out))
            self.close()
            return
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    async def _write(self, frame: mbap.Frame, request: P.WriteRequest) -> None:
        reply = await self.server.write(frame.unit, request)
        if self.transport is not None:
            self.transport.write(mbap.encode(frame.tid, frame.unit, reply))
