"""Interval energy over OPC UA (SPEC §9 through §6): each meter's ``Energy`` object showing its last closed
interval, virtual meters with their balance alarm, and the intervals' history (Part 11 HistoryRead), read
by real clients (asyncua, and node-opcua, an independent stack) from a bridge polling simulated meters
whose energy counters advance at known rates (``test_energy_e2e.Counters``).

One bridge is shared by the module (2-second intervals, so boundaries come fast); the tests only read,
except the last, which reloads it. ``read_history`` itself (directions, paging, limits) is also tested
alone against a fake energy source, without a server.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
import pytest_asyncio
from asyncua import Client, ua
from support import run, until
from test_energy_e2e import LAYOUT, RATES, UNMETERED, Counters

from bridge.config.profiles import get_builtin
from bridge.core.model import EnergyConfig
from bridge.energy.types import Interval
from bridge.north.opcua.energy import DEMAND, MAX_SLOTS, read_history
from bridge.testing import Harness, running_bridge

pytestmark = pytest.mark.asyncio(loop_scope="module")

NAMESPACE = "urn:modbus-bridge"  # running_bridge's default
WINDOW = 5  # seconds of history the history tests read
SECONDS = 1  # interval length: several boundaries within the module's time, each well apart from the next
ENERGY = EnergyConfig(seconds=SECONDS, max_gap=1.0, virtual=(UNMETERED,))  # balance alarm: 10 % of incomer, 2 intervals
NODE_CLIENT = Path(__file__).parent / "opcua_node_client"
QUANTITY = "import_active_energy"
# the energy quantities of the simulated meters' profile (every meter of LAYOUT has it), in CamelCase
QUANTITIES = [m.name for m in get_builtin("eastron-sdm120").measurements if m.name.endswith("_energy")]
CAMEL = {q: "".join(p.capitalize() for p in q.split("_")) for q in QUANTITIES}
RATE_TOLERANCE = 0.25  # enough to tell the incomer (36 kW) from the others (9, 18 kW) on a loaded machine
STATUS_NAMES = {"complete": "Good", "estimated": "UncertainSubNormal", "rollover": "UncertainSubNormal",
                "reset": "UncertainSubNormal"}


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def unece_id(code: str) -> int:
    value = 0
    for ch in code:
        value = (value << 8) | ord(ch)
    return value


async def read_dv(node) -> ua.DataValue:
    return await node.read_attribute(ua.AttributeIds.Value, raise_on_bad_status=False)


# ------------------------------------------------------------------------------- the shared bridge
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plant(tmp_path_factory):
    async with running_bridge(LAYOUT, opcua=True, energy=ENERGY,
                              state_dir=str(tmp_path_factory.mktemp("energy-state"))) as h:
        h.started = time.time()
        task = asyncio.create_task(Counters(h.sims, RATES).run())
        try:
            yield h
        finally:
            task.cancel()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(plant: Harness):
    async with Client(plant.opcua_endpoint, timeout=5) as c:
        c.ns = await c.get_namespace_index(NAMESPACE)
        yield c


def recorder(h: Harness):
    return h.app.north["energy"]


async def closed_since_start(h: Harness, meter: str, seconds: float) -> Interval:
    """Wait until ``meter``'s last closed interval ends ``seconds`` after the bridge started; return it."""
    rec = recorder(h)
    await until(lambda: (last := rec.last(meter)) is not None and last.end >= h.started + seconds,
                timeout=seconds + 10, what=f"{meter}: an interval closed {seconds} s after the start")
    return rec.last(meter)


async def child(c: Client, *names: str):
    return await c.nodes.objects.get_child([f"{c.ns}:{n}" for n in names])


