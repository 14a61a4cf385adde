"""The JSON topics and Home Assistant discovery (bridge.core.mqtt_json): pure, a made-up clock."""
from __future__ import annotations

import json
import re
import struct

import pytest

from bridge.config.profiles import builtin_profile_names, get_builtin
from bridge.core.codec import DataType, Function, WordOrder
from bridge.core.model import Measurement, MeterConfig, MqttJsonConfig
from bridge.core.mqtt_json import (
    AVAILABILITY_TEMPLATE,
    JsonTopics,
    check_topic,
    friendly_name,
    manufacturer,
    number_json,
    sensor_class,
)
from bridge.core.mqtt_types import LiveProfile, MeterSample, Publish, VirtualDevice

SDM120 = get_builtin("eastron-sdm120")
SDM630 = get_builtin("eastron-sdm630")
TS = 1718000000123

# What Home Assistant accepts (homeassistant/components/sensor/const.py: DEVICE_CLASS_UNITS and
# DEVICE_CLASS_STATE_CLASSES), for the device classes an energy meter needs; kept here on purpose,
# independent of the module's own table.
HA_UNITS: dict[str, set[str | None]] = {
    "voltage": {"V", "mV"},
    "current": {"A", "mA"},
    "power": {"W", "kW"},
    "reactive_power": {"var"},
    "apparent_power": {"VA"},
    "frequency": {"Hz", "kHz", "MHz", "GHz"},
    "energy": {"Wh", "kWh", "MWh", "MJ", "GJ"},
    "reactive_energy": {"varh", "kvarh"},
    "power_factor": {"%", None},
}
HA_STATE_CLASSES: dict[str, set[str]] = {
    "voltage": {"measurement"},
    "current": {"measurement"},
    "power": {"measurement"},
    "reactive_power": {"measurement"},
    "apparent_power": {"measurement"},
    "frequency": {"measurement"},
    "energy": {"total", "total_increasing"},
    "reactive_energy": {"total", "total_increasing"},
    "power_factor": {"measurement"},
}
# HA's discovery topic: <prefix>/<component>/[<node_id>/]<object_id>/config
HA_DISCOVERY_TOPIC = re.compile(r"homeassistant/(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?"
                                r"(?P<object_id>[a-zA-Z0-9_-]+)/config")


def f32(x: float) -> float:
    """x as the float32 a register holds, widened back to a Python float (what the codec returns)."""
    return struct.unpack(">f", struct.pack(">f", x))[0]


def meter(name: str = "main", profile=SDM120) -> MeterConfig:
    return MeterConfig(name, 1, 1, profile)


def topics(*meters: MeterConfig, max_age: float = 60.0, ha: bool = False, topic: str = "mb/panel-7",
           bridge: str = "panel-7") -> JsonTopics:
    return JsonTopics(MqttJsonConfig(topic, max_age, ha), meters or (meter(),), bridge, sw_version="0.1.0")


def sample(name: str = "main", quality: str = "good", ts: int | None = TS, profile=SDM120,
           **changed: float | None) -> MeterSample:
    """Every measurement of the profile at a plausible float32 value, some of them overridden."""
    base = {m.name: f32(1.5 + i) for i, m in enumerate(profile.measurements)}
    if "voltage" in base:
        base.update(voltage=f32(230.1), current=f32(1.25))
    base.update(changed)
    return MeterSample(name, quality, ts, tuple((m, base[m.name]) for m in profile.measurements))


def body(publish: Publish) -> dict:
    return json.loads(publish.payload)


# --- the state message -------------------------------------------------------------------------------

