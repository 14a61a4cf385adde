"""The built-in profile library: every shipped profile is valid, uses the common names and
units, survives a real poll over a pty, and matches the register maps it was written from
(/work/shared/METER_MAPS.md, with the choices each profile's description explains)."""
from __future__ import annotations

import asyncio
import math
import re
import struct

import pytest

from bridge.core import codec
from bridge.core.codec import DataType, Function, WordOrder
from bridge.config.profiles import builtin_profile_names, get_builtin
from bridge.testing import MeterSpec, running_bridge

NEW_PROFILES = {
    "eastron-sdm230", "eastron-sdm72d", "chint-ddsu666", "chint-dtsu666", "abb-b2x",
    "carlo-gavazzi-em24", "carlo-gavazzi-em3x0", "schneider-iem3000", "orno-we-514",
    "orno-we-517", "finder-7m24", "finder-7m38", "janitza-umg96rm-e",
}
EXISTING_PROFILES = {"eastron-sdm120", "eastron-sdm630"}

# The measurement names a built-in profile may use, kept explicit on purpose: a new name
# means a new shared quantity, which docs/profiles.md (and this list) must name first.
_PHASE = r"(?:_l[123])?"
ALLOWED_NAME_PATTERNS = [
    # the common measurement names (docs/profiles.md), and their per-phase forms
    rf"voltage{_PHASE}",
    rf"current{_PHASE}",
    rf"active_power{_PHASE}",
    rf"reactive_power{_PHASE}",
    rf"apparent_power{_PHASE}",
    rf"power_factor{_PHASE}",
    rf"frequency{_PHASE}",
    rf"import_active_energy{_PHASE}",
    rf"export_active_energy{_PHASE}",
    rf"total_active_energy{_PHASE}",
    rf"total_reactive_energy{_PHASE}",
    # line-to-line voltages
    r"voltage_l1_l2", r"voltage_l2_l3", r"voltage_l3_l1",
    r"neutral_current",
    rf"phase_angle{_PHASE}",
    rf"import_reactive_energy{_PHASE}",
    rf"export_reactive_energy{_PHASE}",
    # Eastron SDM72D: total import / export active power
    r"import_power", r"export_power",
]
ALLOWED_UNITS = {"V", "A", "W", "var", "VA", "Hz", "kWh", "kvarh", "deg", ""}

# the unit each kind of quantity must carry (so a forgotten kW -> W scale shows up)
UNIT_BY_STEM = [
    (r"voltage(_l\d)*", "V"),
    (r"(neutral_)?current(_l\d)?", "A"),
    (r"active_power(_l\d)?|import_power|export_power", "W"),
    (r"reactive_power(_l\d)?", "var"),
    (r"apparent_power(_l\d)?", "VA"),
    (r"power_factor(_l\d)?", ""),
    (r"frequency(_l\d)?", "Hz"),
    (r"phase_angle(_l\d)?", "deg"),
    (r"(import|export|total)_active_energy(_l\d)?", "kWh"),
    (r"(import|export|total)_reactive_energy(_l\d)?", "kvarh"),
]
PHYSICAL_RANGES = {"power_factor": (-1.0, 1.0), "frequency": (45.0, 65.0)}


def _stem(name: str) -> str:
    return re.sub(r"_l[123]$", "", name)


# --- 1. every built-in profile is valid and speaks the common vocabulary -----------------


def test_library_has_the_new_profiles():
    names = set(builtin_profile_names())
    assert NEW_PROFILES | EXISTING_PROFILES <= names
    assert len(names) >= 15


