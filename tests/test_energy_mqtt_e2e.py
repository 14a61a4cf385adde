"""Closed energy intervals on MQTT, through a real mosquitto and the independent subscriber (mqtt.js and
the Eclipse Tahu decoder): JSON on ``<topic>/<meter>/energy``, Sparkplug as each device's ``Energy/...``
metrics timestamped with the interval's end; a broker outage loses none of them."""
from __future__ import annotations

import asyncio
import json

import pytest
from broker import Mosquitto, Subscriber
from support import until
from test_energy_e2e import ENERGY, LAYOUT, RATES, SECONDS, Counters

from bridge.core.model import MqttConfig, MqttJsonConfig, SparkplugConfig
from bridge.energy.report import iso
from bridge.testing import running_bridge

TOPIC = "site/panel-7"


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


def config(broker: Mosquitto) -> MqttConfig:
    return MqttConfig(brokers=(broker.url,), client_id="panel-7", sparkplug=SparkplugConfig("site", "panel-7"),
                      json=MqttJsonConfig(TOPIC))


def json_intervals(messages: list[dict], meter: str) -> dict[str, dict]:
    """end -> interval, from the live topic and the history topic alike."""
    out = {}
    for m in messages:
        if m["topic"] in (f"{TOPIC}/{meter}/energy", f"{TOPIC}/{meter}/energy/history") and m["payload"]:
            body = json.loads(m["payload"])
            out[body["end"]] = body
    return out


def sparkplug_intervals(messages: list[dict], meter: str) -> dict[int, dict]:
    """interval end (ms) -> {metric name: metric}, from DBIRTH (names) and DDATA (aliases)."""
    names: dict[int, str] = {}
    out: dict[int, dict] = {}
    for m in messages:
        parts = m["topic"].split("/")
        if len(parts) < 5 or parts[4] != meter or parts[2] not in ("DBIRTH", "DDATA"):
            continue
        for x in m["payload"]["metrics"]:
            if "name" in x and "alias" in x:
                names[x["alias"]] = x["name"]
            name = x.get("name") or names.get(x.get("alias"))
            if name and name.startswith("Energy/") and parts[2] == "DDATA":
                out.setdefault(x["timestamp"], {})[name] = x
    return out


async def test_closed_intervals_go_out_as_json_and_sparkplug_and_survive_a_broker_outage(broker, tmp_path):
    async with Subscriber(broker.url, f"{TOPIC}/#", "spBv1.0/site/#", persistent_id="energy-audit") as sub, \
            running_bridge(LAYOUT, mqtt=config(broker), energy=ENERGY, state_dir=str(tmp_path)) as h:
        task = asyncio.create_task(Counters(h.sims, RATES).run())
        try:
            recorder = h.app.north["energy"]
            await sub.wait_for(lambda ms: len(json_intervals(ms, "incomer")) >= 2
                               and len(sparkplug_intervals(ms, "incomer")) >= 2, timeout=15, what="intervals")
            # JSON: the API's interval record; Sparkplug: every quantity, demand and status at the end's time
            j = json_intervals(sub.messages, "incomer")
            body = j[max(j)]
            assert body["meter"] == "incomer" and body["status"] in ("complete", "estimated")
            assert body["import_active_energy"] == pytest.approx(36.0 * SECONDS / 3600, rel=0.1)
            retained = [m for m in sub.messages if m["topic"] == f"{TOPIC}/incomer/energy"]
            assert retained  # published with retain (a late subscriber gets the last interval)
            sp = sparkplug_intervals(sub.messages, "incomer")
            end_ms = max(sp)
            metrics = sp[end_ms]
            assert {"Energy/import_active_energy", "Energy/Demand", "Energy/Status"} <= set(metrics)
            assert metrics["Energy/Demand"]["value"] == pytest.approx(36000.0, rel=0.1)
            assert end_ms % (SECONDS * 1000) == 0  # timestamped with the interval's end, a boundary
            # the virtual meter has a JSON topic too, and a live state like a meter's: the sum of its terms'
            # power now (36 - 9 - 18 kW), good while they all are
            assert json_intervals(sub.messages, "unmetered")
            await sub.wait_for(lambda ms: any(m["topic"] == f"{TOPIC}/unmetered" and m["payload"]
                                              and json.loads(m["payload"])["status"] == "good" for m in ms),
                               what="the virtual meter's live state")
            live = [json.loads(m["payload"]) for m in sub.messages if m["topic"] == f"{TOPIC}/unmetered" and m["payload"]]
            assert live[-1]["values"]["active_power"] == pytest.approx(9000.0) and live[-1]["ts"] > 0

            # an outage: every interval closed meanwhile arrives once the broker is back
            broker.kill()
            link = h.app.north["mqtt"].links[0]
            await until(lambda: not link.connected, what="the bridge notices")
            killed = recorder.last("incomer").end
            await asyncio.sleep(3 * SECONDS)
            broker.start()
            back = recorder.last("incomer").end
            assert back > killed
            await sub.wait_for(lambda ms: len([t for t in sparkplug_intervals(ms, "incomer")
                                               if killed * 1000 < t <= back * 1000]) >= (back - killed) // SECONDS,
                               timeout=20, what="the outage's Sparkplug intervals")
            await asyncio.sleep(1.0)  # and the JSON backlog
            stored = [i for i in await recorder.intervals("incomer", killed, back) if i.status != "missing"]
            got_json = {json.loads(m["payload"])["end"] for m in sub.messages
                        if m["topic"].startswith(f"{TOPIC}/incomer/energy") and m["payload"]}
            assert {iso(i.end) for i in stored} <= got_json, "a JSON interval lost in the outage"
            got_sp = set(sparkplug_intervals(sub.messages, "incomer"))
            assert {i.end * 1000 for i in stored} <= got_sp, "a Sparkplug interval lost in the outage"
            historical = [x for t, ms in sparkplug_intervals(sub.messages, "incomer").items()
                          if killed * 1000 < t < back * 1000 for x in ms.values() if x.get("isHistorical")]
            assert historical, "the outage's intervals were not flagged historical"
        finally:
            task.cancel()


