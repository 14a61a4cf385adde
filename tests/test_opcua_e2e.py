"""OPC UA as a client sees it (SPEC §6): a real asyncua client on loopback, simulated meters on real ptys.

One bridge (``plant``) is shared by the tests of this module, per event loop: starting
an asyncua server takes ~1.5 s, so a bridge per test would not fit the time budget.
Each test works on its own meters or measurements, so the tests do not disturb each
other whatever their order. Only the restart test starts bridges of its own.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import pytest
import pytest_asyncio
from asyncua import Client, Node, ua
from support import as_f32, run

import bridge
from bridge.config.profiles import get_builtin
from bridge.testing import Harness, MeterSpec, running_bridge

pytestmark = pytest.mark.asyncio(loop_scope="module")

NAMESPACE = "urn:example:plant-7:energy-meters"  # not the default: proves clients must resolve it by URI
CEFACT = "http://www.opcfoundation.org/UA/units/un/cefact"

POLL = 0.1  # poll interval of every meter
STALE_AFTER = 0.4
TIMEOUT = 0.3  # reply timeout; with RETRIES a failed poll takes 0.6 s, so stale comes well before offline
RETRIES = 1
OFFLINE_RETRY = 0.5  # demote_interval: instead of 10 s between polls of an offline meter, so recovery is quick to see
DIAGNOSTICS = 1.0  # bridge.north.opcua.server.DIAGNOSTICS_PERIOD: Online and counters lag by up to this
NEVER_SLAVE = 9  # the simulated meter at this address never answers, from its first request on

LAYOUT = {
    # slave 1 on both panels: the bridge must not confuse a1 with b1
    "panel-a": [MeterSpec("a1", 1, 11, poll_interval=POLL), MeterSpec("a2", 2, 12, poll_interval=POLL)],
    "panel-b": [MeterSpec("b1", 1, 21, poll_interval=POLL),
                MeterSpec("b3", 3, 23, profile="eastron-sdm630", poll_interval=POLL)],
    # alone on their segments, so their silence delays nobody else's polls
    "line-c": [MeterSpec("flaky", 1, 31, poll_interval=POLL)],
    "line-d": [MeterSpec("never", NEVER_SLAVE, 41, poll_interval=POLL, silent=True)],
}
SEGMENT_OF = {spec.name: seg for seg, specs in LAYOUT.items() for spec in specs}
SPECS = {spec.name: spec for specs in LAYOUT.values() for spec in specs}

GOOD = ua.StatusCodes.Good
UNCERTAIN_LAST_USABLE = ua.StatusCodes.UncertainLastUsableValue
BAD_COMMUNICATION = ua.StatusCodes.BadCommunicationError
BAD_WAITING = ua.StatusCodes.BadWaitingForInitialData

T = TypeVar("T")


# ------------------------------------------------------------------------------- helpers
def unece_id(code: str) -> int:
    """OPC UA Part 8 EUInformation.UnitId: the UNECE code's characters shifted in, most significant first."""
    value = 0
    for ch in code:
        value = (value << 8) | ord(ch)
    return value


def measurements(meter: str) -> list[str]:
    return [m.name for m in get_builtin(SPECS[meter].profile).measurements]


def now() -> datetime:
    return datetime.now(timezone.utc)


def status_name(dv: ua.DataValue) -> str:
    return dv.StatusCode.name


