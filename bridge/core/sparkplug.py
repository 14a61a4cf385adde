"""Sparkplug B 3.0 edge node session: events in, MQTT messages out. Pure: no I/O, no clock.

One ``EdgeNode`` per configuration, kept across connections (its aliases and the meters' last
states live in it): the bridge is the edge node ``spBv1.0/<group_id>/…/<edge_node_id>``, each meter
a device named by the meter's name, each of its measurements a metric. The adapter
(bridge.north.mqtt) owns the connection and calls, in order:

1. ``will(bd_seq)`` for every MQTT CONNECT (the NDEATH as the Will; a new session starts);
   ``subscriptions()`` right after the CONNACK; ``host_state(topic, payload)`` for every STATE
   message when a primary host is configured.
2. ``online(bd_seq, now_ms, samples, node_metrics)`` once connected (and the primary host is
   online): the NBIRTH and a DBIRTH per meter. With ``replay=True`` the messages kept during an
   outage follow as ``historical(sample, now_ms)``, then ``end_replay(now_ms)``.
3. ``sample(sample, now_ms)`` after every poll or change of a meter's health (DDATA by exception,
   DDEATH, DBIRTH), ``node_data(now_ms, node_metrics)`` for the bridge's own figures (NDATA), and
   ``command(topic, payload, now_ms)`` for every NCMD/DCMD received.
4. ``disconnected()`` when the connection is gone (or is being closed: publish ``will(bd_seq,
   now_ms)`` first, the clean NDEATH).

Sequence numbers (``seq``) run 0..255 over NBIRTH, DBIRTH, NDATA, DDATA and DDEATH, the NBIRTH
being 0. bdSeq is the adapter's: it persists it and increments it (``next_bd_seq``) per CONNECT.

Choices the specification leaves open, made here:

- Measurements are ``Double`` metrics: a scaled value is a real number whatever the register's
  type, and one datatype per metric for good (a metric's type cannot change between births).
- Data messages (NDATA, DDATA) carry the metric's ``datatype`` although the specification says they
  SHOULD NOT (tck-id-payloads-metric-datatype-not-req): Eclipse Tahu's decoders (Java, and the
  JavaScript ``sparkplug-payload``) read a value through its datatype and return null without it,
  and Tahu's own encoders always write it.
- Quality: the ``Quality`` property (Int32) is 500 (STALE) on every metric of a stale meter, and
  192 (GOOD) on the metrics of the message that reports it good again; absent otherwise (GOOD).
- A never-read meter gets a DBIRTH with ``is_null`` metrics; an offline meter none (its DBIRTH
  follows when it answers again). Report by exception: a metric is sent when its value moved by
  more than its deadband (any change without one) or its quality changed.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from bridge.core import sparkplug_b_pb2 as pb
from bridge.core.model import Measurement, SparkplugConfig
from bridge.core.mqtt_types import MeterSample, Publish

NAMESPACE = "spBv1.0"
BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
ENG_UNIT = "engUnit"
QUALITY = "Quality"
QUALITY_BAD, QUALITY_GOOD, QUALITY_STALE = 0, 192, 500

# The datatypes a node metric may have (``pb.Double`` etc.), by the value field that carries them.
# UInt32 is left out: implementations disagree on its field (int_value by the specification's table,
# long_value in Eclipse Tahu's Java and JavaScript libraries); Int64 serves for counters.
_INT32_TYPES = frozenset({pb.Int8, pb.Int16, pb.Int32, pb.UInt8, pb.UInt16})
_INT64_TYPES = frozenset({pb.Int64, pb.UInt64, pb.DateTime})
SUPPORTED_TYPES = _INT32_TYPES | _INT64_TYPES | {pb.Float, pb.Double, pb.Boolean, pb.String, pb.Text}

_RESERVED_CHARS = ("+", "/", "#")

NodeMetrics = Mapping[str, tuple[object, int]]  # name -> (value or None, Sparkplug datatype)


class _Profile(Protocol):
    @property
    def measurements(self) -> Sequence[Measurement]: ...


class MeterLike(Protocol):
    """What the session needs of a meter: ``MeterConfig`` is one."""

    @property
    def name(self) -> str: ...

    @property
    def profile(self) -> _Profile: ...


def next_bd_seq(previous: int | None) -> int:
    """The bdSeq for the next MQTT CONNECT: 0 first, then one more each time, 0 again after 255."""
    return 0 if previous is None else (previous + 1) % 256


def _check_id(kind: str, value: str) -> None:
    if not value or any(c in value for c in _RESERVED_CHARS):
        raise ValueError(f"Sparkplug {kind} {value!r}: must be non-empty and without '+', '/' or '#'")


def _same(old: object, new: object, deadband: float) -> bool:
    """Whether ``new`` is no report-worthy change from ``old`` (None: no value)."""
    if old is None or new is None:
        return old is None and new is None
    if isinstance(old, float) and isinstance(new, float) and (math.isnan(old) or math.isnan(new)):
        return math.isnan(old) and math.isnan(new)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(new, bool):
        return abs(new - old) <= deadband if deadband > 0 else new == old
    return old == new


def _set_value(target: pb.Payload.Metric | pb.Payload.PropertyValue, datatype: int, value: object) -> None:
    """Put ``value`` in the field its datatype prescribes; None is ``is_null`` and no value."""
    if value is None:
        target.is_null = True
    elif datatype in _INT32_TYPES:
        target.int_value = int(value) & 0xFFFFFFFF  # signed types: two's complement, as Tahu's
    elif datatype in _INT64_TYPES:
        target.long_value = int(value) & 0xFFFFFFFFFFFFFFFF
    elif datatype == pb.Float:
        target.float_value = float(value)
    elif datatype == pb.Double:
        target.double_value = float(value)
    elif datatype == pb.Boolean:
        target.boolean_value = bool(value)
    elif datatype in (pb.String, pb.Text):
        target.string_value = str(value)
    else:
        raise ValueError(f"unsupported Sparkplug datatype {datatype}")


def _add_property(metric: pb.Payload.Metric, key: str, datatype: int, value: object) -> None:
    props = metric.properties
    props.keys.append(key)
    prop = props.values.add()
    prop.type = datatype
    _set_value(prop, datatype, value)


ENERGY_PREFIX = "Energy/"  # a meter's last closed energy interval: Energy/<quantity> (kWh), Demand (W), Status
ENERGY_UNITS = {"active": "kWh", "reactive": "kvarh"}


@dataclass(frozen=True)
class IntervalSample:
    """A meter's closed energy interval, as Sparkplug publishes it (timestamped with the interval's end)."""
    end_ms: int
    status: str
    energy: Mapping[str, float]  # quantity -> kWh/kvarh
    demand: float | None  # W


class _Device:
    """One meter as a Sparkplug device: its metrics and what was last reported of them."""

    def __init__(self, meter: MeterLike, energy: Sequence[str] = ()) -> None:
        self.name = meter.name
        self.measurements: tuple[Measurement, ...] = tuple(meter.profile.measurements)
        self.energy = tuple(energy)  # the energy quantities of its intervals (none: no Energy/ metrics)
        self.interval: IntervalSample | None = None  # the last closed interval known
        self.latest = MeterSample(meter.name, "unread", None, tuple((m, None) for m in self.measurements))
        self.alive = False  # DBIRTH published in this session and no DDEATH since
        self.reported: dict[str, tuple[object, int]] = {}  # live RBE: measurement -> (value, quality)
        self.replayed: dict[str, tuple[object, int]] = {}  # historical RBE, apart from the live one

    def values(self, sample: MeterSample) -> dict[str, float | int | None]:
        by_name = {m.name: v for m, v in sample.values}
        return {m.name: by_name.get(m.name) for m in self.measurements}


def _quality(sample: MeterSample) -> int:
    return QUALITY_STALE if sample.quality in ("stale", "offline") else QUALITY_GOOD


class EdgeNode:
    """The Sparkplug B session of the bridge as an edge node. See the module's docstring."""

    def __init__(self, cfg: SparkplugConfig, meters: Sequence[MeterLike],
                 energy: Mapping[str, Sequence[str]] | None = None) -> None:
        """``energy``: meter -> the quantities of its energy intervals (interval energy on), which
        become ``Energy/...`` metrics of its device."""
        _check_id("group_id", cfg.group_id)
        _check_id("edge_node_id", cfg.edge_node_id)
        self.cfg = cfg
        self._devices: dict[str, _Device] = {}
        for meter in meters:
            _check_id("device_id (meter name)", meter.name)
            if meter.name in self._devices:
                raise ValueError(f"Sparkplug device_id {meter.name!r} given twice")
            self._devices[meter.name] = _Device(meter, (energy or {}).get(meter.name, ()))
        self._deadband = dict(cfg.deadband)
        # Aliases: unique over the edge node's node and device metrics, kept for the node's life (so
        # across rebirths); 'Node Control/Rebirth' never gets one. Device metrics first, in order.
        self._aliases: dict[tuple[str, str], int] = {("", BDSEQ): 1}
        for device in self._devices.values():
            for m in device.measurements:
                self._aliases[(device.name, m.name)] = len(self._aliases) + 1
            for name, _, _ in _energy_metrics(device.energy):
                self._aliases[(device.name, name)] = len(self._aliases) + 1
        self._online = False
        self._bd_seq = 0
        self._seq = 0  # the next message's seq
        self._node_current: dict[str, tuple[object, int]] = {}
        self._node_reported: dict[str, tuple[object, int]] = {}
        self._deferred_deaths: set[str] = set()
        self._host_online = False
        self._host_ts: int | float | None = None

    # ----------------------------------------------------------------------------------- topics

    def node_topic(self, kind: str) -> str:
        """``spBv1.0/<group>/<kind>/<edge node>`` for NBIRTH, NDEATH, NDATA, NCMD."""
        return f"{NAMESPACE}/{self.cfg.group_id}/{kind}/{self.cfg.edge_node_id}"

    def device_topic(self, kind: str, device: str) -> str:
        """``spBv1.0/<group>/<kind>/<edge node>/<device>`` for DBIRTH, DDEATH, DDATA, DCMD."""
        return f"{self.node_topic(kind)}/{device}"

    def state_topic(self) -> str:
        """The primary host's STATE topic ("" without a primary host)."""
        host = self.cfg.primary_host
        if not host:
            return ""
        return f"STATE/{host}" if self.cfg.state_v22 else f"{NAMESPACE}/STATE/{host}"

    def subscriptions(self) -> list[tuple[str, int]]:
        """What to subscribe to after each CONNACK, (topic filter, QoS): NCMD, every device's DCMD
        (refused, but logged), the primary host's STATE."""
        subs = [(self.node_topic("NCMD"), 1), (self.device_topic("DCMD", "+"), 1)]
        if self.cfg.primary_host:
            subs.append((self.state_topic(), 1))
        return subs

    # ------------------------------------------------------------------------------ the session

    @property
    def is_online(self) -> bool:
        """Whether the births of this session have been published (data may follow)."""
        return self._online

    @property
    def host_online(self) -> bool:
        """The primary host's last accepted STATE (always True without a primary host)."""
        return self._host_online or not self.cfg.primary_host

    def will(self, bd_seq: int, now_ms: int | None = None) -> Publish:
        """The NDEATH: the Will of the CONNECT with this bdSeq (QoS 1, not retained), and the message
        to publish before an intentional disconnect (then with ``now_ms`` as its timestamp).

        Only the bdSeq metric (Int64), no seq. No timestamp by default: one fixed at CONNECT time
        says nothing when the broker delivers the Will. Calling it starts a new session: nothing is
        published until ``online``, and STATE messages of an earlier server no longer count."""
        _check_bd_seq(bd_seq)
        payload = pb.Payload()
        if now_ms is not None:
            payload.timestamp = now_ms
        metric = payload.metrics.add()
        metric.name = BDSEQ
        metric.datatype = pb.Int64
        metric.long_value = bd_seq
        if now_ms is not None:
            metric.timestamp = now_ms
        self._online = False
        self._host_online = False
        self._host_ts = None
        return Publish(self.node_topic("NDEATH"), payload.SerializeToString(), qos=1, retain=False)

    def disconnected(self) -> None:
        """The MQTT connection is gone: nothing more is published until the next ``online``."""
        self._online = False

    def online(self, bd_seq: int, now_ms: int, samples: Iterable[MeterSample] = (),
               node_metrics: NodeMetrics | None = None, *, replay: bool = False) -> list[Publish]:
        """The birth sequence once connected: NBIRTH (seq 0, ``bd_seq`` as in the Will), then a
        DBIRTH per meter that is not offline. [] while a configured primary host is not online.

        With ``replay``, offline meters that were read before are born too (stale), so that
        ``historical`` can deliver their kept samples; their DDEATH follows in ``end_replay``."""
        _check_bd_seq(bd_seq)
        for s in samples:
            if s.name in self._devices:
                self._devices[s.name].latest = s
        if node_metrics is not None:
            self._node_current = _checked_node_metrics(node_metrics)
        if not self.host_online:
            return []
        self._bd_seq = bd_seq
        self._online = True
        return self._births(now_ms, replay=replay)

    def sample(self, s: MeterSample, now_ms: int) -> list[Publish]:
        """A meter's new state: DDATA with what changed, DDEATH once when it went offline, a DBIRTH
        when it answers again. Kept for later births in any case; [] while not online."""
        device = self._devices.get(s.name)
        if device is None:
            return []
        device.latest = s
        if not self._online:
            return []
        if s.quality == "offline":
            if not device.alive or s.name in self._deferred_deaths:
                return []
            device.alive = False
            return [self._ddeath(device, now_ms)]
        self._deferred_deaths.discard(s.name)
        if not device.alive:
            return [self._dbirth(device, now_ms)]
        metrics = self._changes(device, s, device.reported)
        if not metrics:
            return []
        return [self._ddata(device, s, metrics, now_ms, historical=False)]

    def historical(self, s: MeterSample, now_ms: int) -> list[Publish]:
        """A sample kept while the node was offline, after ``online``: DDATA whose metrics are
        ``is_historical`` with their original timestamps (by exception among the replayed samples of
        the meter, apart from the live state). [] for meters not born in this session and for
        samples without values (offline, never read)."""
        device = self._devices.get(s.name)
        if (device is None or not self._online or not device.alive or s.ts_ms is None
                or s.quality not in ("good", "stale")):
            return []
        metrics = self._changes(device, s, device.replayed)
        if not metrics:
            return []
        return [self._ddata(device, s, metrics, now_ms, historical=True)]

    def end_replay(self, now_ms: int) -> list[Publish]:
        """After the replay: the DDEATH of every meter born only to receive its history that is
        still offline."""
        out = []
        for name in sorted(self._deferred_deaths, key=list(self._devices).index):
            device = self._devices[name]
            if self._online and device.alive and device.latest.quality == "offline":
                device.alive = False
                out.append(self._ddeath(device, now_ms))
        self._deferred_deaths.clear()
        return out

    def interval(self, device_name: str, sample: IntervalSample, now_ms: int, *, historical: bool = False) -> list[Publish]:
        """A meter's closed energy interval: DDATA with its ``Energy/...`` metrics, each timestamped with
        the interval's end (``is_historical`` for one that is not the newest). Kept for the next DBIRTH
        in any case; [] while not online, for a device not born, or a meter without intervals."""
        device = self._devices.get(device_name)
        if device is None or not device.energy:
            return []
        if device.interval is None or sample.end_ms >= device.interval.end_ms:
            device.interval = sample
        if not self._online or not device.alive:
            return []
        payload = self._payload(now_ms)
        for name, datatype, _ in _energy_metrics(device.energy):
            metric = payload.metrics.add()
            self._identify(metric, device.name, name, birth=False)
            metric.datatype = datatype
            metric.timestamp = sample.end_ms
            if historical:
                metric.is_historical = True
            _set_value(metric, datatype, _interval_value(sample, name))
        return [self._publish(self.device_topic("DDATA", device.name), payload)]

    def node_data(self, now_ms: int, node_metrics: NodeMetrics) -> list[Publish]:
        """The bridge's own figures (all of them, name -> (value, datatype)): NDATA with those that
        changed; a new birth sequence if the set of names or a datatype differs from the NBIRTH's
        (an NBIRTH lists every metric the node will report)."""
        self._node_current = _checked_node_metrics(node_metrics)
        if not self._online:
            return []
        birthed = self._node_reported
        if any(name not in birthed or birthed[name][1] != dt for name, (_, dt) in self._node_current.items()):
            return self._births(now_ms, replay=False)
        changed = [(name, value, datatype) for name, (value, datatype) in self._node_current.items()
                   if not _same(birthed[name][0], value, 0.0)]
        if not changed:
            return []
        payload = self._payload(now_ms)
        for name, value, datatype in changed:
            metric = payload.metrics.add()
            self._identify(metric, "", name, birth=False)
            metric.datatype = datatype
            metric.timestamp = now_ms
            _set_value(metric, datatype, value)
            birthed[name] = (value, datatype)
        return [self._publish(self.node_topic("NDATA"), payload)]

    def command(self, topic: str, payload: bytes, now_ms: int) -> tuple[list[Publish], str]:
        """An NCMD or DCMD received: what to publish and one line for the log. Only
        ``Node Control/Rebirth`` = true is obeyed (NBIRTH, same bdSeq, and every DBIRTH); every
        write is refused: the meters' data are read-only from MQTT. Never raises."""
        dcmd_prefix = self.node_topic("DCMD") + "/"
        if topic.startswith(dcmd_prefix):
            device = topic[len(dcmd_prefix):]
            names = _metric_names(payload)
            what = f" ({', '.join(names)})" if names else " (malformed payload)" if names is None else ""
            return [], f"DCMD refused: meter data are read-only from MQTT: device {device!r}{what}"
        if topic != self.node_topic("NCMD"):
            return [], f"ignored: {topic!r} is no command for this edge node"
        try:
            request = pb.Payload.FromString(payload)
        except Exception as exc:  # untrusted bytes: any decoding failure is a refusal, never a crash
            return [], f"NCMD ignored: malformed payload ({type(exc).__name__})"
        rebirth = False
        refused = []
        for metric in request.metrics:
            if metric.HasField("name") and metric.name == REBIRTH:
                if metric.WhichOneof("value") == "boolean_value" and metric.boolean_value:
                    rebirth = True
            else:
                refused.append(metric.name or f"alias {metric.alias}")
        note = f"; refused (read-only): {', '.join(refused)}" if refused else ""
        if not rebirth:
            return [], f"NCMD ignored: no {REBIRTH} = true{note}"
        if not self._online:
            return [], f"NCMD {REBIRTH} while offline: the births follow the next connection{note}"
        out = self._births(now_ms, replay=False)
        return out, f"NCMD {REBIRTH}: NBIRTH and {len(out) - 1} DBIRTH republished{note}"

    def host_state(self, topic: str, payload: bytes) -> bool | None:
        """The configured primary host's STATE: True (online), False (offline), or None when the
        message is not about it, is malformed, or is older than the last one accepted (3.0: the
        ``timestamp`` must not go back; the host's Will carries its birth's timestamp, so an equal
        one counts). With ``state_v22``, the 2.2 form: ``STATE/<host>``, text ONLINE/OFFLINE.
        Offline ends the session (nothing more is published): the edge node must publish its NDEATH
        (``will(bd_seq, now_ms)``), disconnect and connect again, to the next server if there is one."""
        if not self.cfg.primary_host or topic != self.state_topic():
            return None
        if self.cfg.state_v22:
            text = payload.decode("utf-8", "replace").strip()
            online = {"ONLINE": True, "OFFLINE": False}.get(text)
        else:
            try:
                doc = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                return None
            if not isinstance(doc, dict):
                return None
            online, ts = doc.get("online"), doc.get("timestamp")
            if not isinstance(online, bool) or isinstance(ts, bool) or not isinstance(ts, (int, float)):
                return None
            if self._host_ts is not None and ts < self._host_ts:
                return None
            self._host_ts = ts
        if online is not None:
            self._host_online = online
        if online is False:
            self._online = False  # the adapter now publishes the NDEATH and leaves this server
        return online

    # ---------------------------------------------------------------------------------- building

    def _births(self, now_ms: int, *, replay: bool) -> list[Publish]:
        self._seq = 0
        payload = self._payload(now_ms)
        self._add_birth_metric(payload, "", BDSEQ, pb.Int64, self._bd_seq, now_ms)
        rebirth = payload.metrics.add()  # never an alias (tck-id-...-rebirth-name-aliases)
        rebirth.name = REBIRTH
        rebirth.datatype = pb.Boolean
        rebirth.timestamp = now_ms
        rebirth.boolean_value = False
        for name, (value, datatype) in self._node_current.items():
            self._add_birth_metric(payload, "", name, datatype, value, now_ms)
        self._node_reported = dict(self._node_current)
        out = [self._publish(self.node_topic("NBIRTH"), payload)]
        self._deferred_deaths.clear()
        for device in self._devices.values():
            device.alive = False
            device.replayed = {}
            latest = device.latest
            if latest.quality == "offline":
                if not (replay and latest.ts_ms is not None):
                    continue
                self._deferred_deaths.add(device.name)
            out.append(self._dbirth(device, now_ms))
        return out

    def _add_birth_metric(self, payload: pb.Payload, device: str, name: str, datatype: int,
                          value: object, ts: int) -> pb.Payload.Metric:
        metric = payload.metrics.add()
        self._identify(metric, device, name, birth=True)
        metric.datatype = datatype
        metric.timestamp = ts
        _set_value(metric, datatype, value)
        return metric

    def _dbirth(self, device: _Device, now_ms: int) -> Publish:
        s = device.latest
        quality = _quality(s)
        values = device.values(s)
        payload = self._payload(now_ms)
        for m in device.measurements:
            ts = s.ts_ms if s.ts_ms is not None else now_ms
            metric = self._add_birth_metric(payload, device.name, m.name, pb.Double, values[m.name], ts)
            if m.unit:
                _add_property(metric, ENG_UNIT, pb.String, m.unit)
            if quality != QUALITY_GOOD:
                _add_property(metric, QUALITY, pb.Int32, quality)
        last = device.interval
        for name, datatype, unit in _energy_metrics(device.energy):
            value = None if last is None else _interval_value(last, name)
            metric = self._add_birth_metric(payload, device.name, name, datatype, value,
                                            now_ms if last is None else last.end_ms)
            if unit:
                _add_property(metric, ENG_UNIT, pb.String, unit)
        device.reported = {name: (value, quality) for name, value in values.items()}
        device.alive = True
        return self._publish(self.device_topic("DBIRTH", device.name), payload)

    def _changes(self, device: _Device, s: MeterSample,
                 baseline: dict[str, tuple[object, int]]) -> list[tuple[Measurement, object, int, bool]]:
        """(measurement, value, quality, quality changed) of every metric to report; ``baseline``
        updated to them."""
        quality = _quality(s)
        values = device.values(s)
        changes = []
        for m in device.measurements:
            value = values[m.name]
            old = baseline.get(m.name)
            quality_changed = old is None or old[1] != quality
            deadband = self._deadband.get(m.name, 0.0)
            if old is not None and not quality_changed and _same(old[0], value, deadband):
                continue
            changes.append((m, value, quality, quality_changed))
            baseline[m.name] = (value, quality)
        return changes

    def _ddata(self, device: _Device, s: MeterSample, changes, now_ms: int, *, historical: bool) -> Publish:
        payload = self._payload(now_ms)
        ts = s.ts_ms if s.ts_ms is not None else now_ms
        for m, value, quality, quality_changed in changes:
            metric = payload.metrics.add()
            self._identify(metric, device.name, m.name, birth=False)
            metric.datatype = pb.Double
            metric.timestamp = ts
            if historical:
                metric.is_historical = True
            _set_value(metric, pb.Double, value)
            if quality != QUALITY_GOOD or quality_changed:
                _add_property(metric, QUALITY, pb.Int32, quality)
        return self._publish(self.device_topic("DDATA", device.name), payload)

    def _ddeath(self, device: _Device, now_ms: int) -> Publish:
        return self._publish(self.device_topic("DDEATH", device.name), self._payload(now_ms))

    def _identify(self, metric: pb.Payload.Metric, device: str, name: str, *, birth: bool) -> None:
        """Name and alias: both in births, the alias alone in data when aliases are on."""
        if self.cfg.aliases:
            key = (device, name)
            alias = self._aliases.get(key)
            if alias is None:
                alias = self._aliases[key] = len(self._aliases) + 1
            metric.alias = alias
            if birth:
                metric.name = name
        else:
            metric.name = name

    def _payload(self, now_ms: int) -> pb.Payload:
        payload = pb.Payload()
        payload.timestamp = now_ms
        payload.seq = self._seq
        self._seq = (self._seq + 1) % 256
        return payload

    @staticmethod
    def _publish(topic: str, payload: pb.Payload) -> Publish:
        # QoS 0, not retained: the specification's rule for NBIRTH, DBIRTH, NDATA, DDATA, DDEATH.
        return Publish(topic, payload.SerializeToString(), qos=0, retain=False)