def test_state_message_is_exact_compact_json_in_profile_order():
    [p] = topics().sample(sample(), now=0.0)
    assert p == Publish("mb/panel-7/main", p.payload, qos=1, retain=True)
    assert p.payload == (
        b'{"ts":1718000000123,"status":"good","values":{"voltage":230.1,"current":1.25,'
        b'"active_power":3.5,"apparent_power":4.5,"reactive_power":5.5,"power_factor":6.5,'
        b'"phase_angle":7.5,"frequency":8.5,"import_active_energy":9.5,"export_active_energy":10.5,'
        b'"import_reactive_energy":11.5,"export_reactive_energy":12.5,"total_active_energy":13.5,'
        b'"total_reactive_energy":14.5}}')
    assert list(body(p)["values"]) == [m.name for m in SDM120.measurements]


def test_missing_nan_and_infinite_values_are_null():
    [p] = topics().sample(sample(voltage=float("nan"), current=float("inf"), frequency=None,
                                 active_power=float("-inf")), now=0.0)
    values = body(p)["values"]
    assert values["voltage"] is None and values["current"] is None
    assert values["frequency"] is None and values["active_power"] is None
    assert b"NaN" not in p.payload and b"Infinity" not in p.payload


def _m(dtype: DataType, scale: float = 1.0) -> Measurement:
    return Measurement("x", 0, dtype, Function.INPUT, WordOrder.BIG, scale=scale)


@pytest.mark.parametrize("m, value, text", [
    (_m(DataType.FLOAT32), f32(230.1), "230.1"),  # not 230.10000610351562
    (_m(DataType.FLOAT32), f32(-0.987), "-0.987"),
    (_m(DataType.FLOAT32), f32(123456.78), "123456.78"),
    (_m(DataType.FLOAT32), f32(1e-7), "1e-07"),
    (_m(DataType.FLOAT32, 1000.0), f32(1.2345) * 1000.0, "1234.5"),  # kW scaled to W
    (_m(DataType.FLOAT32), 0.0, "0.0"),
    (_m(DataType.INT32, 0.1), 23012 * 0.1, "2301.2"),  # not 2301.2000000000003
    (_m(DataType.UINT32, 0.01), 123456789 * 0.01, "1234567.89"),
    (_m(DataType.INT16, 0.001), -987 * 0.001, "-0.987"),
    (_m(DataType.UINT16), 42, "42"),
    (_m(DataType.UINT64), 2**63 + 5, str(2**63 + 5)),
    (_m(DataType.FLOAT64), 0.1 + 0.2, "0.30000000000000004"),  # a double is published as it is
    (_m(DataType.FLOAT64), float("nan"), "null"),
    (_m(DataType.FLOAT32), None, "null"),
])
def test_numbers_have_the_digits_the_meter_sent(m, value, text):
    assert number_json(m, value) == text
    if text != "null":
        assert json.loads(text) == pytest.approx(value, rel=1e-6)
        if m.dtype is DataType.FLOAT32:
            assert f32(json.loads(text)) == f32(value)  # the same float32: nothing lost


def test_unread_meter_clears_the_retained_state_with_offline_and_null_ts():
    [p] = topics().sample(sample(quality="unread", ts=None), now=0.0)
    assert body(p) == {"ts": None, "status": "offline", "values": {m.name: None for m in SDM120.measurements}}
    assert p.retain and p.qos == 1


def test_stale_and_offline_keep_the_last_values_and_their_time():
    t = topics()
    t.sample(sample(), now=0.0)
    [stale] = t.sample(sample(quality="stale"), now=11.0)
    assert body(stale)["status"] == "stale" and body(stale)["ts"] == TS
    assert body(stale)["values"]["voltage"] == 230.1
    [offline] = t.sample(sample(quality="offline"), now=40.0)
    assert body(offline)["status"] == "offline" and body(offline)["ts"] == TS
    assert body(offline)["values"]["voltage"] == 230.1


def test_offline_before_any_good_poll_has_null_ts():
    [p] = topics().sample(sample(quality="offline", ts=None, voltage=None), now=0.0)
    assert body(p)["ts"] is None and body(p)["status"] == "offline"


