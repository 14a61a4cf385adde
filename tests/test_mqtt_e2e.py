"""The MQTT side end to end: simulated meters on ptys, the bridge, a real mosquitto broker started per
test on a free port, and an independent subscriber (mqtt.js + the Eclipse Tahu Sparkplug B decoder)."""
from __future__ import annotations

import asyncio
import json
import sys

import pytest
from broker import Mosquitto, Subscriber
from support import until

from bridge.config.profiles import get_builtin
from bridge.core.model import MqttConfig, MqttJsonConfig, SparkplugConfig
from bridge.south.simulator import SimMeter, SimulatedBus
from bridge.testing import MeterSpec, running_bridge

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

LAYOUT = {"a": [MeterSpec("incomer", 1, 11, animate=True), MeterSpec("hvac", 2, 12, "eastron-sdm630", animate=True)]}
TOPIC = "site/panel-7"


def json_config(broker: Mosquitto, **json_options) -> MqttConfig:
    return MqttConfig(brokers=(broker.url,), client_id="panel-7",
                      json=MqttJsonConfig(TOPIC, **json_options))


def states(messages: list[dict], meter: str) -> list[dict]:
    return [json.loads(m["payload"]) for m in messages if m["topic"] == f"{TOPIC}/{meter}" and m["payload"]]


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


async def test_json_state_per_meter_status_and_home_assistant_discovery(broker, tmp_path):
    async with Subscriber(broker.url, f"{TOPIC}/#", "homeassistant/#") as sub, \
            running_bridge(LAYOUT, mqtt=json_config(broker, homeassistant=True), state_dir=str(tmp_path)) as h:
        await sub.wait_for(lambda ms: any(s["status"] == "good" for s in states(ms, "incomer"))
                           and any(s["status"] == "good" for s in states(ms, "hvac")), what="good states")
        status = [m for m in sub.messages if m["topic"] == f"{TOPIC}/status"]
        assert status[-1]["payload"] == "online" and status[-1]["qos"] == 1
        good = next(s for s in states(sub.messages, "incomer") if s["status"] == "good")
        assert set(good) == {"ts", "status", "values"}
        names = [m.name for m in h.meters["incomer"].profile.measurements]
        assert list(good["values"]) == names and 200 < good["values"]["voltage"] < 260
        assert abs(good["ts"] / 1000 - h.app.image.unit(11).last_good_wall) < 60
        configs = {m["topic"]: json.loads(m["payload"]) for m in sub.messages
                   if m["topic"].startswith("homeassistant/") and m["topic"].endswith("/config")}
        energy = next(c for t, c in configs.items() if t.endswith("incomer-import_active_energy/config"))
        assert (energy["device_class"], energy["state_class"], energy["unit_of_measurement"]) == \
            ("energy", "total_increasing", "kWh")
        assert energy["state_topic"] == f"{TOPIC}/incomer"
        assert len([t for t in configs if "/hvac-" in t]) == len(h.meters["hvac"].profile.measurements)
    # a clean stop says offline on the status topic (retained: a new subscriber sees it)
    async with Subscriber(broker.url, f"{TOPIC}/status") as late:
        await late.wait_for(lambda ms: ms, what="retained status")
        assert late.messages[-1]["payload"] == "offline" and late.messages[-1]["retain"]


async def test_json_the_will_says_offline_when_the_bridge_is_killed(broker, tmp_path):
    """kill -9 of the bridge: no goodbye, the broker publishes the Will (status offline, retained)."""
    bus = SimulatedBus([SimMeter(1, get_builtin("eastron-sdm120"))])
    try:
        config = tmp_path / "bridge.yaml"
        config.write_text(
            f"segments:\n  - name: a\n    port: {bus.open()}\n    timeout: 0.1\n"
            "    meters:\n      - {name: incomer, slave: 1, unit: 11, profile: eastron-sdm120, poll_interval: 0.1}\n"
            "modbus_tcp:\n  enabled: false\nopcua:\n  enabled: false\n"
            f"mqtt:\n  brokers: [{broker.url}]\n  client_id: panel-7\n  json: {{topic: {TOPIC}}}\n")
        async with Subscriber(broker.url, f"{TOPIC}/status") as sub:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bridge", "run", "-c", str(config),
                                                        stderr=asyncio.subprocess.DEVNULL)
            try:
                await sub.wait_for(lambda ms: ms and ms[-1]["payload"] == "online", timeout=20, what="online")
            finally:
                proc.kill()
                await proc.wait()
            await sub.wait_for(lambda ms: ms[-1]["payload"] == "offline", timeout=20, what="offline by the Will")
            assert sub.messages[-1]["qos"] == 1
    finally:
        bus.close()


