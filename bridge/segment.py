"""The RTU master for one serial port: one task owns the port.

RS485 is half duplex, so exactly one transaction is in flight per segment.
Polls are scheduled earliest-deadline-first by each meter's poll interval;
writes from upstream clients are queued to this task and go out ahead of the
next poll. Nothing here is shared with another segment: a dead meter or an
unplugged adapter affects only this segment's meters.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from . import pdu as P
from . import rtu
from .codec import Function
from .errors import BadReply, ExceptionReply, PortError, ReplyTimeout, TransactionError
from .image import RegisterImage
from .model import MeterConfig, SegmentConfig
from .plan import Block, plan_meter
from .serial_link import PySerialLink, SerialLink

log = logging.getLogger("bridge.segment")

OFFLINE_AFTER = 3  # consecutive failed polls before a meter is declared offline
OFFLINE_RETRY = 10.0  # seconds between polls of an offline meter, so it cannot starve its neighbours
REOPEN_BACKOFF = (0.1, 3.0)  # first and longest wait before reopening a lost port

LinkFactory = Callable[[SegmentConfig], SerialLink]


def open_link(cfg: SegmentConfig) -> SerialLink:
    return PySerialLink(cfg.port, cfg.baudrate, cfg.parity, cfg.stopbits, cfg.bytesize)


@dataclass
class Counters:
    requests: int = 0
    good: int = 0
    timeouts: int = 0
    crc_errors: int = 0
    protocol_errors: int = 0  # wrong slave/function/length/echo
    exceptions: int = 0  # Modbus exception replies
    retries: int = 0
    writes: int = 0


@dataclass
class MeterState:
    meter: MeterConfig
    blocks: list[Block]
    next_due: float = 0.0
    failures: int = 0  # consecutive failed polls
    counters: Counters = field(default_factory=Counters)

    @property
    def offline(self) -> bool:
        return self.failures >= OFFLINE_AFTER


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
        self.meters = {m.unit: MeterState(m, plan_meter(m)) for m in cfg.meters}
        self.counters = Counters()
        self._writes: deque[_Write] = deque()
        self._wakeup = asyncio.Event()
        self._silence = rtu.silence(cfg.baudrate, cfg.parity, cfg.stopbits, cfg.bytesize)
        self._char = rtu.char_time(cfg.baudrate, cfg.parity, cfg.stopbits, cfg.bytesize)
        self._line_free_at = 0.0  # monotonic time after which the next frame may start
        self.port_ok = False
        self.cycle_time = 0.0  # seconds for the last round of every meter
        self.busy_time = 0.0  # seconds spent in transactions (the line was not free); for utilisation
        self.tried_all = asyncio.Event()  # every meter polled at least once (readiness)

    # ------------------------------------------------------------ public API
    async def submit_write(self, unit: int, request: P.WriteRequest) -> bytes:
        """Carry a write to the meter ahead of the poll schedule; return its reply PDU.

        Raises ExceptionReply with the meter's exception, or TransactionError
        when the meter did not answer usefully.
        """
        state = self.meters[unit]
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._writes.append(_Write(state.meter, request, future))
        self._wakeup.set()
        return await future

    async def run(self) -> None:
        """Own the port until cancelled: open it, poll, reopen with backoff when it is lost."""
        backoff = REOPEN_BACKOFF[0]
        try:
            while True:
                try:
                    self._link = self._link_factory(self.cfg)
                except PortError as exc:
                    self._port_lost(exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, REOPEN_BACKOFF[1])
                    continue
                if not self.port_ok:
                    log.info("segment %s: port %s open", self.cfg.name, self.cfg.port)
                self.port_ok = True
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
            self._fail_writes(PortError(f"segment {self.cfg.name} stopped"))

    # ------------------------------------------------------------- schedule
    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for state in self.meters.values():
            state.next_due = now
        round_start, polled = now, set()
        while True:
            while self._writes:
                await self._do_write(self._writes.popleft())
            state = min(self.meters.values(), key=lambda s: s.next_due)
            delay = state.next_due - loop.time()
            if delay > 0:
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(delay):
                        await self._wakeup.wait()
                    continue  # a write arrived
                except TimeoutError:
                    pass
            await self._poll(state)
            now = loop.time()
            interval = state.meter.poll_interval
            if state.offline:
                interval = max(interval, OFFLINE_RETRY)
            # start-to-start interval; an overrun is not caught up in a burst
            state.next_due = max(state.next_due + interval, now)
            polled.add(state.meter.unit)
            if len(polled) == len(self.meters):
                self.cycle_time = now - round_start
                round_start, polled = now, set()
                self.tried_all.set()

    async def _poll(self, state: MeterState) -> None:
        meter = state.meter
        try:
            for block in state.blocks:
                while self._writes:  # a write waits for one block at most, not a whole poll
                    await self._do_write(self._writes.popleft())
                request = P.ReadRequest(int(block.function), block.address, block.count)
                data, stamp = await self._transact(state, request)
                self.image.store_block(meter.unit, Function(block.function), block.address, data, stamp)
        except PortError:
            raise
        except TransactionError as exc:
            state.failures += 1
            if state.failures == OFFLINE_AFTER:
                log.warning("meter %s (slave %d on %s) offline: %s", meter.name, meter.slave, self.cfg.name, exc)
            self.image.mark_failed(meter.unit, str(exc), offline=state.offline)
            return
        if state.offline:
            log.info("meter %s (slave %d on %s) back online", meter.name, meter.slave, self.cfg.name)
        state.failures = 0
        self.image.mark_good(meter.unit, time.time())

    async def _do_write(self, job: _Write) -> None:
        if job.future.done():  # the client went away
            return
        state = self.meters[job.meter.unit]
        state.counters.writes += 1
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
            state.next_due = 0.0  # read back what was written at once

    # ----------------------------------------------------------- transaction
    async def _transact(self, state: MeterState, request: P.Request) -> tuple[bytes, float]:
        """One request with retries; returns (checked reply payload, wall time of the reply)."""
        last: TransactionError | None = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                self.counters.retries += 1
                state.counters.retries += 1
            started = time.monotonic()
            try:
                return await self._once(state, request)
            except (ReplyTimeout, BadReply) as exc:
                last = exc
            finally:
                self.busy_time += time.monotonic() - started
        assert last is not None
        raise last

    async def _once(self, state: MeterState, request: P.Request) -> tuple[bytes, float]:
        link = self._link
        assert link is not None
        slave = state.meter.slave
        wait = self._line_free_at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        link.discard_input()  # nothing received before our request can be its reply
        adu = rtu.frame(slave, P.encode_request(request))
        for c in (self.counters, state.counters):
            c.requests += 1
        link.write(adu)
        sent = time.monotonic()
        self._line_free_at = sent + (len(adu) * self._char) + self._silence
        crc_errors = 0
        try:
            async with asyncio.timeout(self.cfg.timeout):
                while True:
                    scan = rtu.find_reply(link.buffer, slave, request)
                    crc_errors = scan.crc_errors
                    if scan.pdu is not None:
                        break
                    await link.wait_data()
        except TimeoutError:
            # A reply may still be on its way: let the longest possible one pass and
            # drop it, so it is never taken for the answer to the next request.
            self._line_free_at = time.monotonic() + rtu.max_reply_length(request) * self._char + self._silence
            for c in (self.counters, state.counters):
                if crc_errors:
                    c.crc_errors += 1
                else:
                    c.timeouts += 1
            if crc_errors:
                raise BadReply("crc", f"slave {slave}: reply with a bad CRC") from None
            raise ReplyTimeout(f"slave {slave}: no reply within {self.cfg.timeout:g} s") from None
        self._line_free_at = link.last_rx + self._silence
        stamp = time.time()
        del link.buffer[: scan.end]
        try:
            payload = P.check_response(request, scan.pdu)
        except ExceptionReply:
            for c in (self.counters, state.counters):
                c.exceptions += 1
            raise
        except BadReply:
            for c in (self.counters, state.counters):
                c.protocol_errors += 1
            raise
        for c in (self.counters, state.counters):
            c.good += 1
        return payload, stamp

    # ---------------------------------------------------------------- faults
    def _port_lost(self, exc: PortError) -> None:
        if self.port_ok:
            log.error("segment %s: port lost: %s", self.cfg.name, exc)
        self.port_ok = False
        for state in self.meters.values():
            state.failures = max(state.failures, OFFLINE_AFTER)
            self.image.mark_failed(state.meter.unit, str(exc), offline=True)
        self._fail_writes(exc)
        self.tried_all.set()  # an absent port must not hold readiness back

    def _fail_writes(self, exc: TransactionError) -> None:
        while self._writes:
            job = self._writes.popleft()
            if not job.future.done():
                job.future.set_exception(exc)