async def eventually(probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], timeout: float,
                     what: str) -> T:
    """Call ``probe`` every 20 ms until ``accept`` says yes; return that result, or fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await probe()
        if accept(result):
            return result
        if loop.time() > deadline:
            pytest.fail(f"{what}: not within {timeout} s; last seen {result!r}")
        await asyncio.sleep(0.02)


async def settled(h: Harness, *meters: str) -> None:
    """Wait until what the simulated meters hold now is in the OPC UA server: the first of three polls may
    have been under way before a change, the second carries it, and the third gives the server's writer
    task (which runs after the reply is stored, not in it) a whole poll interval to write it."""
    await asyncio.gather(*(h.polls(meter, 3) for meter in meters))


async def read_dv(node: Node) -> ua.DataValue:
    # asyncua's read_value()/read_data_value() raise on any status other than Good, Uncertain included
    return await node.read_attribute(ua.AttributeIds.Value, raise_on_bad_status=False)


class Browser:
    """The client's view: everything reached by browse paths from Objects in the namespace found by URI."""

    def __init__(self, client: Client, ns: int):
        self.client, self.ns = client, ns

    @classmethod
    async def connect(cls, client: Client, uri: str = NAMESPACE) -> "Browser":
        return cls(client, await client.get_namespace_index(uri))

    def path(self, *names: str) -> list[str]:
        return [f"{self.ns}:{name}" for name in names]

    async def node(self, *names: str) -> Node:
        return await self.client.nodes.objects.get_child(self.path(*names))

    async def measurement(self, meter: str, name: str) -> Node:
        return await self.node("Meters", meter, name)

    async def value_of(self, *names: str):
        return await (await self.node(*names)).read_value()


async def collect_nodeids(browser: Browser, start: Node) -> set[tuple[str, str]]:
    """(namespace URI, string identifier) of every node below ``start`` (hierarchical references)."""
    uris = await browser.client.get_namespace_array()
    seen: set[tuple[str, str]] = set()
    pending = [start]
    while pending:
        node = pending.pop()
        for ref in await node.get_children_descriptions():
            nid = ref.NodeId
            key = (uris[nid.NamespaceIndex], str(nid.Identifier))
            if nid.NamespaceIndex == 0 or key in seen:
                continue
            assert nid.NodeIdType == ua.NodeIdType.String, nid
            seen.add(key)
            pending.append(browser.client.get_node(nid))
    return seen


# ------------------------------------------------------------------------------- the shared bridge
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plant():
    async with running_bridge(LAYOUT, opcua=True, namespace=NAMESPACE, stale_after=STALE_AFTER,
                              timeout=TIMEOUT, retries=RETRIES, demote_interval=OFFLINE_RETRY) as h:
        yield h


@pytest_asyncio.fixture(loop_scope="module")
async def ua_client(plant: Harness):
    async with Client(plant.opcua_endpoint, timeout=5) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def browser(ua_client: Client) -> Browser:
    return await Browser.connect(ua_client)


# ------------------------------------------------------------------------------- 1. address space
async def test_namespace_is_resolved_from_its_uri(ua_client: Client, browser: Browser):
    namespaces = await ua_client.get_namespace_array()
    assert namespaces[browser.ns] == NAMESPACE and browser.ns > 0
    assert "urn:modbus-bridge" not in namespaces, "the configured namespace URI must replace the default"
    assert (await browser.node("Meters")).nodeid.NamespaceIndex == browser.ns
    # the same names in any other namespace find nothing
    with pytest.raises(ua.UaStatusCodeError):
        await ua_client.nodes.objects.get_child([f"{browser.ns + 1}:Meters"])
    with pytest.raises(ua.UaStatusCodeError):
        await ua_client.nodes.objects.get_child(["0:Meters"])


async def test_browse_meters_and_their_measurements(ua_client: Client, browser: Browser):
    meters = await browser.node("Meters")
    children = await meters.get_children_descriptions()
    assert sorted(c.BrowseName.to_string() for c in children) == sorted(f"{browser.ns}:{m}" for m in SPECS)
    assert all(c.NodeClass == ua.NodeClass.Object for c in children)

    for meter in SPECS:
        node = await browser.node("Meters", meter)
        described = await node.get_children_descriptions()
        analog = [d for d in described if d.TypeDefinition == ua.NodeId(ua.ObjectIds.AnalogItemType)]
        assert [d.BrowseName for d in analog] == [ua.QualifiedName(m, browser.ns) for m in measurements(meter)]
        others = {d.BrowseName.Name for d in described} - set(measurements(meter))
        assert {"Segment", "SlaveAddress", "UnitId", "Profile", "Online", "LastGoodPoll", "Requests"} <= others

        # every measurement by its browse path, and its NodeId exactly ns=<idx>;s=<meter>.<measurement>
        paths = [browser.path("Meters", meter, m) for m in measurements(meter)]
        found = await ua_client.nodes.objects.get_children_by_path(paths)
        for name, targets in zip(measurements(meter), found):
            assert targets is not None and len(targets) == 1, f"{meter}/{name}"
            assert targets[0].nodeid.to_string() == f"ns={browser.ns};s={meter}.{name}"
            assert targets[0].nodeid == ua.NodeId(f"{meter}.{name}", browser.ns)

    # per-phase names of a three-phase meter
    assert {"voltage_l1", "voltage_l2", "voltage_l3", "current_l3", "active_power_l2"} <= set(measurements("b3"))


