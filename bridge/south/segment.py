"""The RTU master for one serial port: one task owns the port.

RS485 is half duplex, so exactly one transaction is in flight per segment.
Polls are scheduled earliest-deadline-first by each meter's poll interval (core.schedule);
writes from upstream clients are queued to this task and go out before the
next block read. A meter that fails ``demote_after`` polls in a row is demoted
(declared offline, polled every ``demote_interval``) so its neighbours keep
their rate. Nothing here is shared with another segment: a dead meter or an
unplugged adapter affects only this segment's meters.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from bridge.core import pdu as P
from bridge.core import rtu
from bridge.core.codec import Function
from bridge.core.diagnostics import MeterDiagnostics, SegmentDiagnostics
from bridge.core.errors import BadReply, ExceptionReply, PortError, ReplyTimeout, TransactionError
from bridge.core.image import RegisterImage
from bridge.core.model import MeterConfig, SegmentConfig
from bridge.core.plan import Block, plan_meter
from bridge.core.schedule import PollSchedule
from bridge.south.rtu_master import RtuMaster
from bridge.south.serial_link import PySerialLink, SerialLink

log = logging.getLogger("bridge.segment")

REOPEN_BACKOFF = (0.1, 3.0)  # first and longest wait before reopening a lost port
TURNAROUND_WEIGHT = 0.2  # weight of a new sample in the moving average of a meter's turnaround
REPLAN_CHANGE = 0.25  # replan a meter when its turnaround moved by this fraction (and a character)

LinkFactory = Callable[[SegmentConfig], SerialLink]


def bus_key(cfg: SegmentConfig) -> tuple:
    """What a meter's values depend on besides the meter itself: a change means it is read anew."""
    return (cfg.name, cfg.port, cfg.baudrate, cfg.parity, cfg.stopbits, cfg.bytesize)


def open_link(cfg: SegmentConfig) -> SerialLink:
    return PySerialLink(cfg.port, cfg.baudrate, cfg.parity, cfg.stopbits, cfg.bytesize)


@dataclass
class MeterState:
    meter: MeterConfig
    diag: MeterDiagnostics
    blocks: list[Block]
    planned_turnaround: float = 0.0  # the turnaround (s) the current plan assumed
    failures: int = 0  # consecutive failed polls


@dataclass
class _Write:
    meter: MeterConfig
    request: P.WriteRequest
    future: asyncio.Future[bytes]


