"""Wires the parts together and owns their lifecycle.

One ``asyncio.TaskGroup`` holds every long-running task (one per segment,
the staleness sweep); the servers are started after the tasks so a client
never connects to a bridge without pollers. ``stop`` ends them all.
"""
from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable

from . import pdu as P
from .errors import BridgeError
from .image import RegisterImage
from .model import Config
from .modbus_server import ModbusTcpServer
from .opcua_server import OpcUaServer
from .segment import LinkFactory, Segment, open_link

log = logging.getLogger("bridge.app")

SWEEP_PERIOD = 0.2  # seconds between staleness checks
STOP_GRACE = 3.0  # seconds the segments get to finish their transaction in flight on stop
RESTART_PAUSE = 1.0  # seconds before a part that failed unexpectedly is restarted


class App:
    def __init__(self, config: Config, link_factory: LinkFactory = open_link):
        self.config = config
        self.image = RegisterImage(config.meters)
        if config.modbus_tcp.consolidated is not None:
            self.image.add_consolidated(config.modbus_tcp.consolidated)
        self.segments = [Segment(s, self.image, link_factory) for s in config.segments]
        self._segment_of = {m.unit: seg for seg in self.segments for m in seg.cfg.meters}
        self.modbus: ModbusTcpServer | None = None
        if config.modbus_tcp.enabled:
            self.modbus = ModbusTcpServer(self.image, self._route_write, config.modbus_tcp)
        self.opcua: OpcUaServer | None = None
        if config.opcua.enabled:
            self.opcua = OpcUaServer(config.opcua, config, self.image)
        self.listening = asyncio.Event()
        self._stop = asyncio.Event()

    async def _route_write(self, unit: int, request: P.WriteRequest) -> bytes:
        return await self._segment_of[unit].submit_write(unit, request)

    async def run(self) -> None:
        """Run until ``stop()``; raises BridgeError if a server cannot listen.

        Stopping: servers stop accepting first, each segment finishes the transaction in
        flight (bounded by STOP_GRACE), then everything left is cancelled.
        """
        try:
            async with asyncio.TaskGroup() as tg:
                segments = [tg.create_task(self._supervised(f"segment {seg.cfg.name}", seg.run))
                            for seg in self.segments]
                others = [tg.create_task(self._supervised("staleness sweep", self._sweep))]
                try:
                    await self._start_servers()
                    if self.opcua is not None:
                        others.append(tg.create_task(self._supervised("OPC UA writer", self.opcua.run)))
                    # the address space and the profiles live for the whole run: keep them out of
                    # every future garbage collection pass (a full pass over them takes ~1 s)
                    gc.freeze()
                    self.listening.set()
                    await self._stop.wait()
                finally:
                    await self._stop_servers()
                    for seg in self.segments:
                        seg.request_stop()
                    if segments:
                        await asyncio.wait(segments, timeout=STOP_GRACE)
                    for task in segments + others:
                        task.cancel()
        except* OSError as group:
            raise BridgeError(f"cannot listen: {group.exceptions[0]}") from None
        except* BridgeError as group:  # e.g. an unusable OPC UA certificate: one line for the user
            raise group.exceptions[0] from None

    @staticmethod
    async def _supervised(name: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` until it returns; an unexpected exception is logged with its context and the
        work restarted after a pause, so one failing part never takes the others down."""
        while True:
            try:
                await work()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed unexpectedly; restarting it in %g s", name, RESTART_PAUSE)
                await asyncio.sleep(RESTART_PAUSE)

    def stop(self) -> None:
        self._stop.set()

    async def _start_servers(self) -> None:
        if self.modbus is not None:
            await self.modbus.start()
            log.info("Modbus TCP listening on %s:%d", self.config.modbus_tcp.host, self.modbus.port)
        if self.opcua is not None:
            await self.opcua.start()

    async def _stop_servers(self) -> None:
        if self.modbus is not None:
            await self.modbus.stop()
        if self.opcua is not None:
            await self.opcua.stop()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_PERIOD)
            for unit in self.image.sweep():
                meter = self.image.unit(unit).meter
                log.warning("meter %s (unit %d) stale: no good poll for %g s", meter.name, unit, meter.stale_after)