# ------------------------------------------------------------------------------- the live interval
async def test_energy_object_shows_the_last_closed_interval(plant: Harness, client: Client):
    rec = recorder(plant)
    await closed_since_start(plant, "incomer", 3 * SECONDS)  # past the first interval, which began at rest
    energy = await child(client, "Meters", "incomer", "Energy")
    assert energy.nodeid == ua.NodeId("incomer.Energy", client.ns)
    assert await energy.read_node_class() == ua.NodeClass.Object
    children = {d.BrowseName.Name: d for d in await energy.get_children_descriptions()}
    expected = {"IntervalStart", "IntervalEnd", "Status", "Demand", *CAMEL.values()}
    assert set(children) == expected
    for name, d in children.items():
        assert d.NodeId == ua.NodeId(f"incomer.Energy.{name}", client.ns), d.NodeId
    nodes = {name: client.get_node(d.NodeId) for name, d in children.items()}

    # what the server shows is the recorder's last interval (one Read of every variable: a consistent view;
    # retried across a boundary that falls between the server's refresh and the recorder's)
    for _ in range(100):
        last = rec.last("incomer")
        dvs = dict(zip(nodes, await client.read_attributes(list(nodes.values()))))
        if rec.last("incomer") is last and dvs["IntervalEnd"].Value.Value == utc(last.end):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the OPC UA Energy object never showed the recorder's last interval")
    assert dvs["IntervalStart"].Value.Value == utc(last.start)
    assert dvs["Status"].Value.Value == last.status
    assert last.end - last.start == SECONDS
    for q in QUANTITIES:
        dv = dvs[CAMEL[q]]
        assert dv.Value.VariantType == ua.VariantType.Double
        assert dv.Value.Value == last.energy[q], q
        assert dv.SourceTimestamp == utc(last.end)
        assert dv.StatusCode.name == STATUS_NAMES[last.status]
    assert dvs["Demand"].Value.Value == last.demand
    assert dvs["Demand"].SourceTimestamp == utc(last.end)
    # the incomer's counter runs at 36 kW: 0.02 kWh per 2-second interval, 36 kW of demand (loosely: a
    # loaded machine delays the simulated counters' updates by tens of ms, a few % of a 2-second interval;
    # what is checked exactly above is that the server shows the recorder's interval)
    assert last.status == "complete"
    assert dvs[CAMEL[QUANTITY]].Value.Value == pytest.approx(36.0 * SECONDS / 3600, rel=RATE_TOLERANCE)
    assert dvs["Demand"].Value.Value == pytest.approx(36000.0, rel=RATE_TOLERANCE)

    # energy and demand variables: AnalogItemType with units, historizing, history readable
    for name, code in ((CAMEL[QUANTITY], "KWH"), (CAMEL["import_reactive_energy"], "K3"), ("Demand", "WTT")):
        node = nodes[name]
        assert await node.read_type_definition() == ua.NodeId(ua.ObjectIds.AnalogItemType)
        assert (await (await node.get_child("0:EngineeringUnits")).read_value()).UnitId == unece_id(code)
        assert (await node.read_attribute(ua.AttributeIds.Historizing)).Value.Value is True
        for attr in (ua.AttributeIds.AccessLevel, ua.AttributeIds.UserAccessLevel):
            level = (await node.read_attribute(attr)).Value.Value
            assert level & ua.AccessLevel.HistoryRead.mask and level & ua.AccessLevel.CurrentRead.mask, name
            assert not level & ua.AccessLevel.CurrentWrite.mask
    assert (await nodes["Status"].read_attribute(ua.AttributeIds.Historizing)).Value.Value is False


