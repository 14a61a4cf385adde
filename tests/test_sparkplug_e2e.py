"""Sparkplug B end to end: simulated meters on ptys, the bridge, a real mosquitto broker per test on a
free port, and an independent subscriber (mqtt.js + the Eclipse Tahu decoder, npm sparkplug-payload).

Every payload is read as the Tahu decoder gives it (never with the bridge's own protobuf module);
commands and the primary host's STATE are published by an independent client (publish.mjs, Tahu's
encoder). Each test's docstring names the Sparkplug 3.0 requirements (tck-id-…) it covers, chiefly
those the conformance table marks "adapter": they bind the MQTT connection, not the pure session.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from broker import ROOT, SUBSCRIBER, Mosquitto, Subscriber
from support import until

from bridge.config.profiles import get_builtin
from bridge.core.model import MqttConfig, SparkplugConfig
from bridge.core.mqtt_types import MeterSample
from bridge.north.mqtt.side import sample_of
from bridge.south.simulator import SimMeter, SimulatedBus
from bridge.testing import MeterSpec, running_bridge

# uvloop only, like the other MQTT end-to-end tests (conftest adds plain asyncio to *_e2e modules
# unless "mqtt" is in the module's name)
pytestmark = [pytest.mark.asyncio(loop_factories=["uvloop"]),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

GROUP, NODE = "site-a", "panel-7"
PREFIX = f"spBv1.0/{GROUP}"
NODE_KINDS = {"NBIRTH", "NDEATH", "NDATA", "DBIRTH", "DDEATH", "DDATA"}  # what the edge node publishes
PUBLISH = ROOT / "tests" / "mqtt_node_client" / "publish.mjs"
# A broker that keeps QoS 0 messages for a persistent subscriber session while it is away (Sparkplug
# data are QoS 0), across the broker's own restarts and kill -9 (persistence is on in Mosquitto)
PERSISTENT = "queue_qos0_messages true\n"

LAYOUT = {"a": [MeterSpec("incomer", 1, 11, animate=True), MeterSpec("hvac", 2, 12, "eastron-sdm630", animate=True)]}
PAIR = {"a": [MeterSpec("incomer", 1, 11, animate=True), MeterSpec("feeder", 2, 12, animate=True)]}


# ------------------------------------------------------------------------------------- helpers

def sparkplug(broker: Mosquitto, **options) -> MqttConfig:
    protocol = options.pop("protocol", "5")
    return MqttConfig(brokers=(broker.url,), client_id=NODE, protocol=protocol,
                      sparkplug=SparkplugConfig(GROUP, NODE, **options))


def kind(m: dict) -> str:
    return m["topic"].split("/")[2]


def device(m: dict) -> str:
    parts = m["topic"].split("/")
    return parts[4] if len(parts) > 4 else ""


def node_messages(messages: list[dict]) -> list[dict]:
    """What the edge node published, in arrival order (no commands, no STATE)."""
    return [m for m in messages if m["topic"].startswith(PREFIX + "/") and kind(m) in NODE_KINDS
            and m["topic"].split("/")[3] == NODE]


def of(messages: list[dict], what: str, dev: str = "") -> list[dict]:
    return [m for m in node_messages(messages) if kind(m) == what and (not dev or device(m) == dev)]


def metric(m: dict, name: str) -> dict:
    found = [x for x in m["payload"].get("metrics", []) if x.get("name") == name]
    assert len(found) == 1, f"{m['topic']}: metric {name!r} {len(found)} times"
    return found[0]


def bd_seq(m: dict) -> int:
    x = metric(m, "bdSeq")
    assert x["type"] == "Int64"
    return x["value"]


def sessions(messages: list[dict]) -> list[list[dict]]:
    """The node's messages cut at each NBIRTH (an NDEATH closes a session)."""
    out: list[list[dict]] = []
    for m in node_messages(messages):
        if kind(m) == "NBIRTH":
            out.append([])
        if out:
            out[-1].append(m)
    return out


def check_seq(messages: list[dict]) -> int:
    """seq: 0 on every NBIRTH, then one more per message, 255 → 0, NDEATH without one. Returns how
    many times it wrapped."""
    wraps, previous = 0, None
    for m in node_messages(messages):
        p = m["payload"]
        if kind(m) == "NDEATH":
            assert "seq" not in p, f"NDEATH with a seq: {p}"
            previous = None
            continue
        if kind(m) == "NBIRTH":
            assert p["seq"] == 0, p
        elif previous is not None:
            assert p["seq"] == (previous + 1) % 256, f"{m['topic']}: seq {p['seq']} after {previous}"
            wraps += p["seq"] == 0
        previous = p["seq"]
    return wraps


def key(x: dict) -> object:
    """A metric's identity in data messages: its alias when aliases are on, else its name."""
    return x["alias"] if "alias" in x else x["name"]


def number(value: object) -> bool:
    """A Double as JSON gives it back (230.0 comes as 230)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def prop(x: dict, name: str) -> dict | None:
    return (x.get("properties") or {}).get(name)


def record_polls(h) -> dict[int, list[int]]:
    """Every good poll's reply time (ms, as the bridge stamps it), per unit, from now on."""
    polls: dict[int, list[int]] = {u: [] for u in h.app.image.units()}
    image = h.app.image
    mark_good = image.mark_good

    def recording(unit: int, timestamp: float) -> None:
        polls.setdefault(unit, []).append(int(timestamp * 1000))
        mark_good(unit, timestamp)

    image.mark_good = recording
    return polls


async def publish(url: str, topic: str, body: object, *flags: str) -> float:
    """Publish with the independent client (Tahu's encoder, or text); returns when it was acknowledged."""
    text = body if isinstance(body, str) else json.dumps(body)
    proc = await asyncio.create_subprocess_exec("node", str(PUBLISH), url, topic, text, *flags,
                                                stderr=asyncio.subprocess.PIPE,
                                                env={**os.environ, "NODE_NO_WARNINGS": "1"})
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()
    return time.time()


def now_ms() -> int:
    return int(time.time() * 1000)


class PersistentSubscriber(Subscriber):
    """The independent subscriber with a persistent session: what the broker kept for it may arrive
    before the acknowledgement of its subscriptions (Subscriber expects that one first)."""

    def __init__(self, url: str, *filters: str, persistent_id: str):
        super().__init__(url, *filters, persistent_id=persistent_id)

    async def __aenter__(self) -> PersistentSubscriber:
        self.proc = await asyncio.create_subprocess_exec(
            "node", str(SUBSCRIBER), self.url, *self.filters, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "NODE_NO_WARNINGS": "1", "SUBSCRIBER_ID": self.persistent_id})
        async with asyncio.timeout(20):
            while (doc := json.loads(await self.proc.stdout.readline())) != {"subscribed": True}:
                self.messages.append(doc)
        self._reader = asyncio.create_task(self._read())
        return self


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