@pytest.mark.parametrize("name", builtin_profile_names())
def test_builtin_profile_is_valid_and_uses_common_names_and_units(name):
    profile = get_builtin(name)  # loads and validates (overlaps, types, ranges ...)
    assert profile.name == name and profile.source == "builtin"
    assert profile.measurements
    assert profile.description.strip()
    fc = "FC3" if profile.function is Function.HOLDING else "FC4"
    assert fc in profile.description, f"{name}: the description should say {fc}"
    allowed = re.compile("|".join(f"(?:{p})" for p in ALLOWED_NAME_PATTERNS))
    for m in profile.measurements:
        assert allowed.fullmatch(m.name), f"{name}: '{m.name}' is not a common measurement name"
        assert m.unit in ALLOWED_UNITS, f"{name}: {m.name} has unit {m.unit!r}"
        expected = next(unit for pattern, unit in UNIT_BY_STEM if re.fullmatch(pattern, m.name))
        assert m.unit == expected, f"{name}: {m.name} should be in {expected!r}, not {m.unit!r}"
        assert m.scale != 0 and math.isfinite(m.scale)
        if m.eu_range is not None:
            assert PHYSICAL_RANGES.get(_stem(m.name)) == m.eu_range, (
                f"{name}: {m.name} range {m.eu_range} is not a physical fact")


def test_every_new_profile_states_the_serial_settings_and_word_order():
    for name in NEW_PROFILES:
        text = get_builtin(name).description
        assert re.search(r"baud|serial settings", text, re.I), name
        assert re.search(r"word first|CDAB|ABCD", text), name


# --- 2. round trip: simulated meter -> real bridge over a pty -> image -> decode ------------


def _raw_value(i: int, m) -> int | float:
    """A distinct, exactly representable raw value for the i-th measurement of a profile;
    negative for every other one where the type is signed."""
    k = i + 1
    sign = -1 if (k % 2 == 0 and m.dtype.value[0] in "if") else 1  # int* and float*
    if m.dtype.is_float:
        return sign * (k * 1.5 + 0.25)
    if m.dtype.registers == 1:
        return sign * (100 + 7 * k)  # fits int16
    if m.dtype.registers == 2:
        return sign * (70_000 + 65_539 * k)  # both words non-zero, and distinct
    return sign * ((1 << 40) + k * ((1 << 33) + 12_345))


def _layout() -> dict[str, list[MeterSpec]]:
    """One simulated meter per built-in profile, spread over three pty segments."""
    names = builtin_profile_names()
    layout: dict[str, list[MeterSpec]] = {}
    for n, name in enumerate(names):
        segment = f"seg{n % 3}"
        specs = layout.setdefault(segment, [])
        specs.append(MeterSpec(name, slave=len(specs) + 1, unit=10 + n, profile=name, poll_interval=0.05))
    return layout


async def test_every_profile_round_trips_through_a_real_bridge():
    async with running_bridge(_layout()) as h:
        targets: dict[str, dict[str, float]] = {}
        for name, sim in h.sims.items():
            values = {}
            for i, m in enumerate(sim.profile.measurements):
                values[m.name] = _raw_value(i, m) * m.scale
                sim.set_value(m.name, values[m.name])
            targets[name] = values
        await asyncio.gather(*(h.polls(name, 2) for name in h.sims))

        for name, sim in h.sims.items():
            unit = h.meters[name].unit
            raws = []
            for m in sim.profile.measurements:
                data = h.app.image.value_registers(unit, m.function, m.address, m.count)
                assert data is not None and len(data) == 2 * m.count, (name, m.name)
                raw = codec.decode(codec.bytes_to_registers(data), m.dtype, m.word_order)
                raws.append(raw)
                got = raw * m.scale
                want = sim.value(m.name)
                assert got == want, f"{name}.{m.name}: image {got} != simulator {want}"
                if m.dtype.is_float:
                    assert got == pytest.approx(targets[name][m.name], rel=2e-7), (name, m.name)
                else:
                    assert isinstance(raw, int)
                    assert got == targets[name][m.name], (name, m.name)
            assert len(set(raws)) == len(raws), f"{name}: round-trip values are not distinct"


# --- 3. spot checks against METER_MAPS.md ---------------------------------------------------

H, I = Function.HOLDING, Function.INPUT
BIG, LITTLE = WordOrder.BIG, WordOrder.LITTLE
F32, U16, I16, U32, I32, U64 = (DataType.FLOAT32, DataType.UINT16, DataType.INT16,
                                DataType.UINT32, DataType.INT32, DataType.UINT64)