async def test_a_virtual_meter_has_its_own_object_and_raises_its_balance_alarm(plant: Harness, client: Client):
    rec = recorder(plant)
    unmetered = await child(client, "Meters", "unmetered")
    assert unmetered.nodeid == ua.NodeId("unmetered", client.ns)
    assert {d.BrowseName.Name for d in await unmetered.get_children_descriptions()} == \
        {"Formula", "Energy", "ActivePower", "ReactivePower"}
    # live: the sum of the terms' active power now (36 - 9 - 18 kW), with the terms' poll time and quality
    power = client.get_node(ua.NodeId("unmetered.ActivePower", client.ns))
    await until(lambda: _value_is(power, 9000.0), timeout=5, what="ActivePower = 9 kW over OPC UA")
    dv = await read_dv(power)
    assert dv.StatusCode.is_good()
    polls = [plant.app.image.unit(plant.meters[m].unit).last_good_wall for m in ("incomer", "lighting", "sockets")]
    assert abs(dv.SourceTimestamp.replace(tzinfo=timezone.utc).timestamp() - min(polls)) < 2.0
    unit = await client.get_node(ua.NodeId("unmetered.ActivePower.EngineeringUnits", client.ns)).read_value()
    assert unit.DisplayName.Text == "W"
    assert await (await child(client, "Meters", "unmetered", "Formula")).read_value() == "incomer - lighting - sockets"
    energy = await child(client, "Meters", "unmetered", "Energy")
    assert energy.nodeid == ua.NodeId("unmetered.Energy", client.ns)
    names = {d.BrowseName.Name for d in await energy.get_children_descriptions()}
    assert names == {"IntervalStart", "IntervalEnd", "Status", "Demand", "BalanceAlarm", "BalancePercent",
                     *CAMEL.values()}
    # the unmetered rest is 9 kW of the incomer's 36 kW: 25 % for 2 intervals raises the alarm (10 %)
    await until(lambda: rec.alarm_state()["unmetered"]["active"], timeout=20, what="the recorder's balance alarm")
    alarm = client.get_node(ua.NodeId("unmetered.Energy.BalanceAlarm", client.ns))
    await until(lambda: _value_is(alarm, True), timeout=3, what="BalanceAlarm true over OPC UA")
    percent = client.get_node(ua.NodeId("unmetered.Energy.BalancePercent", client.ns))
    await until(lambda: _value_is(percent, rec.alarm_state()["unmetered"]["percent"]), timeout=3,
                what="BalancePercent as the recorder has it")
    assert (await percent.read_value()) > 10.0  # 25 % of 36 kW, give or take the simulation's timing
    # its interval: incomer - lighting - sockets, slot by slot
    shown = [client.get_node(ua.NodeId(f"unmetered.Energy.{name}", client.ns)) for name in ("IntervalEnd",
                                                                                             CAMEL[QUANTITY])]
    for _ in range(100):
        last = rec.last("unmetered")
        end, value = await client.read_values(shown)
        if end == utc(last.end) and rec.last("unmetered") is last:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the virtual meter's Energy object never showed the recorder's last interval")
    assert value == last.energy[QUANTITY]
    terms = {m: (await rec.intervals(m, last.start, last.start + 1))[0].energy[QUANTITY]
             for m in ("incomer", "lighting", "sockets")}
    assert value == pytest.approx(terms["incomer"] - terms["lighting"] - terms["sockets"], abs=1e-12)
    assert 0 < value < terms["incomer"]  # about 9 of 36 kW


async def _value_is(node, expected) -> bool:
    return (await read_dv(node)).Value.Value == expected


# ------------------------------------------------------------------------------- history
async def history_window(plant: Harness) -> tuple[Interval, list[Interval]]:
    """The last closed interval of the incomer, once WINDOW seconds of intervals lie between it and the first
    interval (which began at rest), and the recorder's closed intervals ending in the WINDOW seconds up to it."""
    rec = recorder(plant)
    last = await closed_since_start(plant, "incomer", WINDOW + 3 * SECONDS)
    stored = await rec.intervals("incomer", last.end - WINDOW - 2, last.end)
    expected = [i for i in stored if i.status != "missing" and last.end - WINDOW <= i.end <= last.end]
    assert [i.end for i in expected] == list(range(last.end - WINDOW, last.end + 1, SECONDS))
    return last, expected