# ----------------------------------------------------------------------------------------- tests

async def test_births_come_first_with_every_measurement_value_unit_and_reply_time(tmp_path):
    """The first messages of a session: NBIRTH (seq 0, bdSeq 0 for a new state directory, Node
    Control/Rebirth false without alias, the segments' figures), then one DBIRTH per meter with every
    measurement as a Double, its value, the poll reply's time and its unit; no data before them.
    The broker comes up after the meters were read (so the births carry values): a persistent
    subscriber session, made beforehand, receives them.

    tck-ids: principles-birth-certificates-order, message-flow-edge-node-birth-publish-connect,
    topics-nbirth-topic, message-flow-edge-node-birth-publish-nbirth-topic,
    message-flow-edge-node-birth-publish-nbirth-payload, topics-nbirth-mqtt, payloads-nbirth-qos,
    payloads-nbirth-retain, topics-nbirth-seq-num, payloads-nbirth-seq, topics-nbirth-timestamp,
    topics-nbirth-bdseq-included, payloads-nbirth-bdseq,
    topics-nbirth-rebirth-metric, payloads-nbirth-rebirth-req, operational-behavior-data-commands-
    rebirth-name/-datatype/-value, operational-behavior-data-commands-rebirth-name-aliases,
    topics-nbirth-metric-reqs, topics-nbirth-metrics, topics-dbirth-topic,
    message-flow-device-birth-publish-dbirth-topic, -dbirth-match-edge-node-topic, topics-dbirth-mqtt,
    payloads-dbirth-qos, payloads-dbirth-retain, topics-dbirth-seq, payloads-dbirth-seq-inc,
    topics-dbirth-timestamp, message-flow-device-birth-publish-nbirth-wait, payloads-dbirth-order,
    topics-dbirth-metric-reqs, topics-dbirth-metrics, operational-behavior-data-publish-dbirth-values,
    payloads-name-birth-data-requirement, payloads-metric-timestamp-in-UTC, payloads-alias-birth-requirement,
    payloads-alias-uniqueness, payloads-metric-datatype-req, payloads-metric-propertyvalue-type-*,
    payloads-ddata-order, payloads-ndata-order."""
    broker = Mosquitto(tmp_path / "broker", extra=PERSISTENT).start()
    try:
        async with PersistentSubscriber(broker.url, f"{PREFIX}/#", persistent_id="births"):
            pass  # the session stays on the broker, its subscription with it
        broker.stop()
        async with running_bridge(LAYOUT, mqtt=sparkplug(broker), state_dir=str(tmp_path)) as h:
            polls = record_polls(h)
            await h.polls("incomer", 2)
            await h.polls("hvac", 2)
            link = h.app.north["mqtt"].links[0]
            started = time.time()
            broker.start()
            await until(lambda: link.sent >= 3, timeout=10, what="births sent")
            async with PersistentSubscriber(broker.url, f"{PREFIX}/#", persistent_id="births") as sub:
                await sub.wait_for(lambda ms: len(of(ms, "DDATA")) >= 4, what="births and data")
                walls = {u: h.app.image.unit(u).last_good_wall for u in (11, 12)}
        msgs = node_messages(sub.messages)
        nbirth, *dbirths = msgs[:3]
        assert nbirth["topic"] == f"{PREFIX}/NBIRTH/{NODE}", [m["topic"] for m in msgs[:5]]
        assert [m["topic"] for m in dbirths] == [f"{PREFIX}/DBIRTH/{NODE}/incomer", f"{PREFIX}/DBIRTH/{NODE}/hvac"]
        assert all(kind(m) not in ("NBIRTH", "DBIRTH") for m in msgs[3:])

        p = nbirth["payload"]
        assert p["seq"] == 0 and abs(p["timestamp"] - started * 1000) < 10_000
        assert (nbirth["qos"], nbirth["retain"]) == (0, False)
        # the Will's bdSeq, kept in the state directory (its strict value: see the bdSeq test below)
        assert bd_seq(nbirth) == int((tmp_path / "sparkplug-bdseq").read_text())
        rebirth = metric(nbirth, "Node Control/Rebirth")
        assert (rebirth["type"], rebirth["value"]) == ("Boolean", False) and "alias" not in rebirth
        util = metric(nbirth, "Segments/a/Utilisation")
        assert util["type"] == "Double" and 0 <= util["value"] <= 1
        assert all("timestamp" in x for x in p["metrics"])

        aliases = [x["alias"] for m in (nbirth, *dbirths) for x in m["payload"]["metrics"] if "alias" in x]
        assert len(aliases) == len(set(aliases)) == sum(len(m["payload"]["metrics"]) for m in (nbirth, *dbirths)) - 1
        for seq, (m, name, unit) in enumerate(zip(dbirths, ("incomer", "hvac"), (11, 12)), start=1):
            d = m["payload"]
            assert d["seq"] == seq and (m["qos"], m["retain"]) == (0, False) and "timestamp" in d
            measurements = h.meters[name].profile.measurements
            assert [x["name"] for x in d["metrics"]] == [ms.name for ms in measurements]
            stamps = {x["timestamp"] for x in d["metrics"]}
            assert len(stamps) == 1, stamps
            stamp = stamps.pop()
            assert stamp in polls[unit], f"{name}: DBIRTH time {stamp} is no poll reply time"
            assert stamp <= walls[unit] * 1000 and stamp <= d["timestamp"] < stamp + 2000
            for x, ms in zip(d["metrics"], measurements):
                assert x["type"] == "Double" and number(x["value"]), x
                assert prop(x, "Quality") is None, x  # good: no Quality property
                if ms.unit:
                    assert prop(x, "engUnit") == {"type": "String", "value": ms.unit}, x
                else:
                    assert prop(x, "engUnit") is None, x
            assert 200 < next(x["value"] for x in d["metrics"] if x["name"] in ("voltage", "voltage_l1")) < 260
        check_seq(sub.messages)
    finally:
        broker.stop()


