"""Configuration loading: the frozen objects it yields and every issue it reports, with its line."""
from __future__ import annotations

import dataclasses
import stat
import textwrap
from pathlib import Path

import pytest
from support import write

from bridge.core.codec import Function
from bridge.config.loader import load_config, parse_broker, parse_duration, summary
from bridge.core.errors import BridgeError, ConfigError, ConfigIssue
from bridge.core.model import (
    Config,
    HttpConfig,
    ModbusTcpConfig,
    MqttConfig,
    MqttJsonConfig,
    MqttQueue,
    MqttTls,
    OpcUaConfig,
    SparkplugConfig,
)
from bridge.config.profiles import get_builtin
from bridge.config.yamlsource import Invalid, parse_yaml, plain
from bridge.state import ensure_state_dir, state_path

FULL = """
segments:
  - name: panel-a
    port: /dev/ttyUSB0
    baudrate: 19200
    parity: E
    stopbits: 2
    timeout: 1
    retries: 3
    meters:
      - name: incomer
        slave: 1
        unit: 11
        profile: eastron-sdm120
        poll_interval: 0
        writable: true
        stale_after: 2.5
        ranges:
          - {start: 0, count: 80}
      - name: feeder
        slave: 2
        profile: eastron-sdm630
  - name: panel_b
    port: /dev/ttyUSB1
    meters:
      - {name: pump, slave: 1, unit: 21, profile: eastron-sdm120}
stale_after: 5
modbus_tcp:
  enabled: false
  listen: 127.0.0.1:5020
opcua:
  endpoint: opc.tcp://127.0.0.1:4841/x
  namespace: urn:test
http:
  listen: "[::1]:0"
"""

MINIMAL = """
segments:
  - name: a
    port: /dev/ttyS0
    meters:
      - {name: m1, slave: 7, profile: eastron-sdm120}
"""


