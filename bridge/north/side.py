"""The contract every north side keeps with the App: start, stage a reconfiguration, stop.

A side is built from the configuration and the read model (``BridgeView``), never from the App.

- ``await start()`` binds its listener(s) and returns once clients can connect; a listener that
  cannot bind raises ``BridgeError`` naming the side, host and port.
- ``run()`` is the side's background work (janitors, writers); the App runs it in its task group,
  supervised, and cancels it on stop. A side with nothing to do in the background returns at once.
- ``await stage(config)`` prepares a new configuration without changing what clients see: it binds
  any new listener and builds what it needs, and raises ``BridgeError`` if it cannot. It returns a
  ``Staged`` whose ``commit()`` switches to the new configuration (closing what it replaces) and
  whose ``abort()`` releases what was prepared. The App stages every side first and commits only
  when all staged, so a reload is all-or-nothing.
- ``await stop()`` closes listeners and connections.
- ``status()`` says whether it listens, where, and its counters (``NorthStatus``).
"""
from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from bridge.core.model import Config
from bridge.view import NorthStatus


async def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Staged:
    commit: Callable[[], Awaitable[None]] = _nothing
    abort: Callable[[], Awaitable[None]] = _nothing


class NorthSide(Protocol):
    name: str

    async def start(self) -> None: ...

    async def run(self) -> None: ...

    async def stage(self, config: Config) -> Staged: ...

    async def stop(self) -> None: ...

    def status(self) -> NorthStatus: ...


def listen_error(side: str, host: str, port: int, exc: OSError) -> str:
    """One line naming the side, host and port a listener could not bind, and why."""
    if isinstance(exc, socket.gaierror):
        reason = f"cannot resolve host name {host!r} ({exc.strerror})"
    elif exc.errno:  # asyncio's own wording repeats the address: the system's says it plainly
        reason = os.strerror(exc.errno)
    else:
        reason = exc.strerror or str(exc)
    return f"{side}: cannot listen on {host}:{port}: {reason}"