@pytest.mark.parametrize("aliases", [True, False], ids=["aliases", "names"])
async def test_ddata_reports_by_exception_and_seq_runs_over_every_message(broker, tmp_path, aliases):
    """DDATA carries only the metrics that changed: a non-animated meter reports nothing until one of
    its registers changes, then exactly that metric (alias only with aliases on, name only without),
    with the poll reply's time; animated meters report each change once. seq goes up by one per
    message over NBIRTH, DBIRTH, NDATA, DDATA, and wraps 255 → 0.

    tck-ids: topics-ddata-topic, topics-ddata-mqtt, payloads-ddata-qos, payloads-ddata-retain,
    topics-ddata-seq-num, payloads-ddata-seq, payloads-ddata-seq-inc, topics-ndata-seq-num,
    payloads-ndata-seq-inc, payloads-sequence-num-always-included, payloads-sequence-num-incrementing,
    topics-ddata-timestamp, payloads-ddata-timestamp, topics-ddata-payload,
    operational-behavior-data-publish-dbirth-change, principles-rbe-recommended,
    payloads-alias-data-cmd-requirement, payloads-name-requirement, payloads-name-birth-data-requirement,
    payloads-metric-timestamp-in-UTC, payloads-metric-datatype-not-req (deviation: datatype kept)."""
    fast = dict(poll_interval=0.02, animate=True)
    layout = {"a": [MeterSpec("incomer", 1, 11, poll_interval=0.02),
                    MeterSpec("m2", 2, 12, **fast), MeterSpec("m3", 3, 13, **fast)]}
    async with Subscriber(broker.url, f"{PREFIX}/#") as sub, \
            running_bridge(layout, mqtt=sparkplug(broker, aliases=aliases), state_dir=str(tmp_path),
                           bus_options={"baudrate": 115200}, baudrate=115200) as h:
        polls = record_polls(h)
        sim = h.sims["incomer"]
        await sub.wait_for(lambda ms: of(ms, "DBIRTH", "incomer") and len(of(ms, "DDATA", "m2")) >= 3,
                           what="first data")
        await h.polls("incomer", 3)
        await asyncio.sleep(0.2)
        before = len(of(sub.messages, "DDATA", "incomer"))
        await asyncio.sleep(0.3)
        assert len(of(sub.messages, "DDATA", "incomer")) == before, "DDATA for a meter whose values did not change"

        dbirth = of(sub.messages, "DBIRTH", "incomer")[0]
        ident = {x["name"]: key(x) for x in dbirth["payload"]["metrics"]}
        sim.set_value("voltage", 233.25)
        await sub.wait_for(lambda ms: len(of(ms, "DDATA", "incomer")) > before, what="the voltage change")
        await asyncio.sleep(0.2)
        changed = of(sub.messages, "DDATA", "incomer")[before:]
        assert len(changed) == 1, changed
        [x] = changed[0]["payload"]["metrics"]
        assert key(x) == ident["voltage"] and x["value"] == 233.25 and x["type"] == "Double"
        assert ("name" not in x) if aliases else ("alias" not in x), x
        assert x["timestamp"] in polls[11] and not x.get("isHistorical")

        before = len(of(sub.messages, "DDATA", "incomer"))
        sim.set_values({"current": 7.5, "frequency": 50.5})
        await sub.wait_for(lambda ms: len({key(x) for m in of(ms, "DDATA", "incomer")[before:]
                                           for x in m["payload"]["metrics"]}) >= 2, what="two changes")
        await asyncio.sleep(0.2)
        reported = [(key(x), x["value"]) for m in of(sub.messages, "DDATA", "incomer")[before:]
                    for x in m["payload"]["metrics"]]
        assert sorted(reported, key=str) == sorted([(ident["current"], 7.5), (ident["frequency"], 50.5)], key=str)

        if aliases:  # long enough for seq to wrap (about 150 messages a second)
            await sub.wait_for(lambda ms: len(node_messages(ms)) >= 300, timeout=15, what="300 messages")
    msgs = sub.messages
    wraps = check_seq(msgs)
    assert wraps >= 1 or not aliases
    last: dict[object, object] = {}
    for m in node_messages(msgs):
        if kind(m) == "DBIRTH":
            last.update({(device(m), key(x)): x["value"] for x in m["payload"]["metrics"]})
        elif kind(m) == "DDATA":
            assert (m["qos"], m["retain"]) == (0, False) and "timestamp" in m["payload"]
            assert m["payload"]["metrics"], m
            for x in m["payload"]["metrics"]:
                assert ("name" not in x and "alias" in x) if aliases else ("name" in x and "alias" not in x), x
                assert "timestamp" in x and x["type"] == "Double"
                k = (device(m), key(x))
                assert x["value"] != last.get(k) or prop(x, "Quality") is not None, f"unchanged {k} reported: {x}"
                last[k] = x["value"]
        elif kind(m) == "NDATA":
            for x in m["payload"]["metrics"]:
                assert ("name" not in x and "alias" in x) if aliases else "name" in x, x