async def test_measurement_variables_attributes(ua_client: Client, browser: Browser):
    nodes = [ua_client.get_node(ua.NodeId(f"{meter}.{m}", browser.ns)) for meter in SPECS for m in measurements(meter)]
    attributes = {
        attr: await ua_client.read_attributes(nodes, attr)
        for attr in (ua.AttributeIds.NodeClass, ua.AttributeIds.DataType, ua.AttributeIds.ValueRank,
                     ua.AttributeIds.AccessLevel, ua.AttributeIds.UserAccessLevel, ua.AttributeIds.Description)
    }
    for i, node in enumerate(nodes):
        what = node.nodeid.to_string()
        got = {attr: dvs[i] for attr, dvs in attributes.items()}
        assert all(dv.StatusCode.is_good() for dv in got.values()), what
        assert got[ua.AttributeIds.NodeClass].Value.Value == ua.NodeClass.Variable, what
        assert got[ua.AttributeIds.DataType].Value.Value == ua.NodeId(ua.ObjectIds.Double), what
        assert got[ua.AttributeIds.ValueRank].Value.Value == ua.ValueRank.Scalar, what
        assert got[ua.AttributeIds.AccessLevel].Value.Value == ua.AccessLevel.CurrentRead.mask, what
        assert got[ua.AttributeIds.UserAccessLevel].Value.Value == ua.AccessLevel.CurrentRead.mask, what
        assert got[ua.AttributeIds.Description].Value.Value.Text, f"{what} has no description"
        assert await node.read_type_definition() == ua.NodeId(ua.ObjectIds.AnalogItemType), what


async def test_measurements_reject_writes(plant: Harness, browser: Browser):
    await plant.polls("a2", 1)
    node = await browser.measurement("a2", "frequency")
    before = await read_dv(node)
    refused = (ua.StatusCodes.BadNotWritable, ua.StatusCodes.BadUserAccessDenied)
    for attempt in (
        lambda: node.write_value(ua.Variant(12.5, ua.VariantType.Double)),
        lambda: node.write_value(ua.DataValue(ua.Variant(12.5, ua.VariantType.Double))),
        lambda: node.write_attribute(ua.AttributeIds.Description,
                                     ua.DataValue(ua.Variant(ua.LocalizedText("x"), ua.VariantType.LocalizedText))),
    ):
        with pytest.raises(ua.UaStatusCodeError) as refusal:
            await attempt()
        assert refusal.value.code in refused, refusal.value
    after = await read_dv(node)
    assert after.Value.Value == before.Value.Value == as_f32(plant.sims["a2"].value("frequency"))


EXPECTED_UNITS = {"V": "VLT", "A": "AMP", "W": "WTT", "Hz": "HTZ", "kWh": "KWH"}


async def engineering_units(ua_client: Client, node: Node) -> tuple[ua.QualifiedName, ua.EUInformation]:
    props = [d for d in await node.get_children_descriptions(refs=ua.ObjectIds.HasProperty)
             if d.BrowseName.Name == "EngineeringUnits"]
    assert len(props) == 1, f"{node.nodeid.to_string()} has no EngineeringUnits property"
    prop = ua_client.get_node(props[0].NodeId)
    assert await prop.read_data_type() == ua.NodeId(ua.ObjectIds.EUInformation)
    return props[0].BrowseName, await prop.read_value()


