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

from bridge.core.codec import Function
from bridge.core.model import MAX_READ_REGISTERS, MeterConfig, served_intervals

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


def plan_intervals(
    intervals: list[tuple[int, int]],
    *,
    max_read: int = MAX_READ_REGISTERS,
    read_gaps: bool = True,
    turnaround_chars: float = 0.0,
    no_cut: frozenset[int] | set[int] = frozenset(),
) -> list[tuple[int, int]]:
    """Cheapest list of (start, end) reads covering sorted, disjoint ``intervals``.

    A read may start or end at any interval boundary, or inside an interval at
    any address not in ``no_cut`` (the inner addresses of multi-register
    values, which must come from one reply). Exact: a shortest path over those
    positions, each read reaching at most ``max_read`` registers ahead.
    """
    overhead = request_overhead_chars(turnaround_chars)
    # touching intervals form one run: a read may span them even when gaps may not be read
    runs, run = [], 0
    for k, (lo, _) in enumerate(intervals):
        if k and lo > intervals[k - 1][1]:
            run += 1
        runs.append(run)
    # positions in address order: (address, may start a read, may end a read, run)
    positions: list[tuple[int, bool, bool, int]] = []
    for k, (lo, hi) in enumerate(intervals):
        positions.append((lo, True, False, runs[k]))
        positions += [(a, True, True, runs[k]) for a in range(lo + 1, hi) if a not in no_cut]
        positions.append((hi, False, True, runs[k]))
    n = len(positions)
    best = [float("inf")] * n  # best[i]: cost of covering every needed register below positions[i]
    came_from = [-1] * n  # where the last read started (-1: an interval start, reached for free)
    for i, (addr, _, can_end, run) in enumerate(positions):
        if not can_end:  # an interval start: everything below it is covered once the previous interval is
            best[i] = best[i - 1] if i else 0.0
            continue
        j = i - 1
        while j >= 0 and addr - positions[j][0] <= max_read:
            p_addr, can_start, _, p_run = positions[j]
            if not read_gaps and p_run != run:
                break
            cost = best[j] + overhead + 2 * (addr - p_addr)
            if can_start and cost < best[i]:
                best[i], came_from[i] = cost, j
            j -= 1
        if best[i] == float("inf"):
            raise ValueError(f"no read of at most {max_read} registers can end at {addr} without splitting a value")
    reads = []
    i = n - 1
    while i > 0:
        j = came_from[i]
        if j < 0:
            i -= 1  # a free skip over a gap
            continue
        reads.append((positions[j][0], positions[i][0]))
        i = j
    return reads[::-1]


def plan_meter(meter: MeterConfig, turnaround_chars: float = 0.0) -> list[Block]:
    """The block reads for one poll of ``meter``: everything its image serves."""
    profile = meter.profile
    blocks = []
    for function, intervals in sorted(served_intervals(meter).items()):
        no_cut = {a for m in profile.measurements if m.function == function for a in range(m.address + 1, m.end)}
        for start, end in plan_intervals(
            intervals, max_read=profile.max_read, read_gaps=profile.read_gaps,
            turnaround_chars=turnaround_chars, no_cut=no_cut,
        ):
            blocks.append(Block(function, start, end - start))
    return blocks


def plan_chars(blocks: list[Block], turnaround_chars: float = 0.0) -> float:
    return sum(block_chars(b.count, turnaround_chars) for b in blocks)
