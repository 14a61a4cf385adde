"""The bridge configuration file: YAML in, a validated frozen ``Config`` out.

Each section is a table of ``Field``s whose keys match the model's attribute
names, so a new key is one line here plus one field in ``model.py``. Checks
that span entries (unique names, ports, slaves and units) run afterwards on
the checked records, which still know the line of every value.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from pathlib import Path
from typing import Any

from bridge.core.codec import Function
from bridge.core.errors import ConfigError, ConfigIssue
from bridge.core.model import (
    Config,
    ConsolidatedMap,
    HttpConfig,
    MeterConfig,
    ModbusTcpConfig,
    OpcUaConfig,
    OpcUaUser,
    Profile,
    SegmentConfig,
)
from bridge.config.profiles import RANGES, UnknownProfile, build_ranges, resolve_profile
from bridge.config.yamlsource import (
    INVALID,
    Ctx,
    Field,
    Invalid,
    Record,
    boolean,
    integer,
    list_of,
    number,
    one_of,
    parse_yaml,
    read_mapping,
    record_of,
    scalar,
    show,
    text,
)

NAME = r"[A-Za-z0-9_-]+"
NAME_HINT = "use letters, digits, '-' and '_'"
LISTEN_FORM = "expected host:port or [ipv6]:port, e.g. 0.0.0.0:502"


def _listen(value: Any) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); port 0 means "any free port"."""
    if not isinstance(value, str):
        raise Invalid(f"{LISTEN_FORM}; got {show(value)}")
    match = re.fullmatch(r"\[([^\[\]]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", value.strip())
    if not match:
        raise Invalid(f"{LISTEN_FORM}; got {value!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise Invalid(f"port {port} is out of range 0..65535 in {value!r}")
    return host, port


def _endpoint(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("opc.tcp://") or len(value) == len("opc.tcp://"):
        raise Invalid(f"expected an OPC UA endpoint like opc.tcp://0.0.0.0:4840/bridge, got {show(value)}")
    return value


LISTEN = scalar(_listen)


def _default(cls: type, name: str) -> Any:
    """A key's default is its configuration object's: each default is written once, in the model."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)

METER_SCHEMA: dict[str, Field] = {
    "name": Field(text(NAME, NAME_HINT)),
    "slave": Field(integer(1, 247)),
    "unit": Field(integer(1, 247), None),  # None: the slave address
    "profile": Field(text()),  # resolved to a Profile after checking
    "poll_interval": Field(number(ge=0), _default(MeterConfig, "poll_interval")),
    "writable": Field(boolean(), _default(MeterConfig, "writable")),
    "ranges": Field(RANGES, []),
    "write_ranges": Field(RANGES, []),  # holding registers upstream writes may touch (needs writable)
    "stale_after": Field(number(gt=0), None),  # None: the bridge-wide value
}

SEGMENT_SCHEMA: dict[str, Field] = {
    "name": Field(text(NAME, NAME_HINT)),
    "port": Field(text()),
    "baudrate": Field(integer(1), _default(SegmentConfig, "baudrate")),
    "parity": Field(one_of({"N": "N", "E": "E", "O": "O"}, "parity"), _default(SegmentConfig, "parity")),
    "stopbits": Field(one_of({1: 1, 2: 2}, "stopbits"), _default(SegmentConfig, "stopbits")),
    "timeout": Field(number(gt=0), _default(SegmentConfig, "timeout")),
    "retries": Field(integer(0), _default(SegmentConfig, "retries")),
    "demote_after": Field(integer(1), _default(SegmentConfig, "demote_after")),
    "demote_interval": Field(number(gt=0), _default(SegmentConfig, "demote_interval")),
    "meters": Field(list_of(record_of(METER_SCHEMA), what="meter")),
}

def _network(value: Any) -> str:
    """An IP address or network in CIDR form, for client allowlists."""
    hint = f"expected an IP address or network like 10.0.0.0/8, got {show(value)}"
    if not isinstance(value, str):
        raise Invalid(hint)
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise Invalid(hint) from None


CONSOLIDATED_SCHEMA: dict[str, Field] = {
    "unit": Field(integer(1, 247)),
    "base": Field(integer(0, 65535), _default(ConsolidatedMap, "base")),
    "stride": Field(integer(2, 65535), _default(ConsolidatedMap, "stride")),
}

MODBUS_TCP_SCHEMA: dict[str, Field] = {
    "enabled": Field(boolean(), _default(ModbusTcpConfig, "enabled")),
    "listen": Field(LISTEN, (_default(ModbusTcpConfig, "host"), _default(ModbusTcpConfig, "port"))),
    "max_connections": Field(integer(1, 10000), _default(ModbusTcpConfig, "max_connections")),
    "idle_timeout": Field(number(gt=0), _default(ModbusTcpConfig, "idle_timeout")),
    "frame_timeout": Field(number(gt=0), _default(ModbusTcpConfig, "frame_timeout")),
    "max_pending": Field(integer(1, 1000), _default(ModbusTcpConfig, "max_pending")),
    "allow": Field(list_of(scalar(_network), what="address", non_empty=False), []),
    "consolidated": Field(record_of(CONSOLIDATED_SCHEMA), None),
}

SECURITY_MODES = ("None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt")


def _password_hash(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("scrypt$") or value.count("$") != 5:
        raise Invalid("expected a hash made by `modbus-bridge hash-password` (scrypt$...), never a plain password")
    return value


OPCUA_USER_SCHEMA: dict[str, Field] = {
    "name": Field(text()),
    "password": Field(scalar(_password_hash), attr="password_hash"),
}

OPCUA_SCHEMA: dict[str, Field] = {
    "enabled": Field(boolean(), _default(OpcUaConfig, "enabled")),
    "endpoint": Field(scalar(_endpoint), _default(OpcUaConfig, "endpoint")),
    "namespace": Field(text(), _default(OpcUaConfig, "namespace")),
    "security": Field(list_of(one_of({m: m for m in SECURITY_MODES}, "security mode"), what="security mode"),
                      list(_default(OpcUaConfig, "security"))),
    "certificate_dir": Field(text(), ""),  # "": <state_dir>/pki
    "trusted_clients_dir": Field(text(allow_empty=True), ""),
    "anonymous": Field(boolean(), _default(OpcUaConfig, "anonymous")),
    "users": Field(list_of(record_of(OPCUA_USER_SCHEMA), what="user", non_empty=False), []),
}

HTTP_SCHEMA: dict[str, Field] = {
    "listen": Field(LISTEN, (_default(HttpConfig, "host"), _default(HttpConfig, "port"))),
}

TOP_SCHEMA: dict[str, Field] = {
    "segments": Field(list_of(record_of(SEGMENT_SCHEMA), what="segment")),
    "stale_after": Field(number(gt=0), _default(Config, "stale_after")),
    "modbus_tcp": Field(record_of(MODBUS_TCP_SCHEMA, null_is_empty=True), None),
    "opcua": Field(record_of(OPCUA_SCHEMA, null_is_empty=True), None),
    "http": Field(record_of(HTTP_SCHEMA, null_is_empty=True), None),  # absent: no HTTP server
    "state_dir": Field(text(), None),  # absent: $STATE_DIRECTORY, else state/ next to the configuration file
}

STATE_DIRECTORY = "STATE_DIRECTORY"  # set by systemd's StateDirectory=; several paths are ':'-separated
DEFAULT_STATE_DIR = "state"
PKI_DIR = "pki"  # the default certificate_dir, under the state directory


def _state_dir(value: str | None, base_dir: Path) -> str:
    """The state directory, absolute: as written (relative: to the configuration file's folder), else
    the first path in $STATE_DIRECTORY, else ``state/`` next to the configuration file."""
    if value is None:
        from_systemd = next((p for p in os.environ.get(STATE_DIRECTORY, "").split(":") if p), "")
        if from_systemd:
            return os.path.abspath(from_systemd)
        value = DEFAULT_STATE_DIR
    return os.path.abspath(base_dir / value)


def load_config(path: str | Path) -> Config:
    """Read and validate a configuration file; ConfigError carries every issue found."""
    path = Path(path)
    file = str(path)
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(file, None, "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(file, None, "", f"cannot read file: {exc}")]) from None
    root, issues = parse_yaml(content, file)
    if root is None:
        if not issues:
            issues.append(ConfigIssue(file, 1, "", "the file is empty; expected a mapping with 'segments'"))
        raise ConfigError(issues)
    ctx = Ctx(file, issues)
    top = read_mapping(root, ctx, TOP_SCHEMA)
    config = _build(top, ctx, path.parent) if top is not INVALID else None
    if ctx.issues or config is None:
        # the config file's issues first, in line order, then those of profile files it names
        raise ConfigError(sorted(ctx.issues, key=lambda i: (i.file != file, i.file, i.line or 0)))
    return config


class _Builder:
    """Builds segments and meters while checking what must be unique across entries."""

    def __init__(self, ctx: Ctx, base_dir: Path, stale_after: float):
        self.ctx = ctx
        self.base_dir = base_dir
        self.stale_after = stale_after
        self.segment_names: dict[str, int] = {}
        self.ports: dict[str, tuple[str, str, int]] = {}  # realpath -> (as written, "segment 'x'", line)
        self.meter_names: dict[str, int] = {}
        self.units: dict[int, tuple[str, int]] = {}  # unit -> (meter, line)
        self.profiles: dict[str, Profile | None] = {}  # by reference: each file is loaded (and reported) once

    def segment(self, rec: Record, ctx: Ctx) -> SegmentConfig | None:
        v = rec.values
        if rec.valid("name"):
            self._unique(self.segment_names, v["name"], rec.lines["name"], ctx.child("name"),
                         f"segment name '{v['name']}' is already used")
        segment = f"segment '{v['name']}'" if rec.valid("name") else ctx.path
        if rec.valid("port"):
            self._port(v["port"], segment, rec.lines["port"], ctx.child("port"))
        slaves: dict[int, tuple[str, int]] = {}
        meters = []
        if v["meters"] is not INVALID:
            for i, meter_rec in enumerate(v["meters"]):
                if meter_rec is not INVALID:
                    meters.append(self.meter(meter_rec, ctx.child("meters").child(i), slaves))
        if not rec.ok or None in meters:
            return None
        values = rec.kwargs(SEGMENT_SCHEMA)
        values["meters"] = tuple(meters)
        return SegmentConfig(**values)

    def meter(self, rec: Record, ctx: Ctx, slaves: dict[int, tuple[str, int]]) -> MeterConfig | None:
        v = rec.values
        name = v["name"] if rec.valid("name") else ctx.path
        if rec.valid("name"):
            self._unique(self.meter_names, name, rec.lines["name"], ctx.child("name"),
                         f"meter name '{name}' is already used")
        if rec.valid("slave"):
            self._taken(slaves, v["slave"], name, rec.lines["slave"], ctx.child("slave"),
                        f"slave {v['slave']} is already used on this segment")
        unit = self._unit(rec, name, ctx)
        profile = self._profile(v["profile"], rec.lines["profile"], ctx.child("profile")) \
            if rec.valid("profile") else None
        table = profile.function if profile else Function.INPUT
        ranges = build_ranges(v["ranges"], ctx.child("ranges"), table)
        write_ranges = build_ranges(v["write_ranges"], ctx.child("write_ranges"), Function.HOLDING)
        if "write_ranges" in rec.given and rec.valid("writable") and not v["writable"]:
            ctx.child("write_ranges").report(
                rec.lines["write_ranges"], "write_ranges allows writes only to a meter with writable: true")
        stale_after = self.stale_after if not rec.valid("stale_after") or v["stale_after"] is None \
            else v["stale_after"]
        if rec.valid("poll_interval") and v["poll_interval"] >= stale_after:
            # such a meter would go stale between every two polls and clients would get 0x0B
            key = "poll_interval" if "poll_interval" in rec.given else "name"
            ctx.child("poll_interval").report(
                rec.lines.get(key), f"poll_interval {v['poll_interval']:g} s must be shorter than "
                f"stale_after {stale_after:g} s, or the meter is stale between polls")
        if not rec.ok or profile is None or unit is None:
            return None
        values = rec.kwargs(METER_SCHEMA)
        values.update(unit=unit, profile=profile, ranges=ranges, stale_after=stale_after, write_ranges=write_ranges)
        return MeterConfig(**values)

    def _unit(self, rec: Record, name: str, ctx: Ctx) -> int | None:
        """The upstream unit id, defaulting to the slave address; unique across the bridge."""
        v = rec.values
        if "unit" in rec.given:
            unit, line, origin, hint = v["unit"], rec.lines["unit"], "", ""
        else:
            unit, line = v["slave"], rec.lines["slave"]
            origin, hint = " (defaulted from slave)", "; set 'unit' to a free id"
        if unit is INVALID:
            return None
        if unit in self.units:
            other, other_line = self.units[unit]
            ctx.child("unit").report(line, f"unit {unit}{origin} is already used by meter '{other}' "
                                           f"(line {other_line}){hint}")
        else:
            self.units[unit] = (name, line)
        return unit

    def _profile(self, ref: str, line: int, ctx: Ctx) -> Profile | None:
        if ref not in self.profiles:
            try:
                self.profiles[ref] = resolve_profile(ref, self.base_dir)
            except UnknownProfile as exc:
                ctx.report(line, str(exc))
                self.profiles[ref] = None
            except ConfigError as exc:
                ctx.report(line, f"profile '{ref}' is invalid ({len(exc.issues)} issue(s) listed under its file)")
                self.ctx.issues.extend(exc.issues)
                self.profiles[ref] = None
        return self.profiles[ref]

    def _port(self, port: str, segment: str, line: int, ctx: Ctx) -> None:
        key = os.path.realpath(port)  # /dev/serial/by-id/... links and the ttyUSBn they point to are one bus
        if key in self.ports:
            written, other, other_line = self.ports[key]
            same = f"port '{port}'" if written == port else f"port '{port}' (the same device as '{written}')"
            ctx.report(line, f"{same} is already used by {other} (line {other_line}); "
                             "one segment per serial port")
        else:
            self.ports[key] = (port, segment, line)

    @staticmethod
    def _unique(seen: dict[str, int], name: str, line: int, ctx: Ctx, message: str) -> None:
        if name in seen:
            ctx.report(line, f"{message} (line {seen[name]})")
        else:
            seen[name] = line

    @staticmethod
    def _taken(seen: dict[int, tuple[str, int]], value: int, owner: str, line: int, ctx: Ctx,
               message: str) -> None:
        if value in seen:
            other, other_line = seen[value]
            ctx.report(line, f"{message} by meter '{other}' (line {other_line})")
        else:
            seen[value] = (owner, line)


def _build(top: Record, ctx: Ctx, base_dir: Path) -> Config | None:
    v = top.values
    stale_after = v["stale_after"] if top.valid("stale_after") else 10.0
    builder = _Builder(ctx, base_dir, stale_after)
    segments = []
    if v["segments"] is not INVALID:
        for i, rec in enumerate(v["segments"]):
            if rec is not INVALID:
                segments.append(builder.segment(rec, ctx.child("segments").child(i)))
    modbus_tcp, opcua, http = (_section(v[key], build) for key, build in (
        ("modbus_tcp", _modbus_tcp), ("opcua", _opcua), ("http", _http)))
    if not top.ok or None in segments or INVALID in (modbus_tcp, opcua, http):
        return None
    if modbus_tcp is not None and modbus_tcp.consolidated is not None:
        _check_consolidated(modbus_tcp.consolidated, segments, builder.units, v["modbus_tcp"], ctx)
    state_dir = _state_dir(v["state_dir"], base_dir)
    opcua = opcua or OpcUaConfig(certificate_dir="")
    # certificate directories written in the file are relative to it, like profile paths;
    # by default our certificate lives in the state directory
    pki = base_dir / opcua.certificate_dir if opcua.certificate_dir else Path(state_dir) / PKI_DIR
    opcua = dataclasses.replace(opcua, certificate_dir=str(pki),
                                trusted_clients_dir=str(base_dir / (opcua.trusted_clients_dir or pki / "trusted")))
    return Config(segments=tuple(segments), stale_after=stale_after,
                  modbus_tcp=modbus_tcp or ModbusTcpConfig(), opcua=opcua,
                  http=http, source=str(ctx.file), state_dir=state_dir)


def _check_consolidated(cmap: ConsolidatedMap, segments: list[SegmentConfig], units: dict[int, tuple[str, int]],
                        tcp: Record, ctx: Ctx) -> None:
    """The consolidated unit must be free, and every meter's values must fit its stride and the table."""
    rec = tcp.values["consolidated"]
    here = ctx.child("modbus_tcp").child("consolidated")
    if cmap.unit in units:
        meter, line = units[cmap.unit]
        here.child("unit").report(rec.lines["unit"], f"unit {cmap.unit} is already used by meter '{meter}' "
                                                         f"(line {line})")
    meters = [m for seg in segments for m in seg.meters]
    widest = max((len(m.profile.measurements) for m in meters), default=0)
    if 2 * widest > cmap.stride:
        here.child("stride").report(rec.lines["stride"],
                                    f"stride {cmap.stride} is too small: a meter has {widest} measurements, "
                                    f"which need {2 * widest} registers")
    end = cmap.base + len(meters) * cmap.stride
    if end > 65536:
        here.child("base").report(rec.lines["base"], f"{len(meters)} meters × stride {cmap.stride} from "
                                                         f"{cmap.base} run past register 65535")


def _section(rec: Record | None | Any, build: Any) -> Any:
    """None when the section is absent, INVALID when it has errors, else the built object."""
    if rec is None or rec is INVALID:
        return rec
    return build(rec) if rec.ok else INVALID


def _modbus_tcp(rec: Record) -> ModbusTcpConfig:
    values = rec.kwargs(MODBUS_TCP_SCHEMA)
    values["host"], values["port"] = values.pop("listen")
    values["allow"] = tuple(values["allow"])
    if values["consolidated"] is not None:
        values["consolidated"] = ConsolidatedMap(**values["consolidated"].kwargs(CONSOLIDATED_SCHEMA))
    return ModbusTcpConfig(**values)


def _opcua(rec: Record) -> OpcUaConfig:
    values = rec.kwargs(OPCUA_SCHEMA)
    values["security"] = tuple(dict.fromkeys(values["security"]))
    values["users"] = tuple(OpcUaUser(**u.kwargs(OPCUA_USER_SCHEMA)) for u in values["users"] if u is not INVALID)
    return OpcUaConfig(**values)


def _http(rec: Record) -> HttpConfig:
    values = rec.kwargs(HTTP_SCHEMA)
    values["host"], values["port"] = values.pop("listen")
    return HttpConfig(**values)


# --- summary for `modbus-bridge check` ---------------------------------------------------


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def summary(config: Config) -> str:
    """A few lines describing what the bridge will do with this configuration."""
    lines = [f"configuration {config.source}: OK"]
    for seg in config.segments:
        lines.append(f"segment {seg.name}: {seg.port} {seg.baudrate} {seg.bytesize}{seg.parity}{seg.stopbits}, "
                     f"timeout {seg.timeout:g} s, retries {seg.retries}")
        for m in seg.meters:
            extra = f", +{len(m.ranges)} range(s)" if m.ranges else ""
            rw = ", writable" if m.writable else ""
            lines.append(f"  meter {m.name}: slave {m.slave} -> unit {m.unit}, profile {m.profile.name} "
                         f"({len(m.profile.measurements)} measurements{extra}), poll {m.poll_interval:g} s{rw}")
    meters = config.meters
    lines.append(f"{len(config.segments)} segment(s), {len(meters)} meter(s), "
                 f"{sum(len(m.profile.measurements) for m in meters)} measurement(s)")
    tcp, ua = config.modbus_tcp, config.opcua
    lines.append(f"modbus tcp: {_hostport(tcp.host, tcp.port) if tcp.enabled else 'off'}")
    lines.append(f"opc ua: {f'{ua.endpoint} (namespace {ua.namespace})' if ua.enabled else 'off'}")
    lines.append(f"http: {_hostport(config.http.host, config.http.port) if config.http else 'off'}")
    lines.append(f"state directory: {config.state_dir or 'not set'}")
    return "\n".join(lines)
