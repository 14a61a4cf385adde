"""Configuration loading: the frozen objects it yields and every issue it reports, with its line."""
from __future__ import annotations

import dataclasses
import stat
import textwrap
from pathlib import Path

import pytest
from support import write

from bridge.core.codec import Function
from bridge.config.loader import load_config, summary
from bridge.core.errors import BridgeError, ConfigError, ConfigIssue
from bridge.core.model import Config, HttpConfig, ModbusTcpConfig, OpcUaConfig
from bridge.config.profiles import get_builtin
from bridge.config.yamlsource import parse_yaml, plain
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
