"""The OPC UA server: every meter's measurements, with units, quality and source timestamps.

Built once from the configuration with ``NodeBuilder`` (fast, shared attribute
values), then fed by the register image's change notifications: the listener
only records what changed; one task decodes the changed measurements and
writes the values that differ, yielding to the event loop every few hundred
writes so the serial side and Modbus TCP clients are never held up.

Status rule (see docs/opcua.md): never read → BadWaitingForInitialData;
fresh → Good; stale → UncertainLastUsableValue (last value kept);
offline → BadCommunicationError; Good again on the next good poll.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urlparse

from asyncua import Server, ua
from asyncua.server.address_space import AttributeValue, NodeData

from bridge import __version__
from bridge.core import codec
from bridge.core.image import Change, Health, RegisterImage
from bridge.core.model import Config, Measurement, MeterConfig, OpcUaConfig
from bridge.north.opcua.nodes import ANALOG_ITEM_TYPE, NodeBuilder
from bridge.north.opcua.security import configure_security
from bridge.core.units import CEFACT_NAMESPACE, unit_for

log = logging.getLogger("bridge.opcua")

YIELD_EVERY = 200  # value writes between two yields to the event loop
COALESCE = 0.02  # seconds the writer waits after a change before writing, gathering a poll's blocks
DIAGNOSTICS_PERIOD = 1.0  # seconds between refreshes of counters and online flags

_DT = ua.ObjectIds
_STATUS = {
    Health.NEVER_READ: ua.StatusCode(ua.StatusCodes.BadWaitingForInitialData),
    Health.FRESH: ua.StatusCode(ua.StatusCodes.Good),
    Health.STALE: ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue),
    Health.OFFLINE: ua.StatusCode(ua.StatusCodes.BadCommunicationError),
}
_NULL = ua.Variant(None, ua.VariantType.Null)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


@dataclass
class _Point:
    """One measurement's node and what it last showed."""

    measurement: Measurement
    node: NodeData
    decode: Callable[[bytes], int | float]
    value: float | None = None
    status: ua.StatusCode | None = None
    source_time: datetime | None = None

    @property
    def attribute(self) -> AttributeValue:
        return self.node.attributes[ua.AttributeIds.Value]


class _Counters:
    """Variables of one object whose values come from a dict of numbers, written when they change."""

    def __init__(self, builder: NodeBuilder, parent: ua.NodeId, prefix: str, spec: dict[str, tuple[int, str]]):
        self.nodes: dict[str, NodeData] = {}
        self.last: dict[str, object] = {}
        self.datatypes = {name: datatype for name, (datatype, _) in spec.items()}
        for name, (datatype, description) in spec.items():
            self.nodes[name] = builder.variable(parent, f"{prefix}.{name}", name, _initial(datatype), datatype,
                                                description)


# the value a diagnostic variable shows before its first refresh, by data type
_INITIAL = {
    _DT.Boolean: (False, ua.VariantType.Boolean),
    _DT.UInt32: (0, ua.VariantType.UInt32),
    _DT.Double: (0.0, ua.VariantType.Double),
    _DT.DateTime: (None, ua.VariantType.DateTime),
    _DT.String: ("", ua.VariantType.String),
}


def _initial(datatype: int) -> ua.Variant:
    value, vtype = _INITIAL[datatype]
    # a null DateTime cannot be encoded: "no time yet" is a null Variant
    return ua.Variant(value, vtype if value is not None else ua.VariantType.Null)


METER_COUNTERS = {
    "Online": (_DT.Boolean, "True while the meter answers its polls (not stale, not offline)"),
    "LastGoodPoll": (_DT.DateTime, "Time of the last poll in which every block was read"),
    "Requests": (_DT.UInt32, "Requests sent to this meter"),
    "GoodReplies": (_DT.UInt32, "Replies that answered their request"),
    "Timeouts": (_DT.UInt32, "Requests with no reply in time"),
    "CrcErrors": (_DT.UInt32, "Replies with a bad CRC"),
    "ProtocolErrors": (_DT.UInt32, "Answers that were truncated, from another slave, noise, or of the wrong "
                                   "function, length or echo"),
    "ExceptionReplies": (_DT.UInt32, "Modbus exception replies"),
    "Retries": (_DT.UInt32, "Requests repeated after a timeout or a bad reply"),
    "Demotions": (_DT.UInt32, "Times the meter was declared offline and polled less often"),
    "TurnaroundTime": (_DT.Double, "Measured seconds from the end of a request to the start of its reply"),
    "LastError": (_DT.String, "The last error, empty while the meter is healthy"),
}
SEGMENT_COUNTERS = {
    "PortOpen": (_DT.Boolean, "True while the serial port is open"),
    "Requests": (_DT.UInt32, "Requests sent on this segment"),
    "Errors": (_DT.UInt32, "CRC, protocol and exception errors on this segment"),
    "Timeouts": (_DT.UInt32, "Requests with no reply in time"),
    "CycleTime": (_DT.Double, "Seconds for the last round in which every meter was polled"),
    "Utilisation": (_DT.Double, "Fraction of the last period the line was busy with transactions (0..1)"),
}


