"""`modbus-bridge run` as a service: the App under signals, reloads and systemd's eye.

SIGHUP re-reads the configuration and applies it all-or-nothing (refused and logged if invalid or
if a new listener cannot bind: the running configuration stays whole). systemd hears READY once
every enabled server listens, RELOADING then always READY again around a reload, STOPPING when a
stop begins, and watchdog pings while the read model says the bridge is healthy (see ``sdnotify``).
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


async def serve(path: str | Path, config: Config, stop: asyncio.Event) -> None:
    """Run the bridge until ``stop`` is set; raises BridgeError if it cannot start."""
    loop = asyncio.get_running_loop()
    notifier = Notifier.from_env(unset=True)
    lock = asyncio.Lock()
    try:
        async with App(config) as app:
            view = app.view

            async def reload() -> None:
                async with lock:  # one reload at a time, in the order the signals came
                    notifier.notify(RELOADING=1)
                    try:
                        log.info("reload applied: %s", await app.reload(load_config(path)))
                    except ConfigError as exc:
                        for issue in exc.issues:
                            log.error("reload refused, the running configuration stays: %s", issue)
                    except BridgeError as exc:
                        log.error("reload refused, the running configuration stays: %s", exc)
                    finally:
                        notifier.notify(READY=1, STATUS=view.status_line())

            async with asyncio.TaskGroup() as tg:  # the service's own tasks: watchdog and reloads
                loop.add_signal_handler(signal.SIGHUP, lambda: tg.create_task(reload()))
                notifier.notify(READY=1, STATUS=view.status_line())
                pinger = tg.create_task(watchdog(notifier, lambda: not view.problems()))
                stopped = tg.create_task(stop.wait())
                runner = tg.create_task(app.wait())
                await asyncio.wait({stopped, runner}, return_when=asyncio.FIRST_COMPLETED)
                loop.remove_signal_handler(signal.SIGHUP)
                notifier.notify(STOPPING=1)
                await lock.acquire()  # a reload in progress finishes first
                for task in (pinger, stopped, runner):
                    task.cancel()
    except BaseExceptionGroup as group:  # from the service's task group: the one error that matters
        raise next((e for e in group.exceptions if isinstance(e, BridgeError)), group) from None
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        notifier.close()