def device_messages(messages: list[dict], device: str, kind: str) -> list[dict]:
    return [m for m in messages if m["topic"] == f"spBv1.0/site/{kind}/panel-7/{device}"]


async def test_a_virtual_meter_is_a_sparkplug_device_born_fed_and_dead_like_a_meter(broker, tmp_path):
    """The virtual meter ``unmetered`` (incomer - lighting - sockets) as a device: a DBIRTH with its live
    active power (engUnit W) and its Energy/ metrics, DDATA of its closed intervals, a DDEATH when a term
    goes offline and a new DBIRTH when it answers again (tck-id-topics-dbirth-*, tck-id-payloads-ddeath-*:
    a device that cannot be read is dead, as a meter's is)."""
    async with Subscriber(broker.url, "spBv1.0/site/#") as sub, \
            running_bridge(LAYOUT, mqtt=config(broker), energy=ENERGY, state_dir=str(tmp_path)) as h:
        task = asyncio.create_task(Counters(h.sims, RATES).run())
        try:
            await sub.wait_for(lambda ms: device_messages(ms, "unmetered", "DBIRTH"), what="the virtual DBIRTH")
            birth = device_messages(sub.messages, "unmetered", "DBIRTH")[-1]["payload"]["metrics"]
            names = {x["name"]: x for x in birth}
            assert {"active_power", "Energy/import_active_energy", "Energy/Demand", "Energy/Status"} <= set(names)
            assert names["active_power"]["properties"]["engUnit"]["value"] == "W"
            # its value arrives (in the birth if the terms were all read by then, else as DDATA by alias)
            aliases = {x["alias"]: x["name"] for x in birth if "alias" in x}

            def live_power(ms):
                for m in device_messages(ms, "unmetered", "DBIRTH") + device_messages(ms, "unmetered", "DDATA"):
                    for x in m["payload"]["metrics"]:
                        if (x.get("name") or aliases.get(x.get("alias"))) == "active_power" and x.get("value") is not None:
                            yield x["value"]
            await sub.wait_for(lambda ms: pytest.approx(9000.0) in list(live_power(ms)), what="9 kW unmetered")
            await sub.wait_for(lambda ms: len(sparkplug_intervals(ms, "unmetered")) >= 2, timeout=15,
                               what="the virtual meter's intervals")
            metrics = sparkplug_intervals(sub.messages, "unmetered")[max(sparkplug_intervals(sub.messages, "unmetered"))]
            assert metrics["Energy/Demand"]["value"] == pytest.approx(9000.0, rel=0.15)

            # a term goes offline: the virtual device dies with it; it is born again when the term is back
            h.sims["sockets"].faults.silent = True
            await sub.wait_for(lambda ms: device_messages(ms, "unmetered", "DDEATH"), timeout=15, what="DDEATH")
            births = len(device_messages(sub.messages, "unmetered", "DBIRTH"))
            h.sims["sockets"].faults.silent = False
            await sub.wait_for(lambda ms: len(device_messages(ms, "unmetered", "DBIRTH")) > births, timeout=15,
                               what="the DBIRTH after the term is back")
        finally:
            task.cancel()