# (profile, measurement): (function, address, type, word order, scale, unit)
SPOT_CHECKS = {
    ("eastron-sdm230", "voltage"): (I, 0x0000, F32, BIG, 1, "V"),
    ("eastron-sdm230", "total_reactive_energy"): (I, 0x0158, F32, BIG, 1, "kvarh"),
    ("eastron-sdm72d", "active_power"): (I, 0x0034, F32, BIG, 1, "W"),
    ("eastron-sdm72d", "import_power"): (I, 0x0500, F32, BIG, 1, "W"),
    ("eastron-sdm72d", "export_power"): (I, 0x0502, F32, BIG, 1, "W"),
    ("chint-ddsu666", "active_power"): (H, 0x2004, F32, BIG, 1000, "W"),
    ("chint-ddsu666", "import_active_energy"): (H, 0x4000, F32, BIG, 1, "kWh"),
    ("chint-ddsu666", "export_active_energy"): (H, 0x400A, F32, BIG, 1, "kWh"),
    ("chint-dtsu666", "voltage_l1_l2"): (H, 0x2000, F32, BIG, 0.1, "V"),
    ("chint-dtsu666", "voltage_l1"): (H, 0x2006, F32, BIG, 0.1, "V"),
    ("chint-dtsu666", "current_l3"): (H, 0x2010, F32, BIG, 0.001, "A"),
    ("chint-dtsu666", "frequency"): (H, 0x2044, F32, BIG, 0.01, "Hz"),
    ("chint-dtsu666", "import_active_energy"): (H, 0x101E, F32, BIG, 1, "kWh"),
    ("abb-b2x", "import_active_energy"): (H, 0x5000, U64, BIG, 0.01, "kWh"),
    ("abb-b2x", "export_active_energy_l3"): (H, 0x5474, U64, BIG, 0.01, "kWh"),
    ("abb-b2x", "voltage_l2"): (H, 0x5B02, U32, BIG, 0.1, "V"),
    ("abb-b2x", "active_power"): (H, 0x5B14, I32, BIG, 0.01, "W"),
    ("abb-b2x", "frequency"): (H, 0x5B2C, U16, BIG, 0.01, "Hz"),
    ("abb-b2x", "power_factor_l1"): (H, 0x5B3B, I16, BIG, 0.001, ""),
    ("carlo-gavazzi-em24", "voltage_l1"): (I, 0x0000, I32, LITTLE, 0.1, "V"),
    ("carlo-gavazzi-em24", "current_l2"): (I, 0x000E, I32, LITTLE, 0.001, "A"),
    ("carlo-gavazzi-em24", "power_factor"): (I, 0x0035, I16, LITTLE, 0.001, ""),
    ("carlo-gavazzi-em24", "frequency"): (I, 0x0037, I16, LITTLE, 0.1, "Hz"),
    ("carlo-gavazzi-em24", "export_active_energy"): (I, 0x005C, I32, LITTLE, 0.1, "kWh"),
    ("carlo-gavazzi-em3x0", "active_power"): (I, 0x0028, I32, LITTLE, 0.1, "W"),
    ("carlo-gavazzi-em3x0", "frequency"): (I, 0x0033, I16, LITTLE, 0.1, "Hz"),
    ("carlo-gavazzi-em3x0", "import_active_energy"): (I, 0x0034, I32, LITTLE, 0.1, "kWh"),
    ("carlo-gavazzi-em3x0", "export_reactive_energy"): (I, 0x0050, I32, LITTLE, 0.1, "kvarh"),
    ("schneider-iem3000", "active_power"): (H, 0x5012, F32, BIG, 1000, "W"),
    ("schneider-iem3000", "apparent_power_l3"): (H, 0x5028, F32, BIG, 1000, "VA"),
    ("schneider-iem3000", "import_active_energy"): (H, 0x600C, F32, BIG, 1, "kWh"),
    ("schneider-iem3000", "total_reactive_energy"): (H, 0x6024, F32, BIG, 1, "kvarh"),
    ("orno-we-514", "voltage"): (H, 0x0131, U16, BIG, 0.01, "V"),
    ("orno-we-514", "current"): (H, 0x0139, U32, BIG, 0.001, "A"),
    ("orno-we-514", "total_active_energy"): (H, 0xA000, U32, BIG, 0.01, "kWh"),
    ("orno-we-517", "voltage_l1"): (H, 0x000E, F32, BIG, 1, "V"),
    ("orno-we-517", "active_power"): (H, 0x001C, F32, BIG, 1000, "W"),
    ("orno-we-517", "reactive_power_l3"): (H, 0x002A, F32, BIG, 1000, "var"),
    ("orno-we-517", "import_active_energy"): (H, 0x0108, F32, BIG, 1, "kWh"),
    ("finder-7m24", "voltage"): (I, 2500, F32, BIG, 1, "V"),
    ("finder-7m24", "frequency"): (I, 2584, F32, BIG, 1, "Hz"),
    ("finder-7m38", "current_l1"): (I, 2516, F32, BIG, 1, "A"),
    ("finder-7m38", "power_factor"): (I, 2560, F32, BIG, 1, ""),
    ("finder-7m38", "import_active_energy"): (I, 2752, U32, BIG, 0.001, "kWh"),
    ("finder-7m38", "export_reactive_energy"): (I, 2758, U32, BIG, 0.001, "kvarh"),
    ("janitza-umg96rm-e", "voltage_l1"): (H, 19000, F32, BIG, 1, "V"),
    ("janitza-umg96rm-e", "active_power"): (H, 19026, F32, BIG, 1, "W"),
    ("janitza-umg96rm-e", "frequency"): (H, 19050, F32, BIG, 1, "Hz"),
    ("janitza-umg96rm-e", "import_active_energy"): (H, 19068, F32, BIG, 0.001, "kWh"),
    ("janitza-umg96rm-e", "export_active_energy"): (H, 19076, F32, BIG, 0.001, "kWh"),
}