def test_unknown_quality_is_an_error_and_unknown_meter_is_ignored():
    t = topics()
    with pytest.raises(ValueError, match="quality"):
        t.sample(sample(quality="bad"), now=0.0)
    assert t.sample(sample(name="not-configured"), now=0.0) == []
    assert t.due(1e9) == []


# --- when a state is published --------------------------------------------------------------------------

def test_unchanged_values_wait_for_max_age_and_then_carry_the_newest_ts():
    t = topics(max_age=60.0)
    assert len(t.sample(sample(ts=TS), now=100.0)) == 1
    assert t.sample(sample(ts=TS + 1000), now=101.0) == []  # only ts moved: no change
    assert t.sample(sample(ts=TS + 59000), now=159.9) == []
    assert t.due(159.9) == []
    [again] = t.due(160.0)
    assert again.topic == "mb/panel-7/main" and again.retain
    assert body(again)["ts"] == TS + 59000  # the newest poll's time, not the first one's
    assert t.due(160.0) == [] and t.due(219.9) == []
    assert t.sample(sample(ts=TS + 61000), now=161.0) == []
    # a poll that finds the state due publishes it itself; the timer then has nothing to do
    [by_sample] = t.sample(sample(ts=TS + 120000), now=220.0)
    assert body(by_sample)["ts"] == TS + 120000
    assert t.due(220.0) == []


def test_a_changed_value_is_published_at_once():
    t = topics()
    t.sample(sample(), now=0.0)
    [p] = t.sample(sample(ts=TS + 1000, current=f32(1.26)), now=1.0)
    assert body(p)["values"]["current"] == 1.26 and body(p)["ts"] == TS + 1000
    assert t.sample(sample(ts=TS + 2000, current=f32(1.26)), now=2.0) == []
    # the max_age clock restarted with the change
    assert t.due(60.9) == [] and len(t.due(61.0)) == 1


def test_a_value_going_missing_or_coming_back_is_a_change_but_nan_twice_is_not():
    t = topics()
    t.sample(sample(), now=0.0)
    assert len(t.sample(sample(voltage=float("nan")), now=1.0)) == 1
    assert t.sample(sample(voltage=float("nan")), now=2.0) == []  # NaN != NaN must not re-trigger
    assert t.sample(sample(voltage=None), now=3.0) == []  # None and NaN are both null
    assert len(t.sample(sample(), now=4.0)) == 1


@pytest.mark.parametrize("transitions, expected", [
    # (quality, ts) in turn -> which of them publish
    ([("unread", None), ("unread", None), ("good", TS), ("good", TS)], [True, False, True, False]),
    ([("good", TS), ("stale", TS), ("stale", TS), ("offline", TS), ("offline", TS), ("good", TS + 9)],
     [True, True, False, True, False, True]),
    ([("good", TS), ("offline", TS), ("stale", TS), ("good", TS)], [True, True, True, True]),
])
def test_every_status_change_is_published(transitions, expected):
    t = topics()
    published = [bool(t.sample(sample(quality=q, ts=ts), now=float(i))) for i, (q, ts) in enumerate(transitions)]
    assert published == expected


def test_meters_are_independent():
    t = topics(meter("a"), meter("b-2_x"))
    assert [p.topic for p in t.sample(sample("a"), now=0.0)] == ["mb/panel-7/a"]
    assert [p.topic for p in t.sample(sample("b-2_x"), now=30.0)] == ["mb/panel-7/b-2_x"]
    assert t.sample(sample("a"), now=31.0) == []
    assert [p.topic for p in t.due(60.0)] == ["mb/panel-7/a"]
    assert t.next_due() == 90.0
    assert [p.topic for p in t.due(90.0)] == ["mb/panel-7/b-2_x"]
    assert t.next_due() == 120.0


def test_next_due_and_a_disabled_max_age():
    t = topics(max_age=60.0)
    assert t.next_due() is None
    t.sample(sample(), now=5.0)
    assert t.next_due() == 65.0
    off = topics(max_age=0.0)
    off.sample(sample(), now=0.0)
    assert off.sample(sample(), now=1e6) == [] and off.due(1e6) == [] and off.next_due() is None


