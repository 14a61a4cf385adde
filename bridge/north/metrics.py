"""Prometheus metrics: one collector that reads the bridge's diagnostics at scrape time.

Nothing is counted here: every figure is read from the read model (``bridge.view``): the
diagnostics records the segments update, the register image, and the north sides' status.
The collector turns them into metric families when scraped, on a private registry
(never the global one), together with the standard process and platform collectors.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from bridge.core.image import Health
from bridge.view import BridgeView

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
    ("stray_bytes", "stray_bytes", "Bytes skipped before a good reply (noise or another device's traffic)"),
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

    def __init__(self, view: BridgeView):
        self.view = view

    def describe(self) -> list[Metric]:
        return []  # families are dynamic; do not collect at registration

    def collect(self) -> Iterator[Metric]:
        yield from self._segments()
        yield from self._meters()
        yield from self._modbus_tcp()
        yield from self._opcua()
        yield from self._mqtt()
        yield from self._energy()
        yield from self._parts()

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
        now = time.monotonic()
        for seg in self.view.segments():
            d, name = seg.diag, seg.name
            for attr, fam in counters.items():
                fam.add_metric([name], getattr(d, attr))
            for kind, attr in _ERROR_KINDS:
                errors.add_metric([name, kind], getattr(d, attr))
            losses.add_metric([name], d.port_losses)
            busy.add_metric([name], d.busy_time)
            cycle.add_metric([name], d.cycle_time)
            util.add_metric([name], seg.utilisation(now))
            port.add_metric([name], 1.0 if d.port_open else 0.0)
            tried.add_metric([name], 1.0 if seg.ready else 0.0)
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
        now = time.monotonic()
        for seg in self.view.segments():
            for mv in seg.meters:
                key = [seg.name, mv.name]
                d = mv.diag
                for attr, fam in counters.items():
                    fam.add_metric(key, getattr(d, attr))
                for kind, attr in _ERROR_KINDS:
                    errors.add_metric(key + [kind], getattr(d, attr))
                demotions.add_metric(key, d.demotions)
                h = mv.health
                online.add_metric(key, 1.0 if h is Health.FRESH else 0.0)
                demoted.add_metric(key, 1.0 if d.demoted else 0.0)
                for state_ in Health:
                    health.add_metric(key + [state_.value], 1.0 if state_ is h else 0.0)
                last = mv.last_good
                age.add_metric(key, math.nan if last is None else max(0.0, now - last))
                turnaround.add_metric(key, _num(d.turnaround))
        yield from counters.values()
        yield from (errors, demotions, online, demoted, health, age, turnaround)

    # ------------------------------------------------------------ upstream
    def _modbus_tcp(self) -> Iterator[Metric]:
        st = self.view.north().get("modbus_tcp")
        if st is None:
            return
        n = f"{PREFIX}_modbus_tcp"
        stats = st.counters
        conns = GaugeMetricFamily(f"{n}_connections", "Open Modbus TCP connections")
        conns.add_metric([], stats.get("connections", 0))
        accepted = CounterMetricFamily(f"{n}_connections_accepted", "Modbus TCP connections accepted")
        accepted.add_metric([], stats.get("connections_accepted", 0))
        requests = CounterMetricFamily(f"{n}_requests", "Modbus TCP requests received, by function code",
                                       labels=["function"])
        for function, count in sorted(st.by_label.get("function", {}).items()):
            requests.add_metric([str(function)], count)
        exceptions = CounterMetricFamily(f"{n}_exceptions", "Modbus exception replies sent, by exception code",
                                         labels=["code"])
        for code, count in sorted(st.by_label.get("exception", {}).items()):
            exceptions.add_metric([str(code)], count)
        refused = CounterMetricFamily(f"{n}_refused_connections", "Modbus TCP connections refused")
        refused.add_metric([], stats.get("refused", 0))
        closed = CounterMetricFamily(f"{n}_closed_connections", "Modbus TCP connections closed by the bridge, "
                                     "by reason", labels=["reason"])
        for reason, key in _CLOSED_REASONS:
            closed.add_metric([reason], stats.get(key, 0))
        yield from (conns, accepted, requests, exceptions, refused, closed)

    def _opcua(self) -> Iterator[Metric]:
        st = self.view.north().get("opcua")
        if st is None:
            return
        for key, name, doc in (("sessions", "sessions", "Open OPC UA sessions"),
                               ("subscriptions", "subscriptions", "OPC UA subscriptions")):
            if key in st.counters:
                fam = GaugeMetricFamily(f"{PREFIX}_opcua_{name}", doc)
                fam.add_metric([], st.counters[key])
                yield fam

    def _mqtt(self) -> Iterator[Metric]:
        st = self.view.north().get("mqtt")
        if st is None:
            return
        n = f"{PREFIX}_mqtt"
        c = st.counters
        connected = GaugeMetricFamily(f"{n}_connected", "1 while the MQTT connection of a flavour is up",
                                      labels=["link"])
        for link, up in st.by_label.get("link", {}).items():
            connected.add_metric([link], up)
        yield connected
        for key, name, doc, kind in (
            ("sent", "messages_sent", "MQTT messages sent (QoS 1: acknowledged)", CounterMetricFamily),
            ("replayed", "messages_replayed", "Messages sent from the store-and-forward queue", CounterMetricFamily),
            ("connects", "connects", "Connections made to a broker", CounterMetricFamily),
            ("queue_queued", "queue_messages", "Messages waiting in the store-and-forward queue", GaugeMetricFamily),
            ("queue_queued_bytes", "queue_bytes", "Bytes waiting in the store-and-forward queue", GaugeMetricFamily),
            ("queue_oldest_age", "queue_oldest_age_seconds", "Age of the oldest queued message", GaugeMetricFamily),
            ("queue_dropped", "queue_dropped", "Queued messages dropped by the size or age bound",
             CounterMetricFamily),
            ("queue_dropped_disk_full", "queue_dropped_disk_full",
             "Messages that could not be queued (disk full or failing)", CounterMetricFamily),
        ):
            if key in c:
                fam = kind(f"{n}_{name}", doc)
                fam.add_metric([], c[key])
                yield fam

    def _energy(self) -> Iterator[Metric]:
        """Interval energy: the recorder's own counters (its north status) and, per meter, the last closed
        interval and the balance alarms (the read model ``view.energy``). Nothing while energy is off."""
        energy = self.view.energy
        st = self.view.north().get("energy")
        if energy is None and st is None:
            return
        n = f"{PREFIX}_energy"
        if st is not None:
            c = st.counters
            closed = CounterMetricFamily(f"{n}_intervals_closed",
                                         "Intervals of (real) meters closed by the energy recorder")
            closed.add_metric([], c.get("intervals_closed", 0))
            errors = CounterMetricFamily(f"{n}_store_write_errors",
                                         "Failed writes to the energy store (intervals kept in memory, retried)")
            errors.add_metric([], c.get("write_errors", 0))
            yield from (closed, errors)
        if energy is None:
            return
        labels = ["meter"]
        kwh = GaugeMetricFamily(f"{n}_last_interval_kwh",
                                "Active energy imported in the meter's last closed interval (kWh)", labels=labels)
        demand = GaugeMetricFamily(f"{n}_last_interval_demand_watts",
                                   "Block demand of the meter's last closed interval: average active power drawn (W)",
                                   labels=labels)
        end = GaugeMetricFamily(f"{n}_last_interval_end_timestamp_seconds",
                                "End of the meter's last closed interval (UTC epoch seconds)", labels=labels)
        for name in energy.meter_names():
            last = energy.last(name)
            if last is None:
                continue  # no interval closed yet: no sample rather than a made-up zero
            end.add_metric([name], last.end)
            value = last.energy.get("import_active_energy")
            if value is not None:
                kwh.add_metric([name], value)
            if last.demand is not None:
                demand.add_metric([name], last.demand)
        alarm = GaugeMetricFamily(f"{n}_balance_alarm",
                                  "1 while a virtual meter's energy balance is beyond its alarm threshold",
                                  labels=labels)
        for name, state_ in sorted(energy.alarm_state().items()):
            alarm.add_metric([name], 1.0 if state_.get("active") else 0.0)
        power = GaugeMetricFamily(f"{PREFIX}_virtual_active_power_watts",
                                  "A virtual meter's active power now: the sum of its terms' (absent until each "
                                  "term has been read)", labels=labels)
        good = GaugeMetricFamily(f"{PREFIX}_virtual_good",
                                 "1 while every term of the virtual meter is fresh", labels=labels)
        for v in self.view.virtual_meters():
            good.add_metric([v.name], 1.0 if v.quality == "good" else 0.0)
            if "active_power" in v.measurements and (w := v.value("active_power")) is not None:
                power.add_metric([v.name], w)
        yield from (kwh, demand, end, alarm, power, good)

    def _parts(self) -> Iterator[Metric]:
        listening = GaugeMetricFamily(f"{PREFIX}_listening", "1 while the north side listens", labels=["side"])
        for name, st in self.view.north().items():
            listening.add_metric([name], 1.0 if st.listening else 0.0)
        failures = GaugeMetricFamily(f"{PREFIX}_part_recent_failures",
                                     "Unexpected failures of a supervised part among its last restarts",
                                     labels=["part"])
        for part in self.view.parts.values():
            failures.add_metric([part.name], len(part.failures))
        healthy = GaugeMetricFamily(f"{PREFIX}_healthy", "1 while no part is stopped or failing in a loop")
        healthy.add_metric([], 0.0 if self.view.problems() else 1.0)
        listener_errors = CounterMetricFamily(f"{PREFIX}_image_listener_errors",
                                              "Image change notifications a listener failed on (skipped)")
        listener_errors.add_metric([], self.view.image.listener_errors)
        ready = GaugeMetricFamily(f"{PREFIX}_ready", "1 while the bridge is ready (as /readyz)")
        ready.add_metric([], 0.0 if self.view.not_ready() else 1.0)
        yield from (listening, failures, healthy, ready, listener_errors)


def make_registry(view: BridgeView) -> CollectorRegistry:
    """A private registry: the bridge's collector plus the process and platform collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BridgeCollector(view))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
