"""Typed, frozen configuration objects: what a validated config and profile are.

Loading and validation live in ``config`` and ``profiles``; everything else in
the bridge consumes only these objects.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

from bridge.core import codec
from bridge.core.codec import DataType, Function, WordOrder
from bridge.core.pdu import MAX_READ

MAX_READ_REGISTERS = MAX_READ  # Modbus limit for FC3/FC4 (the protocol says it: pdu)


@dataclass(frozen=True)
class Measurement:
    name: str
    address: int  # 0-based PDU address
    dtype: DataType
    function: Function
    word_order: WordOrder
    scale: float = 1.0
    unit: str = ""  # as written in the profile: V, A, W, var, VA, Hz, kWh, kvarh, deg, "" ...
    description: str = ""
    eu_range: tuple[float, float] | None = None  # profile key: range [low, high], the value's normal span

    @property
    def count(self) -> int:
        return self.dtype.registers

    @functools.cached_property
    def _decode(self):
        return codec.decoder(self.dtype, self.word_order)

    def value(self, raw: bytes) -> float | int:
        """The measurement's value from its raw registers: decoded, then scaled (the one place)."""
        value = self._decode(raw)
        return value * self.scale if self.scale != 1.0 else value

    @property
    def end(self) -> int:
        """One past the last register."""
        return self.address + self.count


@dataclass(frozen=True)
class RegisterRange:
    """Raw registers mirrored verbatim into the image."""

    function: Function
    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    function: Function
    word_order: WordOrder
    measurements: tuple[Measurement, ...]
    ranges: tuple[RegisterRange, ...] = ()
    max_read: int = MAX_READ_REGISTERS  # profile key: max_registers_per_read
    read_gaps: bool = True  # profile key: read_gaps; False if the meter refuses reads spanning unmapped holes
    source: str = ""  # "builtin" or the file path it was loaded from


@dataclass(frozen=True)
class MeterConfig:
    name: str
    slave: int
    unit: int
    profile: Profile
    poll_interval: float = 1.0
    writable: bool = False
    ranges: tuple[RegisterRange, ...] = ()  # added to the profile's
    stale_after: float = 10.0  # resolved: the meter's own value or the bridge-wide one
    write_ranges: tuple[RegisterRange, ...] = ()  # holding registers a write may touch; empty: any

    def may_write(self, address: int, count: int) -> bool:
        """Whether an upstream write of ``count`` registers at ``address`` is allowed to reach the bus."""
        if not self.writable:
            return False
        if not self.write_ranges:
            return True
        return any(r.start <= address and address + count <= r.end for r in self.write_ranges)

    @property
    def all_ranges(self) -> tuple[RegisterRange, ...]:
        return self.profile.ranges + self.ranges


def merge_intervals(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def served_intervals(meter: MeterConfig) -> dict[Function, list[tuple[int, int]]]:
    """The registers a unit serves, per table: its measurements and mirrored ranges, merged."""
    raw: dict[Function, list[tuple[int, int]]] = {}
    for m in meter.profile.measurements:
        raw.setdefault(m.function, []).append((m.address, m.end))
    for r in meter.all_ranges:
        raw.setdefault(r.function, []).append((r.start, r.end))
    return {fn: merge_intervals(iv) for fn, iv in raw.items()}


@dataclass(frozen=True)
class SegmentConfig:
    name: str
    port: str
    baudrate: int = 9600
    parity: str = "N"  # N | E | O
    stopbits: int = 1  # 1 | 2
    bytesize: int = 8
    timeout: float = 0.5
    retries: int = 1
    meters: tuple[MeterConfig, ...] = ()
    demote_after: int = 3  # consecutive failed polls before a meter is demoted (declared offline)
    demote_interval: float = 10.0  # seconds between polls of a demoted meter


@dataclass(frozen=True)
class ConsolidatedMap:
    """An extra unit serving every meter's measurements as float32: meter k, measurement j at
    ``base + k * stride + 2 * j`` (meters in configuration order), FC3 and FC4 alike."""

    unit: int
    base: int = 0
    stride: int = 100


@dataclass(frozen=True)
class ModbusTcpConfig:
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = 502
    max_connections: int = 64  # a new connection beyond this is closed at once
    idle_timeout: float = 300.0  # seconds without a request before a connection is closed
    frame_timeout: float = 5.0  # seconds a started request may take to arrive in full
    max_pending: int = 16  # requests per connection awaiting the bus (writes); more get exception 0x06
    allow: tuple[str, ...] = ()  # client addresses or networks (CIDR) allowed to connect; empty: any
    consolidated: ConsolidatedMap | None = None  # the whole panel under one unit id


@dataclass(frozen=True)
class OpcUaUser:
    name: str
    password_hash: str  # from `modbus-bridge hash-password`: scrypt$n$r$p$salt$hash (base64)


@dataclass(frozen=True)
class OpcUaConfig:
    enabled: bool = True
    endpoint: str = "opc.tcp://0.0.0.0:4840/bridge"
    namespace: str = "urn:modbus-bridge"
    # SecurityPolicy/mode pairs offered; "None" (no security) only when listed explicitly
    security: tuple[str, ...] = ("Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign")
    # our certificate and key (created on first start); relative: to the config file; not in the file:
    # <state_dir>/pki (load_config resolves both to a path)
    certificate_dir: str = "pki"
    trusted_clients_dir: str = ""  # client certificates trusted; "": <certificate_dir>/trusted
    anonymous: bool = True  # anonymous sessions (on the offered security policies)
    users: tuple[OpcUaUser, ...] = ()


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True)
class MqttTls:
    ca: str = ""  # CA bundle (PEM) that signed the broker's certificate; "": the system's
    cert: str = ""  # client certificate (PEM) for mutual TLS; "" : none
    key: str = ""  # its private key (PEM)


