"""The OPC UA north side on its own (no App): start, reloads in place and with a new server, stop.

Each test builds a register image and a read model with fake segments, an ``OpcUaServer`` on a
free loopback port, and talks to it with a real asyncua client. Polls are simulated by storing
blocks into the image, as a segment does.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from asyncua import Client, ua
from support import until

from bridge.config.profiles import get_builtin
from bridge.core import codec
from bridge.core.diagnostics import SegmentDiagnostics
from bridge.core.errors import BridgeError
from bridge.core.image import Health, RegisterImage
from bridge.core.model import Config, MeterConfig, OpcUaConfig, SegmentConfig
from bridge.north.opcua.server import OpcUaServer
from bridge.south.segment import bus_key
from bridge.testing import free_port
from bridge.view import BridgeView

NAMESPACE = "urn:test:opcua-side"
PROFILE = get_builtin("eastron-sdm120")

BAD_WAITING = ua.StatusCodes.BadWaitingForInitialData
BAD_NODE_ID_UNKNOWN = ua.StatusCodes.BadNodeIdUnknown


# ------------------------------------------------------------------------------- helpers
def endpoint(port: int) -> str:
    return f"opc.tcp://127.0.0.1:{port}/bridge"


def meter(name: str, unit: int, slave: int | None = None) -> MeterConfig:
    return MeterConfig(name, slave if slave is not None else unit, unit, PROFILE)


def config(segments: dict[tuple[str, str], list[MeterConfig]], port: int) -> Config:
    """``{(segment name, port): [meters]}`` served as OPC UA on 127.0.0.1:``port``."""
    return Config(
        tuple(SegmentConfig(name, tty, meters=tuple(meters)) for (name, tty), meters in segments.items()),
        opcua=OpcUaConfig(endpoint=endpoint(port), namespace=NAMESPACE, security=("None",)),
    )


def bus_of(cfg: Config) -> dict[int, tuple]:
    """What each unit is read through, for the image (as the App has it): a unit read on another bus
    starts unread."""
    return {m.unit: bus_key(seg) for seg in cfg.segments for m in seg.meters}


@dataclass
class FakeSegment:
    """What the read model needs of a running segment."""

    cfg: SegmentConfig
    diag: SegmentDiagnostics = field(default_factory=SegmentDiagnostics)
    ready: bool = True


class Rig:
    """An image, a read model and the OPC UA side on them, with its writer task running."""

    def __init__(self, cfg: Config):
        self.config = cfg
        self.image = RegisterImage(cfg.meters, bus=bus_of(cfg))
        self.view = BridgeView(self.image)
        self.side = OpcUaServer(cfg, self.view)
        self._attach(cfg)
        self.writer: asyncio.Task | None = None

    def _attach(self, cfg: Config) -> None:
        self.view.attach([FakeSegment(s) for s in cfg.segments], {"opcua": self.side})

    async def __aenter__(self) -> "Rig":
        await self.side.start()
        self.writer = asyncio.create_task(self.side.run())
        return self

    async def __aexit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.cancel()
            await asyncio.gather(self.writer, return_exceptions=True)
        await self.side.stop()

    async def reload(self, cfg: Config) -> None:
        """What the App does: stage, reconfigure the image, commit, attach the new parts."""
        staged = await self.side.stage(cfg)
        self.image.reconfigure(cfg.meters, bus=bus_of(cfg))
        await staged.commit()
        self._attach(cfg)
        self.config = cfg

    def poll(self, name: str, **values: float) -> None:
        """A good poll of meter ``name``: the measurements given take these values, the others 0."""
        m = next(m for m in self.config.meters if m.name == name)
        now = time.time()
        for x in m.profile.measurements:
            regs = codec.encode(values.get(x.name, 0.0) / x.scale, x.dtype, x.word_order)
            self.image.store_block(m.unit, x.function, x.address, codec.registers_to_bytes(regs), now)
        self.image.mark_good(m.unit, now)


class Watcher:
    """A subscription handler that keeps every notification."""

    def __init__(self):
        self.seen: list[tuple[str, ua.DataValue]] = []

    def datachange_notification(self, node, val, data):
        self.seen.append((node.nodeid.Identifier, data.monitored_item.Value))

    def status_change_notification(self, status):
        pass

    def values(self, ident: str) -> list[ua.DataValue]:
        return [dv for i, dv in self.seen if i == ident]

    async def receives(self, ident: str, accept: Callable[[ua.DataValue], bool], what: str) -> None:
        await until(lambda: any(accept(dv) for dv in self.values(ident)), what=what)


class UaView:
    def __init__(self, client: Client, ns: int):
        self.client, self.ns = client, ns

    @classmethod
    async def connect(cls, client: Client, uri: str = NAMESPACE) -> "UaView":
        return cls(client, await client.get_namespace_index(uri))

    def node(self, ident: str):
        return self.client.get_node(ua.NodeId(ident, self.ns))

    async def dv(self, ident: str) -> ua.DataValue:
        return await self.node(ident).read_attribute(ua.AttributeIds.Value, raise_on_bad_status=False)

    async def value(self, ident: str):
        return (await self.dv(ident)).Value.Value

    async def shows(self, ident: str, accept: Callable[[ua.DataValue], bool], what: str) -> ua.DataValue:
        """Wait until the node's value is accepted; return it."""
        seen: list[ua.DataValue] = []

        async def accepted() -> bool:
            seen.append(await self.dv(ident))
            return accept(seen[-1])
        try:
            await until(accepted, what=f"{what} ({ident})")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen {seen[-1] if seen else None}") from None
        return seen[-1]

    async def holds(self, ident: str, expected) -> bool:
        return await self.value(ident) == expected

    async def children(self, ident: str) -> set[str]:
        return {d.BrowseName.Name for d in await self.node(ident).get_children_descriptions()}