@pytest.fixture(autouse=True)
def no_systemd_state_directory(monkeypatch):
    """The default state_dir depends on $STATE_DIRECTORY: tests set it only on purpose."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)


def issues_of(tmp_path: Path, text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value.issues


def one_issue(tmp_path: Path, text: str) -> ConfigIssue:
    found = issues_of(tmp_path, text)
    assert len(found) == 1, [str(i) for i in found]
    return found[0]


def where(issues: list[ConfigIssue]) -> list[tuple[int | None, str]]:
    return [(i.line, i.key) for i in issues]


# --- valid configurations ---------------------------------------------------------------


def test_full_config_loads_into_frozen_objects(tmp_path):
    path = write(tmp_path, FULL)
    config = load_config(path)
    assert isinstance(config, Config) and config.source == str(path)
    a, b = config.segments
    assert (a.name, a.port, a.baudrate, a.parity, a.stopbits, a.timeout, a.retries) == (
        "panel-a", "/dev/ttyUSB0", 19200, "E", 2, 1.0, 3)
    assert isinstance(a.timeout, float)
    incomer, feeder = a.meters
    assert (incomer.name, incomer.slave, incomer.unit, incomer.poll_interval, incomer.writable) == (
        "incomer", 1, 11, 0.0, True)
    assert incomer.profile is get_builtin("eastron-sdm120")
    assert incomer.stale_after == 2.5
    assert [(r.function, r.start, r.count) for r in incomer.ranges] == [(Function.INPUT, 0, 80)]
    assert (feeder.unit, feeder.stale_after, feeder.profile.name, feeder.writable) == (
        2, 5.0, "eastron-sdm630", False)
    assert (b.name, b.baudrate, b.parity, b.meters[0].unit) == ("panel_b", 9600, "N", 21)
    assert config.stale_after == 5.0
    assert config.modbus_tcp == ModbusTcpConfig(enabled=False, host="127.0.0.1", port=5020)
    assert config.opcua == OpcUaConfig(enabled=True, endpoint="opc.tcp://127.0.0.1:4841/x", namespace="urn:test",
                                       certificate_dir=str(tmp_path / "state" / "pki"),
                                       trusted_clients_dir=str(tmp_path / "state" / "pki" / "trusted"))
    assert config.http == HttpConfig(host="::1", port=0)
    assert [m.name for m in config.meters] == ["incomer", "feeder", "pump"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.segments[0].meters[0].unit = 5  # type: ignore[misc]


def test_minimal_config_gets_the_documented_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    (seg,) = config.segments
    assert (seg.baudrate, seg.parity, seg.stopbits, seg.bytesize, seg.timeout, seg.retries) == (
        9600, "N", 1, 8, 0.5, 1)
    (meter,) = seg.meters
    assert (meter.unit, meter.poll_interval, meter.writable, meter.ranges, meter.stale_after) == (
        7, 1.0, False, (), 10.0)
    assert config.stale_after == 10.0
    assert config.modbus_tcp == ModbusTcpConfig(enabled=True, host="0.0.0.0", port=502)
    assert config.opcua == OpcUaConfig(True, "opc.tcp://0.0.0.0:4840/bridge", "urn:modbus-bridge",
                                       certificate_dir=str(tmp_path / "state" / "pki"),
                                       trusted_clients_dir=str(tmp_path / "state" / "pki" / "trusted"))
    # SecurityPolicy None is never offered unless the configuration lists it
    assert "None" not in config.opcua.security and config.opcua.anonymous
    assert config.http is None


def test_top_level_stale_after_is_inherited_by_meters(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "stale_after: 30\n"))
    assert config.meters[0].stale_after == 30.0


def test_empty_sections_take_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "modbus_tcp:\nopcua:\nhttp:\n"))
    assert config.modbus_tcp == ModbusTcpConfig()
    assert config.opcua == OpcUaConfig(certificate_dir=str(tmp_path / "state" / "pki"),
                                       trusted_clients_dir=str(tmp_path / "state" / "pki" / "trusted"))
    assert config.http == HttpConfig()  # present, even empty, switches HTTP on with its defaults


def test_same_slave_on_two_segments_is_fine_with_distinct_units(tmp_path):
    config = load_config(write(tmp_path, """
        segments:
          - name: a
            port: /dev/ttyS0
            meters: [{name: m1, slave: 1, profile: eastron-sdm120}]
          - name: b
            port: /dev/ttyS1
            meters: [{name: m2, slave: 1, unit: 2, profile: eastron-sdm120}]
        """))
    assert [(m.slave, m.unit) for m in config.meters] == [(1, 1), (1, 2)]


def test_file_profile_is_resolved_relative_to_the_config_directory(tmp_path, monkeypatch):
    site = tmp_path / "site"
    write(site, """
        name: custom
        function: holding
        measurements:
          - {name: voltage, address: 0x5B00, type: uint32, scale: 0.1, unit: V}
        """, name="profiles/custom.yaml")
    config_path = write(site, """
        segments:
          - name: a
            port: /dev/ttyS0
            meters:
              - name: m1
                slave: 1
                profile: profiles/custom.yaml
                ranges: [{start: 0x5B00, count: 4}]
        """)
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    meter = load_config(config_path).meters[0]
    assert meter.profile.name == "custom"
    assert meter.profile.source == str(site / "profiles" / "custom.yaml")
    assert meter.ranges[0].function is Function.HOLDING  # a meter's range defaults to its profile's table


def test_summary_names_segments_meters_and_endpoints(tmp_path):
    text = summary(load_config(write(tmp_path, FULL)))
    assert "panel-a: /dev/ttyUSB0 19200 8E2" in text
    assert "incomer: slave 1 -> unit 11, profile eastron-sdm120 (14 measurements" in text
    assert "pump: slave 1 -> unit 21" in text
    assert "2 segment(s), 3 meter(s), 70 measurement(s)" in text
    assert "modbus tcp: off" in text
    assert "opc ua: opc.tcp://127.0.0.1:4841/x (namespace urn:test)" in text
    assert "http: [::1]:0" in text
    assert f"state directory: {tmp_path / 'state'}" in text


# --- file-level errors ------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.issues == [ConfigIssue(str(tmp_path / "nope.yaml"), None, "", "file not found")]


def test_malformed_yaml_names_the_line(tmp_path):
    issue = one_issue(tmp_path, """
        segments:
          - name: a
            port: /dev/ttyS0
           meters: []
        """)
    assert issue.line == 4
    assert issue.message.startswith("invalid YAML: ") and "\n" not in issue.message
    assert str(issue).startswith(f"{tmp_path / 'bridge.yaml'}:4: invalid YAML")


def test_unclosed_flow_sequence_points_at_its_start(tmp_path):
    issue = one_issue(tmp_path, """
        segments:
          - name: a
            port: /dev/ttyS0
            meters: [{name: m1, slave: 1, profile: eastron-sdm120}
        """)
    assert issue.line == 4


def test_empty_file_and_wrong_top_level(tmp_path):
    assert "empty" in one_issue(tmp_path, "").message
    issue = one_issue(tmp_path, "- a\n- b\n")
    assert issue.line == 1 and "expected a mapping" in issue.message


def test_duplicate_yaml_key_is_reported_at_the_duplicate(tmp_path):
    issue = one_issue(tmp_path, """
        segments:
          - name: a
            port: /dev/ttyS0
            meters: [{name: m1, slave: 1, profile: eastron-sdm120}]
            port: /dev/ttyS1
        """)
    assert (issue.line, issue.key) == (5, "segments[0].port")
    assert issue.message == "duplicate key 'port' (first at line 3)"


def test_unknown_keys_with_and_without_suggestion(tmp_path):
    found = issues_of(tmp_path, """
        segments:
          - name: a
            port: /dev/ttyS0
            baudrat: 19200
            meters:
              - {name: m1, slave: 1, profile: eastron-sdm120, colour: red}
        opcua:
          endpiont: opc.tcp://x:4840
        """)
    assert where(found) == [(4, "segments[0].baudrat"), (6, "segments[0].meters[0].colour"),
                            (8, "opcua.endpiont")]
    assert found[0].message == "unknown key 'baudrat'; did you mean 'baudrate'?"
    assert "unknown key 'colour'; expected one of: name, slave, unit" in found[1].message
    assert "did you mean 'endpoint'?" in found[2].message


def test_misspelt_required_top_level_key(tmp_path):
    found = issues_of(tmp_path, """
        segment:
          - name: a
        """)
    assert where(found) == [(1, "segment"), (1, "segments")]
    assert "did you mean 'segments'?" in found[0].message
    assert found[1].message == "missing required key 'segments'"


# --- section and value errors -----------------------------------------------------------


def test_segments_must_be_a_non_empty_list(tmp_path):
    issue = one_issue(tmp_path, "segments: []\n")
    assert (issue.line, issue.key) == (1, "segments") and "at least one segment" in issue.message
    issue = one_issue(tmp_path, "stale_after: 3\nsegments: /dev/ttyS0\n")
    assert (issue.line, issue.key) == (2, "segments") and "expected a list" in issue.message


def test_missing_segment_and_meter_keys_point_at_the_mapping(tmp_path):
    found = issues_of(tmp_path, """
        segments:
          - baudrate: 9600
            parity: N
          - name: b
            port: /dev/ttyS1
            meters:
              - unit: 3
                poll_interval: 2
        """)
    assert where(found) == [
        (2, "segments[0].name"), (2, "segments[0].port"), (2, "segments[0].meters"),
        (7, "segments[1].meters[0].name"), (7, "segments[1].meters[0].slave"),
        (7, "segments[1].meters[0].profile")]
    assert all(i.message.startswith("missing required key") for i in found)


SEGMENT_VALUE_CASES = [
    ("name: panel a", "segments[0].name", "letters, digits"),
    ("port: 5", "segments[0].port", "expected a string, got 5"),
    ("port: ''", "segments[0].port", "must not be empty"),
    ("baudrate: 0", "segments[0].baudrate", "0 is out of range >= 1"),
    ("baudrate: fast", "segments[0].baudrate", "expected an integer, got 'fast'"),
    ("baudrate: true", "segments[0].baudrate", "expected an integer, got true"),
    ("baudrate: 9600.0", "segments[0].baudrate", "expected an integer"),
    ("parity: X", "segments[0].parity", "unknown parity 'X'; expected one of N, E, O"),
    ("stopbits: 3", "segments[0].stopbits", "unknown stopbits 3; expected one of 1, 2"),
    ("stopbits: true", "segments[0].stopbits", "unknown stopbits true"),
    ("timeout: 0", "segments[0].timeout", "must be greater than 0"),
    ("timeout: '1'", "segments[0].timeout", "expected a number, got '1'"),
    ("timeout: .nan", "segments[0].timeout", "expected a finite number"),
    ("retries: -1", "segments[0].retries", "-1 is out of range >= 0"),
]


def segment_with(line: str) -> tuple[str, int]:
    """A one-segment config with ``line`` added last (replacing its default key); and its line number."""
    fields = {"name": "name: a", "port": "port: /dev/ttyS0",
              "meters": "meters: [{name: m1, slave: 1, profile: eastron-sdm120}]"}
    fields.pop(line.split(":")[0], None)
    body = [*fields.values(), line]
    return "segments:\n  - " + "\n    ".join(body) + "\n", len(body) + 1


def meter_with(line: str) -> tuple[str, int]:
    """A one-meter config with ``line`` added last to the meter; and its line number."""
    fields = {"name": "name: m1", "slave": "slave: 1", "profile": "profile: eastron-sdm120"}
    fields.pop(line.split(":")[0], None)
    body = [*fields.values(), line]
    head = "segments:\n  - name: a\n    port: /dev/ttyS0\n    meters:\n      - "
    return head + "\n        ".join(body) + "\n", len(body) + 4


@pytest.mark.parametrize(("line", "key", "message"), SEGMENT_VALUE_CASES)
def test_segment_value_errors(tmp_path, line, key, message):
    text, line_number = segment_with(line)
    issue = one_issue(tmp_path, text)
    assert (issue.line, issue.key) == (line_number, key)
    assert message in issue.message


def test_unusual_but_positive_baudrate_is_accepted(tmp_path):
    config = load_config(write(tmp_path, MINIMAL.replace("port: /dev/ttyS0", "port: /dev/ttyS0\n    baudrate: 250000")))
    assert config.segments[0].baudrate == 250000


METER_VALUE_CASES = [
    ("name: m.1", "segments[0].meters[0].name", "letters, digits"),
    ("slave: 0", "segments[0].meters[0].slave", "0 is out of range 1..247"),
    ("slave: 248", "segments[0].meters[0].slave", "248 is out of range 1..247"),
    ("slave: true", "segments[0].meters[0].slave", "expected an integer, got true"),
    ("unit: 300", "segments[0].meters[0].unit", "300 is out of range 1..247"),
    ("poll_interval: -1", "segments[0].meters[0].poll_interval", "must be 0 or more"),
    ("writable: 1", "segments[0].meters[0].writable", "expected true or false, got 1"),
    ("writable: 'true'", "segments[0].meters[0].writable", "expected true or false, got 'true'"),
    ("stale_after: 0", "segments[0].meters[0].stale_after", "must be greater than 0"),
    ("profile: 120", "segments[0].meters[0].profile", "expected a string"),
    ("ranges: {start: 0}", "segments[0].meters[0].ranges", "expected a list of ranges"),
]


@pytest.mark.parametrize(("line", "key", "message"), METER_VALUE_CASES)
def test_meter_value_errors(tmp_path, line, key, message):
    text, line_number = meter_with(line)
    issue = one_issue(tmp_path, text)
    assert (issue.line, issue.key) == (line_number, key)
    assert message in issue.message


def test_value_helpers_put_the_line_where_they_say():
    text, number = meter_with("unit: 9")
    assert text.splitlines()[number - 1].strip() == "unit: 9"
    text, number = segment_with("name: b")
    assert text.splitlines()[number - 1].strip() == "name: b"


def test_zero_poll_interval_is_allowed(tmp_path):
    config = load_config(write(tmp_path, MINIMAL.replace("profile: eastron-sdm120", "profile: eastron-sdm120, poll_interval: 0")))
    assert config.meters[0].poll_interval == 0.0


def test_meter_range_errors(tmp_path):
    found = issues_of(tmp_path, """
        segments:
          - name: a
            port: /dev/ttyS0
            meters:
              - name: m1
                slave: 1
                profile: eastron-sdm120
                ranges:
                  - {start: 0xFFFF, count: 2}
                  - {start: 0, count: 0, function: coils}
        """)
    assert where(found) == [(9, "segments[0].meters[0].ranges[0].count"),
                            (10, "segments[0].meters[0].ranges[1].function"),
                            (10, "segments[0].meters[0].ranges[1].count")]


@pytest.mark.parametrize("listen", ["502", "localhost", ":502", "h:70000", "::1:502", "[::1]", "h: 1", "h:-1"])
def test_bad_listen_addresses(tmp_path, listen):
    issue = one_issue(tmp_path, MINIMAL + f"modbus_tcp:\n  listen: '{listen}'\n")
    assert (issue.line, issue.key) == (7, "modbus_tcp.listen")
    assert "host:port" in issue.message or "out of range 0..65535" in issue.message


@pytest.mark.parametrize(("listen", "host", "port"), [
    ("localhost:5020", "localhost", 5020), ("[::]:502", "::", 502), ("0.0.0.0:0", "0.0.0.0", 0)])
def test_good_listen_addresses(tmp_path, listen, host, port):
    config = load_config(write(tmp_path, MINIMAL + f"http:\n  listen: '{listen}'\n"))
    assert (config.http.host, config.http.port) == (host, port)


def test_server_section_errors(tmp_path):
    found = issues_of(tmp_path, MINIMAL + textwrap.dedent("""
        stale_after: 10s
        modbus_tcp:
          enabled: "no"
        opcua:
          endpoint: http://0.0.0.0:4840
          namespace: ""
        http: 8080
        """))
    assert where(found) == [(7, "stale_after"), (9, "modbus_tcp.enabled"), (11, "opcua.endpoint"),
                            (12, "opcua.namespace"), (13, "http")]
    assert "opc.tcp://" in found[2].message


# --- cross-entry errors -----------------------------------------------------------------


def test_duplicate_segment_names_and_shared_ports(tmp_path):
    found = issues_of(tmp_path, """
        segments:
          - name: a
            port: /dev/ttyS0
            meters: [{name: m1, slave: 1, profile: eastron-sdm120}]
          - name: a
            port: /dev/ttyS0
            meters: [{name: m2, slave: 2, profile: eastron-sdm120}]
        """)
    assert where(found) == [(5, "segments[1].name"), (6, "segments[1].port")]
    assert found[0].message == "segment name 'a' is already used (line 2)"
    assert "port '/dev/ttyS0' is already used by segment 'a' (line 3)" in found[1].message


def test_port_aliases_are_compared_by_real_path(tmp_path):
    device = tmp_path / "ttyUSB0"
    device.touch()
    (tmp_path / "by-id").symlink_to(device)
    issue = one_issue(tmp_path, f"""
        segments:
          - name: a
            port: {device}
            meters: [{{name: m1, slave: 1, profile: eastron-sdm120}}]
          - name: b
            port: {tmp_path / 'by-id'}
            meters: [{{name: m2, slave: 2, profile: eastron-sdm120}}]
        """)
    assert (issue.line, issue.key) == (6, "segments[1].port")
    assert "the same device as" in issue.message and "segment 'a' (line 3)" in issue.message


def test_duplicate_meter_names_across_segments(tmp_path):
    issue = one_issue(tmp_path, """
        segments:
          - name: a
            port: /dev/ttyS0
            meters: [{name: pump, slave: 1, profile: eastron-sdm120}]
          - name: b
            port: /dev/ttyS1
            meters:
              - {name: pump, slave: 2, profile: eastron-sdm120}
        """)
    assert (issue.line, issue.key) == (8, "segments[1].meters[0].name")
    assert issue.message == "meter name 'pump' is already used (line 4)"


def test_duplicate_slave_on_one_segment(tmp_path):
    issue = one_issue(tmp_path, """
        segments:
          - name: a
            port: /dev/ttyS0
            meters:
              - name: incomer
                slave: 3
                unit: 1
                profile: eastron-sdm120
              - name: feeder
                slave: 3
                unit: 2
                profile: eastron-sdm120
        """)
    assert (issue.line, issue.key) == (10, "segments[0].meters[1].slave")
    assert issue.message == "slave 3 is already used on this segment by meter 'incomer' (line 6)"


def test_explicit_unit_collision_across_segments(tmp_path):
    issue = one_issue(tmp_path, """
        segments:
          - name: a
            port: /dev/ttyS0
            meters:
              - name: incomer
                slave: 1
                unit: 11
                profile: eastron-sdm120
          - name: b
            port: /dev/ttyS1
            meters:
              - name: feeder
                slave: 2
                unit: 11
                profile: eastron-sdm120
        """)
    assert (issue.line, issue.key) == (14, "segments[1].meters[0].unit")
    assert issue.message == "unit 11 is already used by meter 'incomer' (line 7)"


def test_unit_defaulting_to_slave_collides_across_segments(tmp_path):
    issue = one_issue(tmp_path, """
        segments:
          - name: a
            port: /dev/ttyS0
            meters:
              - {name: incomer, slave: 1, profile: eastron-sdm120}
          - name: b
            port: /dev/ttyS1
            meters:
              - name: feeder
                profile: eastron-sdm120
                slave: 1
        """)
    # no 'unit' key: reported at the slave it was derived from, and says how to fix it
    assert (issue.line, issue.key) == (11, "segments[1].meters[0].unit")
    assert issue.message == ("unit 1 (defaulted from slave) is already used by meter 'incomer' (line 5); "
                             "set 'unit' to a free id")


def test_default_unit_colliding_with_explicit_unit(tmp_path):
    issue = one_issue(tmp_path, """
        segments:
          - name: a
            port: /dev/ttyS0
            meters:
              - {name: incomer, slave: 1, unit: 2, profile: eastron-sdm120}
              - {name: feeder, slave: 2, profile: eastron-sdm120}
        """)
    assert (issue.line, issue.key) == (6, "segments[0].meters[1].unit")
    assert "'incomer' (line 5)" in issue.message


# --- profiles referenced by the configuration -------------------------------------------


def test_unknown_builtin_profile_is_reported_at_the_meter(tmp_path):
    issue = one_issue(tmp_path, MINIMAL.replace("eastron-sdm120", "eastron-sdm-120"))
    assert (issue.line, issue.key) == (5, "segments[0].meters[0].profile")
    assert "did you mean 'eastron-sdm120'?" in issue.message


def test_missing_profile_file(tmp_path):
    issue = one_issue(tmp_path, MINIMAL.replace("eastron-sdm120", "profiles/none.yaml"))
    assert (issue.line, issue.key) == (5, "segments[0].meters[0].profile")
    assert issue.message == f"profile file not found: {tmp_path / 'profiles' / 'none.yaml'}"


def test_profile_file_errors_join_the_config_errors_once(tmp_path):
    profile_path = write(tmp_path, """
        name: broken
        measurements:
          - {name: a, address: 0, type: float32}
          - {name: b, address: 1, type: float32}
        """, name="broken.yaml")
    found = issues_of(tmp_path, """
        segments:
          - name: a
            port: /dev/ttyS0
            baudrate: -5
            meters:
              - {name: m1, slave: 1, profile: broken.yaml}
              - {name: m2, slave: 2, profile: broken.yaml}
        """)
    config_file = str(tmp_path / "bridge.yaml")
    assert [(i.file, i.line, i.key) for i in found] == [
        (config_file, 4, "segments[0].baudrate"),
        (config_file, 6, "segments[0].meters[0].profile"),
        (str(profile_path), 4, "measurements[1].address"),
    ]
    assert "profile 'broken.yaml' is invalid" in found[1].message


def test_many_errors_reported_together_in_line_order(tmp_path):
    path = write(tmp_path, """
        segments:
          - name: a
            port: /dev/ttyS0
            parity: n
            meters:
              - name: m1
                slave: 250
                profile: eastron-sdm120
                writeable: true
        stale_after: 0
        opcua:
          enabled: yes please
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    found = info.value.issues
    assert where(found) == [(4, "segments[0].parity"), (7, "segments[0].meters[0].slave"),
                            (9, "segments[0].meters[0].writeable"), (10, "stale_after"),
                            (12, "opcua.enabled")]
    assert "did you mean 'writable'?" in found[2].message
    lines = str(info.value).splitlines()
    assert len(lines) == 5 and lines[0] == f"{path}:4: segments[0].parity: unknown parity 'n'; expected one of N, E, O"


# --- the located YAML reader ------------------------------------------------------------


def test_parse_yaml_keeps_lines_and_values():
    root, issues = parse_yaml("a: 1\nb:\n  - x: 0x10\n    y: [true, 2.5]\n", "mem")
    assert issues == []
    assert plain(root) == {"a": 1, "b": [{"x": 16, "y": [True, 2.5]}]}
    assert root.key_lines == {"a": 1, "b": 2}
    item = root.value["b"].value[0]
    assert (item.line, item.key_lines["y"], item.value["y"].value[1].line) == (3, 4, 4)


def test_parse_yaml_merge_keys_and_aliases():
    root, issues = parse_yaml("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n", "mem")
    assert issues == []
    assert plain(root)["other"] == {"x": 1, "y": 3}


def test_parse_yaml_reports_unknown_tags_and_control_characters():
    _, issues = parse_yaml("a: 1\nb: !custom 2\n", "mem")
    assert [(i.line, i.key) for i in issues] == [(2, "b")]
    root, issues = parse_yaml("a: 1\nb: \x07\n", "mem")
    assert root is None and issues[0].line == 2 and issues[0].message.startswith("invalid YAML")


def test_poll_interval_not_shorter_than_stale_after_is_an_error(tmp_path):
    path = tmp_path / "bridge.yaml"
    path.write_text(
        "segments:\n"
        "  - name: a\n"
        "    port: /dev/ttyUSB0\n"
        "    meters:\n"
        "      - name: slow\n"
        "        slave: 1\n"
        "        profile: eastron-sdm120\n"
        "        poll_interval: 30\n"
        "      - {name: ok, slave: 2, profile: eastron-sdm120, poll_interval: 30, stale_after: 60}\n"
        "stale_after: 10\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    [issue] = err.value.issues
    assert (issue.line, issue.key) == (8, "segments[0].meters[0].poll_interval")
    assert "stale_after 10 s" in issue.message


def test_opcua_security_settings(tmp_path):
    good = "scrypt$16384$8$1$c2FsdA==$aGFzaA=="
    config = load_config(write(tmp_path, MINIMAL + textwrap.dedent(f"""\
        opcua:
          security: [None, Basic256Sha256_Sign]
          certificate_dir: /etc/modbus-bridge/pki
          anonymous: false
          users:
            - {{name: scada, password: "{good}"}}
        """)))
    assert config.opcua.security == ("None", "Basic256Sha256_Sign")
    assert config.opcua.certificate_dir == "/etc/modbus-bridge/pki"
    assert config.opcua.trusted_clients_dir == "/etc/modbus-bridge/pki/trusted"
    assert [(u.name, u.password_hash) for u in config.opcua.users] == [("scada", good)]
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL + textwrap.dedent("""\
            opcua:
              security: [Basic128]
              users:
                - {name: scada, password: hunter2}
            """)))
    assert [i.key for i in err.value.issues] == ["opcua.security[0]", "opcua.users[0].password"]
    assert "never a plain password" in err.value.issues[1].message