def _energy_metrics(quantities: Sequence[str]) -> list[tuple[str, int, str]]:
    """(name, datatype, unit) of a device's energy interval metrics."""
    if not quantities:
        return []
    out = [(ENERGY_PREFIX + q, pb.Double, ENERGY_UNITS["reactive" if "reactive" in q else "active"])
           for q in quantities]
    return out + [(ENERGY_PREFIX + "Demand", pb.Double, "W"), (ENERGY_PREFIX + "Status", pb.String, "")]


def _interval_value(sample: IntervalSample, name: str) -> object:
    key = name[len(ENERGY_PREFIX):]
    if key == "Demand":
        return sample.demand
    if key == "Status":
        return sample.status
    return sample.energy.get(key)


def _check_bd_seq(bd_seq: int) -> None:
    if not 0 <= bd_seq <= 255:
        raise ValueError(f"bdSeq {bd_seq} out of 0..255")


def _checked_node_metrics(node_metrics: NodeMetrics) -> dict[str, tuple[object, int]]:
    checked = {}
    for name, (value, datatype) in node_metrics.items():
        if name in (BDSEQ, REBIRTH):
            raise ValueError(f"node metric {name!r}: a name the session publishes itself")
        if datatype not in SUPPORTED_TYPES:
            raise ValueError(f"node metric {name!r}: unsupported Sparkplug datatype {datatype}")
        checked[name] = (value, datatype)
    return checked


def _metric_names(payload: bytes) -> list[str] | None:
    """The metric names (or aliases) of a command's payload; None if it does not decode."""
    try:
        request = pb.Payload.FromString(payload)
    except Exception:  # untrusted bytes
        return None
    return [m.name or f"alias {m.alias}" for m in request.metrics]