# --- the bridge's status, the Will, HA's birth ------------------------------------------------------

def test_will_and_online_without_discovery():
    t = topics(ha=False)
    assert t.availability_topic == "mb/panel-7/status"
    assert t.will() == Publish("mb/panel-7/status", b"offline", qos=1, retain=True)
    assert t.online() == [Publish("mb/panel-7/status", b"online", qos=1, retain=True)]
    assert t.discovery() == [] and t.subscriptions() == []
    assert t.homeassistant_status(b"online") is False


def test_online_with_discovery_sends_status_then_bridge_device_then_sensors():
    t = topics(meter("main"), ha=True)
    out = t.online()
    assert out[0] == Publish("mb/panel-7/status", b"online", qos=1, retain=True)
    assert out[1].topic == "homeassistant/binary_sensor/panel-7/status/config"
    assert [p.topic for p in out[2:]] == [f"homeassistant/sensor/panel-7/main-{m.name}/config"
                                          for m in SDM120.measurements]
    assert all(p.retain and p.qos == 1 for p in out)
    assert out[1:] == t.discovery()


def test_homeassistant_birth_asks_for_discovery_again():
    t = topics(ha=True)
    assert t.subscriptions() == ["homeassistant/status"] == [t.ha_status_topic]
    assert t.homeassistant_status(b"online") is True
    assert t.homeassistant_status(b"online\n") is True
    assert t.homeassistant_status(b"offline") is False
    assert t.homeassistant_status(b"") is False
    custom = JsonTopics(MqttJsonConfig("mb", 60.0, True, "ha-test"), [meter()], "b")
    assert custom.subscriptions() == ["ha-test/status"]
    assert custom.discovery()[0].topic.startswith("ha-test/binary_sensor/b/")


# --- Home Assistant discovery ---------------------------------------------------------------------------

def configs(t: JsonTopics) -> dict[str, dict]:
    """object_id -> decoded config, from what discovery() publishes."""
    out = {}
    for p in t.discovery():
        match = HA_DISCOVERY_TOPIC.fullmatch(p.topic)
        assert match, p.topic
        out[match["object_id"]] = json.loads(p.payload.decode("utf-8"))
    return out


SDM120_CLASSES = {  # measurement -> (device_class, unit_of_measurement, state_class)
    "voltage": ("voltage", "V", "measurement"),
    "current": ("current", "A", "measurement"),
    "active_power": ("power", "W", "measurement"),
    "apparent_power": ("apparent_power", "VA", "measurement"),
    "reactive_power": ("reactive_power", "var", "measurement"),
    "power_factor": ("power_factor", None, "measurement"),
    "phase_angle": (None, "°", "measurement"),
    "frequency": ("frequency", "Hz", "measurement"),
    "import_active_energy": ("energy", "kWh", "total_increasing"),
    "export_active_energy": ("energy", "kWh", "total_increasing"),
    "import_reactive_energy": ("reactive_energy", "kvarh", "total_increasing"),
    "export_reactive_energy": ("reactive_energy", "kvarh", "total_increasing"),
    "total_active_energy": ("energy", "kWh", "total_increasing"),
    "total_reactive_energy": ("reactive_energy", "kvarh", "total_increasing"),
}