async def test_history_read_returns_the_stored_intervals(plant: Harness, client: Client):
    last, expected = await history_window(plant)
    start, end = utc(last.end - WINDOW), utc(last.end)
    node = client.get_node(ua.NodeId(f"incomer.Energy.{CAMEL[QUANTITY]}", client.ns))

    dvs = await node.read_raw_history(start, end, return_bounds=False)
    assert [dv.SourceTimestamp for dv in dvs] == [utc(i.end) for i in expected]
    assert [dv.Value.Value for dv in dvs] == [i.energy[QUANTITY] for i in expected]
    assert all(dv.Value.VariantType == ua.VariantType.Double for dv in dvs)
    assert [dv.StatusCode.name for dv in dvs] == [STATUS_NAMES[i.status] for i in expected]
    assert all(v == pytest.approx(36.0 * SECONDS / 3600, rel=RATE_TOLERANCE) for v in (dv.Value.Value for dv in dvs))

    # demand alike, in W
    demand = client.get_node(ua.NodeId("incomer.Energy.Demand", client.ns))
    dvs = await demand.read_raw_history(start, end, return_bounds=False)
    assert [(dv.SourceTimestamp, dv.Value.Value) for dv in dvs] == [(utc(i.end), i.demand) for i in expected]

    # start after end: newest first
    dvs = await node.read_raw_history(end, start, return_bounds=False)
    assert [dv.SourceTimestamp for dv in dvs] == [utc(i.end) for i in reversed(expected)]

    # numValuesPerNode: that many, and a continuation point to the rest
    details = ua.ReadRawModifiedDetails(IsReadModified=False, StartTime=start, EndTime=end, NumValuesPerNode=2,
                                        ReturnBounds=False)
    pages, got, cont = 0, [], None
    while True:
        result = await node.history_read(details, cont)
        result.StatusCode.check()
        pages += 1
        assert len(result.HistoryData.DataValues) <= 2
        got += result.HistoryData.DataValues
        cont = result.ContinuationPoint
        if not cont:
            break
    assert pages == math.ceil(len(expected) / 2)
    assert [(dv.SourceTimestamp, dv.Value.Value) for dv in got] == [(utc(i.end), i.energy[QUANTITY]) for i in expected]

    # no start time: newest first, back from the end, numValuesPerNode of them
    dvs = await node.read_raw_history(None, end, numvalues=3, return_bounds=False)
    assert [dv.SourceTimestamp for dv in dvs] == [utc(i.end) for i in reversed(expected)][:3]

    # a node whose history is not ours still answers as before: no values
    voltage = client.get_node(ua.NodeId("incomer.voltage", client.ns))
    assert await voltage.read_raw_history(start, end, return_bounds=False) == []


async def test_node_opcua_reads_the_same_history(plant: Harness, client: Client, tmp_path_factory):
    node = shutil.which("node")
    assert node, "Node.js is part of this machine kind"
    assert (NODE_CLIENT / "node_modules" / "node-opcua-client").is_dir(), \
        "`make test` installs node-opcua-client (npm ci --prefix tests/opcua_node_client)"
    last, expected = await history_window(plant)
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path_factory.mktemp("node-opcua-config"))}
    start, end = utc(last.end - WINDOW).isoformat(), utc(last.end).isoformat()
    ident = f"incomer.Energy.{CAMEL[QUANTITY]}"
    want = [{"value": i.energy[QUANTITY], "status": STATUS_NAMES[i.status],
             "sourceTimestamp": utc(i.end).strftime("%Y-%m-%dT%H:%M:%S.000Z")} for i in expected]
    for per_page, pages in ((0, 1), (2, math.ceil(len(expected) / 2))):  # whole, then paged (continuation points)
        rc, out, err = await run(node, str(NODE_CLIENT / "history.mjs"), plant.opcua_endpoint, NAMESPACE, ident,
                                 start, end, str(per_page), env=env, timeout=30)
        assert rc == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["nodeId"] == f"ns={client.ns};s={ident}"
        assert result["status"] == "Good"
        assert result["pages"] == pages
        assert all(v["dataType"] == 11 for v in result["values"])  # Double
        assert [{k: v[k] for k in ("value", "status", "sourceTimestamp")} for v in result["values"]] == want


