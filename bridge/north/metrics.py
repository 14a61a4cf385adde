"""Prometheus metrics: one collector that reads the bridge's diagnostics at scrape time.

Nothing is counted here: every figure already lives in the diagnostics records the
segments update (``bridge.diagnostics``), the register image and the upstream servers.
The collector turns them into metric families when scraped, on a private registry
(never the global one), together with the standard process and platform collectors.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from bridge.core.image import Health

if TYPE_CHECKING:
    from bridge.app import App

try:  # the classic text format, which every Prometheus understands
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
except ImportError:  # older prometheus_client
    from prometheus_client.exposition import CONTENT_TYPE_LATEST as CONTENT_TYPE

PREFIX = "modbus_bridge"

# LinkCounters field -> (metric name without prefix/_total, help); common to segments and meters
_LINK_COUNTERS = (
    ("requests", "requests", "Requests sent on the bus"),
    ("good", "good_replies", "Replies that answered their request"),
    ("timeouts", "timeouts", "Requests that got no reply in time"),
    ("crc_errors", "crc_errors", "Replies with a bad CRC"),
    ("retries", "retries", "Requests repeated after a failure"),
    ("late_replies", "late_replies", "Replies that arrived after their request had timed out (dropped)"),
    ("writes", "writes", "Writes forwarded to meters"),
)
# other failed transactions, by kind (label ``kind``)
_ERROR_KINDS = (
    ("truncated", "truncated"),
    ("wrong_slave", "wrong_slave"),
    ("noise", "noise"),
    ("protocol", "protocol_errors"),
    ("exception", "exceptions"),
)
_CLOSED_REASONS = (("bad_frame", "closed_bad_frame"), ("idle", "closed_idle"), ("slow", "closed_slow"))


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)


class BridgeCollector:
    """Builds the bridge's metric families from its live state on every scrape."""

    def __init__(self, app: "App", utilisation: Callable[[str], float]):
        self.app = app
        self.utilisation = utilisation  # segment name -> recent busy fraction (0..1)

    def describe(self) -> list[Metric]:
        return []  # families are dynamic; do not collect at registration

    def collect(self) -> Iterator[Metric]:
        yield from self._segments()
        yield from self._meters()
        yield from self._modbus_tcp()
        yield from self._opcua()

    # ------------------------------------------------------------ bus side
    def _segments(self) -> Iterator[Metric]:
        labels = ["segment"]
        n = f"{PREFIX}_segment"
        counters = {attr: CounterMetricFamily(f"{n}_{name}", f"{doc} (segment)", labels=labels)
                    for attr, name, doc in _LINK_COUNTERS}
        errors = CounterMetricFamily(f"{n}_errors", "Failed transactions that got an answer, by kind (segment)",
                                     labels=labels + ["kind"])
        losses = CounterMetricFamily(f"{n}_port_losses", "Times the serial port was lost", labels=labels)
        busy = CounterMetricFamily(f"{n}_busy_seconds", "Seconds the line carried transactions", labels=labels)
        cycle = GaugeMetricFamily(f"{n}_cycle_time_seconds", "Duration of the last full polling round",
                                  labels=labels)
        util = GaugeMetricFamily(f"{n}_utilisation_ratio", "Fraction of recent wall time the line was busy",
                                 labels=labels)
        port = GaugeMetricFamily(f"{n}_port_open", "1 while the serial port is open", labels=labels)
        tried = GaugeMetricFamily(f"{n}_tried_all", "1 once every meter of the segment was polled once",
                                  labels=labels)
        for seg in self.app.segments:
            d, name = seg.diag, seg.cfg.name
            for attr, fam in counters.items():
                fam.add_metric([name], getattr(d, attr))
            for kind, attr in _ERROR_KINDS:
                errors.add_metric([name, kind], getattr(d, attr))
            losses.add_metric([name], d.port_losses)
            busy.add_metric([name], d.busy_time)
            cycle.add_metric([name], d.cycle_time)
            util.add_metric([name], self.utilisation(name))
            port.add_metric([name], 1.0 if d.port_open else 0.0)
            tried.add_metric([name], 1.0 if seg.tried_all.is_set() else 0.0)
        yield from counters.values()
        yield from (errors, losses, busy, cycle, util, port, tried)

    def _meters(self) -> Iterator[Metric]:
        labels = ["segment", "meter"]
        n = f"{PREFIX}_meter"
        counters = {attr: CounterMetricFamily(f"{n}_{name}", f"{doc} (meter)", labels=labels)
                    for attr, name, doc in _LINK_COUNTERS}
        errors = CounterMetricFamily(f"{n}_errors", "Failed transactions that got an answer, by kind (meter)",
                                     labels=labels + ["kind"])
        demotions = CounterMetricFamily(f"{n}_demotions", "Times the meter was demoted (declared offline)",
                                        labels=labels)
        online = GaugeMetricFamily(f"{n}_online", "1 while the meter's values are fresh", labels=labels)
        demoted = GaugeMetricFamily(f"{n}_demoted", "1 while the meter is demoted (polled rarely)", labels=labels)
        health = GaugeMetricFamily(f"{n}_health", "The meter's health: 1 for its current state",
                                   labels=labels + ["state"])
        age = GaugeMetricFamily(f"{n}_last_good_poll_age_seconds",
                                "Seconds since the last fully good poll (NaN: never read)", labels=labels)
        turnaround = GaugeMetricFamily(f"{n}_turnaround_seconds",
                                       "Measured time from the end of a request to the start of its reply",
                                       labels=labels)
        image = self.app.image
        now = time.monotonic()
        for seg in self.app.segments:
            for unit, state in seg.meters.items():
                key = [seg.cfg.name, state.meter.name]
                d = state.diag
                for attr, fam in counters.items():
                    fam.add_metric(key, getattr(d, attr))
                for kind, attr in _ERROR_KINDS:
                    errors.add_metric(key + [kind], getattr(d, attr))
                demotions.add_metric(key, d.demotions)
                h = image.health(unit)
                online.add_metric(key, 1.0 if h is Health.FRESH else 0.0)
                demoted.add_metric(key, 1.0 if d.demoted else 0.0)
                for state_ in Health:
                    health.add_metric(key + [state_.value], 1.0 if state_ is h else 0.0)
                last = image.unit(unit).last_good
                age.add_metric(key, math.nan if last is None else max(0.0, now - last))
                turnaround.add_metric(key, _num(d.turnaround))
        yield from counters.values()
        yield from (errors, demotions, online, demoted, health, age, turnaround)

    # ------------------------------------------------------------ upstream
    def _modbus_tcp(self) -> Iterator[Metric]:
        server = self.app.modbus
        if server is None:
            return
        n = f"{PREFIX}_modbus_tcp"
        stats = server.stats
        conns = GaugeMetricFamily(f"{n}_connections", "Open Modbus TCP connections")
        conns.add_metric([], len(server.connections))
        accepted = CounterMetricFamily(f"{n}_connections_accepted", "Modbus TCP connections accepted")
        accepted.add_metric([], stats.get("connections", 0))
        requests = CounterMetricFamily(f"{n}_requests", "Modbus TCP requests received, by function code",
                                       labels=["function"])
        for function, count in sorted(server.functions.items()):
            requests.add_metric([str(function)], count)
        exceptions = CounterMetricFamily(f"{n}_exceptions", "Modbus exception replies sent, by exception code",
                                         labels=["code"])
        for code, count in sorted(server.exceptions.items()):
            exceptions.add_metric([str(code)], count)
        refused = CounterMetricFamily(f"{n}_refused_connections", "Modbus TCP connections refused")
        refused.add_metric([], stats.get("refused", 0))
        closed = CounterMetricFamily(f"{n}_closed_connections", "Modbus TCP connections closed by the bridge, "
                                     "by reason", labels=["reason"])
        for reason, key in _CLOSED_REASONS:
            closed.add_metric([reason], stats.get(key, 0))
        yield from (conns, accepted, requests, exceptions, refused, closed)

    def _opcua(self) -> Iterator[Metric]:
        """Sessions and subscriptions, read from asyncua's internal server (plain dicts, no awaiting)."""
        opcua = self.app.opcua
        server = getattr(opcua, "server", None) if opcua is not None else None
        iserver = getattr(server, "iserver", None)
        if iserver is None:
            return
        sessions = getattr(iserver, "_external_sessions", None)
        subs = getattr(getattr(iserver, "subscription_service", None), "subscriptions", None)
        if sessions is not None:
            fam = GaugeMetricFamily(f"{PREFIX}_opcua_sessions", "Open OPC UA sessions")
            fam.add_metric([], len(sessions))
            yield fam
        if subs is not None:
            fam = GaugeMetricFamily(f"{PREFIX}_opcua_subscriptions", "OPC UA subscriptions")
            fam.add_metric([], len(subs))
            yield fam


def make_registry(app: "App", utilisation: Callable[[str], float]) -> CollectorRegistry:
    """A private registry: the bridge's collector plus the process and platform collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BridgeCollector(app, utilisation))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
