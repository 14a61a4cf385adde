"""Wires the parts together and owns their lifecycle.

``async with App(config) as app:`` returns once every enabled server listens (or raises the one-line
BridgeError why it cannot); leaving the block stops everything. One ``asyncio.TaskGroup`` holds every
long-running task: one per segment, the housekeeping (staleness sweep, utilisation samples), and each
north side's background work, each supervised (restarted after an unexpected error, its state in the
read model). ``reload`` applies a new configuration all-or-nothing (see ``north.side``).
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable

from bridge.core import pdu as P
from bridge.core.errors import BridgeError, PortError
from bridge.core.image import RegisterImage
from bridge.core.model import Config
from bridge.north.http import HttpServer
from bridge.north.modbus_tcp import ModbusTcpServer
from bridge.north.opcua.server import OpcUaServer
from bridge.north.side import NorthSide, Staged
from bridge.south.segment import LinkFactory, Segment, bus_key, open_link
from bridge.state import ensure_state_dir
from bridge.view import BridgeView, PartState

log = logging.getLogger("bridge.app")

SWEEP_PERIOD = 0.2  # seconds between staleness checks
STOP_GRACE = 3.0  # seconds the segments get to finish their transaction in flight on stop
RESTART_PAUSE = 1.0  # seconds before a part that failed unexpectedly is restarted
# A reload collects only what was made since the last freeze; once the frozen objects have grown by this
# share since the last full pass (cycles the reloads left among them), it makes a full pass instead
FULL_GC_GROWTH = 0.02
LISTENER_LOG_PERIOD = 60.0  # seconds between two log lines about the same failing image listener


def _buses(config: Config) -> dict[int, tuple]:
    return {m.unit: bus_key(s) for s in config.segments for m in s.meters}


class App:
    def __init__(self, config: Config, link_factory: LinkFactory = open_link):
        self.config = config
        self._link_factory = link_factory
        self.image = RegisterImage(config.meters, bus=_buses(config))
        self.image.on_listener_error = self._listener_failed
        self.view = BridgeView(self.image)
        self.segments: dict[str, Segment] = {}
        self.north: dict[str, NorthSide] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task | None = None
        self._reloading = asyncio.Lock()
        self._frozen_after_full = 0  # objects kept out of garbage collection after the last full pass
        self._listener_logged: dict[str, float] = {}  # listener -> when its failure was last logged
        self.listening = asyncio.Event()
        self._stop = asyncio.Event()
        for cfg in config.segments:
            self.segments[cfg.name] = Segment(cfg, self.image, link_factory)
        self._attach()

    # the sides in force, for tests and the demo's banner
    modbus = property(lambda self: self.north.get("modbus_tcp"))
    opcua = property(lambda self: self.north.get("opcua"))
    http = property(lambda self: self.north.get("http"))

    def _sides(self, config: Config) -> dict[str, Callable[[], NorthSide]]:
        """The north sides ``config`` enables, each with how to build it."""
        sides: dict[str, Callable[[], NorthSide]] = {}
        if config.modbus_tcp.enabled:
            sides["modbus_tcp"] = lambda: ModbusTcpServer(
                self.image, self._route_write, config.modbus_tcp, config.meters,
                config.virtual_meters, self._last_interval)
        if config.opcua.enabled:
            sides["opcua"] = lambda: OpcUaServer(config, self.view)
        if config.http is not None:
            sides["http"] = lambda: HttpServer(config, self.view)
        if config.mqtt is not None:
            from bridge.north.mqtt.side import MqttSide  # its client library only when it is used

            sides["mqtt"] = lambda: MqttSide(config, self.view)
        if config.energy is not None:
            from bridge.energy.recorder import EnergyRecorder

            sides["energy"] = lambda: EnergyRecorder(config, self.view)
        return sides

    def _last_interval(self, meter: str):
        """A meter's (or virtual meter's) last closed energy interval, None while there is none."""
        energy = self.view.energy
        return None if energy is None else energy.last(meter)

    async def _route_write(self, unit: int, request: P.WriteRequest) -> bytes:
        seg = next((s for s in self.segments.values() if unit in s.meters), None)
        if seg is None:  # removed by a reload while the request was on its way
            raise PortError(f"unit {unit} is no longer configured")
        return await seg.submit_write(unit, request)

    # ------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> App:
        self._runner = asyncio.create_task(self._run(), name="bridge")
        listening = asyncio.create_task(self.listening.wait())
        try:
            await asyncio.wait({self._runner, listening}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listening.cancel()
        if self._runner.done():
            self._runner.result()  # raises why it could not start
            raise BridgeError("the bridge stopped before it listened")
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.stop()
        if self._runner is not None:
            await self._runner

    def stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        """Until the bridge stops (``stop()``), or fails: raises why."""
        assert self._runner is not None
        await asyncio.shield(self._runner)

    async def _run(self) -> None:
        """Stopping: servers stop accepting first, each segment finishes the transaction in flight
        (bounded by STOP_GRACE), then everything left is cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                if self.config.state_dir:  # set by every loaded configuration
                    ensure_state_dir(self.config.state_dir)
                self._spawn("housekeeping", self._housekeeping)
                for seg in list(self.segments.values()):
                    self._start_segment(seg)
                try:
                    for name, build in self._sides(self.config).items():
                        side = build()
                        await side.start()
                        self._adopt(name, side)
                    self._attach()
                    # the address space and the profiles live for the whole run: keep them out of
                    # every future garbage collection pass (a full pass over them takes ~1 s)
                    gc.freeze()
                    self._frozen_after_full = gc.get_freeze_count()
                    self.listening.set()
                    self.view.listening = True
                    await self._stop.wait()
                finally:
                    self.view.listening = False
                    for name in list(self.north):
                        await self._retire(name)
                    await self._stop_segments(list(self.segments.values()))
                    for task in self._tasks.values():
                        task.cancel()
        except BaseExceptionGroup as group:
            raise _one_error(group) from None

    def _spawn(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        assert self._tg is not None
        state = self.view.parts[name] = PartState(name, running=True)
        self._tasks[name] = self._tg.create_task(self._supervised(state, work), name=name)

    def _forget(self, name: str) -> asyncio.Task | None:
        self.view.parts.pop(name, None)
        return self._tasks.pop(name, None)

    def _attach(self) -> None:
        self.view.attach(list(self.segments.values()), self.north)

    def _adopt(self, name: str, side: NorthSide) -> None:
        self.north[name] = side
        self._spawn(f"north {name}", side.run)

    async def _retire(self, name: str) -> None:
        """Stop a side, then end its background work (a side may still need it to say goodbye)."""
        side = self.north.pop(name)
        await side.stop()
        task = self._forget(f"north {name}")
        if task is not None:
            task.cancel()

    def _start_segment(self, seg: Segment) -> None:
        self.segments[seg.cfg.name] = seg
        self._spawn(f"segment {seg.cfg.name}", seg.run)

    async def _stop_segments(self, segments: list[Segment]) -> None:
        """Each finishes its transaction in flight (bounded by STOP_GRACE), then is cancelled."""
        tasks = [t for seg in segments if (t := self._forget(f"segment {seg.cfg.name}")) is not None]
        for seg in segments:
            seg.request_stop()
            if self.segments.get(seg.cfg.name) is seg:
                del self.segments[seg.cfg.name]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_GRACE)
        for task in tasks:
            task.cancel()

    # ------------------------------------------------------------ reload
    async def reload(self, config: Config) -> str:
        """Apply a new, already validated configuration; all or nothing.

        Every north side stages the new configuration first (binding new listeners); if any cannot,
        every staged change is undone and BridgeError says why: the old configuration stays in
        force, whole. Then segments whose settings changed are restarted (a meter keeps its values
        only if it and its bus are unchanged), and each side commits. Returns a one-line summary.
        """
        async with self._reloading:
            if config.state_dir:
                ensure_state_dir(config.state_dir)
            staged: list[Staged] = []
            wanted = self._sides(config)
            try:
                for name in sorted(set(wanted) | set(self.north)):
                    staged.append(await self._stage_side(name, wanted.get(name), config))
            except BaseException:
                for st in reversed(staged):
                    await st.abort()
                raise
            kept = self._reload_segments(config)
            await self._stop_segments([s for s in list(self.segments.values()) if s.cfg.name not in kept])
            self.image.reconfigure(config.meters, _buses(config))
            for cfg in config.segments:
                if cfg.name not in kept:
                    self._start_segment(Segment(cfg, self.image, self._link_factory))
            self.segments = {c.name: self.segments[c.name] for c in config.segments}  # configuration order
            self.config = config
            for st in staged:
                await st.commit()
            self._attach()
            self._collect_garbage()
            return (f"{len(kept)} of {len(config.segments)} segment(s) kept, "
                    f"{len(config.meters)} meter(s), sides: {', '.join(self.north) or 'none'}")

    def _collect_garbage(self) -> None:
        """After a reload. What the old configuration alone held is mostly freed as it is dropped (reference
        counts work on frozen objects too); a collection is for cycles. A full pass over everything frozen
        holds the whole bridge up (0.3 s at 200 meters, up to 1 s at 2,000), so a reload collects only what
        was made since the last freeze, and lets the frozen objects back in (a full pass) once the cycles
        left among them have grown them by ``FULL_GC_GROWTH``: memory stays within that share of the first
        reload's, and most reloads are short."""
        gc.collect()
        gc.freeze()
        if gc.get_freeze_count() > self._frozen_after_full * (1 + FULL_GC_GROWTH):
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self._frozen_after_full = gc.get_freeze_count()
            log.info("reload: full garbage collection (%d objects kept)", self._frozen_after_full)

    def _reload_segments(self, config: Config) -> set[str]:
        """Names of the running segments whose configuration is unchanged."""
        return {c.name for c in config.segments if (s := self.segments.get(c.name)) is not None and s.cfg == c}

    async def _stage_side(self, name: str, build: Callable[[], NorthSide] | None, config: Config) -> Staged:
        side = self.north.get(name)
        if side is not None and build is not None:
            return await side.stage(config)
        if build is not None:  # enabled by this reload: listening is the preparation
            new = build()
            await new.start()

            async def adopt() -> None:
                self._adopt(name, new)
            return Staged(commit=adopt, abort=new.stop)

        async def retire() -> None:  # disabled by this reload
            await self._retire(name)
        return Staged(commit=retire)

    # ------------------------------------------------------------ supervision
    async def _supervised(self, state: PartState, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` until it returns; an unexpected exception is logged with its context, counted
        in the read model and the work restarted after a pause, so one failing part never takes the
        others down (one failing in a loop makes the bridge unhealthy: see ``BridgeView.problems``)."""
        try:
            while True:
                try:
                    await work()
                    if self.view.parts.get(state.name) is state:
                        del self.view.parts[state.name]  # done: nothing left to watch
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    state.failures.append(time.monotonic())
                    state.last_error = f"{type(exc).__name__}: {exc}"
                    log.exception("%s failed unexpectedly; restarting it in %g s", state.name, RESTART_PAUSE)
                    await asyncio.sleep(RESTART_PAUSE)
        finally:
            state.running = False

    def _listener_failed(self, listener: object, exc: Exception) -> None:
        """Logged with its traceback the first time, then at most once a minute per listener (it may
        fail on every block); every failure is counted (``RegisterImage.listener_errors``)."""
        name = getattr(listener, "__qualname__", repr(listener))
        now = time.monotonic()
        if now - self._listener_logged.get(name, -LISTENER_LOG_PERIOD) >= LISTENER_LOG_PERIOD:
            self._listener_logged[name] = now
            log.error("image listener %s failed and was skipped (%d failures so far): %s: %s",
                      name, self.image.listener_errors, type(exc).__name__, exc, exc_info=exc)

    async def _housekeeping(self) -> None:
        """Staleness sweep (every SWEEP_PERIOD) and the utilisation samples (about once a second)."""
        next_sample = 0.0
        while True:
            for unit in self.image.sweep():
                meter = self.image.unit(unit).meter
                log.warning("meter %s (unit %d) stale: no good poll for %g s", meter.name, unit, meter.stale_after)
            now = time.monotonic()
            if now >= next_sample:
                self.view.sample()
                next_sample = now + 1.0
            await asyncio.sleep(SWEEP_PERIOD)


def _one_error(group: BaseExceptionGroup) -> BaseException:
    """The one error a user should read from a failed start: the first BridgeError, or the group.

    (Not ``except*``: on Python 3.11.2 an exception raised inside ``except*`` comes out wrapped in
    a new ExceptionGroup, and the user would see a 40-line traceback instead of one line.)"""
    for exc in _leaves(group):
        if isinstance(exc, BridgeError):
            return exc
    return group


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