# ------------------------------------------------------------------------------- reload (last: changes the bridge)
async def test_reload_follows_the_energy_configuration(plant: Harness, client: Client):
    config = plant.app.config
    incomer_energy = ua.NodeId("incomer.Energy", client.ns)
    # the virtual meter goes: its object with it; the real meters keep theirs
    await plant.app.reload(replace(config, energy=replace(config.energy, virtual=())))
    meters = await child(client, "Meters")
    names = {d.BrowseName.Name for d in await meters.get_children_descriptions()}
    assert "unmetered" not in names and {"incomer", "lighting", "sockets"} <= names
    assert await client.get_node(incomer_energy).read_browse_name() == ua.QualifiedName("Energy", client.ns)
    # the history still comes from the store, through the recorder in force
    last = await closed_since_start(plant, "incomer", 0)
    node = client.get_node(ua.NodeId(f"incomer.Energy.{CAMEL[QUANTITY]}", client.ns))
    dvs = await node.read_raw_history(utc(last.end - 4), utc(last.end), return_bounds=False)
    assert dvs and dvs[-1].SourceTimestamp == utc(last.end)
    # energy off: no Energy objects at all
    await plant.app.reload(replace(config, energy=None))
    incomer = await child(client, "Meters", "incomer")
    assert "Energy" not in {d.BrowseName.Name for d in await incomer.get_children_descriptions()}
    with pytest.raises(ua.UaStatusCodeError):
        await client.get_node(incomer_energy).read_browse_name()
    # and back on (a new recorder), with the virtual meter
    await plant.app.reload(config)
    await child(client, "Meters", "unmetered", "Energy", "BalanceAlarm")
    rec = recorder(plant)
    await until(lambda: rec.last("incomer") is not None, timeout=3 * SECONDS + 3, what="an interval after the reload")
    end = client.get_node(ua.NodeId("incomer.Energy.IntervalEnd", client.ns))
    await until(lambda: _value_is(end, utc(rec.last("incomer").end)), timeout=3,
                what="the last interval shown again after the reload")

    # a meter that a reload changes is built anew, its Energy object with it: a client's subscription
    # follows, and receives each new interval's energy, stamped with the interval's end
    received: list[ua.DataValue] = []

    class Handler:
        def datachange_notification(self, node, val, data):
            received.append(data.monitored_item.Value)

    sub = await client.create_subscription(50, Handler())
    try:
        await sub.subscribe_data_change(client.get_node(ua.NodeId(f"incomer.Energy.{CAMEL[QUANTITY]}", client.ns)))
        await until(lambda: received, timeout=3, what="the subscription's first value")
        seg = config.segments[0]
        assert seg.meters[0].name == "incomer"
        incomer = replace(seg.meters[0], poll_interval=seg.meters[0].poll_interval * 2)
        await plant.app.reload(replace(config, segments=(replace(seg, meters=(incomer, *seg.meters[1:])),
                                                         *config.segments[1:])))
        before = received[-1].SourceTimestamp
        await until(lambda: received[-1].SourceTimestamp > before, timeout=2 * SECONDS + 3,
                    what="an interval closed after the reload")
        latest = received[-1]
        end = int(latest.SourceTimestamp.timestamp())
        assert end % SECONDS == 0 and latest.Value.VariantType == ua.VariantType.Double
        [stored] = await rec.intervals("incomer", end - SECONDS, end - SECONDS + 1)
        assert latest.Value.Value == stored.energy[QUANTITY]
    finally:
        await sub.delete()


