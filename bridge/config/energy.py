"""The ``energy`` section (docs/configuration.md §2.8): checked like every other key, errors name file, line and key."""
from __future__ import annotations

import zoneinfo
from typing import Any

from bridge.config.yamlsource import INVALID, Ctx, Field, Invalid, Record, integer, list_of, number, record_of, scalar, text
from bridge.core.model import BalanceAlarmConfig, EnergyConfig, TariffConfig, VirtualMeterConfig
from bridge.energy.tariffs import parse_clock, parse_days, parse_formula


def _interval(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or 60 % value:
        raise Invalid(f"expected minutes dividing an hour (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60), got {value!r}")
    return value


def _timezone(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"expected an IANA time zone name such as Europe/Berlin, got {value!r}")
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise Invalid(f"unknown time zone {value!r}; expected an IANA name such as Europe/Berlin or UTC") from None
    return value


def _lifted(parse):
    def convert(value: Any) -> Any:
        if not isinstance(value, str):
            raise Invalid(f"expected text, got {value!r}")
        try:
            return parse(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
    return convert


def _clock(value: Any) -> int:
    # YAML 1.1 reads an unquoted 22:00 as the sexagesimal number 1320, which is its minutes after midnight
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1440:
        return value
    return _lifted(parse_clock)(value)


TARIFF_SCHEMA: dict[str, Field] = {
    "name": Field(text(r"[A-Za-z0-9_-]+", "use letters, digits, '-' and '_'")),
    "days": Field(scalar(_lifted(parse_days)), None),
    "from": Field(scalar(_clock), None, attr="start"),
    "to": Field(scalar(_clock), None, attr="end"),
}

ALARM_SCHEMA: dict[str, Field] = {
    "reference": Field(text()),
    "above_percent": Field(number(gt=0)),
    "intervals": Field(integer(1, 10_000), 1),
}

VIRTUAL_SCHEMA: dict[str, Field] = {
    "name": Field(text(r"[A-Za-z0-9_-]+", "use letters, digits, '-' and '_'")),
    "formula": Field(text()),
    "alarm": Field(record_of(ALARM_SCHEMA), None),
    "unit": Field(integer(1, 247), None),  # a Modbus TCP unit of its own (docs/modbus.md); None: none
}

ENERGY_SCHEMA: dict[str, Field] = {
    "interval": Field(scalar(_interval), 15),
    "timezone": Field(scalar(_timezone), "UTC"),
    "retention_days": Field(integer(1, 100_000), 400),
    "billing_day": Field(integer(1, 28), 1),
    "max_gap": Field(number(ge=0), 0.0),
    "demand_window": Field(integer(0, 1440), 0),
    "tariffs": Field(list_of(record_of(TARIFF_SCHEMA), what="tariff", non_empty=False), ()),
    "virtual": Field(list_of(record_of(VIRTUAL_SCHEMA), what="virtual meter", non_empty=False), ()),
}


def build_energy(rec: Any, ctx: Ctx, meter_lines: dict[str, int],
                 units: dict[int, tuple[str, int]] | None = None) -> EnergyConfig | None | Any:
    """The ``energy`` section: None when absent, INVALID after reporting, else the built object.
    Checks across keys run here: a tariff needs both ends, virtual meters refer to real meters, a
    virtual meter's unit is free (``units``: unit -> (meter, line), the meters'; a virtual one is added)."""
    units = {} if units is None else units
    if rec is None or rec is INVALID:
        return rec
    ok = rec.ok
    v = rec.values
    tariffs: list[TariffConfig] = []
    for i, t in enumerate(v["tariffs"] if rec.valid("tariffs") else ()):
        if t is INVALID or not t.ok:
            ok = False
            continue
        here = ctx.child("tariffs").child(i)
        if ("from" in t.given) != ("to" in t.given):
            here.report(t.line, f"tariff '{t.values['name']}' needs both from: and to:, or neither")
            ok = False
            continue
        if t.values["name"] in {x.name for x in tariffs}:
            here.child("name").report(t.lines["name"], f"tariff '{t.values['name']}' is defined twice")
            ok = False
            continue
        tariffs.append(TariffConfig(**t.kwargs(TARIFF_SCHEMA)))
    if rec.valid("demand_window") and rec.valid("interval") and v["demand_window"] % v["interval"]:
        ctx.child("demand_window").report(rec.lines["demand_window"],
                                          f"demand_window must be a multiple of the interval ({v['interval']} min)")
        ok = False
    virtual: list[VirtualMeterConfig] = []
    names = set(meter_lines)
    for i, vm in enumerate(v["virtual"] if rec.valid("virtual") else ()):
        if vm is INVALID or not vm.ok:
            ok = False
            continue
        here = ctx.child("virtual").child(i)
        name = vm.values["name"]
        if name in names:
            where = f" (line {meter_lines[name]})" if name in meter_lines else ""
            here.child("name").report(vm.lines["name"], f"'{name}' is already the name of a meter{where}")
            ok = False
            continue
        try:
            terms = parse_formula(vm.values["formula"], meter_lines)
        except ValueError as exc:
            here.child("formula").report(vm.lines["formula"], str(exc))
            ok = False
            continue
        alarm = vm.values["alarm"]
        if alarm is not None:
            if alarm.values["reference"] not in meter_lines:
                here.child("alarm").child("reference").report(
                    alarm.lines["reference"], f"no meter named '{alarm.values['reference']}'")
                ok = False
                continue
            alarm = BalanceAlarmConfig(**alarm.kwargs(ALARM_SCHEMA))
        unit = vm.values["unit"]
        if unit is not None:
            if unit in units:
                other, other_line = units[unit]
                here.child("unit").report(vm.lines["unit"], f"unit {unit} is already used by meter '{other}' "
                                                            f"(line {other_line})")
                ok = False
                continue
            units[unit] = (name, vm.lines["unit"])
        names.add(name)
        virtual.append(VirtualMeterConfig(name, terms, vm.values["formula"], alarm, unit))
    if not ok:
        return INVALID
    values = rec.kwargs(ENERGY_SCHEMA)
    values.update(tariffs=tuple(tariffs), virtual=tuple(virtual), max_gap=float(values["max_gap"]))
    return EnergyConfig(**values)


def energy_summary(energy: EnergyConfig) -> str:
    parts = [f"{energy.interval}-minute intervals, {energy.timezone}, kept {energy.retention_days} days"]
    if energy.tariffs:
        parts.append("tariffs " + ", ".join(t.name for t in energy.tariffs))
    if energy.virtual:
        parts.append("virtual " + ", ".join(f"{v.name} = {v.formula}" for v in energy.virtual))
    return "; ".join(parts)