async def test_silent_meter_goes_stale_then_dies_then_is_born_again(broker, tmp_path):
    """A meter that stops answering: once stale, a DDATA with every metric's Quality 500 (Int32);
    when it is declared offline, a DDEATH (seq, timestamp, no metrics) and nothing more from it;
    answering again, a new DBIRTH with its values (no Quality: good). The other meter carries on.

    tck-ids: payloads-propertyset-quality-value-type, payloads-propertyset-quality-value-value,
    payloads-propertyset-keys-array-size, operational-behavior-device-ddeath, topics-ddeath-topic,
    topics-ddeath-mqtt, topics-ddeath-seq-num, payloads-ddeath-seq, payloads-ddeath-seq-inc,
    payloads-ddeath-seq-number, payloads-ddeath-timestamp, topics-dbirth-metric-reqs,
    payloads-dbirth-order (deviation: a DBIRTH after data of other devices)."""
    async with Subscriber(broker.url, f"{PREFIX}/#") as sub, \
            running_bridge(PAIR, mqtt=sparkplug(broker), state_dir=str(tmp_path), stale_after=0.5,
                           demote_after=8, demote_interval=0.5) as h:
        await sub.wait_for(lambda ms: len(of(ms, "DDATA", "feeder")) >= 2, what="live data")
        names = [m.name for m in h.meters["feeder"].profile.measurements]
        h.sims["feeder"].faults.silent = True

        def stale(m: dict) -> bool:
            return all((prop(x, "Quality") or {}).get("value") == 500 for x in m["payload"]["metrics"])

        await sub.wait_for(lambda ms: any(stale(m) for m in of(ms, "DDATA", "feeder")), what="Quality 500")
        await sub.wait_for(lambda ms: of(ms, "DDEATH", "feeder"), timeout=10, what="DDEATH")
        await asyncio.sleep(0.3)
        h.sims["feeder"].faults.silent = False
        await sub.wait_for(lambda ms: len(of(ms, "DBIRTH", "feeder")) >= 2, timeout=10, what="DBIRTH again")
        await sub.wait_for(lambda ms: len(of(ms, "DDATA", "incomer")) >= 20, what="the other meter")
    feeder = [m for m in node_messages(sub.messages) if device(m) == "feeder"]
    i_stale = next(i for i, m in enumerate(feeder) if kind(m) == "DDATA" and stale(m))
    i_death = next(i for i, m in enumerate(feeder) if kind(m) == "DDEATH")
    assert i_stale < i_death
    stale_msg = feeder[i_stale]
    assert [x["alias"] for x in stale_msg["payload"]["metrics"]] == \
        [x["alias"] for x in of(sub.messages, "DBIRTH", "feeder")[0]["payload"]["metrics"]], "not every metric"
    assert all(prop(x, "Quality") == {"type": "Int32", "value": 500} for x in stale_msg["payload"]["metrics"])
    assert all(kind(m) == "DDATA" and stale(m) for m in feeder[i_stale:i_death]), "fresh data while stale"
    death = feeder[i_death]
    assert death["topic"] == f"{PREFIX}/DDEATH/{NODE}/feeder" and (death["qos"], death["retain"]) == (0, False)
    assert "timestamp" in death["payload"] and not death["payload"].get("metrics")
    assert kind(feeder[i_death + 1]) == "DBIRTH", "data after the DDEATH before a new DBIRTH"
    reborn = feeder[i_death + 1]["payload"]
    assert [x["name"] for x in reborn["metrics"]] == names
    assert all(number(x["value"]) and prop(x, "Quality") is None for x in reborn["metrics"]), reborn
    everything = node_messages(sub.messages)
    assert any(device(m) == "incomer" and kind(m) == "DDATA" for m in everything[everything.index(death):])
    check_seq(sub.messages)


async def test_rebirth_command_republishes_every_birth_within_a_second(broker, tmp_path):
    """NCMD Node Control/Rebirth = true (Tahu-encoded, from another client): a complete NBIRTH (seq 0,
    the same bdSeq: no new connection) and every DBIRTH, back to back, within 1 s; data go on after.

    tck-ids: operational-behavior-data-commands-ncmd-rebirth-verb, -ncmd-rebirth-name,
    -ncmd-rebirth-value, operational-behavior-data-commands-rebirth-action-1, -rebirth-action-2,
    -rebirth-action-3, payloads-nbirth-bdseq-repeat, message-flow-edge-node-ncmd-subscribe,
    payloads-sequence-num-zero-nbirth, payloads-dbirth-order.

    May fail now and then on its seq check ("seq 14 after 2": an older DDATA after the new DBIRTHs)
    until the race shown deterministically by the next test is fixed."""
    async with Subscriber(broker.url, f"{PREFIX}/#") as sub, \
            running_bridge(LAYOUT, mqtt=sparkplug(broker), state_dir=str(tmp_path)) as h:
        await sub.wait_for(lambda ms: len(of(ms, "DDATA", "hvac")) >= 3, what="live data")
        await publish(broker.url, f"{PREFIX}/NCMD/{NODE}",
                      {"timestamp": now_ms(), "metrics": [{"name": "Node Control/Rebirth", "type": "Boolean",
                                                           "value": True}]})
        await sub.wait_for(lambda ms: len(of(ms, "NBIRTH")) >= 2 and len(of(ms, "DBIRTH", "hvac")) >= 2,
                           timeout=5, what="the births again")
        await sub.wait_for(lambda ms: len(sessions(ms)[-1]) >= 10, what="data after the rebirth")
    ncmd = next(m for m in sub.messages if kind(m) == "NCMD")
    first, second = of(sub.messages, "NBIRTH")
    last_dbirth = of(sub.messages, "DBIRTH", "hvac")[-1]
    assert last_dbirth["received"] - ncmd["received"] < 1000, "the births not within 1 s"
    assert bd_seq(second) == bd_seq(first)
    assert metric(second, "Node Control/Rebirth")["value"] is False
    assert {x["name"] for x in second["payload"]["metrics"]} == {x["name"] for x in first["payload"]["metrics"]}
    after = sessions(sub.messages)[-1]
    assert [kind(m) + "/" + device(m) for m in after[:3]] == ["NBIRTH/", "DBIRTH/incomer", "DBIRTH/hvac"]
    for m, name in zip(after[1:3], ("incomer", "hvac")):
        metrics = m["payload"]["metrics"]
        assert [x["name"] for x in metrics] == [ms.name for ms in h.meters[name].profile.measurements]
        assert all(number(x["value"]) for x in metrics), metrics
    kinds = [kind(m) for m in after[3:]]
    n = kinds.index("NDEATH")  # MQTT 5: the node's own NDEATH, then the broker's Will (DISCONNECT 0x04)
    assert set(kinds[:n]) <= {"DDATA", "NDATA"} and set(kinds[n:]) == {"NDEATH"}, kinds[-6:]
    check_seq(sub.messages)


async def test_rebirth_leaves_no_older_data_behind_the_births(broker, tmp_path):
    """A DDATA made just before a rebirth request is handled (the producer and the receiver both ready
    in one turn of the event loop; forced here by making the sample as the NCMD arrives) must not go
    out after the new NBIRTH/DBIRTHs: its seq belongs to the old sequence, and the DBIRTH already
    holds its values.

    tck-ids: operational-behavior-data-commands-rebirth-action-1, payloads-sequence-num-incrementing,
    payloads-ddata-seq-inc."""
    layout = {"a": [MeterSpec("incomer", 1, 11), MeterSpec("feeder", 2, 12)]}
    async with Subscriber(broker.url, f"{PREFIX}/#") as sub, \
            running_bridge(layout, mqtt=sparkplug(broker), state_dir=str(tmp_path)) as h:
        link = h.app.north["mqtt"].links[0]
        await sub.wait_for(lambda ms: len(of(ms, "DBIRTH")) >= 2 and of(ms, "NDATA"), what="the session")
        receive = link.on_message

        def racing(topic: str, payload: bytes):
            if topic == f"{PREFIX}/NCMD/{NODE}":  # the producer's turn came first in this loop turn
                s = sample_of(next(mv for mv in h.app.view.meters() if mv.name == "incomer"))
                link.take(MeterSample(s.name, s.quality, s.ts_ms, tuple((m, v + 1.0) for m, v in s.values)))
            return receive(topic, payload)

        link.on_message = racing
        await publish(broker.url, f"{PREFIX}/NCMD/{NODE}",
                      {"timestamp": now_ms(), "metrics": [{"name": "Node Control/Rebirth", "type": "Boolean",
                                                           "value": True}]})
        await sub.wait_for(lambda ms: len(of(ms, "NBIRTH")) >= 2 and len(sessions(ms)[-1]) >= 5, what="rebirth")
    after = sessions(sub.messages)[-1]
    assert [kind(m) + "/" + device(m) for m in after[:3]] == ["NBIRTH/", "DBIRTH/incomer", "DBIRTH/feeder"]
    seqs = [m["payload"]["seq"] for m in after[:5]]  # the session lasted longer: no NDEATH among them
    assert seqs == [0, 1, 2, 3, 4], \
        f"seq after the rebirth: {[(kind(m), device(m), m['payload']['seq']) for m in after[:5]]}"


