"""Bus diagnostics: what each segment and meter has been through. Plain data, no I/O.

The segment task updates these objects in place; the register image holds
them, so every upstream adapter (OPC UA, the status page, metrics) reads the
same figures without reaching into the serial side.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, fields

# A failed transaction's kind -> the counter it increments
FAULT_COUNTERS = {
    "timeout": "timeouts",  # nothing came back
    "crc": "crc_errors",  # our reply, bad CRC
    "truncated": "truncated",  # our reply's start, never its end
    "wrong_slave": "wrong_slave",  # a well-formed frame from another address
    "noise": "noise",  # bytes that formed no frame at all
    "wrong_function": "protocol_errors",
    "wrong_length": "protocol_errors",
    "wrong_echo": "protocol_errors",
}


UTILISATION_WINDOW = 10.0  # seconds of history behind a segment's utilisation
SAMPLE_PERIOD = 1.0  # seconds between two samples
UTILISATION_SAMPLES = int(UTILISATION_WINDOW / SAMPLE_PERIOD) + 1


@dataclass
class LinkCounters:
    """Counters common to a segment and each of its meters."""

    requests: int = 0  # frames sent
    good: int = 0  # replies that answered their request
    timeouts: int = 0
    crc_errors: int = 0
    truncated: int = 0
    wrong_slave: int = 0
    noise: int = 0
    protocol_errors: int = 0  # wrong function, length or write echo
    exceptions: int = 0  # Modbus exception replies
    retries: int = 0
    late_replies: int = 0  # bytes that arrived after their request had timed out (dropped)
    stray_bytes: int = 0  # bytes skipped before a good reply
    writes: int = 0
    last_error: str = ""

    def count_fault(self, kind: str) -> None:
        name = FAULT_COUNTERS.get(kind, "protocol_errors")
        setattr(self, name, getattr(self, name) + 1)

    @property
    def errors(self) -> int:
        """Every failed transaction that got some answer (not timeouts)."""
        return (self.crc_errors + self.truncated + self.wrong_slave + self.noise + self.protocol_errors
                + self.exceptions)

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class MeterDiagnostics(LinkCounters):
    demotions: int = 0  # times the meter was demoted (declared offline)
    demoted: bool = False
    turnaround: float | None = None  # seconds from the end of our request to the start of its reply


@dataclass
class SegmentDiagnostics(LinkCounters):
    port_open: bool = False
    port_losses: int = 0
    cycle_time: float = 0.0  # seconds for the last round in which every meter was polled
    busy_time: float = 0.0  # seconds the line carried transactions (frames, turnarounds, silences)
    started: float = 0.0  # monotonic time the counters started
    meters: dict[int, MeterDiagnostics] = field(default_factory=dict)  # by unit

    # (monotonic time, busy_time) samples behind ``utilisation``: the last UTILISATION_WINDOW seconds
    samples: deque = field(default_factory=lambda: deque(maxlen=UTILISATION_SAMPLES))

    def sample(self, now: float) -> None:
        """Record the busy time now; call about once a second (the App's housekeeping does)."""
        self.samples.append((now, self.busy_time))

    def utilisation(self, now: float) -> float:
        """The one definition: busy wire time over elapsed time, across the sampled window (0..1)."""
        if self.samples:
            since, since_busy = self.samples[0]
        elif self.started:
            since, since_busy = self.started, 0.0
        else:
            return 0.0
        elapsed = now - since
        return min(1.0, max(0.0, (self.busy_time - since_busy) / elapsed)) if elapsed > 0 else 0.0
