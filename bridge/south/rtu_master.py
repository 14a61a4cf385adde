"""One Modbus RTU transaction at a time over a SerialLink: the master's side of the line.

Keeps the inter-frame silence, matches the reply to its exact request, fails
fast once a bad answer is over, holds the line after a timeout so a late reply
is dropped, and counts every outcome. Used by the segment task and by the
commissioning commands (scan, read).
"""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bridge.core import pdu as P
from bridge.core import rtu
from bridge.core.diagnostics import LinkCounters
from bridge.core.errors import BadReply, ExceptionReply, ReplyTimeout
from bridge.south.serial_link import SerialLink

QUIET_GAP = 0.05  # a reply that stopped arriving for this long (and ≥ 2 × t3.5) is over


@dataclass(frozen=True)
class Reply:
    payload: bytes  # register bytes of a read, the echo PDU of a write
    stamp: float  # wall-clock time the reply was complete
    turnaround: float  # seconds from the end of our request to the reply's first byte (estimated)


class RtuMaster:
    def __init__(self, link: SerialLink, baudrate: int, parity: str = "N", stopbits: int = 1, bytesize: int = 8):
        self.link = link
        self.char = rtu.char_time(baudrate, parity, stopbits, bytesize)
        self.silence = rtu.silence(baudrate, parity, stopbits, bytesize)
        self.quiet_gap = max(QUIET_GAP, 2 * self.silence)
        self._line_free_at = 0.0  # monotonic time after which the next frame may start
        self._late_suspect: LinkCounters | None = None  # whose reply may still arrive late

    async def wait_line_free(self) -> None:
        """Keep the inter-frame silence: not a moment less (a real bus would garble the frame)."""
        # uvloop's timers round to the millisecond, so a sleep may end early: ask for whole
        # milliseconds rounded up (at most ~1 ms late), and check again in case it still was.
        while (wait := self._line_free_at - time.monotonic()) > 0:
            await asyncio.sleep(math.ceil(wait * 1000) / 1000)

    async def transact(self, slave: int, request: P.Request, timeout: float,
                       counters: Sequence[LinkCounters] = ()) -> Reply:
        """One request, no retry. Raises ReplyTimeout, BadReply or ExceptionReply (all counted)."""
        link = self.link
        await self.wait_line_free()
        if link.buffer:  # a reply that came after its request had given up: never use it
            self._count_late(counters)
            link.discard_input()
        self._late_suspect = None
        adu = rtu.frame(slave, P.encode_request(request))
        for c in counters:
            c.requests += 1
        link.write(adu)
        sent = time.monotonic()
        deadline = sent + timeout
        while True:
            scan = rtu.find_reply(link.buffer, slave, request)
            if scan.pdu is not None:
                break
            now = time.monotonic()
            wake = rtu.reply_over_at(deadline, link.last_rx if link.buffer else None, bool(scan.crc_errors),
                                     bool(scan.pending), self.silence, self.quiet_gap)
            if now >= wake:
                self._fail(slave, request, timeout, counters)
            try:
                async with asyncio.timeout(wake - now):
                    await link.wait_data()
            except TimeoutError:
                pass
        self._line_free_at = link.last_rx + self.silence
        stamp = time.time()
        turnaround = rtu.turnaround_estimate(sent, link.first_rx, link.first_rx_len, len(adu), self.char)
        if scan.skipped:
            for c in counters:
                c.stray_bytes += scan.skipped
        del link.buffer[: scan.end]
        try:
            payload = P.check_response(request, scan.pdu)
        except ExceptionReply:
            for c in counters:
                c.exceptions += 1
            raise
        except BadReply as exc:
            for c in counters:
                c.count_fault(exc.kind)
            raise
        for c in counters:
            c.good += 1
        return Reply(payload, stamp, turnaround)

    def _count_late(self, counters: Sequence[LinkCounters]) -> None:
        """A late reply counts for the line (the first counters) and for whoever timed out."""
        targets = list(counters[:1])
        whose = self._late_suspect or (counters[-1] if counters else None)
        if whose is not None and all(whose is not t for t in targets):
            targets.append(whose)
        for c in targets:
            c.late_replies += 1

    def _fail(self, slave: int, request: P.Request, timeout: float, counters: Sequence[LinkCounters]) -> None:
        """Classify a transaction that produced no usable reply, count it, and raise."""
        link = self.link
        nothing = not link.buffer
        kind = rtu.classify_failure(link.buffer, slave, request)
        for c in counters:
            c.count_fault(kind)
        link.discard_input()
        self._line_free_at = rtu.line_free_after_failure(time.monotonic(), request, nothing, self.char, self.silence)
        if nothing:
            self._late_suspect = counters[-1] if counters else None
            raise ReplyTimeout(f"slave {slave}: no reply within {timeout:g} s")
        raise BadReply(kind, f"slave {slave}: {kind.replace('_', ' ')} reply")