class OpcUaServer:
    def __init__(self, cfg: OpcUaConfig, config: Config, image: RegisterImage):
        self.cfg = cfg
        self.config = config
        self.image = image
        self.server: Server | None = None
        self.ns = 0
        self._points: dict[int, list[_Point]] = {}  # unit -> its measurements
        self._meter_counters: dict[int, _Counters] = {}
        self._segment_counters: dict[str, _Counters] = {}
        self._bridge: _Counters | None = None
        self._dirty: dict[int, float | None] = {}  # unit -> newest reply time (None: health only)
        self._wake = asyncio.Event()
        self._started = time.time()
        self._busy_before: dict[str, tuple[float, float]] = {}
        self.build_seconds = 0.0

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        t0 = time.perf_counter()
        server = Server()
        self.server = server
        await server.init()
        server.set_endpoint(self.cfg.endpoint)
        server.set_server_name("modbus-bridge")
        await server.set_application_uri(f"urn:modbus-bridge:{urlparse(self.cfg.endpoint).hostname}")
        await server.set_build_info("https://github.com/modbus-bridge/modbus-bridge", "modbus-bridge",
                                    "modbus-bridge", __version__, __version__, datetime.now(timezone.utc))
        await configure_security(server, self.cfg)
        self.ns = await server.register_namespace(self.cfg.namespace)
        self._build(NodeBuilder(server.iserver.aspace, self.ns))
        self.image.subscribe(self.listener)
        for unit in self._points:
            self._dirty[unit] = None
        self.build_seconds = time.perf_counter() - t0
        await server.start()
        log.info("OPC UA listening on %s (%d variables, built in %.1f s)", self.cfg.endpoint,
                 sum(len(p) for p in self._points.values()), self.build_seconds)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def run(self) -> None:
        """Write what changed, as it changes; refresh diagnostics periodically. Runs until cancelled."""
        next_diag = 0.0
        loop = asyncio.get_running_loop()
        while True:
            timeout = max(0.0, next_diag - loop.time())
            if not self._dirty:
                try:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            if self._dirty:
                # let the rest of a poll's blocks land, so each value is written once per poll
                await asyncio.sleep(COALESCE)
            self._wake.clear()
            await self._flush()
            if loop.time() >= next_diag:
                await self._diagnostics()
                next_diag = loop.time() + DIAGNOSTICS_PERIOD

    # ---------------------------------------------------------- address space
    def _build(self, b: NodeBuilder) -> None:
        objects = ua.NodeId(ua.ObjectIds.ObjectsFolder)
        meters = b.folder(objects, "Meters/", "Meters", "Every meter the bridge polls")
        segments = b.folder(objects, "Segments/", "Segments", "The RS485 segments, one per serial port")
        bridge = b.object(objects, "Bridge/", "Bridge", "The bridge itself")
        b.property(bridge, "Bridge/.Version", "Version", ua.Variant(__version__, ua.VariantType.String), _DT.String)
        b.property(bridge, "Bridge/.StartTime", "StartTime",
                   ua.Variant(_utc(self._started), ua.VariantType.DateTime), _DT.DateTime)
        self._bridge = _Counters(b, bridge, "Bridge/", {"Uptime": (_DT.Double, "Seconds since the bridge started")})
        for seg in self.config.segments:
            node = b.object(segments, f"Segments/{seg.name}", seg.name, f"Segment on {seg.port}")
            ident = f"Segments/{seg.name}"
            for name, value, vt, dt in (
                ("Port", seg.port, ua.VariantType.String, _DT.String),
                ("BaudRate", seg.baudrate, ua.VariantType.UInt32, _DT.UInt32),
                ("Parity", seg.parity, ua.VariantType.String, _DT.String),
                ("StopBits", seg.stopbits, ua.VariantType.UInt32, _DT.UInt32),
            ):
                b.property(node, f"{ident}.{name}", name, ua.Variant(value, vt), dt)
            self._segment_counters[seg.name] = _Counters(b, node, ident, SEGMENT_COUNTERS)
            for meter in seg.meters:
                self._build_meter(b, meters, meter, seg.name)

    def _build_meter(self, b: NodeBuilder, parent: ua.NodeId, meter: MeterConfig, segment: str) -> None:
        profile = meter.profile
        node = b.object(parent, meter.name, meter.name, profile.description.split(". ")[0])
        for name, value, vt, dt in (
            ("Segment", segment, ua.VariantType.String, _DT.String),
            ("SlaveAddress", meter.slave, ua.VariantType.UInt32, _DT.UInt32),
            ("UnitId", meter.unit, ua.VariantType.UInt32, _DT.UInt32),
            ("Profile", profile.name, ua.VariantType.String, _DT.String),
        ):
            b.property(node, f"{meter.name}.{name}", name, ua.Variant(value, vt), dt)
        self._meter_counters[meter.unit] = _Counters(b, node, meter.name, METER_COUNTERS)
        points = []
        for m in profile.measurements:
            ident = f"{meter.name}.{m.name}"
            var = b.variable(node, ident, m.name, _NULL, _DT.Double, m.description or m.name.replace("_", " "),
                             type_def=ANALOG_ITEM_TYPE, status=_STATUS[Health.NEVER_READ])
            b.property(var.nodeid, f"{ident}.EngineeringUnits", "EngineeringUnits",
                       ua.Variant(_eu(m.unit), ua.VariantType.ExtensionObject), _DT.EUInformation, standard=True)
            if m.eu_range is not None:
                low, high = m.eu_range
                b.property(var.nodeid, f"{ident}.EURange", "EURange",
                           ua.Variant(ua.Range(Low=low, High=high), ua.VariantType.ExtensionObject), _DT.Range,
                           standard=True)
            points.append(_Point(m, var, codec.decoder(m.dtype, m.word_order)))
        self._points[meter.unit] = points

    # ------------------------------------------------------------- updates
    def listener(self, change: Change | None, unit: int, health: Health) -> None:
        """Image listener: remember what to refresh; the writer task does the work."""
        if unit not in self._points:
            return
        stamp = change.timestamp if change is not None else None
        prev = self._dirty.get(unit)
        self._dirty[unit] = stamp if prev is None else max(prev, stamp or prev)
        self._wake.set()

    async def _flush(self) -> None:
        """Write every changed value of the units marked dirty, oldest change first.

        Values a client has subscribed to go out first, so a sweep over thousands of
        unwatched values does not delay the watched ones.
        """
        batch = list(self._dirty.items())
        self._dirty.clear()
        now = datetime.now(timezone.utc)
        units = []
        for unit, stamp in batch:
            health = self.image.health(unit)
            u = self.image.unit(unit)
            if stamp is None and health is Health.FRESH and u.last_good_wall is not None:
                stamp = u.last_good_wall  # back to fresh: the values are those of the last good poll
            units.append((unit, health, _utc(stamp) if stamp is not None else None))
            await self._set(self._meter_counters[unit], {"Online": health is Health.FRESH}, now)
        writes = 0
        for watched in (True, False):
            for unit, health, source in units:
                if unit in self._dirty:
                    continue  # changed again while we yielded: its own pass writes it with its stamp
                for point in self._points[unit]:
                    if bool(point.attribute.datachange_callbacks) is watched and \
                            await self._update(point, unit, health, source, now):
                        writes += 1
                        if writes % YIELD_EVERY == 0:
                            await asyncio.sleep(0)
        if writes:
            await asyncio.sleep(0)

    async def _update(self, point: _Point, unit: int, health: Health, source: datetime | None,
                      now: datetime) -> bool:
        """Bring one measurement's node up to date; False if nothing changed."""
        m = point.measurement
        status = _STATUS[health]
        value = None
        if health is Health.FRESH or health is Health.STALE:
            value = point.decode(self.image.value_registers(unit, m.function, m.address, m.count)) * m.scale
        if value == point.value and status == point.status:
            return False
        if source is not None and (value != point.value or health is Health.FRESH):
            point.source_time = source  # the reply this value came from
        elif point.source_time is None or health in (Health.OFFLINE, Health.NEVER_READ):
            point.source_time = now  # no value: when it was lost
        point.value, point.status = value, status
        attr = point.attribute
        if attr.datachange_callbacks:
            # watched: a new DataValue, since asyncua queues the very object for the next publish
            variant = _NULL if value is None else ua.Variant(float(value), ua.VariantType.Double)
            attr.value = ua.DataValue(variant, StatusCode=status, SourceTimestamp=point.source_time,
                                      ServerTimestamp=now)
            await _notify(attr, attr.value)
            return True
        # Unwatched: update the DataValue in place, so a sweep over thousands of values leaves no
        # new objects for the garbage collector to walk (a Read encodes it before anything else runs).
        dv = attr.value
        if dv.Value is _NULL:
            dv.Value = ua.Variant(None, ua.VariantType.Null)
        variant = dv.Value
        if value is None:
            variant.Value, variant.VariantType = None, ua.VariantType.Null
        else:
            variant.Value, variant.VariantType = float(value), ua.VariantType.Double
        dv.StatusCode, dv.SourceTimestamp, dv.ServerTimestamp = status, point.source_time, now
        return True

    async def _diagnostics(self) -> None:
        now_wall = time.time()
        now = datetime.now(timezone.utc)
        await self._set(self._bridge, {"Uptime": now_wall - self._started}, now)
        mono = time.monotonic()
        for name, seg in self.image.segments.items():
            busy_before, at_before = self._busy_before.get(name, (0.0, seg.started or mono))
            self._busy_before[name] = (seg.busy_time, mono)
            await self._set(self._segment_counters[name], {
                "PortOpen": seg.port_open,
                "Requests": seg.requests,
                "Errors": seg.errors,
                "Timeouts": seg.timeouts,
                "CycleTime": seg.cycle_time,
                "Utilisation": seg.utilisation(busy_before, at_before, mono),
            }, now)
            for unit, d in seg.meters.items():
                u = self.image.unit(unit)
                await self._set(self._meter_counters[unit], {
                    "Online": self.image.health(unit) is Health.FRESH,
                    "LastGoodPoll": _utc(u.last_good_wall) if u.last_good_wall else None,
                    "Requests": d.requests,
                    "GoodReplies": d.good,
                    "Timeouts": d.timeouts,
                    "CrcErrors": d.crc_errors,
                    "ProtocolErrors": d.truncated + d.wrong_slave + d.noise + d.protocol_errors,
                    "ExceptionReplies": d.exceptions,
                    "Retries": d.retries,
                    "Demotions": d.demotions,
                    "TurnaroundTime": d.turnaround if d.turnaround is not None else 0.0,
                    "LastError": u.last_error,  # the image clears it on the next good poll
                }, now)
            await asyncio.sleep(0)

    async def _set(self, counters: _Counters | None, values: dict[str, object], now: datetime) -> None:
        if counters is None:
            return
        for name, value in values.items():
            if counters.last.get(name, object()) == value:
                continue
            counters.last[name] = value
            node = counters.nodes[name]
            vtype = _INITIAL[counters.datatypes[name]][1] if value is not None else ua.VariantType.Null
            await _write(node, ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=now, ServerTimestamp=now))


async def _write(node: NodeData, dv: ua.DataValue) -> None:
    """What asyncua's write_attribute_value does for a Value, minus the per-call lookups and checks."""
    attr = node.attributes[ua.AttributeIds.Value]
    attr.value = dv
    await _notify(attr, dv)


async def _notify(attr: AttributeValue, dv: ua.DataValue) -> None:
    for handle, callback in list(attr.datachange_callbacks.items()):
        await callback(handle, dv)


def _eu(symbol: str) -> ua.EUInformation:
    unit = unit_for(symbol)
    if unit is None:  # not a unit we know a UNECE code for: no code (-1), the symbol as written
        return ua.EUInformation(NamespaceUri=CEFACT_NAMESPACE, UnitId=-1, DisplayName=ua.LocalizedText(symbol),
                                Description=ua.LocalizedText(symbol))
    return ua.EUInformation(NamespaceUri=CEFACT_NAMESPACE, UnitId=unit.unit_id,
                            DisplayName=ua.LocalizedText(unit.symbol), Description=ua.LocalizedText(unit.name))