class Segment:
    def __init__(self, cfg: SegmentConfig, image: RegisterImage, link_factory: LinkFactory = open_link):
        self.cfg = cfg
        self.image = image
        self._link_factory = link_factory
        self._link: SerialLink | None = None
        self.diag = SegmentDiagnostics(meters={m.unit: image.unit(m.unit).diag for m in cfg.meters})
        self.meters = {
            m.unit: MeterState(m, self.diag.meters[m.unit], plan_meter(m)) for m in cfg.meters
        }
        self._schedule = PollSchedule(((m.unit, m.poll_interval) for m in cfg.meters), cfg.demote_interval,
                                      lambda unit: self.meters[unit].diag.demoted)
        self._writes: deque[_Write] = deque()
        self._wakeup = asyncio.Event()
        self._char = rtu.char_time(cfg.baudrate, cfg.parity, cfg.stopbits, cfg.bytesize)
        self._master: RtuMaster | None = None  # per open port
        self._stopping = False
        self.tried_all = asyncio.Event()  # every meter polled at least once (readiness)

    @property
    def ready(self) -> bool:
        """Every meter has been tried once (an offline meter or an absent port does not hold it back)."""
        return self.tried_all.is_set()

    # ------------------------------------------------------------ public API
    async def submit_write(self, unit: int, request: P.WriteRequest) -> bytes:
        """Carry a write to the meter ahead of the poll schedule; return its reply PDU.

        Raises TransactionError when the meter did not answer usefully.
        """
        state = self.meters[unit]
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._writes.append(_Write(state.meter, request, future))
        self._wakeup.set()
        return await future

    def request_stop(self) -> None:
        """Finish the transaction in flight, then return from ``run``."""
        self._stopping = True
        self._wakeup.set()

    async def run(self) -> None:
        """Own the port until stopped: open it, poll, reopen with backoff when it is lost."""
        self.diag.started = time.monotonic()
        backoff = REOPEN_BACKOFF[0]
        try:
            while not self._stopping:
                try:
                    self._link = self._link_factory(self.cfg)
                except PortError as exc:
                    self._port_lost(exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, REOPEN_BACKOFF[1])
                    continue
                cfg = self.cfg
                self._master = RtuMaster(self._link, cfg.baudrate, cfg.parity, cfg.stopbits, cfg.bytesize)
                log.info("segment %s: port %s open", self.cfg.name, self.cfg.port)
                self.diag.port_open = True
                backoff = REOPEN_BACKOFF[0]
                try:
                    await self._serve()
                except PortError as exc:
                    self._port_lost(exc)
                finally:
                    self._link.close()
                    self._link = None
                await asyncio.sleep(backoff)
        finally:
            self.diag.port_open = False
            self._fail_writes(PortError(f"segment {self.cfg.name} stopped"))

    # ------------------------------------------------------------- schedule
    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._schedule.start(loop.time())
        while not self._stopping:
            while self._writes:
                await self._do_write(self._writes.popleft())
            unit, due = self._schedule.next()
            delay = due - loop.time()
            if delay > 0:
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(delay):
                        await self._wakeup.wait()
                    continue  # a write arrived
                except TimeoutError:
                    pass
            await self._poll(self.meters[unit])
            cycle = self._schedule.polled(unit, loop.time())
            if cycle is not None:
                self.diag.cycle_time = cycle
                self.tried_all.set()

    async def _poll(self, state: MeterState) -> None:
        meter = state.meter
        try:
            for block in state.blocks:
                if self._stopping:
                    return
                while self._writes:  # a write waits for one block at most, not a whole poll
                    await self._do_write(self._writes.popleft())
                request = P.ReadRequest(int(block.function), block.address, block.count)
                data, stamp = await self._transact(state, request)
                self.image.store_block(meter.unit, Function(block.function), block.address, data, stamp)
        except PortError:
            raise
        except TransactionError as exc:
            self._poll_failed(state, exc)
            return
        if state.diag.demoted:
            state.diag.demoted = False
            log.info("meter %s (slave %d on %s) back online", meter.name, meter.slave, self.cfg.name)
        state.failures = 0
        self.image.mark_good(meter.unit, time.time())
        self._maybe_replan(state)

    def _poll_failed(self, state: MeterState, exc: TransactionError) -> None:
        meter = state.meter
        state.failures += 1
        if state.failures >= self.cfg.demote_after and not state.diag.demoted:
            state.diag.demoted = True
            state.diag.demotions += 1
            log.warning("meter %s (slave %d on %s) offline after %d failed polls, polled every %g s: %s",
                        meter.name, meter.slave, self.cfg.name, state.failures, self.cfg.demote_interval, exc)
        self.image.mark_failed(meter.unit, str(exc), offline=state.diag.demoted)

    def _maybe_replan(self, state: MeterState) -> None:
        """Plan again when the meter's measured turnaround moved enough to change the best plan."""
        measured = state.diag.turnaround
        if measured is None:
            return
        delta = abs(measured - state.planned_turnaround)
        if delta > self._char and delta > REPLAN_CHANGE * max(state.planned_turnaround, self._char):
            state.blocks = plan_meter(state.meter, turnaround_chars=measured / self._char)
            state.planned_turnaround = measured

    async def _do_write(self, job: _Write) -> None:
        if job.future.done():  # the client went away
            return
        state = self.meters[job.meter.unit]
        for c in (self.diag, state.diag):
            c.writes += 1
        try:
            reply, _ = await self._transact(state, job.request)
        except ExceptionReply as exc:
            job.future.set_result(P.exception_pdu(job.request.function, exc.code))
        except TransactionError as exc:
            if not job.future.done():
                job.future.set_exception(exc)
            if isinstance(exc, PortError):
                raise
        else:
            if not job.future.done():
                job.future.set_result(reply)
            self._schedule.soon(state.meter.unit)  # read back what was written at once

    # ----------------------------------------------------------- transaction
    async def _transact(self, state: MeterState, request: P.Request) -> tuple[bytes, float]:
        """One request with retries; returns (checked reply payload, wall time of the reply)."""
        last: TransactionError | None = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                for c in (self.diag, state.diag):
                    c.retries += 1
            started = time.monotonic()
            try:
                reply = await self._master.transact(state.meter.slave, request, self.cfg.timeout,
                                                    (self.diag, state.diag))
                self._measure_turnaround(state, reply.turnaround)
                return reply.payload, reply.stamp
            except (ReplyTimeout, BadReply) as exc:
                last = exc
            finally:
                self.diag.busy_time += time.monotonic() - started
        assert last is not None
        raise last

    def _measure_turnaround(self, state: MeterState, sample: float) -> None:
        old = state.diag.turnaround
        state.diag.turnaround = sample if old is None else old + TURNAROUND_WEIGHT * (sample - old)

    # ---------------------------------------------------------------- faults
    def _port_lost(self, exc: PortError) -> None:
        if self.diag.port_open:
            log.error("segment %s: port lost: %s", self.cfg.name, exc)
            self.diag.port_losses += 1
        self.diag.port_open = False
        self.diag.last_error = str(exc)
        for state in self.meters.values():
            state.failures = max(state.failures, self.cfg.demote_after)
            state.diag.demoted = True
            self.image.mark_failed(state.meter.unit, str(exc), offline=True)
        self._fail_writes(exc)
        self.tried_all.set()  # an absent port must not hold readiness back

    def _fail_writes(self, exc: TransactionError) -> None:
        while self._writes:
            job = self._writes.popleft()
            if not job.future.done():
                job.future.set_exception(exc)
