"""Meter profiles: the built-in ones, and the validator every profile file goes through."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
from support import write as write_file

from bridge.core.codec import DataType, Function, WordOrder
from bridge.core.errors import ConfigError, ConfigIssue
from bridge.config.profiles import (
    UnknownProfile,
    builtin_profile_names,
    get_builtin,
    load_profile,
    resolve_profile,
    validate_profile_data,
)
from bridge.config.yamlsource import parse_yaml


write = partial(write_file, name="meter.yaml")  # a profile file, not a bridge configuration


def issues_of(tmp_path: Path, text: str) -> list[ConfigIssue]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert all(i.file == str(path) for i in info.value.issues)
    return info.value.issues


def one_issue(tmp_path: Path, text: str) -> ConfigIssue:
    found = issues_of(tmp_path, text)
    assert len(found) == 1, [str(i) for i in found]
    return found[0]


# --- built-in profiles ------------------------------------------------------------------

SDM120_MAP = {  # METER_MAPS.md, Eastron SDM120: FC4, float32 ABCD
    "voltage": (0x0000, "V"),
    "current": (0x0006, "A"),
    "active_power": (0x000C, "W"),
    "apparent_power": (0x0012, "VA"),
    "reactive_power": (0x0018, "var"),
    "power_factor": (0x001E, ""),
    "phase_angle": (0x0024, "deg"),
    "frequency": (0x0046, "Hz"),
    "import_active_energy": (0x0048, "kWh"),
    "export_active_energy": (0x004A, "kWh"),
    "import_reactive_energy": (0x004C, "kvarh"),
    "export_reactive_energy": (0x004E, "kvarh"),
    "total_active_energy": (0x0156, "kWh"),
    "total_reactive_energy": (0x0158, "kvarh"),
}


def test_builtin_names_list_the_shipped_profiles():
    names = builtin_profile_names()
    assert {"eastron-sdm120", "eastron-sdm630"} <= set(names)
    assert names == sorted(names)


def test_every_builtin_profile_loads_and_is_named_like_its_file():
    for name in builtin_profile_names():
        profile = get_builtin(name)
        assert profile.name == name
        assert profile.source == "builtin"
        assert profile.measurements
        assert profile.description


def test_sdm120_has_exactly_the_14_mapped_input_registers():
    profile = get_builtin("eastron-sdm120")
    got = {m.name: (m.address, m.unit) for m in profile.measurements}
    assert got == SDM120_MAP
    assert len(profile.measurements) == 14
    for m in profile.measurements:
        assert (m.dtype, m.function, m.word_order, m.scale) == (
            DataType.FLOAT32, Function.INPUT, WordOrder.BIG, 1.0)
    assert profile.ranges == ()
    assert profile.max_read == 80 and profile.read_gaps is True  # Eastron: 40 parameters per request
    assert "2400" in profile.description and "9600" in profile.description


def test_sdm630_follows_the_meter_map_names_and_addresses():
    profile = get_builtin("eastron-sdm630")
    by_name = {m.name: m for m in profile.measurements}
    assert len(profile.measurements) == 42
    expected = {
        "voltage_l1": 0x0000, "voltage_l3": 0x0004, "current_l2": 0x0008,
        "phase_angle_l3": 0x0028, "active_power": 0x0034, "apparent_power": 0x0038,
        "reactive_power": 0x003C, "power_factor": 0x003E, "frequency": 0x0046,
        "voltage_l1_l2": 0x00C8, "voltage_l3_l1": 0x00CC, "neutral_current": 0x00E0,
        "total_active_energy": 0x0156, "import_active_energy_l1": 0x015A,
        "export_active_energy_l3": 0x0164,
    }
    assert {n: by_name[n].address for n in expected} == expected
    assert by_name["power_factor_l1"].unit == ""
    assert all(m.function is Function.INPUT and m.dtype is DataType.FLOAT32 for m in profile.measurements)


def test_get_builtin_unknown_name_suggests_the_close_one():
    with pytest.raises(UnknownProfile, match="did you mean 'eastron-sdm120'"):
        get_builtin("eastron-sdm12")


# --- loading a profile file -------------------------------------------------------------


def test_profile_file_defaults_inheritance_and_overrides(tmp_path):
    path = write(tmp_path, """
        name: test-meter
        measurements:
          - {name: voltage, address: 0x0046, type: uint16, unit: V, scale: 0.1}
          - {name: energy, address: 0x10, type: uint32, function: holding, word_order: little, scale: 2}
        ranges:
          - {start: 0, count: 8}
          - {function: holding, start: 0x100, count: 4}
        """)
    profile = load_profile(path)
    assert profile.name == "test-meter"
    assert profile.description == ""
    assert profile.function is Function.INPUT and profile.word_order is WordOrder.BIG
    assert profile.max_read == 125 and profile.read_gaps is True
    assert profile.source == str(path)
    voltage, energy = profile.measurements
    assert (voltage.address, voltage.dtype, voltage.function, voltage.word_order) == (
        0x46, DataType.UINT16, Function.INPUT, WordOrder.BIG)
    assert voltage.scale == pytest.approx(0.1)
    assert (energy.function, energy.word_order, energy.scale, energy.unit) == (
        Function.HOLDING, WordOrder.LITTLE, 2.0, "")
    assert isinstance(energy.scale, float)
    assert [(r.function, r.start, r.count) for r in profile.ranges] == [
        (Function.INPUT, 0, 8), (Function.HOLDING, 0x100, 4)]


def test_profile_level_function_and_read_settings(tmp_path):
    profile = load_profile(write(tmp_path, """
        name: abb
        description: holding registers
        function: holding
        word_order: little
        max_registers_per_read: 60
        read_gaps: false
        measurements:
          - {name: frequency, address: 0x5B2C, type: uint16, unit: Hz}
        ranges:
          - {start: 0x5B00, count: 2}
        """))
    assert profile.function is Function.HOLDING and profile.word_order is WordOrder.LITTLE
    assert profile.measurements[0].function is Function.HOLDING
    assert profile.measurements[0].word_order is WordOrder.LITTLE
    assert profile.ranges[0].function is Function.HOLDING  # a range inherits the profile's table
    assert (profile.max_read, profile.read_gaps) == (60, False)


def test_same_address_in_different_tables_is_not_an_overlap(tmp_path):
    profile = load_profile(write(tmp_path, """
        name: two-tables
        measurements:
          - {name: a, address: 0, type: float32}
          - {name: b, address: 0, type: float32, function: holding}
        """))
    assert len(profile.measurements) == 2


# --- validation errors ------------------------------------------------------------------


def test_overlapping_registers_are_reported_at_the_later_measurement(tmp_path):
    issue = one_issue(tmp_path, """
        name: x
        measurements:
          - {name: voltage, address: 0, type: float32}
          - {name: current, address: 6, type: float32}
          - {name: power, address: 1, type: uint16}
        """)
    assert (issue.line, issue.key) == (5, "measurements[2].address")
    assert "'voltage'" in issue.message and "line 3" in issue.message and "0x0001" in issue.message


def test_wide_type_overlapping_the_next_register(tmp_path):
    issue = one_issue(tmp_path, """
        name: x
        measurements:
          - {name: a, address: 10, type: uint16}
          - {name: b, address: 7, type: float64}
        """)
    assert (issue.line, issue.key) == (4, "measurements[1].address")
    assert "0x0007..0x000A" in issue.message


def test_duplicate_measurement_name_at_the_duplicate_line(tmp_path):
    issue = one_issue(tmp_path, """
        name: x
        measurements:
          - {name: voltage, address: 0, type: float32}
          - {name: current, address: 2, type: float32}
          - {name: voltage, address: 4, type: float32}
        """)
    assert (issue.line, issue.key) == (5, "measurements[2].name")
    assert "duplicate measurement name 'voltage'" in issue.message and "line 3" in issue.message


def test_unknown_type(tmp_path):
    issue = one_issue(tmp_path, """
        name: x
        measurements:
          - name: voltage
            address: 0
            type: float
        """)
    assert (issue.line, issue.key) == (5, "measurements[0].type")
    assert "unknown type 'float'" in issue.message and "float32" in issue.message


def test_unknown_key_with_suggestion(tmp_path):
    found = issues_of(tmp_path, """
        name: x
        measurements:
          - {name: voltage, adress: 0, type: float32}
        """)
    by_key = {i.key: i for i in found}
    assert by_key["measurements[0].adress"].line == 3
    assert "did you mean 'address'?" in by_key["measurements[0].adress"].message
    missing = by_key["measurements[0].address"]  # the misspelt key leaves address missing
    assert missing.line == 3 and "missing required key 'address'" in missing.message


def test_unknown_top_level_key_without_close_match_lists_the_keys(tmp_path):
    issue = one_issue(tmp_path, """
        name: x
        colour: red
        measurements:
          - {name: voltage, address: 0, type: float32}
        """)
    assert (issue.line, issue.key) == (2, "colour")
    assert "unknown key 'colour'" in issue.message and "max_registers_per_read" in issue.message


def test_missing_required_keys_are_reported_at_the_mapping_line(tmp_path):
    found = issues_of(tmp_path, """
        description: nothing else
        """)
    assert {(i.line, i.key) for i in found} == {(1, "name"), (1, "measurements")}
    found = issues_of(tmp_path, """
        name: x
        measurements:
          - {name: voltage}
        """)
    assert {(i.line, i.key) for i in found} == {
        (3, "measurements[0].address"), (3, "measurements[0].type")}


def test_empty_measurement_list(tmp_path):
    issue = one_issue(tmp_path, """
        name: x
        measurements: []
        """)
    assert (issue.line, issue.key) == (2, "measurements")
    assert "at least one measurement" in issue.message


def test_names_must_be_lower_snake_case(tmp_path):
    found = issues_of(tmp_path, """
        name: x
        measurements:
          - {name: Voltage, address: 0, type: float32}
          - {name: active-power, address: 2, type: float32}
          - {name: l1__current, address: 4, type: float32}
        """)
    assert [(i.line, i.key) for i in found] == [
        (3, "measurements[0].name"), (4, "measurements[1].name"), (5, "measurements[2].name")]
    assert all("lower_snake_case" in i.message for i in found)


def test_bad_function_and_word_order(tmp_path):
    found = issues_of(tmp_path, """
        name: x
        function: coils
        measurements:
          - {name: a, address: 0, type: float32, word_order: middle}
          - {name: b, address: 2, type: float32, function: 3}
        """)
    assert [(i.line, i.key) for i in found] == [
        (2, "function"), (4, "measurements[0].word_order"), (5, "measurements[1].function")]
    assert "unknown function 'coils'; expected one of input, holding" == found[0].message


def test_wrong_types_are_reported(tmp_path):
    found = issues_of(tmp_path, """
        name: x
        read_gaps: "no"
        measurements:
          - {name: a, address: true, type: float32}
          - {name: b, address: "2", type: float32, scale: abc}
          - {name: c, address: 4, type: float32, unit: 5}
        """)
    assert [(i.line, i.key) for i in found] == [
        (2, "read_gaps"), (4, "measurements[0].address"), (5, "measurements[1].address"),
        (5, "measurements[1].scale"), (6, "measurements[2].unit")]
    assert found[1].message == "expected an integer, got true"


def test_addresses_must_fit_the_register_table(tmp_path):
    found = issues_of(tmp_path, """
        name: x
        measurements:
          - {name: a, address: 0x10000, type: uint16}
          - {name: b, address: 0xFFFF, type: uint16}
          - {name: c, address: 0xFFFE, type: float32, function: holding}
          - {name: d, address: 0xFFFD, type: float64}
        """)
    assert [(i.line, i.key) for i in found] == [(3, "measurements[0].address"), (6, "measurements[3].address")]
    assert "65536 is out of range 0..65535" in found[0].message
    assert "runs past the last address" in found[1].message


def test_range_counts_must_fit(tmp_path):
    found = issues_of(tmp_path, """
        name: x
        measurements:
          - {name: a, address: 0, type: uint16}
        ranges:
          - {start: 0, count: 0}
          - {start: 0, count: 65536}
          - {start: 0xFFF0, count: 17}
          - {start: 0xFFF0, count: 16}
        """)
    assert [(i.line, i.key) for i in found] == [
        (5, "ranges[0].count"), (6, "ranges[1].count"), (7, "ranges[2].count")]


def test_max_registers_per_read_must_hold_the_widest_measurement(tmp_path):
    issue = one_issue(tmp_path, """
        name: x
        max_registers_per_read: 2
        measurements:
          - {name: a, address: 0, type: float32}
          - {name: energy, address: 2, type: uint64}
        """)
    assert (issue.line, issue.key) == (2, "max_registers_per_read")
    assert "'energy'" in issue.message and "4 registers" in issue.message
    issue = one_issue(tmp_path, """
        name: x
        max_registers_per_read: 126
        measurements:
          - {name: a, address: 0, type: float32}
        """)
    assert (issue.line, issue.key) == (2, "max_registers_per_read")


def test_all_profile_errors_come_together(tmp_path):
    found = issues_of(tmp_path, """
        name: bad name
        measurements:
          - {name: a, address: 0, type: float32}
          - {name: a, address: 1, type: float32}
          - {name: b, address: 9, type: double}
        """)
    assert [(i.line, i.key) for i in found] == [
        (1, "name"), (4, "measurements[1].name"), (4, "measurements[1].address"), (5, "measurements[2].type")]


def test_malformed_profile_yaml(tmp_path):
    issue = one_issue(tmp_path, """
        name: x
        measurements:
          - {name: a, address: 0, type: float32
          - {name: b, address: 2, type: float32}
        """)
    assert issue.line == 4
    assert issue.message.startswith("invalid YAML:")


def test_validate_profile_data_directly():
    root, issues = parse_yaml("name: p\nmeasurements:\n  - {name: a, address: 1, type: int16}\n", "mem")
    assert issues == []
    profile = validate_profile_data(root, "mem", source="somewhere")
    assert profile.measurements[0].dtype is DataType.INT16 and profile.source == "somewhere"
    with pytest.raises(ConfigError) as info:
        validate_profile_data(parse_yaml("- a\n", "mem")[0], "mem")
    assert info.value.issues[0].line == 1 and "expected a mapping" in info.value.issues[0].message


# --- resolving a profile reference ------------------------------------------------------


def test_resolve_builtin_and_relative_file(tmp_path):
    assert resolve_profile("eastron-sdm120", tmp_path) is get_builtin("eastron-sdm120")
    path = write(tmp_path, """
        name: custom
        measurements:
          - {name: voltage, address: 0, type: float32}
        """, name="profiles/custom.yaml")
    profile = resolve_profile("profiles/custom.yaml", tmp_path)
    assert profile.name == "custom" and profile.source == str(path)
    assert resolve_profile(str(path), Path("/nonexistent")).name == "custom"  # absolute paths ignore the base


def test_resolve_unknown_reference(tmp_path):
    with pytest.raises(UnknownProfile, match="unknown profile 'sdm120'.*eastron-sdm120"):
        resolve_profile("sdm120", tmp_path)
    with pytest.raises(UnknownProfile, match="profile file not found: .*missing.yaml"):
        resolve_profile("missing.yaml", tmp_path)


def test_measurement_range_is_optional_and_checked(tmp_path):
    path = tmp_path / "ranged.yaml"
    path.write_text(
        "name: ranged\n"
        "measurements:\n"
        "  - {name: power_factor, address: 0, type: float32, range: [-1, 1]}\n"
        "  - {name: frequency, address: 2, type: float32}\n"
    )
    pf, freq = load_profile(path).measurements
    assert pf.eu_range == (-1.0, 1.0) and freq.eu_range is None
    path.write_text(
        "name: ranged\n"
        "measurements:\n"
        "  - {name: power_factor, address: 0, type: float32, range: [1, -1]}\n"
        "  - {name: frequency, address: 2, type: float32, range: 50}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    assert [(i.line, i.key) for i in err.value.issues] == [
        (3, "measurements[0].range"), (4, "measurements[1].range")]