async def test_engineering_units_are_unece_codes(ua_client: Client, browser: Browser):
    assert unece_id("VLT") == 5655636  # the packing, as OPC UA Part 8 gives it for the volt
    seen = set()
    for meter in ("a1", "b3"):
        for m in get_builtin(SPECS[meter].profile).measurements:
            _, eu = await engineering_units(ua_client, await browser.measurement(meter, m.name))
            assert isinstance(eu, ua.EUInformation), eu
            assert eu.NamespaceUri == CEFACT, (meter, m.name)
            assert eu.DisplayName.Text, (meter, m.name)
            if m.unit in EXPECTED_UNITS:
                assert eu.UnitId == unece_id(EXPECTED_UNITS[m.unit]), (meter, m.name, m.unit, eu)
                seen.add(m.unit)
    assert seen == set(EXPECTED_UNITS)


async def test_engineering_units_has_the_standard_browse_name(ua_client: Client, browser: Browser):
    """EngineeringUnits is declared by BaseAnalogType in namespace 0; instances must use that BrowseName
    (OPC UA Part 3, instance declarations), which is how generic clients find it: 0:EngineeringUnits."""
    node = await browser.measurement("a1", "voltage")
    browse_name, _ = await engineering_units(ua_client, node)
    assert browse_name == ua.QualifiedName("EngineeringUnits", 0), (
        f"EngineeringUnits has BrowseName {browse_name.to_string()}, not 0:EngineeringUnits")
    eu = await (await node.get_child("0:EngineeringUnits")).read_value()
    assert eu.UnitId == unece_id("VLT")


# ------------------------------------------------------------------------------- 2. values
async def test_values_are_the_meters_values_remapped_and_per_phase(plant: Harness, ua_client: Client,
                                                                   browser: Browser):
    meters = ("a1", "b1", "b3")  # a1 and b1: both slave 1, on different segments
    expected = {}
    for k, meter in enumerate(meters):
        for i, name in enumerate(measurements(meter)):
            value = 100.0 + 1000.0 * k + 1.37 * i + 0.1  # distinct everywhere, none exact in float32
            plant.sims[meter].set_value(name, value)
            expected[(meter, name)] = as_f32(value)
            assert plant.sims[meter].value(name) == as_f32(value)
    await settled(plant, *meters)
    keys = list(expected)
    nodes = [ua_client.get_node(ua.NodeId(f"{meter}.{name}", browser.ns)) for meter, name in keys]
    values = await ua_client.read_attributes(nodes)
    for key, dv in zip(keys, values):
        assert dv.StatusCode.value == GOOD, (key, dv.StatusCode)
        assert dv.Value.VariantType == ua.VariantType.Double, key
        assert dv.Value.Value == expected[key], key
    # and by browse path, as a client that knows only names would read them
    assert await browser.value_of("Meters", "b3", "voltage_l3") == expected[("b3", "voltage_l3")]


async def test_timestamps(plant: Harness, browser: Browser):
    node = await browser.measurement("a1", "frequency")
    await plant.polls("a1", 1)
    before_change = now()
    plant.sims["a1"].set_value("frequency", 49.87)
    dv = await eventually(lambda: read_dv(node), lambda dv: dv.Value.Value == as_f32(49.87), 2.0,
                          "a1.frequency changed")
    after_read = now()
    slack = timedelta(milliseconds=1)  # microsecond rounding of the two clocks' conversions only
    assert dv.SourceTimestamp is not None and dv.ServerTimestamp is not None
    # the reply that carried the value came after the change and before our read
    assert before_change - slack <= dv.SourceTimestamp <= after_read + slack
    assert dv.SourceTimestamp <= dv.ServerTimestamp <= after_read + slack