# --- state_dir: the one writable place kept between runs ---------------------------------


def test_state_dir_defaults_to_state_next_to_the_config_file(tmp_path):
    config = load_config(write(tmp_path / "site", MINIMAL))
    assert config.state_dir == str(tmp_path / "site" / "state")
    # our certificate lives there by default; trusted clients under it
    assert config.opcua.certificate_dir == str(tmp_path / "site" / "state" / "pki")
    assert config.opcua.trusted_clients_dir == str(tmp_path / "site" / "state" / "pki" / "trusted")


def test_state_dir_is_absolute_for_a_relative_config_path(tmp_path, monkeypatch):
    write(tmp_path / "site", MINIMAL)
    monkeypatch.chdir(tmp_path)
    config = load_config("site/bridge.yaml")
    assert config.state_dir == str(tmp_path / "site" / "state")
    assert config.opcua.certificate_dir == str(tmp_path / "site" / "state" / "pki")


@pytest.mark.parametrize("value", ["/var/lib/modbus-bridge", "/var/lib/modbus-bridge:/var/lib/other",
                                   ":/var/lib/modbus-bridge"])
def test_state_dir_defaults_to_systemd_state_directory(tmp_path, monkeypatch, value):
    # systemd's StateDirectory= sets it; several directories come ':'-separated, the first is ours
    monkeypatch.setenv("STATE_DIRECTORY", value)
    config = load_config(write(tmp_path, MINIMAL))
    assert config.state_dir == "/var/lib/modbus-bridge"
    assert config.opcua.certificate_dir == "/var/lib/modbus-bridge/pki"


