"""Meter profiles: a meter model's register map, from a YAML file.

The built-in profiles are YAML files shipped as package data in
``bridge/config/builtin/``; a configuration may also name a profile file of its own.
Both go through ``validate_profile_data``, so they obey the same rules.
"""
from __future__ import annotations

import difflib
import functools
import math
from importlib import resources
from pathlib import Path
from typing import Any

from bridge.core.codec import DataType, Function, WordOrder
from bridge.core.errors import BridgeError, ConfigError, ConfigIssue, UnknownProfile
from bridge.core.model import MAX_READ_REGISTERS, Measurement, Profile, RegisterRange
from bridge.config.yamlsource import (
    INVALID,
    Ctx,
    Field,
    Node,
    Record,
    boolean,
    integer,
    list_of,
    number,
    one_of,
    parse_yaml,
    plain,
    read_mapping,
    record_of,
    show,
    text,
)

TABLE_SIZE = 65536  # registers per function table: addresses 0..65535

SNAKE_CASE = r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*"
PROFILE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"

FUNCTION = one_of({"input": Function.INPUT, "holding": Function.HOLDING}, "function")
WORD_ORDER = one_of({"big": WordOrder.BIG, "little": WordOrder.LITTLE}, "word_order")

def _eu_range(node: Node, ctx: Ctx) -> Any:
    """``[low, high]``, two finite numbers, low < high."""
    value = plain(node)
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            or not value[0] < value[1]):
        ctx.report(node.line, f"expected [low, high] with low < high, got {show(value)}")
        return INVALID
    return (float(value[0]), float(value[1]))


EU_RANGE = _eu_range

MEASUREMENT_SCHEMA: dict[str, Field] = {
    "name": Field(text(SNAKE_CASE, "use lower_snake_case, e.g. active_power_l1")),
    "address": Field(integer(0, TABLE_SIZE - 1)),
    "type": Field(one_of({t.value: t for t in DataType}, "type"), attr="dtype"),
    "unit": Field(text(allow_empty=True), ""),
    "scale": Field(number(nonzero=True), 1.0),
    "description": Field(text(allow_empty=True), ""),
    "function": Field(FUNCTION, None),  # None: the profile's
    "word_order": Field(WORD_ORDER, None),  # None: the profile's
    "range": Field(EU_RANGE, None, attr="eu_range"),  # [low, high]: OPC UA EURange
}

RANGE_SCHEMA: dict[str, Field] = {
    "function": Field(FUNCTION, None),  # None: the profile's
    "start": Field(integer(0, TABLE_SIZE - 1)),
    "count": Field(integer(1, TABLE_SIZE - 1)),
}

RANGES = list_of(record_of(RANGE_SCHEMA), what="range", non_empty=False)

PROFILE_SCHEMA: dict[str, Field] = {
    "name": Field(text(PROFILE_NAME, "use letters, digits, '.', '-' and '_'")),
    "description": Field(text(allow_empty=True), ""),
    "function": Field(FUNCTION, Function.INPUT),
    "word_order": Field(WORD_ORDER, WordOrder.BIG),
    "measurements": Field(list_of(record_of(MEASUREMENT_SCHEMA), what="measurement")),
    "ranges": Field(RANGES, []),
    "max_registers_per_read": Field(integer(1, MAX_READ_REGISTERS), MAX_READ_REGISTERS, attr="max_read"),
    "read_gaps": Field(boolean(), True),
}


# --- loading -------------------------------------------------------------------------


