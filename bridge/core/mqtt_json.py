"""The MQTT side's JSON topics and Home Assistant discovery. Pure: events in, ``Publish`` out.

No I/O and no clock: the caller passes ``now`` (seconds, any monotonic clock) and sends what it gets
back, in order. Topics, for ``json.topic: modbus-bridge/panel-7``:

- ``modbus-bridge/panel-7/status``: ``online`` / ``offline``, retained, QoS 1. ``offline`` is the
  connection's Will (``will()``) and is also what to publish on a clean shutdown.
- ``modbus-bridge/panel-7/<meter>``: the meter's state, retained, QoS 1, compact JSON::

      {"ts":1718000000123,"status":"good","values":{"voltage":230.1,"current":1.25,...}}

  ``ts`` is the poll reply's wall time (ms since the epoch, UTC) of the values shown; ``status`` is
  ``good``, ``stale`` or ``offline``; ``values`` holds every measurement of the meter's profile, in
  profile order, each a JSON number or ``null`` (not read, NaN or infinite). A stale or offline
  message carries the last values read and their ``ts``: the status says they are not current.

  A meter never read yet ("unread") is published as ``{"ts":null,"status":"offline","values":{...
  every value null}}``. Publishing it (rather than nothing until the first good poll) overwrites the
  retained message a previous run left, so neither Home Assistant nor a Node-RED flow shows last
  week's numbers as current while the bridge starts or while a meter that was unplugged is still
  being probed; and consumers only need the three statuses of the contract: anything not ``good``
  is "do not trust the values", and ``ts: null`` means "there never were any".

  A state is published when its status or a value changed since the last one published for that
  meter, and at least every ``json.max_age`` seconds even if unchanged (``sample`` for each poll,
  ``due`` from a periodic timer); a republish carries the newest ``ts``. A new ``ts`` alone is no
  change: with unchanged values ``ts`` may lag the newest poll by up to ``max_age``.

Numbers are written with as few digits as identify the value the meter sent: a float32 register as
the shortest decimal that reads back as the same float32 (``230.1``, not ``230.10000610351562``), an
integer register times a decimal scale rounded to the scale's decimals (``2301.2``, not
``2301.2000000000003``); everything else as Python's shortest round-trip repr.

Home Assistant (``json.homeassistant``): one HA device per meter (via the bridge's own device, which
has a connectivity ``binary_sensor`` on the status topic), one ``sensor`` per measurement reading the
meter topic. Each sensor is available only while the bridge is ``online`` *and* the meter's status is
``good`` (``availability_mode: all``); otherwise HA shows it unavailable. A ``null`` value renders as
``None``, which HA's MQTT sensor takes as "unknown". Discovery configs are retained; republish them
(``discovery()``) when HA announces itself (``homeassistant_status``).
"""
from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache

from bridge.core.codec import DataType
from bridge.core.model import Measurement, MeterConfig, MqttJsonConfig
from bridge.core.mqtt_types import MeterSample, Publish, VirtualDevice

ORIGIN = "modbus-bridge"  # HA discovery "origin" and the prefix of every HA id we make
QUALITY_STATUS = {"good": "good", "stale": "stale", "offline": "offline", "unread": "offline"}
ONLINE, OFFLINE = b"online", b"offline"
HA_ID = re.compile(r"[A-Za-z0-9_-]+")  # what HA accepts as a discovery topic's node_id and object_id

# The Jinja templates HA renders on every message of the meter topic. ``value_json['values']`` and not
# ``value_json.values``: in Jinja the dot prefers the attribute, and a dict's ``values`` attribute is
# its method, so ``value_json.values.voltage`` renders empty and the sensor would never get a value.
VALUE_TEMPLATE = "{{{{ value_json['values']['{name}'] }}}}"  # measurement names are snake_case
AVAILABILITY_TEMPLATE = "{{ 'online' if value_json is defined and value_json.status == 'good' else 'offline' }}"