async def test_dcmd_is_refused_nothing_is_written_and_a_warning_is_logged(broker, tmp_path, caplog):
    """DCMD writing a meter's metric (and NCMD writing a node metric): refused; the simulated meter
    gets no write and its registers stay as they were, no DDATA answers it, the session goes on, and
    a warning naming the DCMD is logged.

    tck-ids: operational-behavior-data-commands-dcmd-verb, message-flow-device-dcmd-subscribe,
    operational-behavior-data-commands-ncmd-verb (read-only: every write refused)."""
    caplog.set_level(logging.WARNING, logger="bridge.mqtt")
    layout = {"a": [MeterSpec("incomer", 1, 11), MeterSpec("hvac", 2, 12, "eastron-sdm630", animate=True)]}
    async with Subscriber(broker.url, f"{PREFIX}/#") as sub, \
            running_bridge(layout, mqtt=sparkplug(broker), state_dir=str(tmp_path)) as h:
        sim = h.sims["incomer"]
        await sub.wait_for(lambda ms: of(ms, "DBIRTH", "incomer") and len(of(ms, "DDATA", "hvac")) >= 2,
                           what="live data")
        await h.polls("incomer", 2)
        tables, requests = copy.deepcopy(sim.tables), sim.requests
        functions_before = len(sim.functions)
        ddata = len(of(sub.messages, "DDATA", "incomer"))
        await publish(broker.url, f"{PREFIX}/DCMD/{NODE}/incomer",
                      {"timestamp": now_ms(), "metrics": [{"name": "voltage", "type": "Double", "value": 999.0}]})
        await publish(broker.url, f"{PREFIX}/NCMD/{NODE}",
                      {"timestamp": now_ms(), "metrics": [{"name": "Segments/a/Utilisation", "type": "Double",
                                                           "value": 0.5}]})
        await until(lambda: any("DCMD" in r.getMessage() for r in caplog.records), what="the DCMD warning")
        await until(lambda: any("NCMD" in r.getMessage() for r in caplog.records), what="the NCMD warning")
        await h.polls("incomer", 3)
        await asyncio.sleep(0.2)
        new_functions = list(sim.functions)[functions_before:]
        assert sim.requests > requests and new_functions, "the meter was not polled meanwhile"
        assert set(new_functions) <= {3, 4}, f"the meter received {set(new_functions) - {3, 4}}"
        assert sim.tables == tables, "the meter's registers changed"
        assert abs(sim.value("voltage") - 999.0) > 1
        assert len(of(sub.messages, "DDATA", "incomer")) == ddata, "DDATA after the DCMD"
        assert len(of(sub.messages, "NBIRTH")) == 1
        n = len(node_messages(sub.messages))
        await sub.wait_for(lambda ms: len(node_messages(ms)) > n + 3, what="the session goes on")
    [dcmd] = [r for r in caplog.records if "DCMD" in r.getMessage()]
    assert dcmd.levelno == logging.WARNING and "incomer" in dcmd.getMessage() and "voltage" in dcmd.getMessage()
    assert "refused" in dcmd.getMessage()
    check_seq(sub.messages)


def bridge_config(tmp_path: Path, bus: SimulatedBus, broker: Mosquitto, sparkplug_extra: str = "") -> Path:
    config = tmp_path / "bridge.yaml"
    config.write_text(
        f"segments:\n  - name: a\n    port: {bus.open()}\n    timeout: 0.1\n"
        "    meters:\n      - {name: incomer, slave: 1, unit: 11, profile: eastron-sdm120, poll_interval: 0.1}\n"
        "modbus_tcp:\n  enabled: false\nopcua:\n  enabled: false\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"mqtt:\n  brokers: [{broker.url}]\n  client_id: {NODE}\n"
        f"  sparkplug: {{group_id: {GROUP}, edge_node_id: {NODE}{sparkplug_extra}}}\n")
    return config


async def start_bridge(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "bridge", "run", "-c", str(config),
                                                stderr=asyncio.subprocess.DEVNULL)