def test_sdm120_discovery_config_content():
    c = configs(topics(meter("main-incomer"), ha=True))
    assert set(c) == {"status"} | {f"main-incomer-{name}" for name in SDM120_CLASSES}
    voltage = c["main-incomer-voltage"]
    assert voltage == {
        "name": "Voltage",
        "unique_id": "modbus-bridge:panel-7:main-incomer:voltage",
        "state_topic": "mb/panel-7/main-incomer",
        "value_template": "{{ value_json['values']['voltage'] }}",
        "availability": [
            {"topic": "mb/panel-7/status"},
            {"topic": "mb/panel-7/main-incomer", "value_template": AVAILABILITY_TEMPLATE},
        ],
        "availability_mode": "all",
        "device_class": "voltage",
        "unit_of_measurement": "V",
        "state_class": "measurement",
        "qos": 1,
        "device": {
            "identifiers": ["modbus-bridge:panel-7:main-incomer"],
            "name": "main-incomer",
            "manufacturer": "Eastron",
            "model": "eastron-sdm120",
            "via_device": "modbus-bridge:panel-7",
        },
        "origin": {"name": "modbus-bridge", "sw_version": "0.1.0"},
    }
    for name, (device_class, unit, state_class) in SDM120_CLASSES.items():
        config = c[f"main-incomer-{name}"]
        assert (config.get("device_class"), config.get("unit_of_measurement"), config["state_class"]) \
            == (device_class, unit, state_class), name
        assert config["value_template"] == f"{{{{ value_json['values']['{name}'] }}}}"
        assert config["device"] == voltage["device"] and config["availability"] == voltage["availability"]
    assert "unit_of_measurement" not in c["main-incomer-power_factor"]  # HA: power factor has no unit


def test_the_bridge_is_a_device_of_its_own_so_via_device_resolves():
    c = configs(topics(meter("main"), ha=True))
    status = c["status"]
    assert status["device"] == {"identifiers": ["modbus-bridge:panel-7"], "name": "panel-7",
                                "model": "modbus-bridge", "sw_version": "0.1.0"}
    assert c["main-voltage"]["device"]["via_device"] in status["device"]["identifiers"]
    assert status["state_topic"] == "mb/panel-7/status"
    assert (status["payload_on"], status["payload_off"]) == ("online", "offline")
    assert status["device_class"] == "connectivity" and status["entity_category"] == "diagnostic"
    assert "availability" not in status  # it shows "disconnected", not "unavailable"


def test_sdm630_every_measurement_is_a_valid_home_assistant_sensor():
    c = configs(topics(meter("sub_2", SDM630), ha=True))
    sensors = {k: v for k, v in c.items() if k != "status"}
    assert len(sensors) == len(SDM630.measurements) == 42
    for m in SDM630.measurements:
        config = sensors[f"sub_2-{m.name}"]
        _assert_valid_for_ha(m, config)
    assert sensors["sub_2-voltage_l1_l2"]["name"] == "Voltage L1-L2"
    assert sensors["sub_2-power_factor_l3"]["device_class"] == "power_factor"
    assert sensors["sub_2-neutral_current"]["device_class"] == "current"
    energies = [k for k in sensors if "energy" in k]
    assert len(energies) == 12
    assert all(sensors[k]["state_class"] == "total_increasing" for k in energies)
    ids = [v["unique_id"] for v in c.values()]
    assert len(set(ids)) == len(ids)


def _assert_valid_for_ha(m: Measurement, config: dict) -> None:
    device_class, unit, state_class = (config.get("device_class"), config.get("unit_of_measurement"),
                                       config["state_class"])
    assert state_class in {"measurement", "total", "total_increasing"}, m.name
    if device_class is not None:
        assert unit in HA_UNITS[device_class], (m.name, device_class, unit)
        assert state_class in HA_STATE_CLASSES[device_class], (m.name, device_class, state_class)
    if m.unit in {"kWh", "kvarh"}:
        assert state_class == "total_increasing", m.name


@pytest.mark.parametrize("profile_name", builtin_profile_names())
def test_every_builtin_profile_maps_to_valid_classes(profile_name):
    profile = get_builtin(profile_name)
    for m in profile.measurements:
        cls = sensor_class(m)
        _assert_valid_for_ha(m, {"device_class": cls.device_class, "unit_of_measurement": cls.unit,
                                 "state_class": cls.state_class})
        if m.unit in {"V", "A", "W", "var", "VA", "Hz", "kWh", "kvarh"} or m.name.startswith("power_factor"):
            assert cls.device_class is not None, (profile_name, m.name)
    assert manufacturer(profile.name, profile.description)