# ------------------------------------------------------------------------------- read_history alone
class FakeEnergy:
    """An energy source with a closed interval every slot of [first, until), except the ``gaps``."""

    interval_s = 60

    def __init__(self, first: int, until: int, gaps: set[int] = frozenset()):
        self.first, self.until, self.gaps = first, until, gaps
        self.calls: list[tuple[int, int]] = []

    async def intervals(self, meter: str, start: int, end: int, detail: bool = False) -> list[Interval]:
        self.calls.append((start, end))
        s = self.interval_s
        out = []
        for t in range(-(-start // s) * s, min(end, self.until), s):
            if t + s > self.until:
                break
            if t < self.first or t in self.gaps:
                out.append(Interval(meter, t, t + s, "missing", {}))
            else:
                out.append(Interval(meter, t, t + s, "estimated" if t % 300 == 0 else "complete",
                                    {QUANTITY: t / 1e6}))
        return out


async def test_read_history_directions_paging_and_limits():
    now = 1_800_000_000.0  # a multiple of 60 and of 300
    e = FakeEnergy(int(now) - 3600, int(now), gaps={int(now) - 600})

    def ends(dvs):
        return [int(dv.SourceTimestamp.timestamp()) for dv in dvs]

    async def read(start, end, n=0, key=QUANTITY, retention=400):
        return await read_history(e, "m", key, start, end, n, now, retention)

    # forward, inclusive at both ends; the gap (its slot ending at now - 540) and the open slot skipped
    dvs, cont = await read(now - 900, now + 100)
    assert ends(dvs) == [t for t in range(int(now) - 900, int(now) + 1, 60) if t != now - 540] and cont is None
    assert dvs[0].Value.Value == (now - 960) / 1e6
    assert {dv.StatusCode.name for dv in dvs if int(dv.SourceTimestamp.timestamp()) % 300 == 60} == \
        {"UncertainSubNormal"}
    # backwards
    dvs, _ = await read(now, now - 300)
    assert ends(dvs) == list(range(int(now), int(now) - 301, -60))
    # numValuesPerNode: the continuation point is the next value's time, forwards and backwards
    dvs, cont = await read(now - 900, now, 3)
    assert ends(dvs) == [now - 900, now - 840, now - 780] and cont == utc(now - 720)
    dvs, cont = await read(now, now - 900, 3)
    assert ends(dvs) == [now, now - 60, now - 120] and cont == utc(now - 180)
    # no start: newest first back from the end, never a continuation point; neither: nothing
    dvs, cont = await read(None, now - 60, 2)
    assert ends(dvs) == [now - 60, now - 120] and cont is None
    assert await read(None, None, 5) == ([], None)
    # no end: from the start on, up to now
    dvs, cont = await read(now - 120, None)
    assert ends(dvs) == [now - 120, now - 60, now] and cont is None
    # a range longer than a page: one page, then a continuation point to the next one
    e.interval_s = 1
    e.first = int(now) - 3 * MAX_SLOTS
    e.calls.clear()
    dvs, cont = await read(now - 2 * MAX_SLOTS + 0.5, now)
    assert ends(dvs) == list(range(int(now) - 2 * MAX_SLOTS + 1, int(now) - MAX_SLOTS + 1))
    assert cont == utc(now - MAX_SLOTS + 1)
    assert [b - a for a, b in e.calls] == [MAX_SLOTS]
    dvs, cont = await read(cont.timestamp(), now)  # the next page: the rest, but the gap
    assert len(dvs) == MAX_SLOTS - 1 and cont is None
    # never before the retention: a request from the year 1700 looks at the last (retention + 1) days only
    e.interval_s = 60
    e.first = int(now) - 3600
    e.calls.clear()
    dvs, cont = await read(datetime(1700, 1, 1, tzinfo=timezone.utc).timestamp(), now, retention=1)
    assert e.calls[0][0] >= now - 2 * 86400 - 60
    assert ends(dvs)[0] == now - 3600 + 60 and ends(dvs)[-1] == now
    # demand from the import energy: kWh over 60 s in W
    dvs, _ = await read(now - 60, now - 60, key=DEMAND)
    assert dvs[0].Value.Value == pytest.approx((now - 120) / 1e6 * 1000 * 3600 / 60)