async def test_subscription_delivers_a_change_within_a_poll_and_a_publish(plant: Harness, ua_client: Client,
                                                                          browser: Browser):
    node = await browser.measurement("b1", "active_power")
    publishing_ms = 100
    target = as_f32(4321.5 + 0.3)
    received: list[tuple[object, ua.DataValue]] = []
    got_initial, got_change = asyncio.Event(), asyncio.Event()

    class Handler:
        def datachange_notification(self, node, val, data):
            received.append((val, data.monitored_item.Value))
            got_initial.set()
            if val == target:
                got_change.set()

    sub = await ua_client.create_subscription(publishing_ms, Handler())
    try:
        await sub.subscribe_data_change(node, sampling_interval=0)
        await asyncio.wait_for(got_initial.wait(), 2.0)
        plant.sims["b1"].set_value("active_power", 4321.5 + 0.3)
        deadline = 1.5  # one poll interval + one publishing interval + generous slack
        try:
            await asyncio.wait_for(got_change.wait(), deadline)
        except TimeoutError:
            pytest.fail(f"no data change to {target} within {deadline} s (poll {POLL} s + publishing "
                        f"{publishing_ms} ms + slack); notifications: {received}")
        dv = next(dv for value, dv in received if value == target)
        assert dv.StatusCode is None or dv.StatusCode.value == GOOD
        assert dv.SourceTimestamp is not None
    finally:
        await sub.delete()


# ------------------------------------------------------------------------------- 3. status
async def test_status_fresh_stale_offline_and_back(plant: Harness, browser: Browser):
    sim = plant.sims["flaky"]
    node = await browser.measurement("flaky", "voltage")
    online = await browser.node("Meters", "flaky", "Online")
    loop = asyncio.get_running_loop()

    sim.set_value("voltage", 231.3)
    await settled(plant, "flaky")
    dv = await read_dv(node)
    assert (status_name(dv), dv.Value.Value) == ("Good", as_f32(231.3))
    await eventually(online.read_value, lambda v: v is True, DIAGNOSTICS + 1.0, "Online while fresh")

    # silent: stale after stale_after, the last value still readable
    sim.faults.silent = True
    silent_at = loop.time()
    dv = await eventually(lambda: read_dv(node), lambda dv: dv.StatusCode.value != GOOD, 3.0, "stale")
    waited = loop.time() - silent_at
    assert dv.StatusCode.value == UNCERTAIN_LAST_USABLE, f"after {waited:.2f} s: {status_name(dv)}"
    assert dv.Value is not None and dv.Value.Value == as_f32(231.3), "a stale value stays readable"
    assert waited >= STALE_AFTER - POLL - 0.05, f"stale after {waited:.2f} s already"
    # the default client API refuses anything but Good: a client must ask for the value explicitly
    with pytest.raises(ua.UaStatusCodeError) as uncertain:
        await node.read_value()
    assert uncertain.value.code == UNCERTAIN_LAST_USABLE

    # offline after 3 consecutive failed polls
    dv = await eventually(lambda: read_dv(node), lambda dv: dv.StatusCode.value != UNCERTAIN_LAST_USABLE,
                          3 * (RETRIES + 1) * TIMEOUT + 2.0, "offline")
    assert dv.StatusCode.value == BAD_COMMUNICATION, status_name(dv)
    assert dv.Value is None or dv.Value.Value is None, "a Bad value carries no value"
    offline_dv = dv
    assert plant.segment("line-c").meters[31].diag.demoted
    with pytest.raises(ua.UaStatusCodeError) as bad:
        await node.read_value()
    assert bad.value.code == BAD_COMMUNICATION
    await eventually(online.read_value, lambda v: v is False, DIAGNOSTICS + 1.0, "Online false when offline")

    # answering again: Good on the next good reply, with the meter's current value
    sim.set_value("voltage", 219.7)
    back_at = now()
    sim.faults.silent = False
    dv = await eventually(lambda: read_dv(node), lambda dv: dv.StatusCode.value == GOOD,
                          OFFLINE_RETRY + 2.0, "good again")
    assert dv.Value.Value == as_f32(219.7)
    await eventually(online.read_value, lambda v: v is True, DIAGNOSTICS + 1.0, "Online again")
    # SPEC §6: SourceTimestamp is the time of the poll reply the value came from, a reply after back_at
    assert dv.SourceTimestamp >= back_at, (
        f"SourceTimestamp {dv.SourceTimestamp.isoformat()} is before the meter answered again "
        f"({back_at.isoformat()}): the value cannot come from a reply that early; the offline value's "
        f"SourceTimestamp was {offline_dv.SourceTimestamp.isoformat()}")