def test_manufacturer_and_names():
    assert manufacturer("carlo-gavazzi-em24", "Carlo Gavazzi EM24 three-phase meter") == "Carlo Gavazzi"
    assert manufacturer("chint-ddsu666", "Chint DDSU666 single-phase meter.") == "Chint"
    assert manufacturer("my-meter", "A meter of my own") is None
    assert manufacturer("solo", "Solo meter") is None
    assert friendly_name("import_active_energy") == "Import active energy"
    assert friendly_name("current_l2") == "Current L2"
    assert friendly_name("voltage_l3_l1") == "Voltage L3-L1"


def test_a_profile_without_a_known_maker_leaves_manufacturer_out():
    own = get_builtin("eastron-sdm120")
    own = type(own)(name="my-meter", description="Home-made", function=own.function,
                    word_order=own.word_order, measurements=own.measurements[:1])
    c = configs(topics(MeterConfig("m", 1, 1, own), ha=True))
    assert "manufacturer" not in c["m-voltage"]["device"] and c["m-voltage"]["device"]["model"] == "my-meter"


def test_templates_render_as_home_assistant_renders_them():
    """HA renders with a Jinja sandbox; jinja2 is not a dependency of the bridge, so only where present."""
    sandbox = pytest.importorskip("jinja2.sandbox")
    env = sandbox.ImmutableSandboxedEnvironment()
    c = configs(topics(meter("main"), ha=True))
    good = json.loads(topics().sample(sample(current=None), now=0.0)[0].payload)
    render = lambda template, **kw: env.from_string(template).render(**kw)  # noqa: E731
    assert render(c["main-voltage"]["value_template"], value_json=good) == "230.1"
    assert render(c["main-current"]["value_template"], value_json=good) == "None"  # HA: unknown
    assert render(AVAILABILITY_TEMPLATE, value_json=good) == "online"
    assert render(AVAILABILITY_TEMPLATE, value_json={**good, "status": "stale"}) == "offline"
    assert render(AVAILABILITY_TEMPLATE) == "offline"  # a payload that is not JSON
    # why the template subscripts: the dot finds the dict's values() method, so this renders empty
    assert render("{{ value_json.values.voltage }}", value_json=good) == ""


# --- topic validity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("topic", ["a", "a/b", "modbus-bridge/panel-7/main_in-1", "a b/c", "ünï/cödé"])
def test_valid_topics(topic):
    check_topic(topic)


@pytest.mark.parametrize("topic", ["", "/a", "a/", "a//b", "a/+/b", "a/#", "a+b", "$SYS/x", "a\x00b",
                                   "x" * 65536])
def test_invalid_topics(topic):
    with pytest.raises(ValueError):
        check_topic(topic)


def test_every_published_topic_is_valid_for_meter_names_with_dashes_and_underscores():
    t = topics(meter("a-b"), meter("a_b"), meter("-x_"), meter("M1", SDM630), ha=True,
               bridge="panel 7.local")
    published = t.online() + [t.will()]
    for name in ("a-b", "a_b", "-x_", "M1"):
        published += t.sample(sample(name, profile=SDM630 if name == "M1" else SDM120), now=0.0)
    for p in published:
        check_topic(p.topic)
        assert "+" not in p.topic and "#" not in p.topic and "" not in p.topic.split("/")
    discovery = [p.topic for p in published if p.topic.startswith("homeassistant/")]
    assert len(discovery) == len(set(discovery)) == 1 + 3 * len(SDM120.measurements) + len(SDM630.measurements)
    for topic in discovery:
        match = HA_DISCOVERY_TOPIC.fullmatch(topic)
        assert match and match["node_id"] == "panel_7_local", topic
    assert t.will().topic == "mb/panel-7/status"


