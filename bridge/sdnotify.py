"""A tiny, dependency-free client of systemd's service notification protocol (sd_notify).

Under a unit with ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a filesystem path, or an
abstract socket name written ``@name``) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` and
``WATCHDOG_PID``. The service sends newline-separated ``KEY=value`` assignments, one message per
datagram, on an AF_UNIX SOCK_DGRAM socket. Outside systemd (no ``NOTIFY_SOCKET``: a terminal, a
container, the tests) every call here is a silent no-op, so the caller never needs to check.

Contract with the lifecycle (``bridge/cli.py`` / ``bridge/app.py``)::

    n = Notifier.from_env()                       # at start, before anything else
    ...                                           # start pollers and servers
    n.notify(READY=1, STATUS="serving 3 segments, 12 meters")  # once every enabled server listens
    task = asyncio.create_task(watchdog(n, lambda: <loop and app are healthy>))
    ...
    n.notify(RELOADING=1)                         # SIGHUP: before re-reading the configuration
    n.notify(READY=1, STATUS="...")               # ...and once the new configuration is in force
    ...
    n.notify(STOPPING=1)                          # SIGTERM/SIGINT: as soon as the stop begins
    task.cancel()

- ``READY=1`` ends ``systemctl start`` (and the unit's ``TimeoutStartSec=``); sending it before the
  servers listen would let dependent units start against closed ports; never sending it makes
  systemd give up on the start and kill the service after ``TimeoutStartSec=``.
- ``RELOADING=1`` is always sent with ``MONOTONIC_USEC=<CLOCK_MONOTONIC in µs>`` (added
  automatically; systemd ≥ 253 requires it for ``Type=notify-reload``); the reload is over at the
  next ``READY=1``.
- ``STOPPING=1`` tells systemd the stop is deliberate and in progress.
- ``STATUS=`` is a free one-line text shown by ``systemctl status`` (newlines are replaced by
  spaces).
- ``WATCHDOG=1`` is sent by :func:`watchdog`, every half ``WatchdogSec=``, but only while
  ``healthy()`` returns true. A stalled event loop cannot run the coroutine, and a wedged
  application makes ``healthy()`` false: either way the pings stop, systemd declares the watchdog
  timeout, kills the process with SIGABRT and, with ``Restart=on-failure``, starts it again.

Sending never raises: an error (the socket gone, a full queue) is logged once as a warning, then
at debug level; the bridge keeps running. ``notify`` returns whether the datagram was sent.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("bridge.sdnotify")

SEND_TIMEOUT = 1.0  # seconds a send may block when systemd's queue is full (never in practice)


class Notifier:
    """Sends notifications to ``address``; does nothing when ``address`` is None."""

    def __init__(self, address: str | None):
        if address is not None and not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract name: notifications are off", address)
            address = None
        self.address = address
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, unset: bool = False) -> Notifier:
        """The notifier systemd asked for (``NOTIFY_SOCKET``), or a no-op one.

        ``unset=True`` removes ``NOTIFY_SOCKET`` from ``os.environ`` so that child processes do
        not inherit it (only when reading ``os.environ``).
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if unset and environ is None:
            os.environ.pop("NOTIFY_SOCKET", None)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _target(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode()
        return self.address

    def notify(self, **fields: object) -> bool:
        """Send one message, e.g. ``notify(READY=1, STATUS="serving")``; True if it was sent.

        Keys are the protocol's variable names (upper case); values are converted to text
        (``True`` -> ``1``). ``RELOADING`` gets ``MONOTONIC_USEC`` unless given.
        """
        if not self.enabled or not fields:
            return False
        if "RELOADING" in fields and "MONOTONIC_USEC" not in fields:
            fields["MONOTONIC_USEC"] = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lines = []
        for key, value in fields.items():
            if isinstance(value, bool):
                value = int(value)
            text = " ".join(str(value).splitlines())
            lines.append(f"{key.upper()}={text}")
        message = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(SEND_TIMEOUT)
            self._sock.sendto(message, self._target())
        except OSError as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "cannot notify systemd at %s: %s", self.address, exc)
            self.close()
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None if no watchdog is asked.

    None also when ``WATCHDOG_PID`` names another process (the variables were inherited) or the
    values are not positive integers.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


async def watchdog(
    notifier: Notifier, healthy: Callable[[], bool], interval: float | None = None
) -> None:
    """Send ``WATCHDOG=1`` every ``interval`` seconds (default: :func:`watchdog_interval`) while
    ``healthy()`` is true; skip the ping while it is false (or raises), resume when it is true again.

    Returns at once when the notifier is off or no watchdog is configured; otherwise runs until
    cancelled.
    """
    if interval is None:
        interval = watchdog_interval()
    if not notifier.enabled or interval is None:
        return
    was_healthy = True
    while True:
        try:
            ok = bool(healthy())
        except Exception:
            log.exception("health check failed")
            ok = False
        if ok:
            if not was_healthy:
                log.warning("healthy again: watchdog pings resume")
            notifier.notify(WATCHDOG=1)
        elif was_healthy:
            log.warning("unhealthy: watchdog pings withheld, systemd restarts the service if this lasts")
        was_healthy = ok
        await asyncio.sleep(interval)
