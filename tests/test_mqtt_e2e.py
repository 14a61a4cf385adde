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
from bridge.north.mqtt import side as side_module
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
    """kill -9 of the broker for a while: every state message the bridge made is delivered once the
    broker is back (the subscriber keeps a persistent session): what was made during the outage on
    ``<topic>/<meter>/history`` (not retained, in order, original ``ts``), while live states go on at
    once on ``<topic>/<meter>``, which retains the newest state."""
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

        def key(m: dict) -> tuple:
            body = json.loads(m["payload"])
            return m["topic"].removesuffix("/history"), body["ts"], body["status"]
        expected = {(m.topic, json.loads(m.payload)["ts"], json.loads(m.payload)["status"]) for m in made}
        await sub.wait_for(lambda ms: {key(m) for m in ms if m["payload"] and not m["topic"].endswith("/status")}
                           >= expected, timeout=20, what="every state message")
        assert queued > 0, "the outage put nothing on disk"
        history = [m for m in sub.messages if m["topic"].endswith("/history")]
        assert history and not any(m["retain"] for m in history)
        for meter in ("incomer", "hvac"):
            replayed = [ts for m in history if m["topic"] == f"{TOPIC}/{meter}/history"
                        and (ts := json.loads(m["payload"])["ts"]) is not None]
            assert replayed == sorted(replayed), f"{meter}: history out of order"
    # what the broker retains for each meter is its newest state, not a replayed one
    async with Subscriber(broker.url, f"{TOPIC}/+") as late:
        await late.wait_for(lambda ms: len([m for m in ms if not m["topic"].endswith("/status")]) >= 2, what="retained")
    for m in late.messages:
        if not m["topic"].endswith("/status"):
            newest = max(ts for x in sub.messages if x["payload"] and x["topic"].removesuffix("/history") == m["topic"]
                         and (ts := key(x)[1]) is not None)
            assert json.loads(m["payload"])["ts"] == newest, m["topic"]


async def test_a_state_that_changed_during_an_outage_is_current_at_once_when_the_broker_is_back(broker, tmp_path):
    """A meter that goes silent while the broker is away, and then says nothing new: once the broker
    is back its own topic holds "offline" at once (not only ``/history``), as does what the broker
    retains for a client connecting later; not the "good" it had before the outage."""
    layout = {"a": [MeterSpec("lighting", 2, 21)]}  # not animated: nothing changes after it goes silent
    async with Subscriber(broker.url, f"{TOPIC}/#") as sub, \
            running_bridge(layout, mqtt=json_config(broker), state_dir=str(tmp_path)) as h:
        link = h.app.north["mqtt"].links[0]
        await sub.wait_for(lambda ms: any(s["status"] == "good" for s in states(ms, "lighting")), what="good")
        await asyncio.sleep(1.2)  # the broker has saved the retained state
        broker.kill()
        await until(lambda: not link.connected, what="the bridge notices")
        h.sims["lighting"].faults.silent = True
        await until(lambda: h.app.view.image.health(21).value in ("stale", "offline"), what="the meter silent")
        await asyncio.sleep(0.3)
        broker.start()
        sub.messages.clear()
        await sub.wait_for(lambda ms: any(s["status"] != "good" for s in states(ms, "lighting")),
                           timeout=20, what="its state on its own topic")
    async with Subscriber(broker.url, f"{TOPIC}/lighting") as late:
        await late.wait_for(lambda ms: ms, what="retained")
        assert json.loads(late.messages[-1]["payload"])["status"] != "good"


async def test_mqtt_side_never_holds_the_bus_back_without_a_broker(tmp_path):
    """No broker at all: the bridge starts, polls at its rate, serves, and keeps what it would have sent."""
    dead = MqttConfig(brokers=("mqtt://127.0.0.1:9",), client_id="panel-7", json=MqttJsonConfig(TOPIC))
    async with running_bridge(LAYOUT, mqtt=dead, state_dir=str(tmp_path)) as h:
        await h.polls("incomer", 5)
        side = h.app.north["mqtt"]
        await until(lambda: side.status().counters.get("queue_queued", 0) > 0, what="queued on disk")
        await until(lambda: "mqtt://127.0.0.1:9" in side.links[0].last_error, what="the refusal said")
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