@pytest.mark.parametrize("kwargs, message", [
    ({"topic": "mb/"}, "empty level"),
    ({"topic": "mb/+"}, "wildcard"),
    ({"topic": "mb", "meters": ("status",)}, "status topic"),
    ({"topic": "mb", "meters": ("a", "a")}, "twice"),
    ({"topic": "mb", "bridge": ""}, "bridge_id"),
])
def test_a_configuration_that_cannot_work_is_refused(kwargs, message):
    names = kwargs.pop("meters", ("main",))
    with pytest.raises(ValueError, match=message):
        topics(*(meter(n) for n in names), **kwargs)


# --- reload ----------------------------------------------------------------------------------------

def test_retired_clears_what_a_previous_configuration_left_retained():
    old = topics(meter("a"), meter("b", SDM630), ha=True)
    assert topics(meter("a"), meter("b", SDM630), ha=True).retired(old) == []
    new = topics(meter("a"), ha=True)
    cleared = new.retired(old)
    assert all(p.payload == b"" and p.retain and p.qos == 1 for p in cleared)
    assert {p.topic for p in cleared} == (
        {f"homeassistant/sensor/panel-7/b-{m.name}/config" for m in SDM630.measurements} | {"mb/panel-7/b"})
    off = topics(meter("a"), ha=False).retired(old)
    assert {p.topic for p in off} >= {"homeassistant/binary_sensor/panel-7/status/config",
                                       "homeassistant/sensor/panel-7/a-voltage/config"}
    assert "mb/panel-7/a" not in {p.topic for p in off}
    moved = topics(meter("a"), topic="mb/panel-8").retired(topics(meter("a")))
    assert {p.topic for p in moved} == {"mb/panel-7/status", "mb/panel-7/a"}


POWER = next(m for m in SDM120.measurements if m.name == "active_power")
UNMETERED = VirtualDevice("unmetered", LiveProfile((POWER,)), "a - b")


def test_a_virtual_meter_has_a_state_topic_and_an_ha_device_of_its_own_and_a_reload_that_drops_it_clears_them():
    cfg = MqttJsonConfig("mb/panel-7", 60.0, True)
    with_virtual = JsonTopics(cfg, (meter("a"),), "panel-7", virtual=(UNMETERED,))
    (state,) = with_virtual.sample(MeterSample("unmetered", "stale", TS, ((POWER, -250.5),)), 0.0)
    assert (state.topic, state.retain, body(state)) == (
        "mb/panel-7/unmetered", True, {"ts": TS, "status": "stale", "values": {"active_power": -250.5}})
    assert with_virtual.current() == [state]  # what a new connection publishes first
    # Home Assistant: a device of its own (via the bridge) with a power sensor, available like a meter's
    ((topic, config),) = [(t, c) for t, c in with_virtual.discovery_configs() if "unmetered" in t]
    assert topic == "homeassistant/sensor/panel-7/unmetered-active_power/config"
    assert (config["state_topic"], config["device_class"], config["unit_of_measurement"]) == (
        "mb/panel-7/unmetered", "power", "W")
    assert config["device"] == {"identifiers": ["modbus-bridge:panel-7:unmetered"], "name": "unmetered",
                                "model": "virtual meter: a - b", "via_device": "modbus-bridge:panel-7"}
    assert config["availability"][1]["topic"] == "mb/panel-7/unmetered"
    without = JsonTopics(cfg, (meter("a"),), "panel-7")
    assert without.sample(MeterSample("unmetered", "good", TS, ((POWER, 1.0),)), 0.0) == []
    assert sorted(p.topic for p in without.retired(with_virtual)) == [
        "homeassistant/sensor/panel-7/unmetered-active_power/config", "mb/panel-7/unmetered"]
    with pytest.raises(ValueError, match="bridge's status topic"):
        JsonTopics(cfg, (meter("a"),), "panel-7", virtual=(VirtualDevice("status", LiveProfile((POWER,))),))
