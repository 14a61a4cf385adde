"""The OPC UA north side: every meter's measurements, with units, quality and source timestamps.

Built from the configuration with ``NodeBuilder`` (fast, shared attribute values), then fed by the
register image's change notifications: the listener only records what changed; one task (``run``)
decodes the changed measurements and writes the values that differ, yielding to the event loop
every few hundred writes so the serial side and Modbus TCP clients are never held up. Everything
else it shows (segments, meters, counters, utilisation, the bridge's start time) comes from the
read model (``BridgeView``).

A reload (``stage``/``commit``, see ``bridge.north.side``) that changes only segments and meters
updates the address space in place: the subtrees of removed or changed meters and segments go,
new ones are built, and every other node, session and subscription stays as it was (a client's
subscription on a node that is built anew with the same NodeId follows it); then every value is
written again from the image, which the App reconfigures before it commits. A reload that changes
the ``opcua`` settings needs a new asyncua server: started beside the old one when the port
changes, in its place when it does not, and the old one started again if the new one cannot listen.

With ``energy:`` configured, each meter with energy counters and each virtual meter has an ``Energy``
object showing its last closed interval (refreshed with the diagnostics, once a second), and its energy
and demand variables answer HistoryRead from the energy store: see ``bridge.north.opcua.energy``.

Status rule (see docs/opcua.md): never read → BadWaitingForInitialData;
fresh → Good; stale → UncertainLastUsableValue (last value kept);
offline → BadCommunicationError; Good again on the next good poll.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlparse

from asyncua import Server, ua
from asyncua.server.address_space import AttributeValue, NodeData
from asyncua.server.binary_server_asyncio import BinaryServer

from bridge import __version__
from bridge.core.errors import BridgeError
from bridge.core.image import Change, Health, UnitImage
from bridge.core.model import Config, Measurement, MeterConfig, OpcUaConfig, SegmentConfig, VirtualMeterConfig
from bridge.core.units import CEFACT_NAMESPACE, unit_for
from bridge.energy.meters import energy_meters, virtual_live
from bridge.north.opcua.energy import EnergyHistory, EnergyNodes, build_energy
from bridge.north.opcua.nodes import ANALOG_ITEM_TYPE, NodeBuilder, Watch, reattach
from bridge.north.opcua.security import configure_security
from bridge.north.side import Staged, listen_error
from bridge.view import BridgeView, NorthStatus

log = logging.getLogger("bridge.opcua")

YIELD_EVERY = 200  # value writes between two yields to the event loop
COALESCE = 0.02  # seconds the writer waits after a change before writing, gathering a poll's blocks
DIAGNOSTICS_PERIOD = 1.0  # seconds between refreshes of counters and online flags
DEFAULT_PORT = 4840  # opc.tcp's port when the endpoint names none

_DT = ua.ObjectIds
_STATUS = {
    Health.NEVER_READ: ua.StatusCode(ua.StatusCodes.BadWaitingForInitialData),
    Health.FRESH: ua.StatusCode(ua.StatusCodes.Good),
    Health.STALE: ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue),
    Health.OFFLINE: ua.StatusCode(ua.StatusCodes.BadCommunicationError),
}
_NULL = ua.Variant(None, ua.VariantType.Null)
_GONE = ua.StatusCode(ua.StatusCodes.BadNodeIdUnknown)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def energy_objects(config: Config) -> dict[str, tuple[tuple[str, ...], VirtualMeterConfig | None, tuple[str, ...]]]:
    """``energy_meters`` with, for a virtual meter, what it has live (``virtual_live``): what each
    ``Energy`` object (and virtual meter) is built from, and built anew when it changes."""
    meters = {m.name: m for m in config.meters}
    return {name: (quantities, virtual,
                   virtual_live([meters[t] for _, t in virtual.terms]) if virtual is not None else ())
            for name, (quantities, virtual) in energy_meters(config).items()}


@dataclass
class _Point:
    """One measurement's node and what it last showed."""

    measurement: Measurement
    node: NodeData
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