def good(value: float) -> Callable[[ua.DataValue], bool]:
    return lambda dv: dv.StatusCode.is_good() and dv.Value is not None and dv.Value.Value == value


def status(code: int) -> Callable[[ua.DataValue], bool]:
    return lambda dv: dv.StatusCode.value == code


def server_side_tracebacks(records: list[logging.LogRecord]) -> list[str]:
    """Records of the server's side (ours, asyncua's server, asyncio's) with a traceback or at ERROR;
    the asyncua client in this process logs its own complaints about a server that went away."""
    client_side = ("asyncua.client", "asyncua.common.subscription")
    return [f"{r.name} {r.levelname}: {r.getMessage()}" for r in records
            if not r.name.startswith(client_side) and (r.exc_info or r.levelno >= logging.ERROR)]


def server_tasks() -> list[str]:
    """The asyncua server's tasks still pending: a subscription's publishing loop, a session's watchdog..."""
    pending = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if code is not None and "/asyncua/server/" in code.co_filename.replace("\\", "/"):
            pending.append(code.co_qualname)
    return pending


A, B, C = ("bus-a", "/dev/ttyA"), ("bus-b", "/dev/ttyB"), ("bus-c", "/dev/ttyB")


# ------------------------------------------------------------------------------- reloads in place
async def test_meters_and_segments_added_removed_renamed_in_place():
    port = free_port()
    first = config({A: [meter("m1", 1), meter("m2", 2), meter("m5", 5)], B: [meter("m3", 3)]}, port)
    async with Rig(first) as rig, Client(endpoint(port), timeout=5) as client:
        ua_ = await UaView.connect(client)
        for name, v in (("m1", 230.5), ("m2", 231.5), ("m5", 232.5), ("m3", 233.5)):
            rig.poll(name, voltage=v)
        await ua_.shows("m3.voltage", good(233.5), "first values")
        watcher = Watcher()
        sub = await client.create_subscription(50, watcher)
        await sub.subscribe_data_change([ua_.node("m1.voltage"), ua_.node("m5.voltage")])
        await watcher.receives("m1.voltage", good(230.5), "m1 initial value")
        removed = weakref.ref(rig.side._space.meters["m5"].points[0].node)
        sessions = rig.side.status().counters
        assert sessions == {"sessions": 1, "subscriptions": 1}, sessions

        # m2 renamed (same unit), m4 added, m5 removed, bus-b renamed bus-c (same port) with m3
        second = config({A: [meter("m1", 1), meter("m2r", 2), meter("m4", 4)], C: [meter("m3", 3)]}, port)
        await rig.reload(second)

        assert await ua_.children("Meters/") == {"m1", "m2r", "m4", "m3"}
        assert await ua_.children("Segments/") == {"bus-a", "bus-c"}
        assert await ua_.value("m3.Segment") == "bus-c"
        assert await ua_.value("Segments/bus-c.Port") == "/dev/ttyB"
        for gone in ("m2", "m2.voltage", "m5.voltage", "Segments/bus-b", "Segments/bus-b.Port"):
            assert (await ua_.dv(gone)).StatusCode.value == BAD_NODE_ID_UNKNOWN, gone
        # new and changed meters start unread; the unchanged one keeps its value
        for new in ("m2r.voltage", "m4.voltage", "m3.voltage"):
            dv = await ua_.shows(new, status(BAD_WAITING), f"{new} unread")
            assert dv.Value is None or dv.Value.Value is None, new
        assert await ua_.value("m1.voltage") == 230.5
        # a client watching the removed meter learns it is gone; its node is not kept alive by us
        await watcher.receives("m5.voltage", status(BAD_NODE_ID_UNKNOWN), "m5 gone")
        gc.collect()
        assert removed() is None, gc.get_referrers(removed())

        # the subscription on the unchanged meter still receives changes; new meters are served
        rig.poll("m1", voltage=240.25)
        rig.poll("m4", voltage=241.25)
        rig.poll("m2r", voltage=242.25)
        await watcher.receives("m1.voltage", good(240.25), "m1 change after the reload")
        await ua_.shows("m4.voltage", good(241.25), "m4 served")
        await ua_.shows("m2r.voltage", good(242.25), "m2r served")
        await until(lambda: ua_.value("m4.Online"), what="m4 Online")
        # a listener call for a unit no longer shown is ignored
        rig.side.listener(None, 5, Health.FRESH)
        assert rig.writer is not None and not rig.writer.done()