async def test_a_reload_moves_the_json_topics_and_births_a_new_meter(broker, tmp_path):
    """SIGHUP-style reload of the mqtt section and of the meters: the old prefix says offline, the
    new one carries every meter (the added one too) and says online."""
    import dataclasses

    layout = {"a": [MeterSpec("incomer", 1, 11, animate=True)], "b": [MeterSpec("lighting", 2, 21)]}
    async with Subscriber(broker.url, "#") as sub, \
            running_bridge(layout, mqtt=json_config(broker), state_dir=str(tmp_path)) as h:
        await sub.wait_for(lambda ms: any(s["status"] == "good" for s in states(ms, "incomer")), what="live")
        old = h.app.config
        await h.app.reload(dataclasses.replace(old, segments=old.segments[:1]))  # lighting removed
        # connected again before the next reload (one that comes before the link is back clears the
        # old status instead of saying offline on it: nothing was said there in between)
        await until(lambda: h.app.north["mqtt"].links[0].connected, what="connected after the first reload")
        sub.messages.clear()
        new = dataclasses.replace(old, mqtt=dataclasses.replace(old.mqtt, json=MqttJsonConfig("site/panel-8")))
        await h.app.reload(new)  # lighting back, under a new prefix
        await sub.wait_for(lambda ms: any(m["topic"] == "site/panel-8/lighting" and m["payload"]
                                          and json.loads(m["payload"])["status"] == "good" for m in ms)
                           and any(m["topic"] == "site/panel-8/status" and m["payload"] == "online" for m in ms),
                           what="the new prefix")
        assert "offline" in [m["payload"] for m in sub.messages if m["topic"] == f"{TOPIC}/status"]
        assert not h.app.view.problems()
        # what the broker now retains, as a client connecting later sees it: nothing left under the
        # old prefix (the removed meter's state and the old status are cleared), the new one complete
        await until(lambda: not h.app.north["mqtt"].links[0].retire, what="the old topics cleared")
        await asyncio.sleep(0.3)
        async with Subscriber(broker.url, "#") as late:
            await late.wait_for(lambda ms: any(m["topic"] == "site/panel-8/status" for m in ms), what="retained")
            await asyncio.sleep(0.5)
        retained = {m["topic"]: m["payload"] for m in late.messages}
        assert not [t for t in retained if t.startswith(TOPIC + "/")], retained.keys()
        assert {"site/panel-8/incomer", "site/panel-8/lighting", "site/panel-8/status"} <= set(retained)


def _certificates(directory):
    """A CA, a broker certificate for 127.0.0.1 and a client certificate, made here."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name, issuer_name, issuer_key, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
        return cert, key

    ca, ca_key = make("ca", None, None, ca=True)
    make("broker", ca.subject, ca_key, san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    make("client", ca.subject, ca_key)
    return {n: str(directory / n) for n in ("ca.pem", "broker.pem", "broker.key", "client.pem", "client.key")}


async def test_mutual_tls_with_a_client_certificate(tmp_path):
    """mqtts:// to a broker that requires a client certificate (as AWS IoT Core and Azure IoT Hub do);
    without the certificate the broker refuses the connection and the bridge says why."""
    from bridge.core.model import MqttTls
    from bridge.testing import free_port

    certs = _certificates(tmp_path)
    tls_port = free_port()
    broker = Mosquitto(tmp_path / "broker", extra=(
        f"listener {tls_port} 127.0.0.1\ncafile {certs['ca.pem']}\ncertfile {certs['broker.pem']}\n"
        f"keyfile {certs['broker.key']}\nrequire_certificate true\n")).start()
    connect_timeout = side_module.CONNECT_TIMEOUT
    try:
        url = f"mqtts://127.0.0.1:{tls_port}"
        good = MqttConfig(brokers=(url,), client_id="panel-7", json=MqttJsonConfig(TOPIC),
                          tls=MqttTls(ca=certs["ca.pem"], cert=certs["client.pem"], key=certs["client.key"]))
        async with Subscriber(broker.url, f"{TOPIC}/#") as sub, \
                running_bridge(LAYOUT, mqtt=good, state_dir=str(tmp_path / "s1")):
            await sub.wait_for(lambda ms: any(s["status"] == "good" for s in states(ms, "incomer")),
                               what="states over TLS")
        no_cert = MqttConfig(brokers=(url,), client_id="panel-8", json=MqttJsonConfig(TOPIC),
                             tls=MqttTls(ca=certs["ca.pem"]))
        side_module.CONNECT_TIMEOUT = 2.0  # TLS 1.3 refuses after the handshake: the client waits for a CONNACK
        async with running_bridge(LAYOUT, mqtt=no_cert, state_dir=str(tmp_path / "s2")) as h:
            link = h.app.north["mqtt"].links[0]
            await until(lambda: link.last_error, timeout=25, what="a refusal (TLS 1.3: after the CONNACK wait)")
            assert not link.connected and url in link.last_error
    finally:
        side_module.CONNECT_TIMEOUT = connect_timeout
        broker.stop()