async def test_bdseq_across_restarts_clean_ndeath_on_sigterm_and_the_will_on_kill(broker, tmp_path):
    """The bridge as a process. SIGTERM: the node publishes its NDEATH (the NBIRTH's bdSeq, a
    timestamp: not the Will, which has none) and nothing after it. Started again: NBIRTH bdSeq one
    more (kept in the state directory). kill -9: the broker delivers the Will, the NDEATH with the
    current bdSeq, QoS 1, not retained.

    tck-ids: topics-nbirth-bdseq-increment, message-flow-edge-node-birth-publish-will-message-payload-bdSeq,
    payloads-ndeath-bdseq, topics-nbirth-bdseq-matching, message-flow-edge-node-birth-publish-will-message,
    payloads-ndeath-will-message, message-flow-edge-node-birth-publish-will-message-topic, topics-ndeath-topic,
    message-flow-edge-node-birth-publish-will-message-payload, message-flow-edge-node-birth-publish-will-message-qos,
    payloads-ndeath-will-message-qos, message-flow-edge-node-birth-publish-will-message-will-retained,
    payloads-ndeath-will-message-retain, topics-ndeath-payload, topics-ndeath-seq, payloads-ndeath-seq,
    payloads-ndeath-will-message-publisher, operational-behavior-edge-node-intentional-disconnect-ndeath."""
    bus = SimulatedBus([SimMeter(1, get_builtin("eastron-sdm120"))])
    try:
        config = bridge_config(tmp_path, bus, broker)
        async with Subscriber(broker.url, f"{PREFIX}/#") as sub:
            proc = await start_bridge(config)
            try:
                await sub.wait_for(lambda ms: of(ms, "NBIRTH") and of(ms, "DDATA"), timeout=20, what="first run")
                first = bd_seq(of(sub.messages, "NBIRTH")[0])
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 10) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await sub.wait_for(lambda ms: of(ms, "NDEATH"), timeout=5, what="NDEATH on SIGTERM")
            await asyncio.sleep(0.3)
            session = sessions(sub.messages)[0]
            ndeath = next(m for m in session if kind(m) == "NDEATH")
            # after it only the broker's Will (MQTT 5: DISCONNECT with reason 0x04), the same NDEATH unstamped
            after = session[session.index(ndeath) + 1:]
            assert all(kind(m) == "NDEATH" and "timestamp" not in m["payload"] for m in after), \
                "messages after the NDEATH"
            assert ndeath["topic"] == f"{PREFIX}/NDEATH/{NODE}" and (ndeath["qos"], ndeath["retain"]) == (1, False)
            assert bd_seq(ndeath) == first and [x["name"] for x in ndeath["payload"]["metrics"]] == ["bdSeq"]
            assert ndeath["payload"].get("timestamp", 0) >= session[0]["payload"]["timestamp"], \
                "no timestamp: the broker's Will, not the node's own NDEATH"
            assert (tmp_path / "state" / "sparkplug-bdseq").read_text().strip() == str(first)

            proc = await start_bridge(config)
            try:
                await sub.wait_for(lambda ms: len(of(ms, "NBIRTH")) == 2 and len(sessions(ms)[-1]) >= 3,
                                   timeout=20, what="second run")
                second = bd_seq(of(sub.messages, "NBIRTH")[1])
                assert second == (first + 1) % 256
                deaths = len(of(sub.messages, "NDEATH"))
            finally:
                proc.kill()  # kill -9: no goodbye
                await proc.wait()
            await sub.wait_for(lambda ms: len(of(ms, "NDEATH")) > deaths, timeout=10, what="the Will")
            will = of(sub.messages, "NDEATH")[-1]
            assert (will["qos"], will["retain"]) == (1, False)
            assert bd_seq(will) == second and [x["name"] for x in will["payload"]["metrics"]] == ["bdSeq"]
            assert "seq" not in will["payload"]
            check_seq(sub.messages)
    finally:
        bus.close()


async def test_bdseq_goes_up_per_mqtt_connect_not_per_failed_attempt(tmp_path):
    """A new state directory and no broker for a while: the first MQTT CONNECT that reaches a broker
    is the first CONNECT packet ever sent, so its Will and NBIRTH carry bdSeq 0 (seen here in the
    clean NDEATH at the stop, which repeats it).

    tck-ids: topics-nbirth-bdseq-increment ("bdSeq ... MUST be incremented by one from the value in
    the previous MQTT CONNECT packet"), message-flow-edge-node-birth-publish-will-message-payload-bdSeq."""
    broker = Mosquitto(tmp_path / "broker")  # not started yet
    sub = Subscriber(broker.url, f"{PREFIX}/#")
    try:
        async with running_bridge(PAIR, mqtt=sparkplug(broker), state_dir=str(tmp_path)) as h:
            link = h.app.north["mqtt"].links[0]
            await until(lambda: link.last_error, what="a refused attempt")
            await asyncio.sleep(0.6)  # and a second one (backoff 0.5 s)
            broker.start()
            await sub.__aenter__()
            await until(lambda: link.connected, timeout=10, what="connected")
            await asyncio.sleep(0.2)
        await sub.wait_for(lambda ms: of(ms, "NDEATH"), timeout=5, what="the NDEATH")
    finally:
        await sub.__aexit__(None, None, None)
        broker.stop()
    deaths = of(sub.messages, "NDEATH")  # MQTT 5: the node's own, then the broker's Will
    assert deaths and {bd_seq(m) for m in deaths} == {0}, (
        f"bdSeq {[bd_seq(m) for m in deaths]} on the first CONNECT ever: refused attempts used up numbers")


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_clean_stop_ndeath_then_disconnect(broker, tmp_path, protocol):
    """A clean stop (in process). MQTT 3.1.1: the node's NDEATH, then DISCONNECT (the broker drops the
    Will: exactly one NDEATH). MQTT 5: the DISCONNECT must carry reason code 0x04 "Disconnect with
    Will Message", so the broker publishes the Will too (a second NDEATH, without timestamp).

    tck-ids: payloads-ndeath-will-message-publisher-disconnect-mqtt311,
    payloads-ndeath-will-message-publisher-disconnect-mqtt50,
    operational-behavior-edge-node-intentional-disconnect-ndeath,
    operational-behavior-edge-node-intentional-disconnect-packet."""
    async with Subscriber(broker.url, f"{PREFIX}/#") as sub:
        async with running_bridge(PAIR, mqtt=sparkplug(broker, protocol=protocol), state_dir=str(tmp_path)):
            await sub.wait_for(lambda ms: len(of(ms, "DDATA")) >= 2, what="live data")
        await sub.wait_for(lambda ms: of(ms, "NDEATH"), timeout=5, what="NDEATH")
        await asyncio.sleep(0.5)
    deaths = of(sub.messages, "NDEATH")
    own = [m for m in deaths if "timestamp" in m["payload"]]
    wills = [m for m in deaths if "timestamp" not in m["payload"]]
    assert len(own) == 1 and bd_seq(own[0]) == bd_seq(of(sub.messages, "NBIRTH")[0])
    assert node_messages(sub.messages).index(own[0]) >= len(node_messages(sub.messages)) - len(deaths)
    if protocol == "3.1.1":
        assert not wills, "the Will was published after a clean DISCONNECT"
    else:
        assert len(wills) == 1, ("MQTT 5 clean stop: no Will NDEATH, so the DISCONNECT did not carry reason "
                                 "code 0x04 (tck-id-payloads-ndeath-will-message-publisher-disconnect-mqtt50)")
        assert bd_seq(wills[0]) == bd_seq(own[0])