async def test_json_broker_killed_and_restarted_loses_no_state_message(broker, tmp_path):
    """kill -9 of the broker for a while: every state message the bridge made is delivered, in order
    per meter, once the broker is back (the subscriber keeps a persistent session)."""
    made: list = []
    async with Subscriber(broker.url, f"{TOPIC}/#", persistent_id="audit") as sub, \
            running_bridge(LAYOUT, mqtt=json_config(broker), state_dir=str(tmp_path)) as h:
        side = h.app.north["mqtt"]
        link = side.links[0]
        offer = link.offer

        def recording(messages):
            made.extend(m for m in messages if m.topic.startswith(f"{TOPIC}/") and not m.topic.endswith("/status"))
            offer(messages)

        link.offer = recording
        await sub.wait_for(lambda ms: len(states(ms, "incomer")) >= 3, what="live states")
        await asyncio.sleep(1.2)  # the broker has saved the subscriber's session
        broker.kill()
        await until(lambda: not link.connected, what="the bridge notices")
        await asyncio.sleep(1.5)  # polls go on: states pile up on disk
        queued = side.status().counters.get("queue_queued", 0)
        broker.start()
        await until(lambda: link.connected, timeout=20, what="reconnected")
        await until(lambda: not link.spilling, timeout=20, what="backlog replayed")
        await asyncio.sleep(0.5)
        link.offer = offer
        expected = [(m.topic, json.loads(m.payload)["ts"], json.loads(m.payload)["status"]) for m in made]
        await sub.wait_for(lambda ms: {(m["topic"], json.loads(m["payload"])["ts"], json.loads(m["payload"])["status"])
                                       for m in ms if m["topic"] in {t for t, _, _ in expected} and m["payload"]}
                           >= set(expected), timeout=20, what="every state message")
        assert queued > 0, "the outage put nothing on disk"
        for meter in ("incomer", "hvac"):
            got = [s["ts"] for s in states(sub.messages, meter) if s["ts"] is not None]
            mine = [ts for t, ts, _ in expected if t.endswith("/" + meter) and ts is not None]
            seen = [ts for ts in got if ts in set(mine)]
            assert sorted(set(seen)) == sorted(set(mine))  # every one arrived
            assert seen == sorted(seen), f"{meter}: out of order"  # the backlog before what came after


async def test_mqtt_side_never_holds_the_bus_back_without_a_broker(tmp_path):
    """No broker at all: the bridge starts, polls at its rate, serves, and keeps what it would have sent."""
    dead = MqttConfig(brokers=("mqtt://127.0.0.1:9",), client_id="panel-7", json=MqttJsonConfig(TOPIC))
    async with running_bridge(LAYOUT, mqtt=dead, state_dir=str(tmp_path)) as h:
        await h.polls("incomer", 5)
        side = h.app.north["mqtt"]
        await until(lambda: side.status().counters.get("queue_queued", 0) > 0, what="queued on disk")
        assert "cannot" in side.links[0].last_error or side.links[0].last_error
        assert not h.app.view.not_ready()  # a missing broker does not make the bridge unready


async def test_demo_publishes_to_a_broker_the_user_runs(broker, tmp_path):
    """`modbus-bridge demo --mqtt URL`: Sparkplug B births and JSON states reach the user's broker."""
    from bridge.testing import free_port

    async with Subscriber(broker.url, "spBv1.0/demo/#", "modbus-bridge/demo/#") as sub:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "demo", "--modbus-port", str(free_port()), "--opcua-port",
            str(free_port()), "--http-port", str(free_port()), "--mqtt", broker.url, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        try:
            await sub.wait_for(lambda ms: any(m["topic"] == "spBv1.0/demo/DBIRTH/demo-panel/incomer" for m in ms)
                               and any(m["topic"] == "modbus-bridge/demo/incomer" and m["payload"]
                                       and json.loads(m["payload"])["status"] == "good" for m in ms),
                               timeout=30, what="births and a good state")
            banner = (await proc.stdout.read(4096)).decode()
            assert "MQTT:" in banner and broker.url in banner
        finally:
            proc.terminate()
            assert await proc.wait() == 0
        nbirth = next(m for m in sub.messages if m["topic"] == "spBv1.0/demo/NBIRTH/demo-panel")
        assert any(metric["name"] == "bdSeq" for metric in nbirth["payload"]["metrics"])