def load_profile(path: str | Path) -> Profile:
    """Load and validate a profile file; ConfigError lists every problem in it."""
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(str(path), None, "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(str(path), None, "", f"cannot read file: {exc}")]) from None
    return _from_text(content, str(path), source=str(path))


def builtin_profile_names() -> list[str]:
    return sorted(entry.name[: -len(".yaml")] for entry in _builtin_dir().iterdir()
                  if entry.name.endswith(".yaml"))


@functools.cache
def get_builtin(name: str) -> Profile:
    entry = _builtin_dir() / f"{name}.yaml"
    if name not in builtin_profile_names():
        raise UnknownProfile(f"unknown built-in profile '{name}'{_suggest(name)}; "
                             "`modbus-bridge profiles` lists them")
    return _from_text(entry.read_text(encoding="utf-8"), str(entry), source="builtin")


def resolve_profile(ref: str, relative_to: Path) -> Profile:
    """A built-in profile by name, else a profile file.

    ``relative_to`` is the directory relative paths are resolved against (the
    configuration file's directory; given the file itself, its directory is used).
    Raises UnknownProfile if ``ref`` names neither, ConfigError if the file is invalid.
    """
    if ref in builtin_profile_names():
        return get_builtin(ref)
    base = Path(relative_to)
    if base.is_file():
        base = base.parent
    path = base / Path(ref).expanduser()
    if path.is_file():
        return load_profile(path)
    if _looks_like_path(ref):
        raise UnknownProfile(f"profile file not found: {path}")
    raise UnknownProfile(f"unknown profile '{ref}'{_suggest(ref)}; `modbus-bridge profiles` lists the "
                         "built-in ones, or give the path of a profile file")


def _builtin_dir() -> Any:
    return resources.files(__package__) / "builtin"


def _looks_like_path(ref: str) -> bool:
    return "/" in ref or "\\" in ref or ref.endswith((".yaml", ".yml"))


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, builtin_profile_names(), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _from_text(content: str, file: str, *, source: str) -> Profile:
    root, issues = parse_yaml(content, file)
    profile = None
    if root is not None or not issues:
        try:
            profile = validate_profile_data(root, file, source=source)
        except ConfigError as exc:
            issues = issues + exc.issues
    if issues:
        raise ConfigError(sorted(issues, key=lambda i: i.line or 0))
    assert profile is not None
    return profile


# --- validation ----------------------------------------------------------------------


def validate_profile_data(root: Node | None, file: str, *, source: str = "") -> Profile:
    """Turn a parsed profile document into a Profile; ConfigError lists every problem."""
    ctx = Ctx(file, [])
    if root is None:
        ctx.report(1, "the profile is empty; expected a mapping with name and measurements")
        raise ConfigError(ctx.issues)
    rec = read_mapping(root, ctx, PROFILE_SCHEMA)
    if rec is INVALID:
        raise ConfigError(ctx.issues)
    function, word_order = rec.values["function"], rec.values["word_order"]
    if function is INVALID:
        function = Function.INPUT  # keep checking the rest against a plausible default
    if word_order is INVALID:
        word_order = WordOrder.BIG
    measurements = _build_measurements(rec.values["measurements"], ctx.child("measurements"),
                                       function, word_order)
    ranges = build_ranges(rec.values["ranges"], ctx.child("ranges"), function)
    _check_max_read(rec, measurements, ctx)
    if ctx.issues or not rec.ok:
        raise ConfigError(ctx.issues)
    values = rec.kwargs(PROFILE_SCHEMA)
    values.update(measurements=tuple(measurements), ranges=ranges, source=source)
    return Profile(**values)


def _build_measurements(items: Any, ctx: Ctx, function: Function, word_order: WordOrder) -> list[Measurement]:
    """Measurements from checked records; reports duplicate names and overlapping registers."""
    if items is INVALID:
        return []
    built: list[tuple[Measurement, Record]] = []
    names: dict[str, int] = {}
    for i, rec in enumerate(items):
        if rec is INVALID:
            continue
        item = ctx.child(i)
        name = rec.values["name"]
        if rec.valid("name"):
            if name in names:
                item.child("name").report(rec.lines["name"],
                                          f"duplicate measurement name '{name}' (first at line {names[name]})")
            else:
                names[name] = rec.lines["name"]
        if not rec.ok:
            continue
        values = rec.kwargs(MEASUREMENT_SCHEMA)
        if values["function"] is None:  # inherited from the profile
            values["function"] = function
        if values["word_order"] is None:
            values["word_order"] = word_order
        m = Measurement(**values)
        if m.end > TABLE_SIZE:
            item.child("address").report(rec.lines["address"], f"{m.dtype.value} at {_hex(m.address)} needs "
                                         f"{m.count} registers and runs past the last address 0xFFFF")
            continue
        for other, other_rec in built:
            if other.function is m.function and m.address < other.end and other.address < m.end:
                item.child("address").report(
                    rec.lines["address"],
                    f"registers {_span(m)} of '{m.name}' overlap '{other.name}' "
                    f"({_span(other)}, line {other_rec.lines['address']}) in the {m.function.label} table")
                break
        built.append((m, rec))
    return [m for m, _ in built]


def build_ranges(items: Any, ctx: Ctx, function: Function) -> tuple[RegisterRange, ...]:
    """RegisterRanges from checked records (``ranges`` of a profile or a meter); ``function``
    is the default table. Ranges may overlap each other: the image is their union."""
    if items is INVALID:
        return ()
    ranges: list[RegisterRange] = []
    for i, rec in enumerate(items):
        if rec is INVALID or not rec.ok:
            continue
        table = function if rec.values["function"] is None else rec.values["function"]
        r = RegisterRange(table, rec.values["start"], rec.values["count"])
        if r.end > TABLE_SIZE:
            ctx.child(i).child("count").report(
                rec.lines["count"], f"{r.count} registers from {_hex(r.start)} run past the last address 0xFFFF")
            continue
        ranges.append(r)
    return tuple(ranges)


def _check_max_read(rec: Record, measurements: list[Measurement], ctx: Ctx) -> None:
    max_read = rec.values["max_registers_per_read"]
    if max_read is INVALID or not measurements:
        return
    widest = max(measurements, key=lambda m: m.count)
    if widest.count > max_read:
        ctx.child("max_registers_per_read").report(
            rec.lines["max_registers_per_read"],
            f"{max_read} is smaller than measurement '{widest.name}' "
            f"({widest.dtype.value}, {widest.count} registers)")


def _hex(address: int) -> str:
    return f"0x{address:04X}"


def _span(m: Measurement) -> str:
    return f"{_hex(m.address)}..{_hex(m.end - 1)}"