async def test_primary_host_gates_the_session_and_history_fills_its_absence(broker, tmp_path):
    """primary_host: scada-1. Until its STATE (retained, published by another client) says online,
    nothing is published; then the births. STATE offline (newer timestamp): the NDEATH, then nothing
    while the node keeps its samples; STATE online again: NBIRTH (a new connection: bdSeq + 1), the
    DBIRTHs, and DDATA with is_historical covering every poll of the absence.

    tck-ids: operational-behavior-primary-application-state-with-multiple-servers-state-subs,
    message-flow-edge-node-birth-publish-phid-wait, operational-behavior-edge-node-birth-sequence-wait,
    message-flow-edge-node-birth-publish-phid-wait-id, message-flow-edge-node-birth-publish-phid-wait-online,
    message-flow-edge-node-birth-publish-phid-wait-timestamp, message-flow-edge-node-birth-publish-phid-offline,
    operational-behavior-edge-node-termination-host-offline, operational-behavior-edge-node-termination-
    host-offline-reconnect, topics-nbirth-bdseq-increment, operational-behavior-data-publish-dbirth-order
    (historical data exempt)."""
    state = "spBv1.0/STATE/scada-1"
    async with Subscriber(broker.url, f"{PREFIX}/#", state) as sub, \
            running_bridge(PAIR, mqtt=sparkplug(broker, primary_host="scada-1"), state_dir=str(tmp_path)) as h:
        polls = record_polls(h)
        link = h.app.north["mqtt"].links[0]
        await until(lambda: link.connected, what="connected to the broker")
        await publish(broker.url, "spBv1.0/STATE/scada-2", json.dumps({"online": True, "timestamp": now_ms()}),
                      "--text", "--retain")  # another host: no matter
        await h.polls("incomer", 5)
        assert not node_messages(sub.messages), f"published before the primary host is online: {sub.messages[:2]}"

        t1 = now_ms()
        await publish(broker.url, state, json.dumps({"online": True, "timestamp": t1}), "--text", "--retain")
        await sub.wait_for(lambda ms: len(of(ms, "DDATA", "feeder")) >= 5, what="births and data")
        first = bd_seq(of(sub.messages, "NBIRTH")[0])
        assert kind(node_messages(sub.messages)[0]) == "NBIRTH"

        offline_at = time.time()
        gone = len(node_messages(sub.messages))  # before: the NDEATH may arrive before publish() returns
        await publish(broker.url, state, json.dumps({"online": False, "timestamp": t1 + 1000}), "--text", "--retain")
        await until(lambda: link.connects >= 2, what="a new connection")  # the node left and came back
        await h.polls("incomer", 12)
        await h.polls("feeder", 2)
        connects_while_absent = link.connects
        back_at = time.time()
        await publish(broker.url, state, json.dumps({"online": True, "timestamp": t1 + 2000}), "--text", "--retain")
        await sub.wait_for(lambda ms: len(of(ms, "NBIRTH")) >= 2, what="births again")
        await until(lambda: not link.spilling, what="history replayed")
        await asyncio.sleep(0.3)

    offline_state = next(m for m in sub.messages if m["topic"] == state and '"online": false' in m["payload"])
    absent = node_messages(sub.messages)[gone:]
    i_birth = next(i for i, m in enumerate(absent) if kind(m) == "NBIRTH")
    late = [m for m in absent[:i_birth] if kind(m) != "NDEATH"
            and m["payload"]["timestamp"] > offline_state["received"] + 200]
    assert not late, f"published while the primary host is offline: {late[:2]}"
    nbirth = absent[i_birth]
    session = sessions(sub.messages)[-1]
    assert [kind(m) + "/" + device(m) for m in session[:3]] == ["NBIRTH/", "DBIRTH/incomer", "DBIRTH/feeder"]
    historical = [m for m in session if kind(m) == "DDATA"
                  and any(x.get("isHistorical") for x in m["payload"]["metrics"])]
    assert historical, "no historical DDATA"
    assert all(all(x.get("isHistorical") for x in m["payload"]["metrics"]) for m in historical)
    for name, unit in (("incomer", 11), ("feeder", 12)):
        got = {x["timestamp"] for m in historical if device(m) == name for x in m["payload"]["metrics"]}
        wanted = [t for t in polls[unit] if offline_at * 1000 + 300 <= t <= back_at * 1000 - 300]
        assert len(wanted) >= 5
        missing = sorted(set(wanted) - got)
        assert not missing, f"{name}: {len(missing)} of {len(wanted)} polls of the absence missing: {missing[:5]}"
        assert max(got) <= nbirth["payload"]["timestamp"]  # polls up to the births (the same ms may hold both)
    check_seq(sub.messages)

    problems = []
    deaths = [m for m in absent[:i_birth] if kind(m) == "NDEATH"]
    if not deaths:
        problems.append("no NDEATH after the primary host's offline STATE: the node disconnected without one "
                        "(tck-id-message-flow-edge-node-birth-publish-phid-offline, "
                        "operational-behavior-edge-node-termination-host-offline)")
    elif bd_seq(deaths[0]) != first:
        problems.append(f"NDEATH bdSeq {bd_seq(deaths[0])}, the NBIRTH's was {first}")
    if connects_while_absent != 2 or bd_seq(nbirth) != (first + 1) % 256:
        problems.append(f"{connects_while_absent} connections while the primary host stayed offline (NBIRTH "
                        f"bdSeq {bd_seq(nbirth)} after {first}): each new connection takes the same retained "
                        "offline STATE (timestamp not newer) as a reason to leave again "
                        "(tck-id-message-flow-edge-node-birth-publish-phid-offline: only a STATE whose timestamp "
                        "is greater than the previous one)")
    assert not problems, "\n".join(problems)


async def test_primary_host_offline_on_one_server_walks_to_the_next(tmp_path):
    """Two servers. The primary host is online on the first: the node is born there. Its STATE goes
    offline on that server: the node publishes its NDEATH there and connects to the next server in
    the list (where the host is online), with bdSeq + 1, and is born there.

    tck-ids: operational-behavior-primary-application-state-with-multiple-servers-walk,
    message-flow-edge-node-birth-publish-phid-offline, topics-nbirth-bdseq-increment."""
    first, second = Mosquitto(tmp_path / "b1").start(), Mosquitto(tmp_path / "b2").start()
    state = "spBv1.0/STATE/scada-1"
    try:
        for b in (first, second):
            await publish(b.url, state, json.dumps({"online": True, "timestamp": now_ms()}), "--text", "--retain")
        config = dataclasses.replace(sparkplug(first, primary_host="scada-1"), brokers=(first.url, second.url))
        async with Subscriber(first.url, f"{PREFIX}/#") as one, Subscriber(second.url, f"{PREFIX}/#") as two, \
                running_bridge(PAIR, mqtt=config, state_dir=str(tmp_path)):
            await one.wait_for(lambda ms: of(ms, "NBIRTH"), what="born on the first server")
            await publish(first.url, state, json.dumps({"online": False, "timestamp": now_ms()}), "--text", "--retain")
            await two.wait_for(lambda ms: of(ms, "NBIRTH") and of(ms, "DBIRTH"), what="born on the second server")
            await asyncio.sleep(0.3)
        [born_one], [born_two] = of(one.messages, "NBIRTH"), of(two.messages, "NBIRTH")
        deaths = of(one.messages, "NDEATH")
        assert deaths and bd_seq(deaths[0]) == bd_seq(born_one), "no NDEATH on the server the host left"
        assert one.messages.index(deaths[0]) > one.messages.index(born_one)
        assert bd_seq(born_two) == (bd_seq(born_one) + 1) % 256
        assert len(of(one.messages, "NBIRTH")) == 1, "it came back to the server whose host is offline"
    finally:
        first.stop()
        second.stop()