async def test_segment_port_change_resets_its_meters_and_subscriptions_follow():
    port = free_port()
    first = config({A: [meter("m1", 1)], B: [meter("m3", 3)]}, port)
    async with Rig(first) as rig, Client(endpoint(port), timeout=5) as client:
        ua_ = await UaView.connect(client)
        rig.poll("m1", voltage=230.5)
        rig.poll("m3", voltage=233.5)
        await ua_.shows("m1.voltage", good(230.5), "m1 value")
        await ua_.shows("m3.voltage", good(233.5), "m3 value")
        watcher = Watcher()
        sub = await client.create_subscription(50, watcher)
        await sub.subscribe_data_change([ua_.node("m1.voltage"), ua_.node("m3.voltage")])
        await watcher.receives("m1.voltage", good(230.5), "m1 initial value")
        await watcher.receives("m3.voltage", good(233.5), "m3 initial value")

        # bus-a moves to another port; m3 gets another slave address (its nodes are built anew)
        second = config({("bus-a", "/dev/ttyA2"): [meter("m1", 1)], B: [meter("m3", 3, slave=7)]}, port)
        await rig.reload(second)
        assert await ua_.value("Segments/bus-a.Port") == "/dev/ttyA2"
        assert "ttyA2" in (await ua_.node("Segments/bus-a").read_description()).Text
        assert await ua_.value("Segments/bus-b.Port") == "/dev/ttyB"
        assert await ua_.value("m3.SlaveAddress") == 7
        # both read anew: unread, not the old values
        for ident in ("m1.voltage", "m3.voltage"):
            dv = await ua_.shows(ident, status(BAD_WAITING), f"{ident} unread after the reload")
            assert dv.Value is None or dv.Value.Value is None
        await until(lambda: ua_.holds("m1.Online", False), what="m1 not Online")
        # the subscriptions see it, and the next values: m3's follows its node built anew
        await watcher.receives("m1.voltage", status(BAD_WAITING), "m1 unread, to its subscriber")
        await watcher.receives("m3.voltage", status(BAD_WAITING), "m3 unread, to its subscriber")
        rig.poll("m1", voltage=250.5)
        rig.poll("m3", voltage=253.5)
        await watcher.receives("m1.voltage", good(250.5), "m1 polled on its new port")
        await watcher.receives("m3.voltage", good(253.5), "m3 polled at its new address")