def test_empty_state_directory_variable_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", "")
    assert load_config(write(tmp_path, MINIMAL)).state_dir == str(tmp_path / "state")


@pytest.mark.parametrize("written, expected", [
    ("var/state", "{base}/var/state"),  # relative: to the configuration file's folder
    ("../shared/state", "{parent}/shared/state"),
    ("/srv/bridge-state", "/srv/bridge-state"),
])
def test_explicit_state_dir(tmp_path, monkeypatch, written, expected):
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/modbus-bridge")  # the file wins over systemd's default
    base = tmp_path / "site"
    config = load_config(write(base, MINIMAL + f"state_dir: {written}\n"))
    assert config.state_dir == expected.format(base=base, parent=tmp_path)
    assert config.opcua.certificate_dir == str(Path(config.state_dir) / "pki")


def test_explicit_certificate_dir_stays_relative_to_the_config_file(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "state_dir: /srv/state\nopcua:\n  certificate_dir: pki\n"))
    assert config.state_dir == "/srv/state"
    assert config.opcua.certificate_dir == str(tmp_path / "pki")
    assert config.opcua.trusted_clients_dir == str(tmp_path / "pki" / "trusted")
    config = load_config(write(tmp_path, MINIMAL + "opcua:\n  trusted_clients_dir: clients\n"))
    assert config.opcua.certificate_dir == str(tmp_path / "state" / "pki")
    assert config.opcua.trusted_clients_dir == str(tmp_path / "clients")


@pytest.mark.parametrize("value, message", [
    ("42", "expected a string, got 42"),
    ("['/a', '/b']", "expected a string, got a list"),
    ("''", "must not be empty"),
    ("", "expected a string, got nothing (null)"),
])
def test_state_dir_of_the_wrong_type(tmp_path, value, message):
    path = write(tmp_path, MINIMAL + "stale_after: 10\n" + f"state_dir: {value}\n")
    issue = one_issue(tmp_path, path.read_text())
    assert (issue.line, issue.key, issue.message) == (7, "state_dir", message)
    assert str(issue) == f"{path}:7: state_dir: {message}"


def test_misspelt_state_dir_is_suggested(tmp_path):
    issue = one_issue(tmp_path, MINIMAL + "statedir: /srv/state\n")
    assert (issue.line, issue.key) == (6, "statedir")
    assert "did you mean 'state_dir'?" in issue.message


def test_config_built_in_code_has_no_state_dir():
    assert Config(segments=()).state_dir == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config(segments=()).state_dir = "/tmp"  # type: ignore[misc]


# --- bridge.state: making sure the state directory is usable -----------------------------


def test_ensure_state_dir_creates_it_with_its_parents(tmp_path):
    target = tmp_path / "var" / "lib" / "bridge"
    assert ensure_state_dir(str(target)) == target
    assert target.is_dir() and list(target.iterdir()) == []  # the write test leaves nothing behind
    for folder in (tmp_path / "var", tmp_path / "var" / "lib", target):
        assert stat.S_IMODE(folder.stat().st_mode) & ~0o750 == 0, folder  # never more than 0750
    assert ensure_state_dir(str(target)) == target  # an existing one is fine, and kept as it is
    (target / "kept").write_text("x")
    ensure_state_dir(str(target))
    assert (target / "kept").read_text() == "x"


def _refused(path: str) -> str:
    with pytest.raises(BridgeError) as info:
        ensure_state_dir(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_ensure_state_dir_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "state").write_text("not a folder")
    assert _refused(str(tmp_path / "state")) == (
        f"state_dir {tmp_path / 'state'}: not a folder (a file is in the way); set state_dir to a writable folder")
    # a file where a parent should be
    assert _refused(str(tmp_path / "state" / "sub" / "dir")) == (
        f"state_dir {tmp_path / 'state' / 'sub' / 'dir'}: cannot create ({tmp_path / 'state'} is a file, "
        "not a folder); set state_dir to a writable folder")


def test_ensure_state_dir_refuses_a_folder_it_cannot_write():
    # the tests run as root, whom permission bits do not stop: /proc refuses even root
    message = _refused("/proc")
    assert message.startswith("state_dir /proc: not writable (")
    assert message.endswith("); set state_dir to a writable folder")
    message = _refused("/proc/bridge/state")
    assert message.startswith("state_dir /proc/bridge/state: cannot create (")
    assert message.endswith("); set state_dir to a writable folder")


def test_ensure_state_dir_refuses_an_unset_state_dir():
    assert _refused("") == "state_dir is not set; set state_dir to a writable folder"


def test_state_path_names_a_place_inside_the_state_dir(tmp_path):
    assert state_path(str(tmp_path), "mqtt", "queue.db") == tmp_path / "mqtt" / "queue.db"
    assert state_path(str(tmp_path)) == tmp_path
    assert not (tmp_path / "mqtt").exists()  # naming creates nothing
    with pytest.raises(BridgeError, match="^state_dir is not set; set state_dir to a writable folder$"):
        state_path("", "energy.db")