async def test_never_polled_meter_is_never_good(plant: Harness, ua_client: Client, browser: Browser):
    nodes = [ua_client.get_node(ua.NodeId(f"never.{m}", browser.ns)) for m in measurements("never")]
    for dv in await ua_client.read_attributes(nodes):
        assert dv.StatusCode.value in (BAD_WAITING, BAD_COMMUNICATION), status_name(dv)
        assert dv.Value is None or dv.Value.Value is None
    assert await browser.value_of("Meters", "never", "Online") is False
    # once its segment has given up on it, it is offline
    node = await browser.measurement("never", "voltage")
    await eventually(lambda: read_dv(node), lambda dv: dv.StatusCode.value == BAD_COMMUNICATION,
                     3 * (RETRIES + 1) * TIMEOUT + 2.0, "never-read meter offline")
    assert plant.sims["never"].requests == 0 and plant.buses["line-d"].stats.requests > 0
    # no good poll yet: LastGoodPoll is readable, and null (or at least not a time)
    last_good = await browser.node("Meters", "never", "LastGoodPoll")
    try:
        dv = await read_dv(last_good)
    except ua.UaStatusCodeError as exc:
        pytest.fail(f"reading {last_good.nodeid.to_string()} before any good poll fails the whole Read "
                    f"request: {exc}")
    value = None if dv.Value is None else dv.Value.Value
    assert value is None or (isinstance(value, datetime) and value.year <= 1601), dv  # 1601-01-01: OPC UA's null


# ------------------------------------------------------------------------------- 4. objects
async def test_meter_segment_and_bridge_objects(plant: Harness, browser: Browser):
    for meter, spec in SPECS.items():
        assert await browser.value_of("Meters", meter, "Segment") == SEGMENT_OF[meter]
        assert await browser.value_of("Meters", meter, "SlaveAddress") == spec.slave
        assert await browser.value_of("Meters", meter, "UnitId") == spec.unit
        assert await browser.value_of("Meters", meter, "Profile") == spec.profile
    for seg in plant.app.config.segments:
        assert await browser.value_of("Segments", seg.name, "Port") == plant.buses[seg.name].path == seg.port
        assert await browser.value_of("Segments", seg.name, "BaudRate") == seg.baudrate
    assert await browser.value_of("Bridge", "Version") == bridge.__version__

    # counters move while the bridge polls
    await plant.polls("a1", 1)
    assert await browser.value_of("Meters", "a1", "Online") is True
    last_good = await browser.value_of("Meters", "a1", "LastGoodPoll")
    assert isinstance(last_good, datetime) and last_good <= now()
    seg_requests = await browser.value_of("Segments", "panel-a", "Requests")
    meter_requests = await browser.value_of("Meters", "a1", "Requests")
    uptime = await browser.value_of("Bridge", "Uptime")
    await eventually(lambda: browser.value_of("Segments", "panel-a", "Requests"), lambda v: v > seg_requests,
                     DIAGNOSTICS + 1.5, "segment Requests increasing")
    await eventually(lambda: browser.value_of("Meters", "a1", "Requests"), lambda v: v > meter_requests,
                     DIAGNOSTICS + 1.5, "meter Requests increasing")
    await eventually(lambda: browser.value_of("Bridge", "Uptime"), lambda v: v > uptime,
                     DIAGNOSTICS + 1.5, "Uptime increasing")
    assert await browser.value_of("Segments", "panel-a", "CycleTime") > 0
    for name in ("Errors", "Timeouts", "Utilisation"):
        assert await browser.value_of("Segments", "panel-a", name) >= 0