# ------------------------------------------------------------------------------- a new server
async def test_endpoint_moves_to_another_port():
    old_port, new_port = free_port(), free_port()
    first = config({A: [meter("m1", 1)]}, old_port)
    async with Rig(first) as rig:
        rig.poll("m1", voltage=230.5)
        async with Client(endpoint(old_port), timeout=5) as client:
            ua_ = await UaView.connect(client)
            await ua_.shows("m1.voltage", good(230.5), "served on the old port")
        old_server = weakref.ref(rig.side.server)

        moved = replace(first, opcua=replace(first.opcua, endpoint=endpoint(new_port)))
        staged = await rig.side.stage(moved)
        # staged: the old server still serves, and is the one in force
        async with Client(endpoint(old_port), timeout=5) as client:
            assert await (await UaView.connect(client)).value("m1.voltage") == 230.5
        assert rig.side.status().address == endpoint(old_port)
        await staged.commit()
        assert rig.side.status().address == endpoint(new_port) and rig.side.status().listening

        with pytest.raises((OSError, asyncio.TimeoutError)):
            async with Client(endpoint(old_port), timeout=2):
                pass
        async with Client(endpoint(new_port), timeout=5) as client:
            ua_ = await UaView.connect(client)
            await ua_.shows("m1.voltage", good(230.5), "served on the new port")
            rig.poll("m1", voltage=231.5)
            await ua_.shows("m1.voltage", good(231.5), "the writer feeds the new server")
        # the server it replaced is not kept by anything of ours
        gc.collect()
        assert old_server() is None, [type(r) for r in gc.get_referrers(old_server())]


