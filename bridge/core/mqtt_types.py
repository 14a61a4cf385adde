"""What the MQTT side's pure cores (Sparkplug B, JSON topics) take in and give out."""
from __future__ import annotations

from dataclasses import dataclass

from bridge.core.model import Measurement


@dataclass(frozen=True)
class Publish:
    """One MQTT message to send."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class MeterSample:
    """One meter as the MQTT side sees it after a poll or a change of health."""

    name: str  # the meter's name: the Sparkplug device id, the JSON topic's last level
    quality: str  # "good" | "stale" | "offline" | "unread"
    ts_ms: int | None  # wall time of the last good poll's reply, ms since the epoch; None: never read
    values: tuple[tuple[Measurement, float | int | None], ...]  # every measurement of its profile


@dataclass(frozen=True)
class LiveProfile:
    """The measurements a virtual meter has live (``VirtualDevice.profile``, like a meter's profile)."""

    measurements: tuple[Measurement, ...]


@dataclass(frozen=True)
class VirtualDevice:
    """A virtual meter (``energy.virtual``) as the flavours take it: a Sparkplug device, a JSON state
    topic and Home Assistant device of its own, with its live measurements (the sums of its terms')."""

    name: str
    profile: LiveProfile
    formula: str = ""