BRIDGE_COUNTERS = {
    "Uptime": (_DT.Double, "Seconds since the bridge started"),
    "MqttConnected": (_DT.Boolean, "True while every MQTT connection (Sparkplug B, JSON) is up"),
    "MqttBroker": (_DT.String, "The broker connected to (or the brokers configured)"),
    "MqttSent": (_DT.UInt32, "MQTT messages sent"),
    "MqttQueued": (_DT.UInt32, "Messages waiting in the store-and-forward queue"),
    "MqttDropped": (_DT.UInt32, "Queued messages dropped by a bound or a full disk"),
    "MqttReplayed": (_DT.UInt32, "Messages sent from the store-and-forward queue"),
    "MqttLastError": (_DT.String, "The last MQTT connection error, empty while connected"),
}
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


def _shown(seg: SegmentConfig) -> tuple:
    """What a segment's object shows of its configuration: it is built anew when this changes. (Not its
    meters, so that adding a meter changes nothing of its siblings; not its timing, which only its
    counters reflect.)"""
    return seg.name, seg.port, seg.baudrate, seg.parity, seg.stopbits


def _host_port(endpoint: str) -> tuple[str, int]:
    url = urlparse(endpoint)
    return url.hostname or "", url.port or DEFAULT_PORT


@dataclass(eq=False)
class _MeterNodes:
    key: tuple[MeterConfig, str]  # the meter and the name of its segment, as built
    nodeid: ua.NodeId
    points: list[_Point]
    counters: _Counters


@dataclass(eq=False)
class _SegmentNodes:
    key: tuple  # what it shows (``_shown``), as built
    nodeid: ua.NodeId
    counters: _Counters


@dataclass(eq=False)
class _Space:
    """One asyncua server, its address space, and the records the writer updates."""

    server: Server
    cfg: OpcUaConfig
    ns: int
    started: bool = False  # asyncua's start() succeeded: its internal server runs until stop()
    listening: bool = False
    meters_folder: ua.NodeId = field(default_factory=ua.NodeId)
    segments_folder: ua.NodeId = field(default_factory=ua.NodeId)
    bridge: _Counters | None = None
    meters: dict[str, _MeterNodes] = field(default_factory=dict)  # by meter name
    segments: dict[str, _SegmentNodes] = field(default_factory=dict)  # by segment name
    # by unit, from the configuration this space shows: what the listener and the writer look up
    points: dict[int, list[_Point]] = field(default_factory=dict)
    meter_counters: dict[int, _Counters] = field(default_factory=dict)
    energy: dict[str, EnergyNodes] = field(default_factory=dict)  # by meter name (real and virtual)
    # the variables whose history the server's EnergyHistory serves: NodeId -> (meter, quantity or "demand");
    # updated in place, the storage holds this very dict
    history: dict[ua.NodeId, tuple[str, str]] = field(default_factory=dict)
    build_seconds: float = 0.0

    def index(self, config: Config) -> None:
        """Rebuild the maps by unit from ``config`` (whose meters all have their nodes)."""
        self.points = {m.unit: self.meters[m.name].points for m in config.meters}
        self.meter_counters = {m.unit: self.meters[m.name].counters for m in config.meters}

    def forget(self) -> None:
        """Drop every record of the address space (the server is closed)."""
        self.bridge = None
        self.meters, self.segments, self.points, self.meter_counters, self.energy = {}, {}, {}, {}, {}
        self.history.clear()


class _NoTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


@contextlib.contextmanager
def _no_tracebacks(logger: str) -> Iterator[None]:
    """asyncua logs a traceback of its own before it raises (a server that cannot listen); we raise a
    one-line BridgeError instead, so its traceback is left out while we call it."""
    target = logging.getLogger(logger)
    quiet = _NoTracebacks()
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)