# --- mqtt ---------------------------------------------------------------------------------

MQTT_FULL = """\
mqtt:
  brokers: [mqtt://127.0.0.1:1884, "mqtts://[::1]", MQTTS://broker.example:8884]
  client_id: panel-7
  username: bridge
  password_file: secrets/mqtt-password
  tls: {ca: pki/ca.pem, cert: pki/client.pem, key: pki/client.key}
  protocol: 3.1.1
  keepalive: 45
  queue: {max_mb: 64.5, max_age: 12h}
  sparkplug:
    group_id: site-a
    edge_node_id: panel-7
    primary_host: scada-1
    state_v22: true
    aliases: false
    deadband: {active_power: 5, voltage: 0.5, frequency: 0}
  json:
    topic: modbus-bridge/panel-7
    max_age: 2m
    homeassistant: true
    discovery_prefix: ha/discovery
"""

MQTT_FILES = ("secrets/mqtt-password", "pki/ca.pem", "pki/client.pem", "pki/client.key")


def mqtt_files(base: Path) -> None:
    for name in MQTT_FILES:
        write(base, "s3cret pass\n" if name.startswith("secrets/") else "-----BEGIN X-----\n", name=name)


def mqtt_text(body: str) -> str:
    """MINIMAL (lines 1-5), ``mqtt:`` at line 6, then ``body`` (dedented) indented under it from line 7."""
    return MINIMAL + "mqtt:\n" + textwrap.indent(textwrap.dedent(body).lstrip("\n"), "  ")


def mqtt_errors(tmp_path: Path, body: str) -> list[str]:
    """Every issue as the user reads it, with the configuration file shown as bridge.yaml."""
    return [str(i).replace(str(tmp_path / "bridge.yaml"), "bridge.yaml") for i in issues_of(tmp_path, mqtt_text(body))]


def mqtt_of(tmp_path: Path, body: str) -> MqttConfig:
    return load_config(write(tmp_path, mqtt_text(body))).mqtt


def test_mqtt_full_example_loads_exactly(tmp_path, monkeypatch):
    site = tmp_path / "site"
    mqtt_files(site)
    write(site, MINIMAL + MQTT_FULL)
    monkeypatch.chdir(tmp_path)  # files are found next to the configuration, wherever we run from
    config = load_config("site/bridge.yaml")
    assert config.mqtt == MqttConfig(
        brokers=("mqtt://127.0.0.1:1884", "mqtts://[::1]:8883", "mqtts://broker.example:8884"),
        client_id="panel-7",
        username="bridge",
        password="s3cret pass",  # read from the file at load, its newline dropped
        tls=MqttTls(ca=str(site / "pki/ca.pem"), cert=str(site / "pki/client.pem"), key=str(site / "pki/client.key")),
        protocol="3.1.1",
        keepalive=45.0,
        queue=MqttQueue(max_mb=64.5, max_age=43200.0),
        sparkplug=SparkplugConfig(group_id="site-a", edge_node_id="panel-7", primary_host="scada-1",
                                  state_v22=True, aliases=False,
                                  deadband=(("active_power", 5.0), ("voltage", 0.5), ("frequency", 0.0))),
        json=MqttJsonConfig(topic="modbus-bridge/panel-7", max_age=120.0, homeassistant=True,
                            discovery_prefix="ha/discovery"),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mqtt.client_id = "x"  # type: ignore[misc]


def test_mqtt_is_off_without_the_key(tmp_path):
    assert load_config(write(tmp_path, MINIMAL)).mqtt is None


def test_mqtt_defaults_come_from_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "panel-7")
    mqtt = mqtt_of(tmp_path, """
        brokers: [mqtt://broker]
        json: {topic: site}
        """)
    assert mqtt == MqttConfig(brokers=("mqtt://broker:1883",), client_id="modbus-bridge-panel-7",
                              json=MqttJsonConfig(topic="site"))
    assert (mqtt.username, mqtt.password, mqtt.tls, mqtt.protocol, mqtt.keepalive, mqtt.sparkplug) == (
        "", "", None, "5", 30.0, None)
    assert mqtt.queue == MqttQueue() == MqttQueue(max_mb=256.0, max_age=7 * 86400.0)
    assert (mqtt.json.max_age, mqtt.json.homeassistant, mqtt.json.discovery_prefix) == (60.0, False, "homeassistant")
    sparkplug = mqtt_of(tmp_path, """
        brokers: [mqtt://broker]
        sparkplug: {group_id: g, edge_node_id: n}
        queue:
        """)
    assert sparkplug.sparkplug == SparkplugConfig(group_id="g", edge_node_id="n", primary_host="", state_v22=False,
                                                  aliases=True, deadband=())
    assert sparkplug.queue == MqttQueue() and sparkplug.json is None


def test_mqtts_without_tls_uses_the_system_cas(tmp_path):
    mqtt = mqtt_of(tmp_path, """
        brokers: [mqtts://broker]
        json: {topic: site}
        """)
    assert (mqtt.brokers, mqtt.tls) == (("mqtts://broker:8883",), None)
    for empty in ("tls:", "tls: {}"):
        mqtt = mqtt_of(tmp_path, f"""
            brokers: [mqtt://plain, mqtts://broker]
            {empty}
            json: {{topic: site}}
            """)
        assert mqtt.tls == MqttTls(ca="", cert="", key="")  # present but empty: the system's CAs, no client cert


def test_mqtt_tls_ca_alone_and_absolute_paths(tmp_path):
    write(tmp_path, "x", name="ca.pem")
    mqtt = mqtt_of(tmp_path, f"""
        brokers: [mqtts://broker]
        tls: {{ca: {tmp_path / 'ca.pem'}}}
        json: {{topic: site}}
        """)
    assert mqtt.tls == MqttTls(ca=str(tmp_path / "ca.pem"))


@pytest.mark.parametrize(("url", "normalised"), [
    ("mqtt://broker", "mqtt://broker:1883"),
    ("mqtts://broker", "mqtts://broker:8883"),
    ("mqtt://10.0.0.5:1884", "mqtt://10.0.0.5:1884"),
    ("mqtts://broker.example.com:443", "mqtts://broker.example.com:443"),
    ("MQTT://Broker_1", "mqtt://Broker_1:1883"),
    ("mqtt://[::1]", "mqtt://[::1]:1883"),
    ("mqtts://[fe80::1%eth0]:8884", "mqtts://[fe80::1%eth0]:8884"),
])
def test_mqtt_broker_forms(tmp_path, url, normalised):
    assert mqtt_of(tmp_path, f"brokers: ['{url}']\njson: {{topic: t}}\n").brokers == (normalised,)


FORM = "expected mqtt://host[:port] or mqtts://host[:port] (an IPv6 host in brackets: mqtt://[::1]:1883)"


@pytest.mark.parametrize(("url", "message"), [
    ("broker:1883", f"{FORM}, got 'broker:1883'"),
    ("tcp://broker:1883", f"{FORM}, got 'tcp://broker:1883'"),
    ("ws://broker", f"{FORM}, got 'ws://broker'"),
    ("mqtt://", f"{FORM}, got 'mqtt://'"),
    ("mqtt://broker:", f"{FORM}, got 'mqtt://broker:'"),
    ("mqtt://broker/topic", f"{FORM}, got 'mqtt://broker/topic'"),
    ("mqtt://user:pw@broker", f"{FORM}, got 'mqtt://user:pw@broker'"),
    ("mqtt://::1:1883", f"{FORM}, got 'mqtt://::1:1883'"),
    ("mqtt://broker:0", "port 0 is out of range 1..65535 in 'mqtt://broker:0'"),
    ("mqtt://broker:65536", "port 65536 is out of range 1..65535 in 'mqtt://broker:65536'"),
    ("mqtt://[broker]:1883", "'broker' in brackets is not an IPv6 address in 'mqtt://[broker]:1883'"),
])
def test_mqtt_bad_brokers(tmp_path, url, message):
    assert mqtt_errors(tmp_path, f"""
        json: {{topic: t}}
        brokers:
          - mqtt://good
          - '{url}'
        """) == [f"bridge.yaml:10: mqtt.brokers[1]: {message}"]