# ------------------------------------------------------------------------------- 5. restarts
async def test_nodeids_stable_across_restarts_and_edits(plant: Harness, browser: Browser):
    before = await collect_nodeids(browser, await browser.node("Meters"))
    assert (NAMESPACE, "a1.voltage") in before and (NAMESPACE, "b3.voltage_l3") in before
    segments_before = await collect_nodeids(browser, await browser.node("Segments"))

    async def snapshot(layout) -> tuple[set, set]:
        async with running_bridge(layout, opcua=True, namespace=NAMESPACE) as h:
            async with Client(h.opcua_endpoint, timeout=5) as client:
                b = await Browser.connect(client)
                return (await collect_nodeids(b, await b.node("Meters")),
                        await collect_nodeids(b, await b.node("Segments")))

    # the same configuration, started afresh
    assert await snapshot(LAYOUT) == (before, segments_before)

    # an edited configuration keeping the names: other order, a1 moved to another segment with
    # another slave and unit, one meter added
    edited = {
        "line-d": LAYOUT["line-d"],
        "panel-b": [LAYOUT["panel-b"][1], MeterSpec("a1", 5, 15), LAYOUT["panel-b"][0]],
        "line-c": LAYOUT["line-c"] + [MeterSpec("c9", 4, 39, profile="eastron-sdm630")],
        "panel-a": [LAYOUT["panel-a"][1]],
    }
    after, _ = await snapshot(edited)
    assert before <= after, sorted(before - after)
    added = after - before
    assert added and all(ident == "c9" or ident.startswith("c9.") for _, ident in added), sorted(added)


# ------------------------------------------------------------------------------- 6. another stack
NODE_CLIENT = Path(__file__).parent / "opcua_node_client"


@pytest.fixture(scope="module")
def node_config_home(tmp_path_factory) -> Path:
    """node-opcua creates a client certificate under $XDG_CONFIG_HOME: once per module, not in $HOME."""
    return tmp_path_factory.mktemp("node-opcua-config")


async def test_node_opcua_client_reads_the_same(plant: Harness, browser: Browser, node_config_home: Path):
    node = shutil.which("node")
    assert node, "Node.js is part of this machine kind"
    assert (NODE_CLIENT / "node_modules" / "node-opcua-client").is_dir(), \
        "`make test` installs node-opcua-client (npm ci --prefix tests/opcua_node_client)"

    plant.sims["b3"].set_value("voltage_l2", 238.9)
    plant.sims["a2"].set_value("current", 17.3)
    await settled(plant, "b3", "a2")
    names = ["b3.voltage_l2", "a2.current", "never.voltage"]
    env = {**os.environ, "XDG_CONFIG_HOME": str(node_config_home)}
    started = now()
    rc, out, err = await run(node, str(NODE_CLIENT / "read.mjs"), plant.opcua_endpoint, NAMESPACE, *names,
                              env=env, timeout=30)
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["namespaceIndex"] == browser.ns
    got = result["values"]
    for name, expected, code in (("b3.voltage_l2", 238.9, "VLT"), ("a2.current", 17.3, "AMP")):
        v = got[name]
        assert v["nodeId"] == f"ns={browser.ns};s={name}"
        assert v["status"] == "Good", v
        assert v["dataType"] == 11, v  # Double
        assert v["value"] == as_f32(expected), v
        source = datetime.fromisoformat(v["sourceTimestamp"].replace("Z", "+00:00"))
        server = datetime.fromisoformat(v["serverTimestamp"].replace("Z", "+00:00"))
        assert source <= server <= now() and source <= started  # (milliseconds)
        assert v["engineeringUnits"]["namespaceUri"] == CEFACT
        assert v["engineeringUnits"]["unitId"] == unece_id(code)
    assert got["never.voltage"]["status"] in ("BadWaitingForInitialData", "BadCommunicationError")
    assert got["never.voltage"]["value"] is None