def check_topic(topic: str) -> None:
    """Raise ValueError unless ``topic`` is a valid MQTT topic name to publish to: not empty, no
    wildcard (``+``, ``#``), no empty level (no leading, trailing or double ``/``), no NUL, not a
    broker's ``$`` topic, at most 65535 bytes of UTF-8."""
    if not topic:
        raise ValueError("an MQTT topic must not be empty")
    if "+" in topic or "#" in topic:
        raise ValueError(f"MQTT topic {topic!r}: no wildcards ('+', '#') in a topic to publish to")
    if "\x00" in topic:
        raise ValueError(f"MQTT topic {topic!r}: contains NUL")
    if topic.startswith("$"):
        raise ValueError(f"MQTT topic {topic!r}: topics starting with '$' belong to the broker")
    if any(level == "" for level in topic.split("/")):
        raise ValueError(f"MQTT topic {topic!r}: empty level (leading, trailing or double '/')")
    if len(topic.encode("utf-8")) > 65535:
        raise ValueError("MQTT topic longer than 65535 bytes")


def ha_id(text: str) -> str:
    """``text`` with every character HA does not accept in a discovery node_id/object_id made ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


# --- numbers -------------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def _decimals(scale: float) -> int:
    """The decimals of a scale factor as written: 0.01 -> 2, 0.5 -> 1, 1e-05 -> 5, 1000 -> 0."""
    return max(0, -int(Decimal(repr(scale)).as_tuple().exponent))


def _float32_text(value: float) -> str:
    """The shortest decimal that is the same float32 as ``value``."""
    try:
        target = struct.pack(">f", value)
    except OverflowError:  # beyond float32 (a large scale): not a float32 any more
        return repr(value)
    for digits in (6, 7, 8, 9):  # %g drops trailing zeros, so 6 also covers every shorter form
        text = f"{value:.{digits}g}"
        if struct.pack(">f", float(text)) == target:
            return repr(float(text))
    return repr(value)  # unreachable: 9 significant digits always identify a float32


def number_json(m: Measurement, value: float | int | None) -> str:
    """One value as JSON text: a number, or ``null`` for None, NaN and infinities."""
    if value is None:
        return "null"
    if isinstance(value, int):  # bool included: 1 / 0
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return "null"
    if m.dtype is DataType.FLOAT32:
        return _float32_text(value)
    if not m.dtype.is_float and m.scale != 1.0:
        return repr(round(value, _decimals(m.scale)))
    return repr(value)


# --- Home Assistant sensor classes ---------------------------------------------------------------

@dataclass(frozen=True)
class SensorClass:
    """How HA should treat a measurement: None leaves the key out of the discovery config."""

    device_class: str | None
    unit: str | None  # HA's unit_of_measurement
    state_class: str


# profile unit -> HA class; each unit one HA accepts for that device class (HA's DEVICE_CLASS_UNITS).
# kW/kvar/kVA are left without a device class where older HA releases reject the unit for it.
_BY_UNIT: dict[str, SensorClass] = {
    "V": SensorClass("voltage", "V", "measurement"),
    "mV": SensorClass("voltage", "mV", "measurement"),
    "A": SensorClass("current", "A", "measurement"),
    "mA": SensorClass("current", "mA", "measurement"),
    "W": SensorClass("power", "W", "measurement"),
    "kW": SensorClass("power", "kW", "measurement"),
    "var": SensorClass("reactive_power", "var", "measurement"),
    "VA": SensorClass("apparent_power", "VA", "measurement"),
    "Hz": SensorClass("frequency", "Hz", "measurement"),
    "Wh": SensorClass("energy", "Wh", "total_increasing"),
    "kWh": SensorClass("energy", "kWh", "total_increasing"),
    "MWh": SensorClass("energy", "MWh", "total_increasing"),
    "varh": SensorClass("reactive_energy", "varh", "total_increasing"),
    "kvarh": SensorClass("reactive_energy", "kvarh", "total_increasing"),
    "deg": SensorClass(None, "°", "measurement"),  # phase angle: HA has no angle device class
    "°": SensorClass(None, "°", "measurement"),
    "VAh": SensorClass(None, "VAh", "total_increasing"),  # apparent energy: no HA device class
    "kVAh": SensorClass(None, "kVAh", "total_increasing"),
}


def sensor_class(m: Measurement) -> SensorClass:
    """The HA device_class, unit and state_class for a measurement, by its unit and, where the unit
    does not tell (a power factor has none), by its name. Energy counters are ``total_increasing``."""
    power_factor = m.name.startswith("power_factor")
    if m.unit == "" and power_factor:
        return SensorClass("power_factor", None, "measurement")
    if m.unit == "%" and power_factor:
        return SensorClass("power_factor", "%", "measurement")
    known = _BY_UNIT.get(m.unit)
    if known is not None:
        return known
    return SensorClass(None, m.unit or None, "measurement")


def friendly_name(measurement: str) -> str:
    """``voltage_l1_l2`` -> ``Voltage L1-L2``, ``import_active_energy`` -> ``Import active energy``."""
    words: list[str] = []
    for word in measurement.split("_"):
        if re.fullmatch(r"l\d", word):
            word = word.upper()
            if words and re.fullmatch(r"L\d(-L\d)*", words[-1]):
                words[-1] += "-" + word
                continue
        words.append(word)
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def manufacturer(profile_name: str, description: str) -> str | None:
    """The maker, read from a profile: the leading words of its description that spell the profile
    name's parts before the model (``carlo-gavazzi-em24`` + "Carlo Gavazzi EM24 ..." -> "Carlo Gavazzi");
    None when they do not match (a profile file of one's own named otherwise)."""
    parts = profile_name.lower().split("-")[:-1]
    words = description.split()
    taken: list[str] = []
    for part, word in zip(parts, words):
        if word.lower() != part:
            break
        taken.append(word)
    return " ".join(taken) or None


# --- the topics ----------------------------------------------------------------------------------

@dataclass
class _MeterState:
    payload: bytes  # the newest state message (published or not)
    key: tuple[str, str]  # (status, values JSON) of the last one published: what "changed" compares
    published_at: float  # ``now`` of the last publish


class JsonTopics:
    """The JSON topics of one bridge: its status, each meter's state and (optionally) HA discovery.

    ``bridge_id`` names this bridge to Home Assistant (e.g. the MQTT client id): it is part of every HA
    unique_id and device identifier and the discovery topics' node_id, so changing it makes HA see new
    devices. Characters HA does not accept in ids are replaced by ``_``.
    ``sw_version``: the bridge's version, shown on its HA device (optional).
    """

    def __init__(self, cfg: MqttJsonConfig, meters: Sequence[MeterConfig], bridge_id: str, *,
                 sw_version: str = "", virtual: Sequence[VirtualDevice] = ()):
        self.cfg = cfg
        # virtual meters (energy.virtual): a state topic each, and an HA device with their live power
        self.virtual: dict[str, VirtualDevice] = {v.name: v for v in virtual}
        self.meters: dict[str, MeterConfig] = {}
        for meter in meters:
            if meter.name in self.meters:
                raise ValueError(f"meter name {meter.name!r} is used twice")
            self.meters[meter.name] = meter
        check_topic(cfg.topic)
        self.availability_topic = f"{cfg.topic}/status"
        for name in (*self.meters, *self.virtual):
            if f"{cfg.topic}/{name}" == self.availability_topic:
                raise ValueError(f"a meter named {name!r} would publish on the bridge's status topic "
                                 f"{self.availability_topic!r}")
            check_topic(self.state_topic(name))
        if not bridge_id:
            raise ValueError("bridge_id must not be empty")
        self.node_id = ha_id(bridge_id)
        self.bridge_name = bridge_id
        self.sw_version = sw_version
        if cfg.homeassistant:
            check_topic(cfg.discovery_prefix)
            for name in (*self.meters, *self.virtual):
                if not HA_ID.fullmatch(name):
                    raise ValueError(f"meter name {name!r}: Home Assistant ids take letters, digits, '-' and '_'")
        self._state: dict[str, _MeterState] = {}

    # -- topics

    def state_topic(self, meter: str) -> str:
        return f"{self.cfg.topic}/{meter}"

    @property
    def ha_status_topic(self) -> str:
        """Where HA publishes its birth (``online``) and will (``offline``)."""
        return f"{self.cfg.discovery_prefix}/status"

    def subscriptions(self) -> list[str]:
        """The topics to subscribe to: HA's status when discovery is on (to republish on its birth)."""
        return [self.ha_status_topic] if self.cfg.homeassistant else []

    # -- the bridge's status

    def will(self) -> Publish:
        """The connection's Will: ``offline`` on the status topic; publish it on a clean shutdown too."""
        return Publish(self.availability_topic, OFFLINE, qos=1, retain=True)

    def online(self) -> list[Publish]:
        """Right after each connect: ``online`` on the status topic, then every discovery config."""
        return [Publish(self.availability_topic, ONLINE, qos=1, retain=True), *self.discovery()]

    def homeassistant_status(self, payload: bytes) -> bool:
        """Whether a message on ``ha_status_topic`` is HA's birth, after which ``discovery()`` must be
        published again (HA may have lost its entities, e.g. a broker without persistence)."""
        return self.cfg.homeassistant and payload.strip() == ONLINE

    # -- meter states

    def sample(self, s: MeterSample, now: float) -> list[Publish]:
        """The state message for one meter's poll or change of health, if it is to be sent now.

        Unknown meters (not in this configuration, e.g. during a reload) are ignored."""
        if s.name not in self.meters and s.name not in self.virtual:
            return []
        status = QUALITY_STATUS.get(s.quality)
        if status is None:
            raise ValueError(f"meter {s.name!r}: unknown quality {s.quality!r}")
        unread = s.quality == "unread"
        values = "{" + ",".join(
            f"{json.dumps(m.name)}:{'null' if unread else number_json(m, v)}" for m, v in s.values) + "}"
        ts = "null" if unread or s.ts_ms is None else str(int(s.ts_ms))
        payload = f'{{"ts":{ts},"status":"{status}","values":{values}}}'.encode()
        key = (status, values)
        last = self._state.get(s.name)
        if last is not None and last.key == key and not self._is_due(last, now):
            last.payload = payload  # the newest ts, for the next republish
            return []
        self._state[s.name] = _MeterState(payload, key, now)
        return [Publish(self.state_topic(s.name), payload, qos=1, retain=True)]

    def current(self) -> list[Publish]:
        """Every meter's newest state, retained: what a new connection publishes first, so that a
        state made while the broker was away (kept on disk, replayed on ``/history``) is current on
        the meter's own topic at once and not only after its next change."""
        return [Publish(self.state_topic(name), last.payload, qos=1, retain=True) for name, last in self._state.items()]

    def due(self, now: float) -> list[Publish]:
        """The unchanged states not published for ``max_age`` seconds, republished (newest ``ts``)."""
        out = []
        for name, last in self._state.items():
            if self._is_due(last, now):
                last.published_at = now
                out.append(Publish(self.state_topic(name), last.payload, qos=1, retain=True))
        return out

    def next_due(self) -> float | None:
        """When ``due`` has something next (in the clock of ``now``); None: nothing to republish."""
        if self.cfg.max_age <= 0 or not self._state:
            return None
        return min(last.published_at for last in self._state.values()) + self.cfg.max_age

    def _is_due(self, last: _MeterState, now: float) -> bool:
        return self.cfg.max_age > 0 and now - last.published_at >= self.cfg.max_age

    # -- Home Assistant discovery

    def discovery(self) -> list[Publish]:
        """Every discovery config, retained: the bridge's device first (each meter's device names it
        as ``via_device``, which HA wants registered already), then one sensor per measurement.
        Empty when discovery is off."""
        if not self.cfg.homeassistant:
            return []
        return [Publish(topic, json.dumps(config, ensure_ascii=False, separators=(",", ":")).encode(),
                        qos=1, retain=True)
                for topic, config in self.discovery_configs()]

    def discovery_configs(self) -> list[tuple[str, dict]]:
        """(config topic, config) for every HA entity, as ``discovery()`` publishes them."""
        if not self.cfg.homeassistant:
            return []
        origin = {"name": ORIGIN, **({"sw_version": self.sw_version} if self.sw_version else {})}
        bridge_device = {"identifiers": [self._device_id()], "name": self.bridge_name, "model": ORIGIN,
                         **({"sw_version": self.sw_version} if self.sw_version else {})}
        configs: list[tuple[str, dict]] = [(
            self._config_topic("binary_sensor", "status"),
            {"name": "Status", "unique_id": f"{self._device_id()}:status",
             "state_topic": self.availability_topic, "payload_on": "online", "payload_off": "offline",
             "device_class": "connectivity", "entity_category": "diagnostic", "qos": 1,
             "device": bridge_device, "origin": origin})]
        devices: list[tuple[str, Sequence[Measurement], dict]] = []
        for name, meter in self.meters.items():
            device = {"identifiers": [self._device_id(name)], "name": name}
            maker = manufacturer(meter.profile.name, meter.profile.description)
            if maker:
                device["manufacturer"] = maker
            device["model"] = meter.profile.name
            devices.append((name, meter.profile.measurements, device))
        for name, v in self.virtual.items():  # its power now: the sum of its terms'
            model = f"virtual meter: {v.formula}" if v.formula else "virtual meter"
            devices.append((name, v.profile.measurements,
                            {"identifiers": [self._device_id(name)], "name": name, "model": model}))
        for name, measurements, device in devices:
            topic = self.state_topic(name)
            device["via_device"] = self._device_id()
            availability = [{"topic": self.availability_topic},
                            {"topic": topic, "value_template": AVAILABILITY_TEMPLATE}]
            for m in measurements:
                cls = sensor_class(m)
                config: dict = {
                    "name": friendly_name(m.name),
                    "unique_id": f"{self._device_id(name)}:{m.name}",
                    "state_topic": topic,
                    "value_template": VALUE_TEMPLATE.format(name=m.name),
                    "availability": availability,
                    "availability_mode": "all",
                }
                if cls.device_class:
                    config["device_class"] = cls.device_class
                if cls.unit:
                    config["unit_of_measurement"] = cls.unit
                config["state_class"] = cls.state_class
                config["qos"] = 1
                config["device"] = device
                config["origin"] = origin
                configs.append((self._config_topic("sensor", f"{name}-{m.name}"), config))
        return configs

    def _device_id(self, meter: str | None = None) -> str:
        # ':' is in neither a (sanitised) bridge id, a meter name nor a measurement name: no collisions
        return f"{ORIGIN}:{self.node_id}" + (f":{meter}" if meter is not None else "")

    def _config_topic(self, component: str, object_id: str) -> str:
        # object_id "<meter>-<measurement>": a measurement name has no '-', so the pair is unambiguous
        return f"{self.cfg.discovery_prefix}/{component}/{self.node_id}/{object_id}/config"

    # -- reload

    def retained_topics(self) -> list[str]:
        """Every topic this configuration leaves a retained message on."""
        return ([topic for topic, _ in self.discovery_configs()]
                + [self.availability_topic] + [self.state_topic(name) for name in (*self.meters, *self.virtual)])

    def retired(self, previous: JsonTopics) -> list[Publish]:
        """After a reload: empty retained messages clearing what ``previous`` published and this
        configuration does not (a removed meter or measurement, discovery turned off, a new prefix);
        HA deletes an entity whose config is emptied. Send them before ``online()``."""
        mine = set(self.retained_topics())
        return [Publish(topic, b"", qos=1, retain=True)
                for topic in previous.retained_topics() if topic not in mine]