def test_mqtt_broker_list_errors(tmp_path):
    assert mqtt_errors(tmp_path, "brokers: []\njson: {topic: t}\n") == [
        "bridge.yaml:7: mqtt.brokers: must list at least one broker"]
    assert mqtt_errors(tmp_path, "brokers: mqtt://broker\njson: {topic: t}\n") == [
        "bridge.yaml:7: mqtt.brokers: expected a list of brokers, got 'mqtt://broker'"]
    assert mqtt_errors(tmp_path, "brokers: [5]\njson: {topic: t}\n") == [
        f"bridge.yaml:7: mqtt.brokers[0]: {FORM}, got 5"]
    assert mqtt_errors(tmp_path, """
        brokers:
          - mqtt://broker
          - mqtt://broker:1883
        json: {topic: t}
        """) == ["bridge.yaml:9: mqtt.brokers[1]: mqtt://broker:1883 is already listed (line 8)"]


def test_parse_broker_is_a_pure_helper():
    assert parse_broker("mqtt://broker") == (False, "broker", 1883)
    assert parse_broker("mqtts://[2001:db8::7]:8884") == (True, "2001:db8::7", 8884)
    assert parse_broker("mqtts://broker:8883") == (True, "broker", 8883)
    with pytest.raises(ValueError, match=r"^expected mqtt://host\[:port\] or mqtts://host\[:port\]"):
        parse_broker("http://broker")


@pytest.mark.parametrize(("value", "seconds"), [
    (45, 45.0), (0.5, 0.5), ("45s", 45.0), ("30m", 1800.0), ("12h", 43200.0), ("7d", 604800.0), ("1.5h", 5400.0)])
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


DURATION_FORM = "expected seconds (a number) or a duration like 7d, 12h, 30m or 45s"


@pytest.mark.parametrize(("value", "message"), [
    ("7", f"{DURATION_FORM}, got '7'"),
    ("7 d", f"{DURATION_FORM}, got '7 d'"),
    ("7D", f"{DURATION_FORM}, got '7D'"),
    ("1w", f"{DURATION_FORM}, got '1w'"),
    ("1h30m", f"{DURATION_FORM}, got '1h30m'"),
    ("-5s", f"{DURATION_FORM}, got '-5s'"),
    ("", f"{DURATION_FORM}, got ''"),
    (True, f"{DURATION_FORM}, got true"),
    (None, f"{DURATION_FORM}, got nothing (null)"),
    ([1], f"{DURATION_FORM}, got a list"),
    (0, "must be a duration greater than 0, got 0"),
    ("0s", "must be a duration greater than 0, got '0s'"),
    (-1.5, "must be a duration greater than 0, got -1.5"),
    (float("inf"), "must be a duration greater than 0, got inf"),
])
def test_bad_durations(value, message):
    with pytest.raises(Invalid) as info:
        parse_duration(value)
    assert str(info.value) == message


def test_durations_in_the_file(tmp_path):
    mqtt = mqtt_of(tmp_path, """
        brokers: [mqtt://b]
        queue: {max_age: 30m}
        json: {topic: t, max_age: 90}
        """)
    assert (mqtt.queue, mqtt.json.max_age) == (MqttQueue(max_mb=256.0, max_age=1800.0), 90.0)
    assert mqtt_errors(tmp_path, """
        brokers: [mqtt://b]
        queue:
          max_mb: 0
          max_age: 1 week
        json: {topic: t, max_age: 0}
        """) == [
        "bridge.yaml:9: mqtt.queue.max_mb: must be greater than 0, got 0",
        f"bridge.yaml:10: mqtt.queue.max_age: {DURATION_FORM}, got '1 week'",
        "bridge.yaml:11: mqtt.json.max_age: must be a duration greater than 0, got 0",
    ]


def test_mqtt_password_inline_and_from_a_file(tmp_path):
    mqtt = mqtt_of(tmp_path, """
        brokers: [mqtt://b]
        username: bridge
        password: "123456"
        json: {topic: t}
        """)
    assert (mqtt.username, mqtt.password) == ("bridge", "123456")
    for content, expected in (("pw\n", "pw"), ("pw", "pw"), ("pw\r\n", "pw"), (" p w \n", " p w "), ("pässwörd\n", "pässwörd")):
        (tmp_path / "pw.txt").write_bytes(content.encode())
        mqtt = mqtt_of(tmp_path, "brokers: [mqtt://b]\nusername: u\npassword_file: pw.txt\njson: {topic: t}\n")
        assert mqtt.password == expected, content


def test_mqtt_username_alone_is_fine(tmp_path):
    mqtt = mqtt_of(tmp_path, "brokers: [mqtt://b]\nusername: u\njson: {topic: t}\n")
    assert (mqtt.username, mqtt.password) == ("u", "")


def test_mqtt_password_file_errors(tmp_path):
    pw = tmp_path / "pw.txt"
    body = "brokers: [mqtt://b]\nusername: u\npassword_file: pw.txt\njson: {topic: t}\n"
    assert mqtt_errors(tmp_path, body) == [f"bridge.yaml:9: mqtt.password_file: file not found: {pw}"]
    pw.mkdir()
    assert mqtt_errors(tmp_path, body) == [f"bridge.yaml:9: mqtt.password_file: {pw} is a folder, not a file"]
    pw.rmdir()
    for content, message in ((b"", f"{pw} is empty"), (b"\n", f"{pw} is empty"),
                             (b"one\ntwo\n", f"{pw} has more than one line; it must hold the password alone"),
                             (b"\xff\xfe", f"{pw} is not UTF-8 text"),
                             (b"a\0b", f"the password in {pw} must not contain the NUL character (U+0000)"),
                             (b"x" * 65536, f"the password in {pw} is 65536 bytes in UTF-8; MQTT allows at most 65535")):
        pw.write_bytes(content)
        assert mqtt_errors(tmp_path, body) == [f"bridge.yaml:9: mqtt.password_file: {message}"], content
    assert mqtt_errors(tmp_path, "brokers: [mqtt://b]\nusername: u\npassword_file: /dev/null\njson: {topic: t}\n") == [
        "bridge.yaml:9: mqtt.password_file: /dev/null is not a regular file"]


def test_mqtt_password_rules(tmp_path):
    write(tmp_path, "pw\n", name="pw.txt")
    assert mqtt_errors(tmp_path, "brokers: [mqtt://b]\npassword: pw\njson: {topic: t}\n") == [
        "bridge.yaml:8: mqtt.password: password needs username"]
    assert mqtt_errors(tmp_path, "brokers: [mqtt://b]\npassword_file: pw.txt\njson: {topic: t}\n") == [
        "bridge.yaml:8: mqtt.password_file: password_file needs username"]
    assert mqtt_errors(tmp_path, """
        brokers: [mqtt://b]
        username: u
        password: pw
        password_file: pw.txt
        json: {topic: t}
        """) == ["bridge.yaml:10: mqtt.password_file: give password or password_file, not both"]
    assert mqtt_errors(tmp_path, "brokers: [mqtt://b]\nusername: u\npassword: 1234\njson: {topic: t}\n") == [
        "bridge.yaml:9: mqtt.password: expected a string, got 1234"]
    assert mqtt_errors(tmp_path, "brokers: [mqtt://b]\nusername: ''\npassword: ''\njson: {topic: t}\n") == [
        "bridge.yaml:8: mqtt.username: must not be empty", "bridge.yaml:9: mqtt.password: must not be empty"]


def test_mqtt_tls_file_errors(tmp_path):
    write(tmp_path, "x", name="client.pem")
    (tmp_path / "pki").mkdir()
    assert mqtt_errors(tmp_path, """
        brokers: [mqtts://b]
        tls:
          ca: pki
          cert: client.pem
          key: client.key
        json: {topic: t}
        """) == [
        f"bridge.yaml:9: mqtt.tls.ca: {tmp_path / 'pki'} is a folder, not a file",
        f"bridge.yaml:11: mqtt.tls.key: file not found: {tmp_path / 'client.key'}",
    ]


def test_mqtt_tls_cert_and_key_go_together(tmp_path):
    write(tmp_path, "x", name="client.pem")
    write(tmp_path, "x", name="client.key")
    pairing = "the client certificate and its private key go together"
    assert mqtt_errors(tmp_path, "brokers: [mqtts://b]\ntls: {cert: client.pem}\njson: {topic: t}\n") == [
        f"bridge.yaml:8: mqtt.tls.cert: cert needs key: {pairing}"]
    assert mqtt_errors(tmp_path, """
        brokers: [mqtts://b]
        tls:
          key: client.key
        json: {topic: t}
        """) == [f"bridge.yaml:9: mqtt.tls.key: key needs cert: {pairing}"]