async def test_a_stage_that_cannot_listen_changes_nothing(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    port = free_port()
    first = config({A: [meter("m1", 1)]}, port)
    async with Rig(first) as rig:
        rig.poll("m1", voltage=230.5)
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            busy = held.getsockname()[1]
            with pytest.raises(BridgeError, match=rf"OPC UA: cannot listen on 127\.0\.0\.1:{busy}\b"):
                await rig.side.stage(replace(first, opcua=replace(first.opcua, endpoint=endpoint(busy))))
        assert not server_side_tracebacks(caplog.records)
        assert rig.side.status().listening and rig.side.status().address == endpoint(port)
        async with Client(endpoint(port), timeout=5) as client:
            ua_ = await UaView.connect(client)
            await ua_.shows("m1.voltage", good(230.5), "the old server serves")
            rig.poll("m1", voltage=231.5)
            await ua_.shows("m1.voltage", good(231.5), "and is still fed")


async def test_same_port_new_settings_abort_then_commit():
    port = free_port()
    first = config({A: [meter("m1", 1)]}, port)
    other = "urn:test:another-namespace"
    async with Rig(first) as rig:
        rig.poll("m1", voltage=230.5)
        renamed = replace(first, opcua=replace(first.opcua, namespace=other))

        staged = await rig.side.stage(renamed)  # the old server makes way for the new one
        async with Client(endpoint(port), timeout=5) as client:
            assert other in await client.get_namespace_array()
        await staged.abort()  # the old one is back
        async with Client(endpoint(port), timeout=5) as client:
            ua_ = await UaView.connect(client)
            assert other not in await client.get_namespace_array()
            await ua_.shows("m1.voltage", good(230.5), "the old server again")

        staged = await rig.side.stage(renamed)
        await staged.commit()
        async with Client(endpoint(port), timeout=5) as client:
            ua_ = await UaView.connect(client, other)
            await ua_.shows("m1.voltage", good(230.5), "the new server, fed")
            assert NAMESPACE not in await client.get_namespace_array()


async def test_same_port_new_server_that_cannot_listen_gives_way_back(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    port = free_port()
    first = config({A: [meter("m1", 1)]}, port)
    async with Rig(first) as rig:
        rig.poll("m1", voltage=230.5)
        # the same port on an address this host does not have (TEST-NET-1): the old server makes way,
        # the new one cannot listen, the old one listens again
        elsewhere = replace(first, opcua=replace(first.opcua, endpoint=f"opc.tcp://192.0.2.1:{port}/bridge"))
        with pytest.raises(BridgeError, match=rf"OPC UA: cannot listen on 192\.0\.2\.1:{port}\b"):
            await rig.side.stage(elsewhere)
        assert rig.side.status().listening and rig.side.status().address == endpoint(port)
        async with Client(endpoint(port), timeout=5) as client:
            ua_ = await UaView.connect(client)
            await ua_.shows("m1.voltage", good(230.5), "the old server again")
            rig.poll("m1", voltage=231.5)
            await ua_.shows("m1.voltage", good(231.5), "and still fed")
        assert not server_side_tracebacks(caplog.records)


# ------------------------------------------------------------------------------- start and stop
async def test_stop_with_a_subscribed_client_logs_no_traceback(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    port = free_port()
    cfg = config({A: [meter("m1", 1)]}, port)
    rig = Rig(cfg)
    await rig.__aenter__()
    client = Client(endpoint(port), timeout=5)
    try:
        await client.connect()
        ua_ = await UaView.connect(client)
        watcher = Watcher()
        for _ in range(2):
            sub = await client.create_subscription(10, watcher)
            await sub.subscribe_data_change([ua_.node("m1.voltage"), ua_.node("m1.Requests")])
        for i in range(20):  # values changing right up to the stop
            rig.poll("m1", voltage=200.0 + i)
            await asyncio.sleep(0.01)
        assert rig.side.status().counters == {"sessions": 1, "subscriptions": 2}
        await rig.__aexit__(None, None, None)
        assert not rig.side.status().listening
        # nothing of the server is left running (such as a subscription publishing into a closed connection)
        assert not server_tasks()
    finally:
        client_log = logging.getLogger("asyncua.client")
        level = client_log.level
        client_log.setLevel(logging.CRITICAL)  # its complaints about the server gone
        try:
            await asyncio.wait_for(client.disconnect(), 2)
        except Exception:
            pass
        client_log.setLevel(level)
    gc.collect()  # asyncio reports a task whose exception nobody retrieved when it is collected
    assert not server_side_tracebacks(caplog.records)


async def test_start_on_a_busy_port_is_one_line(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        rig = Rig(config({A: [meter("m1", 1)]}, busy))
        with pytest.raises(BridgeError) as refused:
            await rig.side.start()
    message = str(refused.value)
    assert "\n" not in message and f"127.0.0.1:{busy}" in message and message.startswith("OPC UA"), message
    assert not rig.side.status().listening
    assert not server_side_tracebacks(caplog.records)
    assert not any(r.exc_info for r in caplog.records), [r.getMessage() for r in caplog.records if r.exc_info]


async def test_start_on_an_unknown_host_names_it(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    port = free_port()
    cfg = config({A: [meter("m1", 1)]}, port)
    cfg = replace(cfg, opcua=replace(cfg.opcua, endpoint=f"opc.tcp://no-such-host.invalid:{port}/bridge"))
    with pytest.raises(BridgeError, match=r"no-such-host\.invalid") as refused:
        await Rig(cfg).side.start()
    assert f":{port}" in str(refused.value)
    assert not server_side_tracebacks(caplog.records)
