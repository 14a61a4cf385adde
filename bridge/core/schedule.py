"""Which meter a segment polls next, and when: earliest deadline first. Pure: times are passed in.

Each meter is due ``poll_interval`` after its previous poll started (start to start); a poll that
overran is not caught up in a burst, the meter is simply due at once. A demoted meter (declared
offline) is polled every ``demote_interval`` at most, so its neighbours keep their rate. A round
is every meter that is not demoted polled once; its duration is the segment's cycle time.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable


class PollSchedule:
    def __init__(self, intervals: Iterable[tuple[Hashable, float]], demote_interval: float,
                 demoted: Callable[[Hashable], bool]):
        self.interval = dict(intervals)  # meter -> its poll interval (s)
        self.demote_interval = demote_interval
        self.demoted = demoted  # whether a meter is demoted now (its segment knows)
        self.due: dict[Hashable, float] = {key: 0.0 for key in self.interval}
        self._round_start = 0.0
        self._polled: set[Hashable] = set()

    def start(self, now: float) -> None:
        """Every meter due now; a new round begins (after opening the port)."""
        for key in self.due:
            self.due[key] = now
        self._round_start, self._polled = now, set()

    def next(self) -> tuple[Hashable, float]:
        """The meter due first, and when it is due (ties: configuration order)."""
        key = min(self.due, key=self.due.__getitem__)
        return key, self.due[key]

    def polled(self, key: Hashable, now: float) -> float | None:
        """``key`` was just polled (at ``now``, after the poll). Returns the cycle time when this
        poll completed a round, else None."""
        interval = self.interval[key]
        if self.demoted(key):
            interval = max(interval, self.demote_interval)
        self.due[key] = max(self.due[key] + interval, now)
        self._polled.add(key)
        if all(k in self._polled or self.demoted(k) for k in self.due):
            cycle = now - self._round_start
            self._round_start, self._polled = now, set()
            return cycle
        return None

    def soon(self, key: Hashable) -> None:
        """Poll ``key`` before anything else (to read back what a write changed)."""
        self.due[key] = 0.0