class OpcUaServer:
    """The OPC UA north side (``bridge.north.side.NorthSide``)."""

    name = "opcua"

    def __init__(self, config: Config, view: BridgeView):
        self.config = config  # the configuration in force
        self.view = view
        self.image = view.image
        self._space: _Space | None = None  # the server clients see
        self._staged: list[_Space] = []  # servers started by a stage not yet committed or aborted
        self._running = False  # between start() and stop()
        self._dirty: dict[int, float | None] = {}  # unit -> newest reply time (None: health only)
        self._wake = asyncio.Event()

    # ------------------------------------------------------------- what others may look at
    @property
    def server(self) -> Server | None:
        """The asyncua server clients see now (None when stopped)."""
        return self._space.server if self._space is not None else None

    @property
    def ns(self) -> int:
        return self._space.ns if self._space is not None else 0

    @property
    def build_seconds(self) -> float:
        """Seconds the address space in force took to build (asyncua's init included)."""
        return self._space.build_seconds if self._space is not None else 0.0

    @property
    def _points(self) -> dict[int, list[_Point]]:  # for bench/opcua.py
        return self._space.points if self._space is not None else {}

    def status(self) -> NorthStatus:
        space = self._space
        if space is None:
            return NorthStatus(self.name, False, self.config.opcua.endpoint, {"sessions": 0, "subscriptions": 0})
        iserver = space.server.iserver
        # asyncua's own bookkeeping: plain dicts, read without awaiting
        return NorthStatus(self.name, space.listening, space.cfg.endpoint, {
            "sessions": len(iserver._external_sessions),
            "subscriptions": len(iserver.subscription_service.subscriptions),
        })

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Build the address space and listen; BridgeError (one line) if it cannot listen."""
        if self._running:
            return
        space = await self._open(self.config)
        await self._listen(space)
        self._space = space
        self._running = True
        self.image.unsubscribe(self.listener)
        self.image.subscribe(self.listener)
        self._mark_all()

    async def stop(self) -> None:
        """Close every session and subscription, then the listener and the server; no client is
        left with a subscription publishing into a closed connection."""
        self._running = False
        self.image.unsubscribe(self.listener)
        spaces = [s for s in (self._space, *self._staged) if s is not None]
        self._space = None
        self._staged = []
        self._dirty.clear()
        for space in spaces:
            await self._close(space)

    async def stage(self, config: Config) -> Staged:
        """Prepare ``config`` without changing what clients see (see the module's docstring)."""
        old = self._space
        if not self._running:
            async def adopt() -> None:
                self.config = config
            return Staged(adopt)
        if not config.opcua.enabled:
            async def close() -> None:
                self.config = config
                self._space = None
                if old is not None:
                    await self._close(old)
            return Staged(close)
        if old is not None and old.cfg == config.opcua:
            async def update() -> None:
                self.config = config
                await self._update(old, config)
                self._mark_all()
                # written now, not by the writer a moment later: once the reload is applied, a meter
                # whose bus changed must already read BadWaitingForInitialData, never its old values
                await self._flush()
            return Staged(update)

        new: _Space | None = await self._open(config)  # BridgeError (e.g. a certificate): nothing changed
        same_port = old is not None and _host_port(old.cfg.endpoint)[1] == _host_port(new.cfg.endpoint)[1]
        if not same_port:
            await self._listen(new)  # beside the old one; BridgeError: nothing changed
        else:
            # the same port: the new server can listen only once the old one has stopped
            await self._unlisten(old)
            try:
                await self._listen(new)
            except BaseException:
                await self._relisten(old, "after the new server could not listen")
                raise
        self._staged.append(new)

        # the closures let go of both servers once done, so that a Staged kept by someone keeps
        # no server alive
        async def commit() -> None:
            nonlocal old, new
            if new is None:
                return
            retired, space, old, new = old, new, None, None
            self._unstage(space)
            self.config = config
            self._space = space
            self._mark_all()
            if retired is not None:
                await self._close(retired)
            log.info("OPC UA: the server on %s is in force", space.cfg.endpoint)

        async def abort() -> None:
            nonlocal old, new
            if new is None:
                return
            kept, space, old, new = old, new, None, None
            self._unstage(space)
            await self._close(space)
            if same_port and kept is not None:
                await self._relisten(kept, "after the reload was abandoned")
        return Staged(commit, abort)

    def _unstage(self, space: _Space) -> None:
        if space in self._staged:
            self._staged.remove(space)

    async def run(self) -> None:
        """Write what changed, as it changes; refresh diagnostics periodically. Runs until cancelled,
        whatever server is in force (reloads swap it under the loop)."""
        self._mark_all()  # a restarted writer may have lost a batch
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

    # ------------------------------------------------------------- asyncua servers
    async def _open(self, config: Config) -> _Space:
        """A new asyncua server with the whole address space of ``config``, not yet listening."""
        t0 = time.perf_counter()
        cfg = config.opcua
        server = Server()
        await server.init()
        server.set_endpoint(cfg.endpoint)
        server.set_server_name("modbus-bridge")
        await server.set_application_uri(f"urn:modbus-bridge:{urlparse(cfg.endpoint).hostname}")
        await server.set_build_info("https://github.com/modbus-bridge/modbus-bridge", "modbus-bridge",
                                    "modbus-bridge", __version__, __version__, datetime.now(timezone.utc))
        await configure_security(server, cfg)
        space = _Space(server, cfg, await server.register_namespace(cfg.namespace))
        # HistoryRead of the energy variables from the energy store; other nodes as asyncua had it
        history = server.iserver.history_manager
        history.set_storage(EnergyHistory(self.view, space.history, self._retention_days, history.storage))
        self._build(space, config)
        space.build_seconds = time.perf_counter() - t0
        return space

    async def _listen(self, space: _Space) -> None:
        host, port = _host_port(space.cfg.endpoint)
        try:
            with _no_tracebacks("asyncua.server.server"):
                await space.server.start()
        except OSError as exc:  # asyncua has stopped what it started
            raise BridgeError(listen_error("OPC UA", host, port, exc)) from None
        space.started = space.listening = True
        log.info("OPC UA listening on %s (%d variables, built in %.1f s)", space.cfg.endpoint,
                 sum(len(p) for p in space.points.values()), space.build_seconds)

    async def _unlisten(self, space: _Space) -> None:
        """Stop listening, closing every session and subscription first; the server stays ready to
        listen again (``_relisten``)."""
        space.listening = False
        server = space.server
        bserver, server.bserver = server.bserver, None
        if bserver is not None and bserver._server is not None:
            bserver._server.close()  # no new connections
        # no new requests either (a request on a session closed below would be refused with a
        # service fault, which asyncua logs as an error); those already received are answered
        for transport in list(server.iserver.asyncio_transports):
            with contextlib.suppress(Exception):
                transport.pause_reading()
        for _ in range(3):
            await asyncio.sleep(0)
        await _end_sessions(server.iserver)
        if bserver is not None:
            await bserver.stop()
            # the closed connections' clean-ups (asyncua runs them in tasks of their own)
            for _ in range(3):
                await asyncio.sleep(0)
            if bserver.closing_tasks:
                done, _ = await asyncio.wait(list(bserver.closing_tasks), timeout=1.0)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        log.debug("OPC UA: closing a connection failed: %r", task.exception())
                bserver.closing_tasks.clear()
        await _end_sessions(server.iserver)  # any a client opened meanwhile

    async def _relisten(self, space: _Space, why: str) -> None:
        """Listen again with a server ``_unlisten`` stopped (its address space untouched)."""
        server = space.server
        host, port = _host_port(space.cfg.endpoint)
        bind_host, bind_port = server._get_bind_socket_info()
        bserver = BinaryServer(server.iserver, bind_host, bind_port, server.limits)
        bserver.set_policies(server._policies)
        try:
            await bserver.start()
        except OSError as exc:
            log.error("OPC UA: the server in force could not listen again %s: %s", why,
                      listen_error("OPC UA", host, port, exc))
            return
        server.bserver = bserver
        space.listening = True
        log.info("OPC UA listening on %s again %s", space.cfg.endpoint, why)

    async def _close(self, space: _Space) -> None:
        """Close a server for good and forget its address space, so that nothing of ours keeps it."""
        await self._unlisten(space)
        if space.started:
            space.started = False
            iserver = space.server.iserver
            # asyncua's stop waits for its clock task's next tick (up to a second): end it now
            clock = iserver.time_task
            if clock is not None and not clock.done():
                clock.cancel()
                await asyncio.wait([clock])
            iserver.time_task = None
            await space.server.stop()
        space.forget()

    # ---------------------------------------------------------- address space
    def _build(self, space: _Space, config: Config) -> None:
        b = NodeBuilder(space.server.iserver.aspace, space.ns)
        objects = ua.NodeId(ua.ObjectIds.ObjectsFolder)
        space.meters_folder = b.folder(objects, "Meters/", "Meters", "Every meter the bridge polls")
        space.segments_folder = b.folder(objects, "Segments/", "Segments", "The RS485 segments, one per serial port")
        bridge = b.object(objects, "Bridge/", "Bridge", "The bridge itself")
        b.property(bridge, "Bridge/.Version", "Version", ua.Variant(__version__, ua.VariantType.String), _DT.String)
        b.property(bridge, "Bridge/.StartTime", "StartTime",
                   ua.Variant(_utc(self.view.started_wall), ua.VariantType.DateTime), _DT.DateTime)
        space.bridge = _Counters(b, bridge, "Bridge/", BRIDGE_COUNTERS)
        self._add(space, b, config)

    def _add(self, space: _Space, b: NodeBuilder, config: Config) -> None:
        """Build the segments and meters of ``config`` that have no nodes yet, and the energy objects (of
        meters with energy counters, and virtual meters: see ``energy``); index by unit."""
        for seg in config.segments:
            if seg.name not in space.segments:
                self._add_segment(space, b, seg)
            for meter in seg.meters:
                if meter.name not in space.meters:
                    self._add_meter(space, b, meter, seg)
        space.index(config)
        for name, (quantities, virtual, live) in energy_objects(config).items():
            if name not in space.energy:
                space.energy[name] = build_energy(b, space.meters_folder, name, quantities, virtual, live)
        space.history.clear()
        space.history.update({nid: (nodes.meter, key) for nodes in space.energy.values()
                              for nid, key in nodes.history.items()})

    def _retention_days(self) -> int:
        """How far back the energy store may hold intervals (for HistoryRead)."""
        energy = self.config.energy
        return energy.retention_days if energy is not None else 0

    def _add_segment(self, space: _Space, b: NodeBuilder, seg: SegmentConfig) -> None:
        ident = f"Segments/{seg.name}"
        node = b.object(space.segments_folder, ident, seg.name, f"Segment on {seg.port}")
        for name, value, vt, dt in (
            ("Port", seg.port, ua.VariantType.String, _DT.String),
            ("BaudRate", seg.baudrate, ua.VariantType.UInt32, _DT.UInt32),
            ("Parity", seg.parity, ua.VariantType.String, _DT.String),
            ("StopBits", seg.stopbits, ua.VariantType.UInt32, _DT.UInt32),
        ):
            b.property(node, f"{ident}.{name}", name, ua.Variant(value, vt), dt)
        space.segments[seg.name] = _SegmentNodes(_shown(seg), node, _Counters(b, node, ident, SEGMENT_COUNTERS))

    def _add_meter(self, space: _Space, b: NodeBuilder, meter: MeterConfig, seg: SegmentConfig) -> None:
        profile = meter.profile
        node = b.object(space.meters_folder, meter.name, meter.name, profile.description.split(". ")[0])
        for name, value, vt, dt in (
            ("Segment", seg.name, ua.VariantType.String, _DT.String),
            ("SlaveAddress", meter.slave, ua.VariantType.UInt32, _DT.UInt32),
            ("UnitId", meter.unit, ua.VariantType.UInt32, _DT.UInt32),
            ("Profile", profile.name, ua.VariantType.String, _DT.String),
        ):
            b.property(node, f"{meter.name}.{name}", name, ua.Variant(value, vt), dt)
        counters = _Counters(b, node, meter.name, METER_COUNTERS)
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
            points.append(_Point(m, var))
        space.meters[meter.name] = _MeterNodes((meter, seg.name), node, points, counters)

    async def _update(self, space: _Space, config: Config) -> None:
        """Bring the address space to ``config`` in place: the subtrees of removed meters and segments go,
        and those of meters whose configuration or segment (name) changed and of segments whose shown
        settings changed; new ones are built. Subscriptions follow a node built anew with the same
        NodeId, and learn that a node is gone (BadNodeIdUnknown) when it is not built again. A meter
        that keeps its nodes while its bus changed (the image reset it to unread) is rewritten, like
        every other, once the commit marks every unit dirty."""
        t0 = time.perf_counter()
        segments = {s.name: _shown(s) for s in config.segments}
        meters = {m.name: (m, s.name) for s in config.segments for m in s.meters}
        gone: list[ua.NodeId] = []
        for name, seg in list(space.segments.items()):
            if segments.get(name) != seg.key:
                gone.append(seg.nodeid)
                del space.segments[name]
        for name, meter in list(space.meters.items()):
            if meters.get(name) != meter.key:
                gone.append(meter.nodeid)
                del space.meters[name]
        # energy objects: those of removed meters go with them; the others when what they show changed
        # (the meter's energy quantities, a virtual meter's formula or alarm, energy switched off)
        energy = energy_objects(config)
        for name, nodes in list(space.energy.items()):
            if nodes.virtual is None and name not in space.meters:
                del space.energy[name]  # removed with its meter's subtree
            elif nodes.key != energy.get(name):
                gone.append(nodes.root)
                del space.energy[name]
        aspace = space.server.iserver.aspace
        b = NodeBuilder(aspace, space.ns)
        watches = b.remove(*gone)
        before = len(space.meters), len(space.segments)
        self._add(space, b, config)
        built = len(space.meters) - before[0], len(space.segments) - before[1]
        lost = reattach(aspace, watches)
        if gone or any(built):
            log.info("OPC UA address space updated in %.2f s: %d meter(s) and %d segment(s) built, %d node(s) "
                     "removed with their subtrees", time.perf_counter() - t0, *built, len(gone))
        await _tell_gone(lost)

    # ------------------------------------------------------------- updates
    def listener(self, change: Change | None, unit: int, health: Health) -> None:
        """Image listener: remember what to refresh; the writer task does the work."""
        space = self._space
        if space is None or unit not in space.points:
            return  # not a unit the address space shows (a reload under way)
        stamp = change.timestamp if change is not None else None
        prev = self._dirty.get(unit)
        self._dirty[unit] = stamp if prev is None else max(prev, stamp or prev)
        self._wake.set()

    def _mark_all(self) -> None:
        """Every value and status is to be written again (after a start or a reload)."""
        space = self._space
        if space is None:
            return
        for unit in space.points:
            self._dirty.setdefault(unit, None)
        self._wake.set()

    async def _flush(self) -> None:
        """Write every changed value of the units marked dirty, oldest change first.

        Values a client has subscribed to go out first, so a sweep over thousands of
        unwatched values does not delay the watched ones.
        """
        batch = list(self._dirty.items())
        self._dirty.clear()
        space = self._space
        if space is None:
            return
        now = datetime.now(timezone.utc)
        units = []
        for unit, stamp in batch:
            points = space.points.get(unit)
            u = self.image.unit(unit)
            if points is None or u is None:
                continue  # gone in a reload
            health = self.image.health(unit)
            if stamp is None and health is Health.FRESH and u.last_good_wall is not None:
                stamp = u.last_good_wall  # back to fresh: the values are those of the last good poll
            units.append((unit, u, points, health, _utc(stamp) if stamp is not None else None))
            await self._set(space.meter_counters.get(unit), {"Online": health is Health.FRESH}, now)
        writes = 0
        for watched in (True, False):
            for unit, u, points, health, source in units:
                if unit in self._dirty:
                    continue  # changed again while we yielded: its own pass writes it with its stamp
                for point in points:
                    if unit in self._dirty or self.image.unit(unit) is not u:
                        break  # a reload (or a new poll) while we yielded: its own pass writes the rest
                    if bool(point.attribute.datachange_callbacks) is watched and \
                            await self._write_point(point, u, health, source, now):
                        writes += 1
                        if writes % YIELD_EVERY == 0:
                            await asyncio.sleep(0)
        if writes:
            await asyncio.sleep(0)

    async def _write_point(self, point: _Point, u: UnitImage, health: Health, source: datetime | None,
                           now: datetime) -> bool:
        """Bring one measurement's node up to date; False if nothing changed."""
        m = point.measurement
        status = _STATUS[health]
        value = None
        if health is Health.FRESH or health is Health.STALE:
            raw = u.read(m.function, m.address, m.count)
            value = m.value(raw) if raw is not None else None
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
        space = self._space
        if space is None:
            return
        now_wall = time.time()
        now = datetime.now(timezone.utc)
        mqtt = self.view.north().get("mqtt")
        c = mqtt.counters if mqtt is not None else {}
        await self._set(space.bridge, {
            "Uptime": now_wall - self.view.started_wall,
            "MqttConnected": bool(c.get("connected")),
            "MqttBroker": mqtt.address if mqtt is not None else "",
            "MqttSent": int(c.get("sent", 0)),
            "MqttQueued": int(c.get("queue_queued", 0)),
            "MqttDropped": int(c.get("queue_dropped", 0) + c.get("queue_dropped_disk_full", 0)),
            "MqttReplayed": int(c.get("replayed", 0)),
            "MqttLastError": mqtt.note if mqtt is not None else "",
        }, now)
        mono = time.monotonic()
        for seg in self.view.segments():
            nodes = space.segments.get(seg.name)
            if nodes is not None:
                d = seg.diag
                await self._set(nodes.counters, {
                    "PortOpen": d.port_open,
                    "Requests": d.requests,
                    "Errors": d.errors,
                    "Timeouts": d.timeouts,
                    "CycleTime": d.cycle_time,
                    "Utilisation": seg.utilisation(mono),
                }, now)
            for meter in seg.meters:
                counters = space.meter_counters.get(meter.unit)
                if counters is None or self.image.unit(meter.unit) is None:
                    continue  # not (or no longer) shown: a reload under way
                d = meter.diag
                last_good = meter.last_good_wall
                await self._set(counters, {
                    "Online": meter.health is Health.FRESH,
                    "LastGoodPoll": _utc(last_good) if last_good else None,
                    "Requests": d.requests,
                    "GoodReplies": d.good,
                    "Timeouts": d.timeouts,
                    "CrcErrors": d.crc_errors,
                    "ProtocolErrors": d.truncated + d.wrong_slave + d.noise + d.protocol_errors,
                    "ExceptionReplies": d.exceptions,
                    "Retries": d.retries,
                    "Demotions": d.demotions,
                    "TurnaroundTime": d.turnaround if d.turnaround is not None else 0.0,
                    "LastError": meter.last_error,  # the image clears it on the next good poll
                }, now)
            await asyncio.sleep(0)
        await self._energy(space, now)

    async def _energy(self, space: _Space, now: datetime) -> None:
        """Show each meter's last closed interval and the balance alarms, where they changed (a look at
        the recorder's memory once a second: cheap)."""
        energy = self.view.energy
        if energy is None or not space.energy:
            return
        alarms = energy.alarm_state()
        for name, nodes in list(space.energy.items()):
            await nodes.show(energy.last(name), alarms.get(name), now)
        for v in self.view.virtual_meters():
            nodes = space.energy.get(v.name)
            if nodes is not None:
                await nodes.show_live({m.name: value for m, value in v.readings()}, v.quality, v.last_good_wall, now)

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


async def _end_sessions(iserver) -> None:
    """Close every client session and delete every client subscription of an asyncua server, before
    its connections close: asyncua keeps a session that has subscriptions alive when its connection
    is lost, and its subscriptions' publishing loops then write into the closed connection (a
    RuntimeError on uvloop, logged by asyncua with its traceback, and tasks that keep the whole
    server from being collected)."""
    for session in list(iserver._external_sessions.values()):
        try:
            await session.close_session(True)
        except Exception as exc:  # noqa: BLE001 - closing anyway
            log.debug("OPC UA: closing session %s: %r", getattr(session, "name", "?"), exc)
    subscriptions = iserver.subscription_service
    internal = iserver.isession.session_id
    ids = [i for i, sub in subscriptions.subscriptions.items() if sub.session_id != internal]
    if ids:
        await subscriptions.delete_subscriptions(ids)


async def _tell_gone(watches: list[Watch]) -> None:
    """Clients watching a node that a reload removed: their monitored item reports BadNodeIdUnknown."""
    for w in watches:
        try:
            await w.callback(w.handle, ua.DataValue(StatusCode=_GONE))
        except Exception as exc:  # noqa: BLE001 - e.g. the monitored item was deleted meanwhile
            log.debug("OPC UA: telling a monitored item its node is gone: %r", exc)


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