def test_mqtt_tls_needs_an_mqtts_broker(tmp_path):
    write(tmp_path, "x", name="ca.pem")
    assert mqtt_errors(tmp_path, """
        brokers: [mqtt://a, mqtt://b:1884]
        tls:
          ca: ca.pem
        json: {topic: t}
        """) == ["bridge.yaml:8: mqtt.tls: tls needs mqtts:// brokers"]  # the key's line, not its first entry's
    assert mqtt_errors(tmp_path, "brokers: [mqtt://a]\ntls: {ca: ''}\njson: {topic: t}\n") == [
        "bridge.yaml:8: mqtt.tls.ca: must not be empty", "bridge.yaml:8: mqtt.tls: tls needs mqtts:// brokers"]


@pytest.mark.parametrize(("written", "protocol"), [
    ("5", "5"), ("'5'", "5"), ("5.0", "5"), ("3.1.1", "3.1.1"), ("'3.1.1'", "3.1.1")])
def test_mqtt_protocol_versions(tmp_path, written, protocol):
    assert mqtt_of(tmp_path, f"brokers: [mqtt://b]\nprotocol: {written}\njson: {{topic: t}}\n").protocol == protocol


MQTT_VALUE_CASES = [
    ("protocol: 4", "mqtt.protocol", "unknown MQTT protocol version 4; expected 3.1.1 or 5"),
    ("protocol: 3.1", "mqtt.protocol", "unknown MQTT protocol version 3.1; expected 3.1.1 or 5"),
    ("protocol: v5", "mqtt.protocol", "unknown MQTT protocol version 'v5'; expected 3.1.1 or 5"),
    ("protocol: true", "mqtt.protocol", "unknown MQTT protocol version true; expected 3.1.1 or 5"),
    ("keepalive: 0", "mqtt.keepalive", "expected whole seconds 1..65535 (MQTT's keep alive), got 0"),
    ("keepalive: 2.5", "mqtt.keepalive", "expected whole seconds 1..65535 (MQTT's keep alive), got 2.5"),
    ("keepalive: 65536", "mqtt.keepalive", "expected whole seconds 1..65535 (MQTT's keep alive), got 65536"),
    ("keepalive: 30s", "mqtt.keepalive", "expected a number, got '30s'"),
    ("client_id: ''", "mqtt.client_id", "must not be empty"),
    ("client_id: 7", "mqtt.client_id", "expected a string, got 7"),
    ("client_id: panel+7", "mqtt.client_id", "'panel+7' must not contain the wildcards '+' or '#'"),
    ("client_id: 'panel#7'", "mqtt.client_id", "'panel#7' must not contain the wildcards '+' or '#'"),
    ('client_id: "a\\0b"', "mqtt.client_id", "must not contain the NUL character (U+0000)"),
    ('client_id: "a\\ud800"', "mqtt.client_id", "'a\\ud800' is not valid UTF-8 (a lone surrogate)"),
    (f"client_id: {'é' * 32768}", "mqtt.client_id", "is 65536 bytes in UTF-8; MQTT allows at most 65535"),
    ("username: [a]", "mqtt.username", "expected a string, got a list"),
    ("queue: 256", "mqtt.queue", "expected a mapping with keys max_mb, max_age, got 256"),
    ("queue: {max_mb: big}", "mqtt.queue.max_mb", "expected a number, got 'big'"),
    ("queue: {size: 5}", "mqtt.queue.size", "unknown key 'size'; expected one of: max_mb, max_age"),
    ("tls: ca.pem", "mqtt.tls", "expected a mapping with keys ca, cert, key, got 'ca.pem'"),
    ("brokerz: []", "mqtt.brokerz", "unknown key 'brokerz'; did you mean 'brokers'?"),
]


@pytest.mark.parametrize(("line", "key", "message"), MQTT_VALUE_CASES)
def test_mqtt_value_errors(tmp_path, line, key, message):
    assert mqtt_errors(tmp_path, f"brokers: [mqtts://b]\njson: {{topic: t}}\n{line}\n") == [
        f"bridge.yaml:9: {key}: {message}"]


def test_mqtt_client_id_may_be_long_and_unicode(tmp_path):
    client_id = "ü" * 40  # more than MQTT 3.1.1's guaranteed 23 characters: many brokers take it, no warning
    assert mqtt_of(tmp_path, f"brokers: [mqtt://b]\nclient_id: {client_id}\njson: {{topic: t}}\n").client_id == client_id


def test_mqtt_needs_sparkplug_or_json(tmp_path):
    assert mqtt_errors(tmp_path, """
        brokers: [mqtt://b]
        client_id: x
        """) == ["bridge.yaml:7: mqtt: mqtt needs sparkplug: or json:"]  # where the mapping starts, like a missing key
    assert mqtt_errors(tmp_path, "") == [
        "bridge.yaml:6: mqtt.brokers: missing required key 'brokers'", "bridge.yaml:6: mqtt: mqtt needs sparkplug: or json:"]
    assert [e.replace(str(tmp_path / "bridge.yaml"), "bridge.yaml") for e in map(str, issues_of(
        tmp_path, MINIMAL + "mqtt: [mqtt://b]\n"))] == [
        "bridge.yaml:6: mqtt: expected a mapping with keys brokers, client_id, username, password, password_file, "
        "tls, protocol, keepalive, queue, sparkplug, json, got a list"]


SPARKPLUG_CASES = [
    ("group_id: ''", "mqtt.sparkplug.group_id", "must not be empty"),
    ("group_id: site/a", "mqtt.sparkplug.group_id", "'site/a' is not a Sparkplug id: it must not contain '/'"),
    ("group_id: 'a+b#c'", "mqtt.sparkplug.group_id",
     "'a+b#c' is not a Sparkplug id: it must not contain '+' or '#'"),
    ("group_id: 'a+/#'", "mqtt.sparkplug.group_id",
     "'a+/#' is not a Sparkplug id: it must not contain '+', '/' or '#'"),
    ("edge_node_id: 'panel#7'", "mqtt.sparkplug.edge_node_id",
     "'panel#7' is not a Sparkplug id: it must not contain '#'"),
    ("edge_node_id: 7", "mqtt.sparkplug.edge_node_id", "expected a string, got 7"),
    ("primary_host: scada/1", "mqtt.sparkplug.primary_host", "'scada/1' is not a Sparkplug id: it must not contain '/'"),
    ("primary_host: ''", "mqtt.sparkplug.primary_host", "must not be empty"),
    ("state_v22: yes please", "mqtt.sparkplug.state_v22", "expected true or false, got 'yes please'"),
    ("state_v22: true", "mqtt.sparkplug.state_v22",
     "state_v22 describes the primary host's STATE messages; it needs primary_host"),
    ("aliases: 1", "mqtt.sparkplug.aliases", "expected true or false, got 1"),
    ("deadband: {voltage: -1}", "mqtt.sparkplug.deadband.voltage", "must be 0 or more, got -1"),
    ("deadband: {voltage: lots}", "mqtt.sparkplug.deadband.voltage", "expected a number, got 'lots'"),
    ("deadband: [voltage]", "mqtt.sparkplug.deadband",
     "expected a mapping of measurement names to deadbands, e.g. {active_power: 5}, got a list"),
    ("deadband: {1: 5}", "mqtt.sparkplug.deadband.1", "expected a measurement name, got 1"),
    ("deadband: {voltag: 1}", "mqtt.sparkplug.deadband.voltag",
     "no configured meter has a measurement 'voltag'; did you mean 'voltage'?"),
    ("deadband: {temperature: 1}", "mqtt.sparkplug.deadband.temperature",
     "no configured meter has a measurement 'temperature'"),
    ("group: x", "mqtt.sparkplug.group", "unknown key 'group'; did you mean 'group_id'?"),
]


def section_with(section: str, required: dict[str, str], line: str) -> tuple[str, int]:
    """An mqtt body with ``section`` holding its ``required`` keys and ``line`` last (replacing the key it
    sets, if required); and the line number ``line`` gets in the file (brokers at 7, the section at 8)."""
    fields = {key: f"{key}: {value}" for key, value in required.items()}
    fields.pop(line.split(":")[0], None)
    body = [*fields.values(), line]
    return f"brokers: [mqtt://b]\n{section}:\n" + "".join(f"  {entry}\n" for entry in body), 8 + len(body)


@pytest.mark.parametrize(("line", "key", "message"), SPARKPLUG_CASES)
def test_mqtt_sparkplug_errors(tmp_path, line, key, message):
    body, number = section_with("sparkplug", {"group_id": "g", "edge_node_id": "n"}, line)
    assert mqtt_errors(tmp_path, body) == [f"bridge.yaml:{number}: {key}: {message}"]


