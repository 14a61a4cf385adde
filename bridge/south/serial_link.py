"""The seam between the RTU master and a serial line.

``SerialLink`` is what the segment task needs from a port: write a frame, let
received bytes accumulate, wait for more, discard what is pending. The real
implementation opens the device with pyserial (non-blocking, exclusive) and
watches its file descriptor on the event loop, so it works the same on a USB
adapter, a built-in UART and a pseudo-terminal.
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import Protocol

import serial

from bridge.core.errors import PortError

_PARITY = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}


class SerialLink(Protocol):
    buffer: bytearray  # received bytes not yet consumed
    last_rx: float  # monotonic time of the last received chunk
    first_rx: float  # monotonic time of the first chunk since the buffer was last empty
    first_rx_len: int  # and its size, to estimate when its first byte arrived

    def write(self, data: bytes) -> None: ...
    def discard_input(self) -> None: ...
    async def wait_data(self) -> None: ...
    def close(self) -> None: ...


class PySerialLink:
    """A real serial port (or pty) driven from the event loop."""

    def __init__(self, port: str, baudrate: int, parity: str, stopbits: int, bytesize: int = 8):
        try:
            self._serial = serial.Serial(
                port=port,
                baudrate=baudrate,
                parity=_PARITY[parity],
                stopbits=stopbits,
                bytesize=bytesize,
                timeout=0,
                write_timeout=1,
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise PortError(f"cannot open {port}: {exc}") from None
        self.port = port
        self._fd = self._serial.fileno()
        self.buffer = bytearray()
        self.last_rx = 0.0
        self.first_rx = 0.0
        self.first_rx_len = 0
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._error: PortError | None = None
        self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
            if not data:
                raise OSError("end of file")
        except BlockingIOError:
            return
        except OSError as exc:
            # The adapter is gone (EIO after unplugging, or the pty's other end closed).
            self._error = PortError(f"{self.port}: {exc.strerror or exc}")
            self._loop.remove_reader(self._fd)
            self._wake()
            return
        now = time.monotonic()
        if not self.buffer:
            self.first_rx, self.first_rx_len = now, len(data)
        self.buffer += data
        self.last_rx = now
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait_data(self) -> None:
        """Return once more bytes arrived; raise PortError if the port failed."""
        if self._error is not None:
            raise self._error
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        try:
            self._serial.write(data)
        except (serial.SerialException, OSError) as exc:
            self._error = PortError(f"{self.port}: write failed: {exc}")
            raise self._error from None

    def discard_input(self) -> None:
        self.buffer.clear()

    def close(self) -> None:
        if self._error is None:
            self._loop.remove_reader(self._fd)
        try:
            self._serial.close()
        except (serial.SerialException, OSError):
            pass
