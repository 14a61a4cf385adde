"""Small helpers shared by the test modules: ``from support import until, f32``.

tests/ has no __init__.py, so pytest (rootdir-based "prepend" import mode) puts tests/ itself on
sys.path before importing a test module; this module is found there like a top-level one.
"""
from __future__ import annotations

import asyncio
import inspect
import struct
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

from bridge.core import codec
from bridge.core.codec import DataType, Function, WordOrder
from bridge.core.model import Measurement

# How long a test waits for something that must happen (a poll, a counter reaching its value, a connection
# closing). Generous on purpose: it only bounds a hang on a loaded machine; it is never a claim about speed.
WAIT = 10.0

# The command line, as a user runs it, from this interpreter (the venv the tests run in).
BRIDGE = (sys.executable, "-m", "bridge")


async def until(predicate: Callable[[], object | Awaitable[object]], timeout: float = WAIT, what: str = "",
                period: float = 0.01) -> None:
    """Wait until ``predicate()`` is true, trying every ``period`` seconds; fail after ``timeout`` seconds,
    naming ``what``. ``predicate`` may return an awaitable (``lambda: some_coroutine()``): it is awaited."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            while True:
                result = predicate()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(period)
    except TimeoutError:
        if not deadline.expired():
            raise  # a timeout inside the predicate itself, not ours
        raise AssertionError(f"{what or 'the condition'}: not within {timeout} s") from None


# ------------------------------------------------------------------------------- float32 registers


def f32(data: bytes, offset: int = 0) -> float:
    """The float32 (high word first, as the built-in profiles have it) in the two registers at
    ``data[offset:offset + 4]``. In a read reply PDU (function, byte count, registers) it is at offset 2."""
    return codec.decode(codec.bytes_to_registers(data[offset:offset + 4]), DataType.FLOAT32)


def f32_bytes(value: float) -> bytes:
    """``value`` as the two registers of a float32, high word first: the inverse of :func:`f32`."""
    return codec.registers_to_bytes(codec.encode(value, DataType.FLOAT32))


def as_f32(value: float) -> float:
    """What a float32 register pair holds for ``value`` (the simulator stores float32)."""
    return struct.unpack(">f", struct.pack(">f", value))[0]


# ------------------------------------------------------------------------------- requests and profiles


def fc16(address: int, values: list[int], count: int | None = None, nbytes: int | None = None) -> bytes:
    """A write-multiple-registers PDU; ``count`` and ``nbytes`` default to what ``values`` make, and may lie."""
    count = len(values) if count is None else count
    nbytes = 2 * count if nbytes is None else nbytes
    return struct.pack(f">BHHB{len(values)}H", 16, address, count, nbytes, *values)


def meas(name: str, address: int, dtype: DataType = DataType.FLOAT32, function: Function = Function.INPUT
         ) -> Measurement:
    """A measurement in big-endian word order."""
    return Measurement(name, address, dtype, function, WordOrder.BIG)


# ------------------------------------------------------------------------------- files and processes


def write(directory: Path, text: str, name: str = "bridge.yaml") -> Path:
    """``text`` (dedented, leading newlines dropped) written to ``directory / name``; returns the path."""
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


async def run(*argv: str, timeout: float, cwd: Path | None = None, env: dict | None = None
              ) -> tuple[int, str, str]:
    """Run a process to its end; returns its exit code, stdout and stderr. Killed if not done in ``timeout``."""
    proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