@pytest.mark.parametrize(("profile", "measurement"), sorted(SPOT_CHECKS))
def test_spot_check_against_the_meter_maps(profile, measurement):
    function, address, dtype, word_order, scale, unit = SPOT_CHECKS[(profile, measurement)]
    by_name = {m.name: m for m in get_builtin(profile).measurements}
    m = by_name[measurement]
    assert (m.function, m.address, m.dtype, m.word_order, m.unit) == (function, address, dtype, word_order, unit)
    assert m.scale == pytest.approx(scale)


def test_profile_wide_settings():
    for name in ("eastron-sdm230", "eastron-sdm72d"):  # Eastron: 40 parameters per request
        assert get_builtin(name).max_read == 80
    for name in NEW_PROFILES - {"eastron-sdm230", "eastron-sdm72d"}:
        assert get_builtin(name).max_read == 125 and get_builtin(name).read_gaps is True
    assert get_builtin("carlo-gavazzi-em24").word_order is WordOrder.LITTLE
    assert get_builtin("carlo-gavazzi-em3x0").word_order is WordOrder.LITTLE
    # DDSU666: reactive power of unknown scale is left out; the choice of FC3 is explained
    ddsu = get_builtin("chint-ddsu666")
    assert "reactive_power" not in {m.name for m in ddsu.measurements}
    assert "FC4" in ddsu.description and "Tasmota" in ddsu.description
    # the sources' disagreements are spelled out where the profile picks a side
    assert "0x401E" in get_builtin("chint-dtsu666").description
    assert "V1" in get_builtin("eastron-sdm72d").description
    assert "8O1" in get_builtin("orno-we-517").description
    assert "0xFFFF" in get_builtin("abb-b2x").description


def test_abb_not_available_sentinels_decode_as_the_documented_raw_values():
    """The description tells clients to treat all-ones (unsigned) and 0x7FFF... (signed)
    as 'not available'; check what those raw values are for the profile's own types."""
    by_name = {m.name: m for m in get_builtin("abb-b2x").measurements}
    energy, power = by_name["import_active_energy"], by_name["active_power"]
    assert codec.decode([0xFFFF] * 4, energy.dtype, energy.word_order) == 2**64 - 1
    assert codec.decode([0x7FFF, 0xFFFF], power.dtype, power.word_order) == struct.unpack(">i", b"\x7f\xff\xff\xff")[0]
