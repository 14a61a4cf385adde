"""`modbus-bridge run` as a service: the App under signals, reloads and systemd's eye.

SIGHUP re-reads the configuration (refused and logged if invalid); systemd hears
READY once every enabled server listens, RELOADING/READY around a reload,
STOPPING when a stop begins, and watchdog pings while the bridge is healthy
(see ``sdnotify``).
"""
from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from bridge.app import App
from bridge.config.loader import load_config
from bridge.core.errors import BridgeError, ConfigError
from bridge.core.model import Config
from bridge.sdnotify import Notifier, watchdog

log = logging.getLogger("bridge.service")


def status_line(app: App) -> str:
    servers = [name for name, on in (("Modbus TCP", app.modbus), ("OPC UA", app.opcua)) if on is not None]
    return (f"serving {len(app.config.meters)} meters on {len(app.segments)} segments"
            f" ({', '.join(servers) or 'no servers'})")


async def serve(path: str | Path, config: Config, stop: asyncio.Event) -> None:
    """Run the bridge until ``stop`` is set; raises BridgeError if it cannot start."""
    loop = asyncio.get_running_loop()
    notifier = Notifier.from_env(unset=True)
    app = App(config)
    lock = asyncio.Lock()
    background: set[asyncio.Task] = set()

    async def reload() -> None:
        async with lock:  # one reload at a time, in the order the signals came
            notifier.notify(RELOADING=1)
            try:
                await app.reload(load_config(path))
            except ConfigError as exc:
                for issue in exc.issues:
                    log.error("reload refused, the running configuration stays: %s", issue)
            except BridgeError as exc:
                log.error("reload refused, the running configuration stays: %s", exc)
            notifier.notify(READY=1, STATUS=status_line(app))

    def spawn(coro) -> None:
        task = loop.create_task(coro)
        background.add(task)
        task.add_done_callback(background.discard)

    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(reload()))
    runner = loop.create_task(app.run())
    listening = loop.create_task(app.listening.wait())
    stopper = loop.create_task(stop.wait())
    try:
        await asyncio.wait({runner, listening, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if listening.done() and not runner.done():
            notifier.notify(READY=1, STATUS=status_line(app))
            spawn(watchdog(notifier, lambda: not runner.done()))
            await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        notifier.notify(STOPPING=1)
        loop.remove_signal_handler(signal.SIGHUP)
        for task in (listening, stopper, *background):
            task.cancel()
        app.stop()
        await asyncio.wait({runner})
        notifier.close()
    runner.result()  # raises why it could not start or failed