@dataclass(frozen=True)
class MqttQueue:
    """Store-and-forward bounds: the oldest messages are dropped (and counted) beyond either."""

    max_mb: float = 256.0
    max_age: float = 7 * 86400.0  # seconds


@dataclass(frozen=True)
class SparkplugConfig:
    group_id: str
    edge_node_id: str
    primary_host: str = ""  # "": publish whenever connected; else only while that host is ONLINE
    state_v22: bool = False  # primary host's STATE in the Sparkplug 2.2 form (ONLINE/OFFLINE text)
    aliases: bool = True  # metric aliases in NBIRTH/DBIRTH, alias only in NDATA/DDATA
    deadband: tuple[tuple[str, float], ...] = ()  # (measurement name, absolute deadband) for DDATA


@dataclass(frozen=True)
class MqttJsonConfig:
    topic: str  # prefix: <topic>/<meter>, <topic>/status
    max_age: float = 60.0  # seconds: republish an unchanged state at least this often
    homeassistant: bool = False  # MQTT discovery under discovery_prefix
    discovery_prefix: str = "homeassistant"


@dataclass(frozen=True)
class MqttConfig:
    brokers: tuple[str, ...]  # mqtt://host:port or mqtts://host:port, tried in order
    client_id: str
    username: str = ""
    password: str = field(default="", repr=False)  # from password: or password_file: (read at load)
    tls: MqttTls | None = None
    protocol: str = "5"  # "3.1.1" | "5"
    keepalive: float = 30.0
    queue: MqttQueue = field(default_factory=MqttQueue)
    sparkplug: SparkplugConfig | None = None
    json: MqttJsonConfig | None = None


@dataclass(frozen=True)
class TariffConfig:
    """A time-of-use period: local time of day [start, end) on some days; no days and no times: the rest."""
    name: str
    days: frozenset[int] | None = None  # 0 = Monday … 6 = Sunday; None: every day
    start: int | None = None  # minutes after local midnight; None with end None: the whole day
    end: int | None = None  # minutes after local midnight, 1440 for midnight; end < start wraps over midnight


@dataclass(frozen=True)
class BalanceAlarmConfig:
    reference: str  # the meter the balance is a percentage of (usually the incomer)
    above_percent: float  # |balance| above this share of the reference's energy …
    intervals: int = 1  # … for this many intervals in a row raises the alarm


@dataclass(frozen=True)
class VirtualMeterConfig:
    name: str
    terms: tuple[tuple[int, str], ...]  # (+1 or -1, meter name), in formula order
    formula: str = ""  # as written
    alarm: BalanceAlarmConfig | None = None
    unit: int | None = None  # a Modbus TCP unit id of its own (bridge.energy.modbus_map), unique across the bridge


@dataclass(frozen=True)
class EnergyConfig:
    interval: int = 15  # minutes, a divisor of 60; boundaries aligned to UTC
    timezone: str = "UTC"  # IANA name: tariffs, billing periods and reports
    retention_days: int = 400
    billing_day: int = 1  # a billing period starts on this day of the month (1..28), local midnight
    max_gap: float = 0.0  # seconds between readings beyond which a boundary is estimated; 0: 2 × stale_after
    demand_window: int = 0  # minutes of sliding demand (a multiple of the interval); 0: block demand only
    tariffs: tuple[TariffConfig, ...] = ()
    virtual: tuple[VirtualMeterConfig, ...] = ()
    seconds: int = 0  # tests only, never from the file: an interval this many seconds long instead

    @property
    def interval_s(self) -> int:
        return self.seconds or self.interval * 60


@dataclass(frozen=True)
class Config:
    segments: tuple[SegmentConfig, ...]
    stale_after: float = 10.0
    modbus_tcp: ModbusTcpConfig = field(default_factory=ModbusTcpConfig)
    opcua: OpcUaConfig = field(default_factory=OpcUaConfig)
    http: HttpConfig | None = None  # off when the key is absent
    mqtt: MqttConfig | None = None  # off when the key is absent
    energy: EnergyConfig | None = None  # off when the key is absent
    source: str = ""
    # the one writable place for what the bridge keeps between runs (OPC UA certificates, MQTT queue and
    # Sparkplug bdSeq, energy store); absolute after load_config; "": not set (bridge.state refuses it)
    state_dir: str = ""

    @property
    def meters(self) -> tuple[MeterConfig, ...]:
        return tuple(m for s in self.segments for m in s.meters)

    @property
    def virtual_meters(self) -> tuple[VirtualMeterConfig, ...]:
        """``energy.virtual``; none while interval energy is off."""
        return self.energy.virtual if self.energy is not None else ()
