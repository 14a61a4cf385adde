"""The bridge configuration file: YAML in, a validated frozen ``Config`` out.

Each section is a table of ``Field``s whose keys match the model's attribute
names, so a new key is one line here plus one field in ``model.py``. Checks
that span entries (unique names, ports, slaves and units) run afterwards on
the checked records, which still know the line of every value.
"""
from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import socket
import stat
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
    MqttConfig,
    MqttJsonConfig,
    MqttQueue,
    MqttTls,
    OpcUaConfig,
    OpcUaUser,
    Profile,
    SegmentConfig,
    SparkplugConfig,
)
from bridge.config.energy import ENERGY_SCHEMA, build_energy, energy_summary
from bridge.config.profiles import RANGES, UnknownProfile, build_ranges, resolve_profile
from bridge.config.yamlsource import (
    INVALID,
    Ctx,
    Field,
    Invalid,
    Node,
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

# --- mqtt ------------------------------------------------------------------------------------

BROKER_FORM = "expected mqtt://host[:port] or mqtts://host[:port] (an IPv6 host in brackets: mqtt://[::1]:1883)"
MQTT_PORTS = {"mqtt": 1883, "mqtts": 8883}  # the scheme's default port
MQTT_STRING_MAX = 65535  # bytes of UTF-8: the longest string an MQTT packet can carry
DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION_FORM = "expected seconds (a number) or a duration like 7d, 12h, 30m or 45s"
CLIENT_ID_PREFIX = "modbus-bridge-"
JSON_STATUS_LEVEL = "status"  # <json.topic>/status: the bridge's online/offline topic (the Will)


def parse_broker(url: str) -> tuple[bool, str, int]:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` → (tls, host, port). Pure.

    The port defaults to the scheme's (1883, 8883); an IPv6 host is written in brackets and returned
    without them. Anything else raises ``ValueError`` naming the accepted form."""
    if not isinstance(url, str):
        raise ValueError(f"{BROKER_FORM}, got {show(url)}")
    match = re.fullmatch(r"([A-Za-z]+)://(?:\[([^\[\]]+)\]|([A-Za-z0-9._-]+))(?::(\d{1,5}))?", url)
    scheme = match.group(1).lower() if match else ""
    if scheme not in MQTT_PORTS:
        raise ValueError(f"{BROKER_FORM}, got {url!r}")
    host = match.group(2) or match.group(3)
    if match.group(2):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address in {url!r}") from None
    port = int(match.group(4)) if match.group(4) else MQTT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1..65535 in {url!r}")
    return scheme == "mqtts", host, port


def broker_url(tls: bool, host: str, port: int) -> str:
    """The normalised form ``MqttConfig.brokers`` holds: lower-case scheme, explicit port."""
    return f"{'mqtts' if tls else 'mqtt'}://{_hostport(host, port)}"


def _broker(value: Any) -> str:
    try:
        return broker_url(*parse_broker(value))
    except ValueError as exc:
        raise Invalid(str(exc)) from None


_BROKER_ITEMS = list_of(scalar(_broker), what="broker")


def _brokers(node: Node, ctx: Ctx) -> Any:
    """A non-empty list of broker URLs, normalised, none listed twice."""
    urls = _BROKER_ITEMS(node, ctx)
    if urls is INVALID:
        return INVALID
    first: dict[str, int] = {}
    for i, (url, child) in enumerate(zip(urls, node.value)):
        if url is INVALID:
            continue
        if url in first:
            ctx.child(i).report(child.line, f"{url} is already listed (line {first[url]})")
            urls[i] = INVALID
        else:
            first[url] = child.line
    return INVALID if INVALID in urls else tuple(urls)


def parse_duration(value: Any) -> float:
    """Seconds > 0 from a number of seconds or a string ``<number><unit>``, unit s, m, h or d
    (``7d``, ``12h``, ``1.5h``, ``30m``, ``45s``). Raises ``Invalid`` with a message for the user."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise Invalid(f"{DURATION_FORM}, got {show(value)}")
    if isinstance(value, str):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", value)
        if not match:
            raise Invalid(f"{DURATION_FORM}, got {value!r}")
        seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise Invalid(f"must be a duration greater than 0, got {show(value)}")
    return seconds


DURATION = scalar(parse_duration)


def _mqtt_string(value: Any) -> str:
    """A non-empty string an MQTT packet can carry: valid UTF-8, no U+0000, at most 65535 bytes."""
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {show(value)}")
    if not value:
        raise Invalid("must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise Invalid(f"{value!r} is not valid UTF-8 (a lone surrogate)") from None
    if "\0" in value:
        raise Invalid("must not contain the NUL character (U+0000)")
    if size > MQTT_STRING_MAX:
        raise Invalid(f"is {size} bytes in UTF-8; MQTT allows at most {MQTT_STRING_MAX}")
    return value


def _client_id(value: Any) -> str:
    value = _mqtt_string(value)
    if "+" in value or "#" in value:
        raise Invalid(f"{value!r} must not contain the wildcards '+' or '#'")
    return value


def default_client_id() -> str:
    """``modbus-bridge-<host name>``: the client id when the file gives none."""
    host = socket.gethostname()
    return f"{CLIENT_ID_PREFIX}{host}" if host else CLIENT_ID_PREFIX.rstrip("-")


def _sparkplug_id(value: Any) -> str:
    """A group, edge node or host id (Sparkplug 3.0 §4.1: UTF-8 without '+', '/' and '#')."""
    value = _mqtt_string(value)
    reserved = [c for c in "+/#" if c in value]
    if reserved:
        raise Invalid(f"{value!r} is not a Sparkplug id: it must not contain {_either(reserved)}")
    return value


def _topic(value: Any) -> str:
    """A topic prefix we publish under: no wildcards, no empty level, not a broker ($) topic."""
    value = _mqtt_string(value)
    wildcards = [c for c in "+#" if c in value]
    if wildcards:
        raise Invalid(f"{value!r} must not contain the wildcard {_either(wildcards)}")
    if value.startswith("/") or value.endswith("/"):
        raise Invalid(f"{value!r} must not start or end with '/'")
    if "//" in value:
        raise Invalid(f"{value!r} must not have an empty level ('//')")
    if value.startswith("$"):
        raise Invalid(f"{value!r} must not start with '$' (the broker's own topics)")
    return value


def _either(chars: list[str]) -> str:
    quoted = [f"'{c}'" for c in chars]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _protocol(value: Any) -> str:
    """``3.1.1`` or ``5``; YAML reads ``5`` as a number, which is accepted as well as the string."""
    if value == "3.1.1":
        return "3.1.1"
    if value == "5" or (type(value) in (int, float) and value == 5):
        return "5"
    raise Invalid(f"unknown MQTT protocol version {show(value)}; expected 3.1.1 or 5")


def _keepalive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"expected a number, got {show(value)}")
    if not (math.isfinite(value) and value == int(value) and 1 <= value <= 65535):
        raise Invalid(f"expected whole seconds 1..65535 (MQTT's keep alive), got {value}")
    return float(value)


_DEADBAND_VALUE = number(ge=0)


def _deadband(node: Node, ctx: Ctx) -> Any:
    """``{measurement: absolute deadband}`` → ((name, deadband, line of the name), ...), in file order."""
    if node.value is None:
        return ()
    if not node.is_mapping:
        ctx.report(node.line, f"expected a mapping of measurement names to deadbands, e.g. {{active_power: 5}}, "
                              f"got {show(node.value)}")
        return INVALID
    entries: list[Any] = []
    for key, child in node.value.items():
        line = node.key_lines[key]
        if not isinstance(key, str):
            ctx.child(str(key)).report(line, f"expected a measurement name, got {show(key)}")
            entries.append(INVALID)
            continue
        value = _DEADBAND_VALUE(child, ctx.child(key)) if child.value is not INVALID else INVALID
        entries.append(INVALID if value is INVALID else (key, value, line))
    return INVALID if INVALID in entries else tuple(entries)


@dataclasses.dataclass
class _Keyed(Record):
    """A checked mapping that also knows the line of each key written, for errors about a key whose
    value is a mapping (a block mapping's value starts on the line after its key)."""

    key_lines: dict[str, int] = dataclasses.field(default_factory=dict)

    def key_line(self, key: str) -> int:
        return self.key_lines.get(key, self.lines[key])


def _keyed_record(schema: dict[str, Field], *, null_is_empty: bool = False) -> Any:
    def check(node: Node, ctx: Ctx) -> Any:
        rec = read_mapping(node, ctx, schema, null_is_empty=null_is_empty)
        if rec is INVALID:
            return INVALID
        key_lines = {k: line for k, line in node.key_lines.items() if isinstance(k, str)}
        return _Keyed(rec.values, rec.lines, rec.line, rec.given, key_lines)

    return check


MQTT_TLS_SCHEMA: dict[str, Field] = {
    # paths relative to the configuration file's folder; resolved and checked by _mqtt_tls
    "ca": Field(text(), _default(MqttTls, "ca")),
    "cert": Field(text(), _default(MqttTls, "cert")),
    "key": Field(text(), _default(MqttTls, "key")),
}

MQTT_QUEUE_SCHEMA: dict[str, Field] = {
    "max_mb": Field(number(gt=0), _default(MqttQueue, "max_mb")),
    "max_age": Field(DURATION, _default(MqttQueue, "max_age")),
}

SPARKPLUG_SCHEMA: dict[str, Field] = {
    "group_id": Field(scalar(_sparkplug_id)),
    "edge_node_id": Field(scalar(_sparkplug_id)),
    "primary_host": Field(scalar(_sparkplug_id), _default(SparkplugConfig, "primary_host")),
    "state_v22": Field(boolean(), _default(SparkplugConfig, "state_v22")),
    "aliases": Field(boolean(), _default(SparkplugConfig, "aliases")),
    "deadband": Field(_deadband, _default(SparkplugConfig, "deadband")),
}

MQTT_JSON_SCHEMA: dict[str, Field] = {
    "topic": Field(scalar(_topic)),
    "max_age": Field(DURATION, _default(MqttJsonConfig, "max_age")),
    "homeassistant": Field(boolean(), _default(MqttJsonConfig, "homeassistant")),
    "discovery_prefix": Field(scalar(_topic), _default(MqttJsonConfig, "discovery_prefix")),
}

MQTT_SCHEMA: dict[str, Field] = {
    "brokers": Field(_brokers),
    "client_id": Field(scalar(_client_id), None),  # None: default_client_id()
    "username": Field(scalar(_mqtt_string), _default(MqttConfig, "username")),
    "password": Field(scalar(_mqtt_string), _default(MqttConfig, "password")),
    "password_file": Field(text(), None),  # read at load into MqttConfig.password
    "tls": Field(record_of(MQTT_TLS_SCHEMA, null_is_empty=True), _default(MqttConfig, "tls")),
    "protocol": Field(scalar(_protocol), _default(MqttConfig, "protocol")),
    "keepalive": Field(scalar(_keepalive), _default(MqttConfig, "keepalive")),
    "queue": Field(record_of(MQTT_QUEUE_SCHEMA, null_is_empty=True), None),  # None: MqttQueue()
    "sparkplug": Field(record_of(SPARKPLUG_SCHEMA), _default(MqttConfig, "sparkplug")),
    "json": Field(record_of(MQTT_JSON_SCHEMA), _default(MqttConfig, "json")),
}

TOP_SCHEMA: dict[str, Field] = {
    "segments": Field(list_of(record_of(SEGMENT_SCHEMA), what="segment")),
    "stale_after": Field(number(gt=0), _default(Config, "stale_after")),
    "modbus_tcp": Field(record_of(MODBUS_TCP_SCHEMA, null_is_empty=True), None),
    "opcua": Field(record_of(OPCUA_SCHEMA, null_is_empty=True), None),
    "http": Field(record_of(HTTP_SCHEMA, null_is_empty=True), None),  # absent: no HTTP server
    "mqtt": Field(_keyed_record(MQTT_SCHEMA, null_is_empty=True), None),  # absent: no MQTT
    "energy": Field(record_of(ENERGY_SCHEMA, null_is_empty=True), None),  # absent: no interval energy
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
    # deadband names are checked against the profiles only when every meter is known
    measurements = None if None in segments else {
        m.name for seg in segments for meter in seg.meters for m in meter.profile.measurements}
    mqtt = _mqtt(v["mqtt"], ctx.child("mqtt"), base_dir, measurements, builder.meter_names)
    energy = build_energy(v["energy"], ctx.child("energy"), builder.meter_names, builder.units)
    if not top.ok or None in segments or INVALID in (modbus_tcp, opcua, http, mqtt, energy):
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
                  http=http, mqtt=mqtt, energy=energy, source=str(ctx.file), state_dir=state_dir)


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


def _mqtt(rec: Any, ctx: Ctx, base_dir: Path, measurements: set[str] | None,
          meter_lines: dict[str, int]) -> MqttConfig | None | Any:
    """The ``mqtt`` section: None when absent, INVALID after reporting, else the built object.
    Checks that span its keys run here; files it names (password_file, tls) are read or checked now."""
    if rec is None or rec is INVALID:
        return rec
    v, given = rec.values, rec.given
    ok = rec.ok
    if "sparkplug" not in given and "json" not in given:
        ctx.report(rec.line, "mqtt needs sparkplug: or json:")
        ok = False
    password = v["password"]
    secret = "password_file" if "password_file" in given else "password"
    if "password" in given and "password_file" in given:
        ctx.child("password_file").report(rec.lines["password_file"], "give password or password_file, not both")
        ok = False
    elif "password_file" in given and rec.valid("password_file"):
        try:
            password = _read_password(os.path.abspath(base_dir / v["password_file"]))
        except Invalid as exc:
            ctx.child("password_file").report(rec.lines["password_file"], str(exc))
            ok = False
    if secret in given and "username" not in given:
        ctx.child(secret).report(rec.lines[secret], f"{secret} needs username")
        ok = False
    tls = v["tls"]
    if isinstance(tls, Record):
        tls = _mqtt_tls(tls, ctx.child("tls"), base_dir)
        if rec.valid("brokers") and not any(url.startswith("mqtts://") for url in v["brokers"]):
            ctx.child("tls").report(rec.key_line("tls"), "tls needs mqtts:// brokers")
            ok = False
    sparkplug = _sparkplug(v["sparkplug"], ctx.child("sparkplug"), measurements) \
        if isinstance(v["sparkplug"], Record) else v["sparkplug"]
    json = _mqtt_json(v["json"], ctx.child("json"), meter_lines) if isinstance(v["json"], Record) else v["json"]
    queue = v["queue"]
    if isinstance(queue, Record):
        queue = MqttQueue(**queue.kwargs(MQTT_QUEUE_SCHEMA)) if queue.ok else INVALID
    if not ok or INVALID in (tls, queue, sparkplug, json):
        return INVALID
    values = rec.kwargs(MQTT_SCHEMA)
    del values["password_file"]
    values.update(client_id=v["client_id"] or default_client_id(), password=password, tls=tls,
                  queue=queue or MqttQueue(), sparkplug=sparkplug, json=json)
    return MqttConfig(**values)


def _unreadable(path: str) -> str | None:
    """Why the file at ``path`` can't be read, or None when it can (a regular file we may open)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"file not found: {path}"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    if stat.S_ISDIR(mode):
        return f"{path} is a folder, not a file"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file"
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return None


def _read_password(path: str) -> str:
    """The password in a file of its own (one line; the trailing newline is not part of it)."""
    problem = _unreadable(path)
    if problem:
        raise Invalid(problem)
    try:
        with open(path, "rb") as f:
            data = f.read(MQTT_STRING_MAX + 3)  # enough to tell a too long password, never a whole big file
    except OSError as exc:
        raise Invalid(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        password = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise Invalid(f"{path} is not UTF-8 text") from None
    if not password:
        raise Invalid(f"{path} is empty")
    if "\n" in password or "\r" in password:
        raise Invalid(f"{path} has more than one line; it must hold the password alone")
    try:
        return _mqtt_string(password)
    except Invalid as exc:
        raise Invalid(f"the password in {path} {exc}") from None


def _mqtt_tls(rec: Record, ctx: Ctx, base_dir: Path) -> MqttTls | Any:
    """Paths resolved against the configuration file's folder; each file must be readable now."""
    ok = rec.ok
    paths = {}
    for key in ("ca", "cert", "key"):
        if key in rec.given and rec.valid(key):
            paths[key] = os.path.abspath(base_dir / rec.values[key])
            problem = _unreadable(paths[key])
            if problem:
                ctx.child(key).report(rec.lines[key], problem)
                ok = False
    if ("cert" in rec.given) != ("key" in rec.given):
        have, missing = ("cert", "key") if "cert" in rec.given else ("key", "cert")
        ctx.child(have).report(rec.lines[have], f"{have} needs {missing}: the client certificate and its "
                                                "private key go together")
        ok = False
    return MqttTls(**paths) if ok else INVALID


def _sparkplug(rec: Record, ctx: Ctx, measurements: set[str] | None) -> SparkplugConfig | Any:
    v = rec.values
    ok = rec.ok
    if rec.valid("state_v22") and v["state_v22"] and "primary_host" not in rec.given:
        ctx.child("state_v22").report(rec.lines["state_v22"], "state_v22 describes the primary host's STATE "
                                                              "messages; it needs primary_host")
        ok = False
    if rec.valid("deadband") and measurements is not None:
        for name, _, line in v["deadband"]:
            if name not in measurements:
                close = difflib.get_close_matches(name, sorted(measurements), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                ctx.child("deadband").child(name).report(
                    line, f"no configured meter has a measurement '{name}'{hint}")
                ok = False
    if not ok:
        return INVALID
    values = rec.kwargs(SPARKPLUG_SCHEMA)
    values["deadband"] = tuple((name, deadband) for name, deadband, _ in values["deadband"])
    return SparkplugConfig(**values)


def _mqtt_json(rec: Record, ctx: Ctx, meter_lines: dict[str, int]) -> MqttJsonConfig | Any:
    v = rec.values
    ok = rec.ok
    if "discovery_prefix" in rec.given and rec.valid("homeassistant") and not v["homeassistant"]:
        ctx.child("discovery_prefix").report(rec.lines["discovery_prefix"],
                                             "discovery_prefix is used only with homeassistant: true")
        ok = False
    if rec.valid("topic") and JSON_STATUS_LEVEL in meter_lines:
        ctx.child("topic").report(
            rec.lines["topic"], f"meter '{JSON_STATUS_LEVEL}' (line {meter_lines[JSON_STATUS_LEVEL]}) would publish "
                                f"on {v['topic']}/{JSON_STATUS_LEVEL}, the bridge's online/offline topic; "
                                "rename the meter")
        ok = False
    return MqttJsonConfig(**rec.kwargs(MQTT_JSON_SCHEMA)) if ok else INVALID


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
    lines.append(f"mqtt: {_mqtt_summary(config.mqtt) if config.mqtt else 'off'}")
    lines.append(f"energy: {energy_summary(config.energy) if config.energy else 'off'}")
    lines.append(f"state directory: {config.state_dir or 'not set'}")
    return "\n".join(lines)


def _mqtt_summary(mqtt: MqttConfig) -> str:
    parts = [f"{', '.join(mqtt.brokers)} as {mqtt.client_id} (MQTT {mqtt.protocol})"]
    if mqtt.sparkplug:
        sp = mqtt.sparkplug
        host = f", primary host {sp.primary_host}" if sp.primary_host else ""
        parts.append(f"sparkplug group {sp.group_id}, edge node {sp.edge_node_id}{host}")
    if mqtt.json:
        ha = f", home assistant discovery under {mqtt.json.discovery_prefix}/" if mqtt.json.homeassistant else ""
        parts.append(f"json {mqtt.json.topic}/<meter>{ha}")
    return "; ".join(parts)