def test_mqtt_sparkplug_missing_ids_and_deadband_lines(tmp_path):
    assert mqtt_errors(tmp_path, "brokers: [mqtt://b]\nsparkplug: {primary_host: h}\n") == [
        "bridge.yaml:8: mqtt.sparkplug.group_id: missing required key 'group_id'",
        "bridge.yaml:8: mqtt.sparkplug.edge_node_id: missing required key 'edge_node_id'"]
    assert mqtt_errors(tmp_path, "brokers: [mqtt://b]\nsparkplug:\n") == [
        "bridge.yaml:8: mqtt.sparkplug: expected a mapping with keys group_id, edge_node_id, primary_host, "
        "state_v22, aliases, deadband, got nothing (null)"]
    assert mqtt_errors(tmp_path, """
        brokers: [mqtt://b]
        sparkplug:
          group_id: g
          edge_node_id: n
          deadband:
            voltage: 1
            nonsense:
              5
        """) == ["bridge.yaml:13: mqtt.sparkplug.deadband.nonsense: no configured meter has a measurement 'nonsense'"]


def test_mqtt_deadband_names_any_configured_meters_measurement(tmp_path):
    site = tmp_path / "site"
    write(site, """
        name: heat
        measurements:
          - {name: flow_temperature, address: 0, type: float32, unit: degC}
        """, name="heat.yaml")
    config = load_config(write(site, """
        segments:
          - name: a
            port: /dev/ttyS0
            meters:
              - {name: m1, slave: 1, profile: eastron-sdm120}
              - {name: m2, slave: 2, profile: heat.yaml}
        mqtt:
          brokers: [mqtt://b]
          sparkplug:
            group_id: g
            edge_node_id: n
            deadband: {flow_temperature: 0.2, active_power: 10}
        """))
    assert config.mqtt.sparkplug.deadband == (("flow_temperature", 0.2), ("active_power", 10.0))


def test_mqtt_deadband_is_not_checked_against_meters_that_failed(tmp_path):
    # the meter's profile is unknown: only that is reported, not a deadband naming its measurements
    found = issues_of(tmp_path, MINIMAL.replace("eastron-sdm120", "nope") + textwrap.dedent("""\
        mqtt:
          brokers: [mqtt://b]
          sparkplug: {group_id: g, edge_node_id: n, deadband: {voltage: 1}}
        """))
    assert where(found) == [(5, "segments[0].meters[0].profile")]


JSON_CASES = [
    ("topic: ''", "mqtt.json.topic", "must not be empty"),
    ("topic: 5", "mqtt.json.topic", "expected a string, got 5"),
    ("topic: site/+/x", "mqtt.json.topic", "'site/+/x' must not contain the wildcard '+'"),
    ("topic: 'site/#'", "mqtt.json.topic", "'site/#' must not contain the wildcard '#'"),
    ("topic: 'a+#'", "mqtt.json.topic", "'a+#' must not contain the wildcard '+' or '#'"),
    ("topic: /site", "mqtt.json.topic", "'/site' must not start or end with '/'"),
    ("topic: site/", "mqtt.json.topic", "'site/' must not start or end with '/'"),
    ("topic: site//panel", "mqtt.json.topic", "'site//panel' must not have an empty level ('//')"),
    ("topic: $SYS/x", "mqtt.json.topic", "'$SYS/x' must not start with '$' (the broker's own topics)"),
    ("homeassistant: 1", "mqtt.json.homeassistant", "expected true or false, got 1"),
    ("discovery_prefix: ha", "mqtt.json.discovery_prefix", "discovery_prefix is used only with homeassistant: true"),
    ("max_age: -1", "mqtt.json.max_age", "must be a duration greater than 0, got -1"),
    ("retain: true", "mqtt.json.retain", "unknown key 'retain'; expected one of: topic, max_age, homeassistant, "
                                         "discovery_prefix"),
]


@pytest.mark.parametrize(("line", "key", "message"), JSON_CASES)
def test_mqtt_json_errors(tmp_path, line, key, message):
    body, number = section_with("json", {"topic": "site"}, line)
    assert mqtt_errors(tmp_path, body) == [f"bridge.yaml:{number}: {key}: {message}"]


def test_section_helper_puts_the_line_where_it_says():
    body, number = section_with("json", {"topic": "site"}, "max_age: 5")
    assert mqtt_text(body).lstrip("\n").splitlines()[number - 1].strip() == "max_age: 5"
    body, number = section_with("sparkplug", {"group_id": "g", "edge_node_id": "n"}, "group_id: x")
    assert mqtt_text(body).lstrip("\n").splitlines()[number - 1].strip() == "group_id: x"


def test_mqtt_json_discovery_prefix_is_a_topic(tmp_path):
    assert mqtt_errors(tmp_path, """
        brokers: [mqtt://b]
        json: {topic: site, homeassistant: true, discovery_prefix: ha/}
        """) == ["bridge.yaml:8: mqtt.json.discovery_prefix: 'ha/' must not start or end with '/'"]
    assert mqtt_errors(tmp_path, "brokers: [mqtt://b]\njson:\n") == [
        "bridge.yaml:8: mqtt.json: expected a mapping with keys topic, max_age, homeassistant, discovery_prefix, "
        "got nothing (null)"]
    assert mqtt_errors(tmp_path, "brokers: [mqtt://b]\njson: {max_age: 5}\n") == [
        "bridge.yaml:8: mqtt.json.topic: missing required key 'topic'"]


def test_a_meter_named_status_would_take_the_json_status_topic(tmp_path):
    found = issues_of(tmp_path, MINIMAL.replace("name: m1", "name: status") + textwrap.dedent("""\
        mqtt:
          brokers: [mqtt://b]
          json: {topic: site/panel}
        """))
    assert [str(i) for i in found] == [
        f"{tmp_path / 'bridge.yaml'}:8: mqtt.json.topic: meter 'status' (line 5) would publish on site/panel/status, "
        "the bridge's online/offline topic; rename the meter"]
    # Sparkplug alone has no such topic
    config = load_config(write(tmp_path, MINIMAL.replace("name: m1", "name: status") + textwrap.dedent("""\
        mqtt:
          brokers: [mqtt://b]
          sparkplug: {group_id: g, edge_node_id: n}
        """)))
    assert config.mqtt.sparkplug is not None


@pytest.mark.parametrize("name", ["a/b", "a+b", "a#b", "a b"])
def test_meter_names_cannot_hold_topic_separators_or_wildcards(tmp_path, name):
    # meter names are Sparkplug device ids and JSON topic levels: the name rule already keeps '/', '+', '#' out
    issue = one_issue(tmp_path, MINIMAL.replace("name: m1", f"name: '{name}'"))
    assert (issue.line, issue.key) == (5, "segments[0].meters[0].name")
    assert issue.message == f"{name!r} is not allowed: use letters, digits, '-' and '_'"


def test_mqtt_errors_come_with_the_others_in_line_order(tmp_path):
    found = issues_of(tmp_path, MINIMAL.replace("slave: 7", "slave: 0") + textwrap.dedent("""\
        mqtt:
          brokers: [tcp://b]
          keepalive: 0
          sparkplug: {group_id: g/h, edge_node_id: n}
        """))
    assert where(found) == [(5, "segments[0].meters[0].slave"), (7, "mqtt.brokers[0]"), (8, "mqtt.keepalive"),
                            (9, "mqtt.sparkplug.group_id")]


def test_summary_describes_mqtt(tmp_path, monkeypatch):
    assert "mqtt: off" in summary(load_config(write(tmp_path, MINIMAL)))
    mqtt_files(tmp_path)
    text = summary(load_config(write(tmp_path, MINIMAL + MQTT_FULL)))
    assert ("mqtt: mqtt://127.0.0.1:1884, mqtts://[::1]:8883, mqtts://broker.example:8884 as panel-7 (MQTT 3.1.1); "
            "sparkplug group site-a, edge node panel-7, primary host scada-1; "
            "json modbus-bridge/panel-7/<meter>, home assistant discovery under ha/discovery/") in text.splitlines()
    monkeypatch.setattr("socket.gethostname", lambda: "box")
    text = summary(load_config(write(tmp_path, mqtt_text("brokers: [mqtt://b]\nsparkplug: {group_id: g, edge_node_id: n}\n"))))
    assert "mqtt: mqtt://b:1883 as modbus-bridge-box (MQTT 5); sparkplug group g, edge node n" in text.splitlines()
    assert "s3cret" not in text