async def test_broker_killed_then_back_births_then_history_covering_the_outage(tmp_path):
    """kill -9 of the broker for about 2 s while the meters change: once it is back, the births (bdSeq
    + 1), then is_historical DDATA whose timestamps are the polls of the outage: every poll's reply
    time of each meter, from shortly before the kill to the new session, is in some DDATA (historical
    or live), and every second of the outage has historical samples of each meter.

    tck-ids: topics-nbirth-bdseq-increment, message-flow-edge-node-birth-publish-will-message-payload-bdSeq,
    principles-birth-certificates-order (after a reconnection), payloads-ddata-order,
    operational-behavior-data-publish-dbirth-order (historical data exempt), payloads-metric-timestamp-in-UTC."""
    broker = Mosquitto(tmp_path / "broker", extra=PERSISTENT).start()
    try:
        async with PersistentSubscriber(broker.url, f"{PREFIX}/#", persistent_id="audit") as sub, \
                running_bridge(PAIR, mqtt=sparkplug(broker), state_dir=str(tmp_path)) as h:
            polls = record_polls(h)
            link = h.app.north["mqtt"].links[0]
            await sub.wait_for(lambda ms: len(of(ms, "DDATA", "feeder")) >= 3, what="live data")
            await asyncio.sleep(1.2)  # the broker has saved the subscriber's session
            killed_at = time.time()
            broker.kill()
            await until(lambda: not link.connected, what="the bridge notices")
            await asyncio.sleep(2.0 - (time.time() - killed_at))
            broker.start()
            up_at = time.time()
            await until(lambda: link.connected, timeout=15, what="reconnected")
            await until(lambda: not link.spilling, timeout=15, what="history replayed")
            cut = int(killed_at * 1000) - 1000

            def covered(ms: list[dict]) -> bool:
                stamps = {(device(m), x["timestamp"]) for m in of(ms, "DDATA") for x in m["payload"]["metrics"]}
                return all((name, t) in stamps for name, unit in (("incomer", 11), ("feeder", 12))
                           for t in polls[unit] if cut <= t <= up_at * 1000)

            try:
                await sub.wait_for(covered, timeout=10, what="every poll of the outage")
            except TimeoutError:
                pass  # said precisely below
    finally:
        broker.stop()
    assert len(of(sub.messages, "NBIRTH")) == 2
    first, second = (bd_seq(m) for m in of(sub.messages, "NBIRTH"))
    assert second > first  # + 1 per CONNECT; failed attempts count too for now (see the bdSeq test)
    session = sessions(sub.messages)[-1]
    assert [kind(m) + "/" + device(m) for m in session[:3]] == ["NBIRTH/", "DBIRTH/incomer", "DBIRTH/feeder"]
    historical = [m for m in session if kind(m) == "DDATA"
                  and any(x.get("isHistorical") for x in m["payload"]["metrics"])]
    assert historical, "no historical DDATA after the outage"
    assert all(all(x.get("isHistorical") for x in m["payload"]["metrics"]) for m in historical)
    stamps = {(device(m), x["timestamp"]) for m in of(sub.messages, "DDATA") for x in m["payload"]["metrics"]}
    for name, unit in (("incomer", 11), ("feeder", 12)):
        wanted = [t for t in polls[unit] if cut <= t <= up_at * 1000]
        missing = [t for t in wanted if (name, t) not in stamps]
        assert not missing, f"{name}: {len(missing)} of {len(wanted)} polls around the outage never published: " \
                            f"{[t - cut for t in missing[:8]]} ms after kill - 1 s"
        hist = sorted(x["timestamp"] for m in historical if device(m) == name for x in m["payload"]["metrics"])
        for second_start in range(int(killed_at * 1000), int(up_at * 1000) - 1000, 1000):
            assert any(second_start <= t < second_start + 1000 for t in hist), \
                f"{name}: no historical sample in [{second_start}, +1 s) of the outage"
    check_seq(session)


async def test_ddata_metric_timestamps_are_those_of_the_poll_that_read_the_values(broker, tmp_path):
    """A metric's timestamp is the reply time of the poll whose registers gave its value, so over the
    DDATA of a device each metric's timestamps go strictly forward: never the same time for two
    different values. Here with a meter read in several blocks (eastron-sdm630, ~42 measurements).

    tck-ids: payloads-metric-timestamp-in-UTC; topics-ddata-payload; the product contract ("metric
    timestamps are the poll reply's time")."""
    layout = {"a": [MeterSpec("hvac", 2, 12, "eastron-sdm630", animate=True)]}
    async with Subscriber(broker.url, f"{PREFIX}/#") as sub, \
            running_bridge(layout, mqtt=sparkplug(broker), state_dir=str(tmp_path)) as h:
        polls = record_polls(h)
        await sub.wait_for(lambda ms: len(of(ms, "DDATA", "hvac")) >= 30, what="data")
    seen: dict[object, tuple[int, float, int]] = {}
    for m in of(sub.messages, "DDATA", "hvac"):
        for x in m["payload"]["metrics"]:
            k = key(x)
            if k in seen:
                t, value, seq = seen[k]
                assert x["timestamp"] > t, (
                    f"metric alias {k}: DDATA seq {m['payload']['seq']} says {x['value']} at {x['timestamp']}, "
                    f"DDATA seq {seq} said {value} at {t}")
            seen[k] = (x["timestamp"], x["value"], m["payload"]["seq"])
    assert all(x["timestamp"] in polls[12] for m in of(sub.messages, "DDATA", "hvac")[3:]
               for x in m["payload"]["metrics"])
