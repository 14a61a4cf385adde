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

from bridge.core import pdu as P
from bridge.core.errors import BridgeError
from bridge.core.image import RegisterImage
from bridge.core.model import Config
from bridge.north.http import HttpServer
from bridge.north.modbus_tcp import ModbusTcpServer
from bridge.north.opcua.server import OpcUaServer
from bridge.south.segment import LinkFactory, Segment, open_link

log = logging.getLogger("bridge.app")

SWEEP_PERIOD = 0.2  # seconds between staleness checks
STOP_GRACE = 3.0  # seconds the segments get to finish their transaction in flight on stop
RESTART_PAUSE = 1.0  # seconds before a part that failed unexpectedly is restarted


class App:
    def __init__(self, config: Config, link_factory: LinkFactory = open_link):
        self.config = config
        self._link_factory = link_factory
        self.image = RegisterImage(config.meters)
        if config.modbus_tcp.consolidated is not None:
            self.image.add_consolidated(config.modbus_tcp.consolidated)
        self.segments = [Segment(s, self.image, link_factory) for s in config.segments]
        self._segment_of = {m.unit: seg for seg in self.segments for m in seg.cfg.meters}
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: dict[object, asyncio.Task] = {}  # segment or "opcua" -> its task
        self.modbus: ModbusTcpServer | None = None
        if config.modbus_tcp.enabled:
            self.modbus = ModbusTcpServer(self.image, self._route_write, config.modbus_tcp)
        self.opcua: OpcUaServer | None = None
        if config.opcua.enabled:
            self.opcua = OpcUaServer(config.opcua, config, self.image)
        self.http: HttpServer | None = None
        if config.http is not None:
            self.http = HttpServer(config.http, self)
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
                self._tg = tg
                for seg in self.segments:
                    self._start_segment(seg)
                others = [tg.create_task(self._supervised("staleness sweep", self._sweep))]
                try:
                    await self._start_servers()
                    if self.opcua is not None:
                        self._tasks["opcua"] = tg.create_task(self._supervised("OPC UA writer", self.opcua.run))
                    # the address space and the profiles live for the whole run: keep them out of
                    # every future garbage collection pass (a full pass over them takes ~1 s)
                    gc.freeze()
                    self.listening.set()
                    await self._stop.wait()
                finally:
                    await self._stop_servers()
                    await self._stop_segments(self.segments)
                    for task in [*self._tasks.values(), *others]:
                        task.cancel()
        except* OSError as group:
            raise BridgeError(f"cannot listen: {group.exceptions[0]}") from None
        except* BridgeError as group:  # e.g. an unusable OPC UA certificate: one line for the user
            raise group.exceptions[0] from None

    def _start_segment(self, seg: Segment) -> None:
        assert self._tg is not None
        self._tasks[seg] = self._tg.create_task(self._supervised(f"segment {seg.cfg.name}", seg.run))

    async def _stop_segments(self, segments: list[Segment]) -> None:
        """Each finishes its transaction in flight (bounded by STOP_GRACE), then is cancelled."""
        tasks = [self._tasks.pop(seg) for seg in segments if seg in self._tasks]
        for seg in segments:
            seg.request_stop()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_GRACE)
        for task in tasks:
            task.cancel()

    async def reload(self, config: Config) -> None:
        """Apply a new, already validated configuration without a restart.

        Segments whose configuration is unchanged keep running, and so do their meters' image
        and every Modbus TCP connection; changed segments are stopped and started anew; the
        OPC UA address space is rebuilt when meters or OPC UA settings changed.
        """
        old = self.config
        wanted = {s.name: s for s in config.segments}
        kept = {seg.cfg.name: seg for seg in self.segments if wanted.get(seg.cfg.name) == seg.cfg}
        await self._stop_segments([seg for seg in self.segments if seg.cfg.name not in kept])
        for name in set(self.image.segments) - set(kept):
            del self.image.segments[name]
        self.image.reconfigure(config.meters, config.modbus_tcp.consolidated)
        self.segments = [kept.get(c.name) or Segment(c, self.image, self._link_factory) for c in config.segments]
        for seg in self.segments:
            if seg.cfg.name not in kept:
                self._start_segment(seg)
        self._segment_of = {m.unit: seg for seg in self.segments for m in seg.cfg.meters}
        if self.modbus is not None:
            if (old.modbus_tcp.host, old.modbus_tcp.port) != (config.modbus_tcp.host, config.modbus_tcp.port):
                log.warning("reload: modbus_tcp.listen changed; restart the bridge to listen there")
            self.modbus.reconfigure(config.modbus_tcp)
        if old.opcua != config.opcua or old.meters != config.meters:
            await self._restart_opcua(config)
        self.config = config
        log.info("reload: %d segment(s) kept, %d (re)started", len(kept), len(self.segments) - len(kept))

    async def _restart_opcua(self, config: Config) -> None:
        task = self._tasks.pop("opcua", None)
        if task is not None:
            task.cancel()
        if self.opcua is not None:
            self.image.unsubscribe(self.opcua.listener)
            await self.opcua.stop()
            self.opcua = None
        if config.opcua.enabled:
            self.opcua = OpcUaServer(config.opcua, config, self.image)
            await self.opcua.start()
            assert self._tg is not None
            self._tasks["opcua"] = self._tg.create_task(self._supervised("OPC UA writer", self.opcua.run))
            gc.freeze()

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
        if self.http is not None:
            await self.http.start()
            log.info("HTTP listening on %s:%d", self.config.http.host, self.http.port)

    async def _stop_servers(self) -> None:
        if self.http is not None:
            await self.http.stop()
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
