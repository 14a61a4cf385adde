"""Block-read planning: which reads cover a meter's registers in the least bus time. Pure.

Cost is counted in characters on the wire. Every request costs a fixed
overhead (request frame, reply header and CRC, the inter-frame silence and the
meter's turnaround); every register read costs two characters, including the
unwanted ones in a gap. Merging two neighbours pays off when the gap is
cheaper than another request's overhead. An exact dynamic programme over the
sorted intervals finds the cheapest plan within the meter's block size.
"""
from __future__ import annotations

from dataclasses import dataclass

from .codec import Function
from .model import MAX_READ_REGISTERS, MeterConfig

REQUEST_CHARS = 8  # slave, function, address(2), count(2), CRC(2)
REPLY_HEADER_CHARS = 5  # slave, function, byte count, CRC(2)
SILENCE_CHARS = 3.5


@dataclass(frozen=True)
class Block:
    function: Function
    address: int
    count: int

    @property
    def end(self) -> int:
        return self.address + self.count


def request_overhead_chars(turnaround_chars: float = 0.0) -> float:
    """Characters of bus time one request costs beyond its registers."""
    return REQUEST_CHARS + REPLY_HEADER_CHARS + SILENCE_CHARS + turnaround_chars


def block_chars(count: int, turnaround_chars: float = 0.0) -> float:
    return request_overhead_chars(turnaround_chars) + 2 * count


def _split(intervals: list[tuple[int, int]], max_read: int) -> list[tuple[int, int]]:
    out = []
    for start, end in intervals:
        while end - start > max_read:
            out.append((start, start + max_read))
            start += max_read
        out.append((start, end))
    return out


def plan_intervals(
    intervals: list[tuple[int, int]],
    *,
    max_read: int = MAX_READ_REGISTERS,
    read_gaps: bool = True,
    turnaround_chars: float = 0.0,
) -> list[tuple[int, int]]:
    """Cheapest list of (start, end) reads covering sorted, disjoint ``intervals``."""
    pieces = _split(intervals, max_read)
    n = len(pieces)
    overhead = request_overhead_chars(turnaround_chars)
    best = [0.0] + [float("inf")] * n  # best[i]: cost of covering pieces[:i]
    choice = [0] * (n + 1)
    for i in range(1, n + 1):
        end = pieces[i - 1][1]
        for j in range(i - 1, -1, -1):  # block covers pieces[j:i]
            start = pieces[j][0]
            if end - start > max_read:
                break
            if not read_gaps and j < i - 1 and pieces[j][1] != pieces[j + 1][0]:
                break
            cost = best[j] + overhead + 2 * (end - start)
            if cost < best[i]:
                best[i], choice[i] = cost, j
    reads = []
    i = n
    while i > 0:
        j = choice[i]
        reads.append((pieces[j][0], pieces[i - 1][1]))
        i = j
    return reads[::-1]


def plan_meter(meter: MeterConfig, turnaround_chars: float = 0.0) -> list[Block]:
    """The block reads for one poll of ``meter``: everything its image serves."""
    from .image import served_intervals

    profile = meter.profile
    blocks = []
    for function, intervals in sorted(served_intervals(meter).items()):
        for start, end in plan_intervals(
            intervals, max_read=profile.max_read, read_gaps=profile.read_gaps, turnaround_chars=turnaround_chars
        ):
            blocks.append(Block(function, start, end - start))
    return blocks


def plan_chars(blocks: list[Block], turnaround_chars: float = 0.0) -> float:
    return sum(block_chars(b.count, turnaround_chars) for b in blocks)
