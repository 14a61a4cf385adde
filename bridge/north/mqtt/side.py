"""The MQTT side: Sparkplug B and JSON topics pushed to a broker, with store-and-forward.

Each flavour (Sparkplug B, JSON) is a ``Link``: one MQTT connection to the first reachable broker,
with its own Will (MQTT allows one Will per connection, and both flavours need theirs: the
Sparkplug NDEATH, the JSON ``status`` ``offline``), reconnecting with capped backoff.

The serial side never waits on MQTT: the image's listener only marks meters dirty; one producer
task turns them into samples (``MeterSample``) for the pure cores (``core.sparkplug``,
``core.mqtt_json``), which say what to publish. A link sends in order: first what is on disk (what
could not be sent while the broker or the primary host was away), then the live messages. A message
leaves the disk only on its PUBACK; what is in flight when the connection drops goes back to disk.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from bridge import __version__
from bridge.core.errors import BridgeError
from bridge.core.image import Change, Health
from bridge.config.loader import parse_broker
from bridge.core.model import Config, MqttConfig
from bridge.core.mqtt_json import JsonTopics
from bridge.core.mqtt_types import LiveProfile, MeterSample, Publish, VirtualDevice
from bridge.core import sparkplug_b_pb2 as pb
from bridge.core.sparkplug import EdgeNode, IntervalSample
from bridge.energy.meters import energy_meters, virtual_measurements
from bridge.energy.report import interval_record
from bridge.energy.types import MISSING
from bridge.north.mqtt.queue import DiskQueue
from bridge.north.side import Staged
from bridge.view import BridgeView, NorthStatus

log = logging.getLogger("bridge.mqtt")

BACKOFF = (0.5, 30.0)  # first and longest wait between two rounds of connection attempts
CONNECT_TIMEOUT = 10.0  # seconds for a broker to accept a connection (TCP, TLS, CONNACK)
GATHER = 0.02  # seconds between two looks at polls still in progress
POLL_END_WAIT = 10.0  # seconds a changed meter waits for its poll to end before it is sampled anyway
IN_FLIGHT = 256  # QoS 1 messages awaiting their PUBACK at once, per link
REPLAY_BATCH = 256  # messages read from disk at once
LIVE_LIMIT = 10_000  # live messages kept in memory per link before they go to disk
YIELD_EVERY = 16  # meters sampled, or live items sent, between two yields to the event loop
RESEND_WINDOW = 5.0  # seconds of Sparkplug samples kept back (QoS 0) to resend as history after a loss
QUEUE_FILE = "mqtt-queue.sqlite3"
HISTORY = "/history"  # JSON: the backlog of a meter's topic, replayed after an outage
NODE_FIGURES = object()  # a Sparkplug live item: NDATA with the bridge's own figures
INTERVAL = object()  # a Sparkplug live item: (INTERVAL, energy interval, historical)
BDSEQ_FILE = "sparkplug-bdseq"


def sample_of(view_meter) -> MeterSample:
    """A meter (``MeterView``) or a virtual meter (``VirtualMeterView``) as the flavours take it."""
    stamp = view_meter.last_good_wall
    return MeterSample(view_meter.name, view_meter.quality, None if stamp is None else int(stamp * 1000),
                       tuple(view_meter.readings()))


class BdSeq:
    """The Sparkplug birth/death sequence number, kept on disk: one more for every connection the
    broker accepted, across restarts. A failed attempt does not use a number up: the next one
    reuses it (``upcoming``); it is written, flushed and renamed once the CONNACK came (``used``)."""

    def __init__(self, path: Path):
        self.path = path

    def upcoming(self) -> int:
        try:
            last = int(self.path.read_text().strip())
        except (FileNotFoundError, ValueError):
            last = -1
        return (last + 1) % 256

    def used(self, value: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(f"{value}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class Link:
    """One MQTT connection carrying one flavour's messages (stream ``name`` in the disk queue)."""

    def __init__(self, side: MqttSide, name: str, client_id: str):
        self.side = side
        self.name = name
        self.client_id = client_id
        self.live: deque[tuple[Publish, float]] = deque()  # (message, when it was made)
        self.urgent: deque[Publish] = deque()  # answers to commands: before anything else
        self.inflight: dict[int, tuple[Publish, float, int | None, bool]] = {}  # awaiting PUBACK
        self.wake = asyncio.Event()
        self.client: aiomqtt.Client | None = None
        self.broker = ""
        self.connected = False
        self.sent = 0
        self.replayed = 0
        self.connects = 0
        self.last_error = ""
        self.spilling = False  # messages go to disk (not connected, or the disk still has some)
        self.was_up = False  # the current attempt reached CONNACK
        self.end_session = ""  # why the session must end now (the Sparkplug primary host went offline)
        self.energy_sent: dict[str, int] = {}  # meter -> end of the last energy interval handed to this link

    # flavour-specific, overridden
    live_during_replay = False  # whether live messages may go out before the backlog has (each flavour: yes)

    def will(self, bd_seq: int | None, now_ms: int | None = None) -> Publish: raise NotImplementedError
    def born(self, bd_seq: int | None) -> list[Publish]: raise NotImplementedError
    def subscriptions(self) -> list[tuple[str, int]]: return []
    def on_message(self, topic: str, payload: bytes) -> list[Publish]: return []
    def may_send(self) -> bool: return True
    def replay_forms(self, stored: Publish) -> list[Publish]: return [stored]
    def replay_done(self) -> list[Publish]: return []
    def render(self, item) -> Sequence[Publish]: return (item,)  # a live item, as it leaves
    def takes_intervals(self) -> bool: return True
    def take_interval(self, interval, historical: bool) -> None: pass
    def uses_bdseq(self) -> bool: return False

    def offer(self, messages: Sequence[Publish]) -> None:
        """Live messages from the producer: in memory while they can go out at once, else to disk."""
        if not messages:
            return
        now = time.time()
        behind = self.spilling and not self.live_during_replay  # must queue behind the backlog
        if behind or not (self.connected and self.may_send()) or len(self.live) >= LIVE_LIMIT:
            self.spilling = True
            self.side.spill(self.name, [(m, now) for m in messages])
        else:
            self.live.extend((m, now) for m in messages)
            self.wake.set()

    async def run(self) -> None:
        """Connect to the first broker that answers; after a loss, start again from the first."""
        backoff = BACKOFF[0]
        while True:
            for url in self.side.cfg.brokers:
                self.was_up = False
                try:
                    await self._session(url)
                except BaseExceptionGroup as group:  # from the session's task group: its first cause
                    self._lost(url, _first(group))
                except EXPECTED as exc:
                    self._lost(url, exc)
                if self.was_up:
                    backoff = BACKOFF[0]
                    if self.end_session:  # the primary host left this server: try the next one
                        continue  # (tck-id-operational-behavior-primary-application-state-with-multiple-servers-walk)
                    break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF[1])

    def _lost(self, url: str, exc: BaseException) -> None:
        self.last_error = f"{url}: {exc}" if str(exc) else f"{url}: {type(exc).__name__}"
        if not isinstance(exc, EXPECTED):  # a bug, not the network: say it loudly, then carry on
            log.error("MQTT %s: the session with %s failed", self.name, url, exc_info=exc)
        elif self.side._closing:  # we are leaving: the connection ends as it should
            log.debug("MQTT %s: left %s: %s", self.name, url, exc)
        elif self.was_up:
            log.warning("MQTT %s: connection to %s lost: %s", self.name, url, exc)
        elif self.connects == 0 or log.isEnabledFor(logging.DEBUG):
            log.info("MQTT %s: cannot connect to %s: %s", self.name, url, exc)

    async def _session(self, url: str) -> None:
        cfg = self.side.cfg
        tls, host, port = parse_broker(url)
        bd_seq = self.side.bdseq.upcoming() if self.uses_bdseq() else None
        will = self.will(bd_seq)
        client = aiomqtt.Client(
            host, port, identifier=self.client_id, username=cfg.username or None, password=cfg.password or None,
            protocol=aiomqtt.ProtocolVersion.V5 if cfg.protocol == "5" else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(will.topic, will.payload, will.qos, will.retain), keepalive=max(1, int(cfg.keepalive)),
            timeout=CONNECT_TIMEOUT, tls_context=self.side.tls_context() if tls else None,
            max_inflight_messages=IN_FLIGHT, logger=_PAHO_LOG)
        client.pending_calls_threshold = IN_FLIGHT + 1  # our own bound; its warning would flood the log
        # aiomqtt leaves an unexpected disconnection's error in this future, unretrieved ("Future exception
        # was never retrieved" at exit): retrieved whenever it ends, even if this task is cancelled first
        client._disconnected.add_done_callback(_retrieve)
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await client.__aenter__()
        client._disconnected.add_done_callback(_retrieve)  # __aenter__ may have replaced it
        try:
            if bd_seq is not None:
                self.side.bdseq.used(bd_seq)
                self.side.bdseq_current = bd_seq
            self.client, self.broker, self.connected, self.was_up = client, url, True, True
            self.connects += 1
            self.last_error = ""
            self.end_session = ""
            self.connected_now()
            log.info("MQTT %s: connected to %s as %s", self.name, url, self.client_id)
            for topic, qos in self.subscriptions():
                await client.subscribe(topic, qos)
            async with asyncio.TaskGroup() as tg:
                receiver = tg.create_task(self._receive(client))
                try:
                    await self._send(client, tg)
                finally:
                    receiver.cancel()
        finally:
            self.connected = False
            self.client = None
            self._to_disk()
            self.disconnected()
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)

    def connected_now(self) -> None:
        """A new connection: flavour state that must start afresh."""

    def disconnected(self) -> None:
        """The connection is gone."""

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            replies = self.on_message(str(message.topic), payload)
            if replies:
                self.urgent.extend(replies)  # answers (a rebirth) go before anything else
            self.wake.set()
        raise aiomqtt.MqttError("the broker closed the connection")

    async def _send(self, client: aiomqtt.Client, tg: asyncio.TaskGroup) -> None:
        """Births, then what is on disk in order, then live messages; never more than IN_FLIGHT
        awaiting their PUBACK. Raises when the connection fails."""
        slots = asyncio.Semaphore(IN_FLIGHT)
        failed: asyncio.Future = asyncio.get_running_loop().create_future()
        keys = itertools.count()
        # Messages go straight into paho's buffer (no task, no event per message: at hundreds a second
        # that is most of the side's CPU); PUBACKs come back through paho's on_publish, by message id.
        paho = client._client
        awaiting: dict[int, tuple[int, int | None]] = {}  # paho mid -> (in-flight key, disk record)
        theirs = paho.on_publish  # aiomqtt's: for publishes made through it (none here), kept working

        def on_publish(c, userdata, mid, *args) -> None:
            entry = awaiting.pop(mid, None)
            if entry is None:
                theirs(c, userdata, mid, *args)
                return
            key, record_id = entry
            slots.release()
            self.inflight.pop(key, None)
            self.sent += 1
            if record_id is not None:
                self.replayed += 1
                self.side.acked(record_id)

        paho.on_publish = on_publish

        async def put(message: Publish, created: float, record_id: int | None = None, keep: bool = True) -> None:
            if failed.done():
                failed.result()
            if message.qos == 0 and record_id is None:  # nothing to await
                info = paho.publish(message.topic, message.payload, 0, message.retain)
                if info.rc != 0:
                    raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
                self.sent += 1
                return
            await slots.acquire()
            key = next(keys)
            self.inflight[key] = (message, created, record_id, keep)
            info = paho.publish(message.topic, message.payload, message.qos, message.retain)
            if info.rc != 0:  # the connection is gone: what is in flight goes back to disk at the session's end
                slots.release()
                raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
            awaiting[info.mid] = (key, record_id)
            if info.is_published():  # already written (QoS 0) or acknowledged
                on_publish(paho, None, info.mid)
            # else paho calls on_publish: on the PUBACK (QoS 1), or once written to the socket (QoS 0: a
            # stored Sparkplug sample). Either way a slot is held until then, so a replay never piles
            # more than IN_FLIGHT messages into paho's buffer ahead of live data.

        async def drain() -> None:  # until every message out is acknowledged
            for _ in range(IN_FLIGHT):
                await slots.acquire()
            for _ in range(IN_FLIGHT):
                slots.release()
            await self.side.flush_acks()

        born = False
        upto = 0  # the last record of the backlog handed out in this session
        while True:
            if failed.done():
                failed.result()
            if self.end_session:  # what was urgent (the NDEATH) goes out first, acknowledged
                while self.urgent:
                    await put(self.urgent.popleft(), time.time(), keep=False)
                await drain()
                await self.leave(client)
                raise aiomqtt.MqttError(self.end_session)
            if not self.may_send():  # e.g. the Sparkplug primary host is not online: keep to disk
                self.wake.clear()
                await self._wait(failed)
                continue
            if not born:  # births are never stored: each connection makes its own
                for message in self.born(self.side.bdseq_current):
                    await put(message, time.time(), keep=False)
                born = True
            while self.urgent:
                await put(self.urgent.popleft(), time.time(), keep=False)
            if self.spilling:  # the disk first, oldest first; a record leaves it once sent (QoS 1: acked)
                # the next batch is read while the previous one awaits its PUBACKs (``upto``): the replay
                # runs at the broker's pace, not one round trip per batch
                records = await self.side.queue.peek(REPLAY_BATCH, self.name, after=upto)
                if records:
                    for record_id, message, created, _ in records:
                        forms = self.replay_forms(message)
                        if not forms:  # nothing to say about it any more (e.g. a meter removed)
                            self.side.acked(record_id)
                        for i, form in enumerate(forms):
                            await put(form, created, record_id if i == len(forms) - 1 else None, keep=False)
                        upto = record_id
                        if self.live and self.live_during_replay:
                            break  # live messages go out between two batches' worth of history
                    await self.side.flush_acks()
                elif self.side.unwritten(self.name):  # still on its way to disk: wait for it
                    self.wake.clear()
                    await self._wait(failed)
                    continue
                else:
                    await drain()  # every record acknowledged and deleted: the backlog is gone
                    if await self.side.queue.peek(1, self.name):  # one written meanwhile: go on
                        upto = 0
                        continue
                    self.spilling = False
                    for message in self.replay_done():
                        await put(message, time.time(), keep=False)
            if not self.spilling or self.live_during_replay:
                for n in itertools.count(1):
                    if not self.live or self.urgent:
                        break
                    item, created = self.live.popleft()
                    for message in self.render(item):
                        await put(message, created)
                    if n % YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # let a Modbus TCP request in between
            if not self.live and not self.urgent and not self.spilling:
                self.wake.clear()
                await self._wait(failed)

    def live_to_disk(self) -> None:
        """On stop: nothing made is lost, what is still in memory is kept for the next run."""
        self._to_disk()

    def _to_disk(self) -> None:
        """What is in memory goes to disk, oldest first: unacknowledged messages, then live ones."""
        self.spilling = True
        pending = [(m, created) for m, created, record_id, keep in self.inflight.values()
                   if keep and record_id is None]
        self.inflight.clear()
        pending.extend(self.live)
        self.live.clear()
        self.urgent.clear()
        if pending:
            self.side.spill(self.name, pending)

    async def _wait(self, failed: asyncio.Future) -> None:
        waiter = asyncio.ensure_future(self.wake.wait())
        try:
            await asyncio.wait({waiter, failed}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if failed.done():
            failed.result()

    async def say_goodbye(self) -> None:
        """Before a clean disconnect: the flavour's death message (NDEATH, status offline)."""
        client = self.client
        if client is None or not self.connected:
            return
        message = self.will(self.side.bdseq_current if self.uses_bdseq() else None, _now_ms())
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await client.publish(message.topic, message.payload, message.qos, message.retain, timeout=2.0)
        await self.leave(client)

    async def leave(self, client: aiomqtt.Client) -> None:
        """A deliberate DISCONNECT. Sparkplug on MQTT 5: with reason code 0x04 "with Will Message", so the
        broker publishes the NDEATH Will too (tck-id-payloads-ndeath-will-message-publisher-disconnect-mqtt50)."""
        if self.uses_bdseq() and self.side.cfg.protocol == "5":
            with contextlib.suppress(Exception):
                client._client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
                async with asyncio.timeout(2.0):
                    await asyncio.shield(client._disconnected)


class SparkplugLink(Link):
    """Sparkplug B: births on every connection (and on a rebirth command), data by exception, samples
    kept on disk while offline and replayed as historical DDATA after the births. Sparkplug sends
    data with QoS 0 (as the specification says), so nothing acknowledges them: the samples of the last
    ``RESEND_WINDOW`` seconds go back to disk as history when a connection is lost."""

    live_during_replay = True  # historical data are flagged: live data need not wait behind them

    def __init__(self, side: MqttSide, node: EdgeNode, client_id: str):
        super().__init__(side, "sparkplug", client_id)
        self.node = node
        self.recent: deque[tuple[float, MeterSample]] = deque()

    def uses_bdseq(self) -> bool:
        return True

    def will(self, bd_seq: int | None, now_ms: int | None = None) -> Publish:
        return self.node.will(bd_seq, now_ms)

    def born(self, bd_seq: int | None) -> list[Publish]:
        return self.node.online(bd_seq, _now_ms(), self.side.samples(), self.side.node_metrics(),
                                replay=self.spilling)

    def subscriptions(self) -> list[tuple[str, int]]:
        return self.node.subscriptions()

    def may_send(self) -> bool:
        return self.node.host_online

    def disconnected(self) -> None:
        self.node.disconnected()
        now = time.monotonic()
        kept = [s for t, s in self.recent if now - t <= RESEND_WINDOW]  # perhaps never delivered
        self.recent.clear()
        self.keep(kept)

    def take(self, sample: MeterSample) -> None:
        """A meter's new state: live while the node is online, else kept for the history."""
        if self.connected and self.node.is_online:
            self.recent.append((time.monotonic(), sample))
            while self.recent and time.monotonic() - self.recent[0][0] > RESEND_WINDOW:
                self.recent.popleft()
            self.live.append((sample, time.time()))
            self.wake.set()
        else:
            self.keep([sample])

    def takes_intervals(self) -> bool:
        return self.connected and self.node.is_online  # else: from the store, once a session is up

    def take_interval(self, interval, historical: bool) -> None:
        self.live.append(((INTERVAL, interval, historical), time.time()))
        self.wake.set()

    def node_figures_due(self) -> None:
        """Time for NDATA with the bridge's own figures (taken as it leaves)."""
        if self.connected and self.node.is_online:
            self.live.append((NODE_FIGURES, time.time()))
            self.wake.set()

    def render(self, item) -> Sequence[Publish]:
        """Sparkplug messages are made as they leave, never before: seq must follow the order on
        the wire, and the replayed history, the births of a rebirth and live data interleave there."""
        if item is NODE_FIGURES:
            return self.node.node_data(_now_ms(), self.side.node_metrics())
        if isinstance(item, tuple) and item[0] is INTERVAL:
            _, i, historical = item
            return self.node.interval(i.meter, IntervalSample(i.end * 1000, i.status, i.energy, i.demand),
                                      _now_ms(), historical=historical)
        return self.node.sample(item, _now_ms())

    def keep(self, samples: Sequence[MeterSample]) -> None:
        worth = [s for s in samples if s.ts_ms is not None and s.quality in ("good", "stale")]
        if worth:
            self.spilling = True
            self.side.spill(self.name, [(encode_sample(s), time.time()) for s in worth])

    def _to_disk(self) -> None:
        """Births, data and deaths of a lost connection are not stored: the samples are (``keep``)."""
        self.live.clear()
        self.urgent.clear()
        self.inflight.clear()

    def replay_forms(self, stored: Publish) -> list[Publish]:
        sample = decode_sample(stored, self.side.meters_by_name)
        return [] if sample is None else self.node.historical(sample, _now_ms())

    def replay_done(self) -> list[Publish]:
        return self.node.end_replay(_now_ms())

    def on_message(self, topic: str, payload: bytes) -> list[Publish]:
        born = self.node.is_online
        state = self.node.host_state(topic, payload)
        if state is False:
            if not born:  # nothing published yet on this connection: wait here for the host
                return []
            log.info("Sparkplug primary host %s is offline: storing data until it is back",
                     self.node.cfg.primary_host)
            self.end_session = "the primary host went offline"
            return [self.node.will(self.side.bdseq_current, _now_ms())]  # NDEATH, then reconnect
        if state is True:
            log.info("Sparkplug primary host %s is online", self.node.cfg.primary_host)
            return []
        replies, note = self.node.command(topic, payload, _now_ms())
        if note:
            log.warning("Sparkplug %s: %s", topic, note)
        return replies  # a rebirth: births of what was sent so far; the live samples follow them


def encode_sample(s: MeterSample) -> Publish:
    """A sample kept on disk for the history: the meter's name, quality, time and values."""
    payload = json.dumps([s.quality, s.ts_ms, [v for _, v in s.values]], allow_nan=True).encode()
    return Publish(s.name, payload, 0, False)


def decode_sample(stored: Publish, meters: dict) -> MeterSample | None:
    meter = meters.get(stored.topic)
    try:
        quality, ts_ms, values = json.loads(stored.payload)
    except (ValueError, TypeError):
        return None
    if meter is None or len(values) != len(meter.profile.measurements):
        return None  # the meter was removed or changed since: its old samples say nothing now
    return MeterSample(stored.topic, quality, ts_ms, tuple(zip(meter.profile.measurements, values)))


class JsonLink(Link):
    """JSON topics. After an outage the live states go out at once (retained: a meter's topic always
    holds its newest state); the backlog follows beside them on ``<topic>/<meter>/history``, not
    retained, each message with its original ``ts``: a consumer that keeps series (Telegraf, Node-RED)
    subscribes to both, Home Assistant sees only current states."""

    live_during_replay = True

    def __init__(self, side: MqttSide, topics: JsonTopics, client_id: str):
        super().__init__(side, "json", client_id)
        self.topics = topics
        self.retire: list[Publish] = []  # after a reload: clear what the previous configuration retained

    def will(self, bd_seq: int | None, now_ms: int | None = None) -> Publish:
        return self.topics.will()

    def born(self, bd_seq: int | None) -> list[Publish]:
        retire, self.retire = self.retire, []
        return retire + self.topics.online()

    def subscriptions(self) -> list[tuple[str, int]]:
        return [(topic, 1) for topic in self.topics.subscriptions()]

    def connected_now(self) -> None:
        self.offer(self.topics.current())

    def replay_forms(self, stored: Publish) -> list[Publish]:
        return [Publish(stored.topic + HISTORY, stored.payload, stored.qos, False)]

    def take_interval(self, interval, historical: bool) -> None:
        body = json.dumps(interval_record(interval), separators=(",", ":"), allow_nan=False).encode()
        self.offer([Publish(self.topics.state_topic(interval.meter) + "/energy", body, 1, True)])

    def on_message(self, topic: str, payload: bytes) -> list[Publish]:
        if topic == self.topics.ha_status_topic and self.topics.homeassistant_status(payload):
            log.info("Home Assistant is online: discovery published again")
            return self.topics.online()
        return []


class MqttSide:
    name = "mqtt"

    def __init__(self, config: Config, view: BridgeView):
        self.config = config
        self.cfg: MqttConfig = config.mqtt
        self.view = view
        self.queue: DiskQueue | None = None
        self.bdseq = BdSeq(Path(config.state_dir or ".") / BDSEQ_FILE)
        self.bdseq_current: int | None = None
        self._dirty: set[int] = set()
        self._pending: dict[int, float] = {}  # unit -> reply time of its newest changed block, poll not ended
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._acks: list[int] = []
        self._spill: list[tuple[str, Publish, float]] = []
        self._spilled = asyncio.Event()
        self._unwritten: dict[str, int] = {}  # stream -> messages handed to the disk writer, not yet written
        self._restart = asyncio.Event()
        self.links: list[Link] = []
        self._build(config)

    def _build(self, config: Config) -> None:
        cfg = config.mqtt
        self.config, self.cfg = config, cfg
        meters = config.meters
        virtual = self._virtual_devices = _virtual(config)
        self.links = []
        energy = self._energy = _energy_of(config)
        if cfg.sparkplug is not None:  # a virtual meter is a device like a meter
            self.links.append(SparkplugLink(self, EdgeNode(cfg.sparkplug, [*meters, *virtual], energy), cfg.client_id))
        if cfg.json is not None:
            suffix = "-json" if cfg.sparkplug is not None else ""
            topics = JsonTopics(cfg.json, meters, cfg.client_id, sw_version=__version__,
                                virtual=virtual)
            self.links.append(JsonLink(self, topics, cfg.client_id + suffix))
        self.bdseq = BdSeq(Path(config.state_dir or ".") / BDSEQ_FILE)
        self._units = {m.unit for m in meters}
        self.meters_by_name = {m.name: m for m in (*meters, *virtual)}
        self._virtual_fed: dict[str, tuple] = {}  # virtual meter -> (quality, values) last given to Sparkplug
        self._views: dict[int, object] | None = None  # after a reload the image's units are new ones

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        state = Path(self.config.state_dir or ".")
        try:
            self.queue = await DiskQueue.open(state / QUEUE_FILE, int(self.cfg.queue.max_mb * 1024 * 1024),
                                              self.cfg.queue.max_age)
        except OSError as exc:
            raise BridgeError(f"MQTT: cannot open the queue in {state}: {exc.strerror or exc}") from None
        self.view.image.subscribe(self.listener)
        self._dirty.update(self._units)
        for link in self.links:
            link.spilling = True  # whatever the last run left on disk goes first

    async def run(self) -> None:
        """The producer, the disk writer and one task per link; built again after a reconfiguration."""
        while True:
            self._restart.clear()
            tasks = [asyncio.create_task(self._produce(), name="mqtt producer"),
                     asyncio.create_task(self._write_spills(), name="mqtt disk writer")]
            tasks += [asyncio.create_task(link.run(), name=f"mqtt {link.name}") for link in self.links]
            self._tasks = tasks
            restart = asyncio.create_task(self._restart.wait())
            try:
                done, _ = await asyncio.wait([*tasks, restart], return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not restart:
                        task.result()  # a part that ended: raise why (the App's supervisor restarts us)
            finally:
                for task in (*tasks, restart):
                    task.cancel()
                await asyncio.gather(*tasks, restart, return_exceptions=True)

    async def stage(self, config: Config) -> Staged:
        if (config.mqtt == self.cfg and config.meters == self.config.meters and config.state_dir == self.config.state_dir
                and _virtual(config) == self._virtual_devices and _energy_of(config) == self._energy):
            async def keep() -> None:
                self.config = config
                self._views = None  # a meter whose bus changed has a new unit in the image
            return Staged(keep)

        async def commit() -> None:  # new identities or meters: new births on new connections
            for link in self.links:
                await link.say_goodbye()
            old = next((link for link in self.links if isinstance(link, JsonLink)), None)
            self._build(config)
            for link in self.links:
                if isinstance(link, JsonLink) and old is not None:
                    mine = set(link.topics.retained_topics())  # and what an earlier reload left to clear
                    link.retire = link.topics.retired(old.topics) + [p for p in old.retire if p.topic not in mine]
            self._dirty.update(self._units)
            self._restart.set()
        return Staged(commit)

    async def stop(self) -> None:
        """In order: no more samples; each flavour says goodbye (NDEATH, status offline) and
        disconnects; what is still in memory goes to disk; the disk is closed."""
        self.view.image.unsubscribe(self.listener)
        self._closing = True
        for link in self.links:  # first, while every part still runs: run() must not tear down a link
            await link.say_goodbye()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(t for t in self._tasks), return_exceptions=True)
        for link in self.links:
            link.live_to_disk()
        if self._spill and self.queue is not None:
            batch, self._spill = self._spill, []
            await self.queue.put(batch)
        await self.flush_acks()
        if self.queue is not None:
            await self.queue.close()

    def status(self) -> NorthStatus:
        connected = [link for link in self.links if link.connected]
        stats = self.queue.stats() if self.queue is not None else {}
        counters = {
            "connected": float(len(connected) == len(self.links) and bool(self.links)),
            "sent": sum(link.sent for link in self.links),
            "replayed": sum(link.replayed for link in self.links),
            "connects": sum(link.connects for link in self.links),
            **{f"queue_{k}": v for k, v in stats.items() if isinstance(v, (int, float))},
        }
        broker = next((link.broker for link in connected), "")
        errors = [f"{link.name}: {link.last_error}" for link in self.links if link.last_error and not link.connected]
        return NorthStatus(self.name, True, broker or ", ".join(self.cfg.brokers), counters=counters,
                           by_label={"link": {link.name: float(link.connected) for link in self.links}},
                           note="; ".join(errors))

    # ------------------------------------------------------------ the producer
    def listener(self, change: Change | None, unit: int, health: Health) -> None:
        """Image listener: remember which meter changed. A changed block waits for the end of its
        poll (``pending``): a sample taken in the middle of a poll would pair the new blocks with the
        previous poll's time."""
        if unit not in self._units:
            return
        if change is not None and health is Health.FRESH:
            self._pending[unit] = max(self._pending.get(unit, 0.0), change.timestamp)
        else:
            self._dirty.add(unit)
        self._wake.set()

    def _complete(self) -> set[int]:
        """The meters to sample now: health changes, and changes whose poll has ended (a good poll
        marks the meter good at its end, so its time is at least that of any of its blocks)."""
        units, self._dirty = self._dirty, set()
        now = time.time()
        for unit, stamp in list(self._pending.items()):
            u = self.view.image.unit(unit)
            done = u is not None and u.last_good_wall is not None and u.last_good_wall >= stamp
            if done or u is None or now - stamp > POLL_END_WAIT:  # a poll that failed half-way: as it is
                units.add(unit)
                del self._pending[unit]
        return units

    def _meter_views(self, units: set[int]) -> dict[int, object]:
        """The read model's meters by unit, built again only when one is missing (a reload): building
        them at every look (50 a second while polls end) was a good part of the side's CPU."""
        if self._views is None or not units <= self._views.keys():
            self._views = {mv.unit: mv for mv in self.view.meters()}
        return self._views

    def samples(self) -> list[MeterSample]:
        """Every meter's and virtual meter's state now (for the births)."""
        return ([sample_of(mv) for mv in self.view.meters() if mv.unit in self._units]
                + [sample_of(v) for v in self.view.virtual_meters() if v.name in self.meters_by_name])

    def node_metrics(self) -> dict[str, tuple[object, int]]:
        """The bridge's own health as Sparkplug node metrics: each segment's bus at a glance."""
        out: dict[str, tuple[object, int]] = {}
        now = time.monotonic()
        for seg in self.view.segments():
            d = seg.diag
            prefix = f"Segments/{seg.name}/"
            out[prefix + "Utilisation"] = (round(seg.utilisation(now), 4), pb.Double)
            out[prefix + "CycleTime"] = (d.cycle_time, pb.Double)
            out[prefix + "Requests"] = (d.requests, pb.Int64)
            out[prefix + "Errors"] = (d.errors, pb.Int64)
            out[prefix + "Timeouts"] = (d.timeouts, pb.Int64)
            out[prefix + "MetersOnline"] = (sum(1 for mv in seg.meters if mv.health is Health.FRESH), pb.Int64)
        return out

    async def _produce(self) -> None:
        next_periodic = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GATHER if self._pending else 1.0):
                    await self._wake.wait()
            self._wake.clear()
            units = self._complete()
            by_unit = self._meter_views(units)
            now = time.time()
            for n, unit in enumerate(units, 1):
                mv = by_unit.get(unit)
                if mv is None:
                    continue
                sample = sample_of(mv)
                for link in self.links:
                    self._feed(link, sample, now)
                if n % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a panel's worth of meters at once must not hold the loop
            if time.monotonic() >= next_periodic:
                next_periodic = time.monotonic() + 1.0
                self._views = None  # built again once a second at most
                virtual = [sample_of(v) for v in self.view.virtual_meters() if v.name in self.meters_by_name]
                for link in self.links:
                    if isinstance(link, JsonLink):
                        for sample in virtual:  # the sum of the terms' values now: once a second, when changed
                            link.offer(link.topics.sample(sample, now))
                        link.offer(link.topics.due(now))
                    elif isinstance(link, SparkplugLink):
                        for sample in virtual:  # only when it changed: no new time alone fills the history
                            state = (sample.quality, tuple(v for _, v in sample.values))
                            if self._virtual_fed.get(sample.name) != state:
                                self._virtual_fed[sample.name] = state
                                link.take(sample)
                        link.node_figures_due()
                await self._energy_intervals()

    async def _energy_intervals(self) -> None:
        """Closed energy intervals out (interval energy on): JSON on ``<topic>/<meter>/energy`` (retained;
        kept on disk like every JSON message while the broker is away), Sparkplug as the device's
        ``Energy/...`` metrics timestamped with the interval's end. A link that could not take them (not
        connected, no session) gets them from the energy store once it can: nothing is skipped."""
        energy = self.view.energy
        if energy is None:
            return
        for name in energy.meter_names():
            last = energy.last(name)
            if last is None:
                continue
            behind = [link for link in self.links  # from the first interval seen on
                      if last.end > link.energy_sent.setdefault(name, last.start) and link.takes_intervals()]
            if not behind:
                continue
            since = min(link.energy_sent[name] for link in behind)  # one read of the store for every link
            stored = [i for i in await energy.intervals(name, since, last.end, detail=True) if i.status != MISSING]
            for link in behind:
                closed = [i for i in stored if i.start >= link.energy_sent[name]]
                for n, interval in enumerate(closed):
                    link.take_interval(interval, historical=n < len(closed) - 1)
                link.energy_sent[name] = last.end

    @staticmethod
    def _feed(link: Link, sample: MeterSample, now: float) -> None:
        if isinstance(link, SparkplugLink):
            link.take(sample)
        else:
            link.offer(link.topics.sample(sample, now))

    # ------------------------------------------------------------ the disk
    def spill(self, stream: str, messages: list[tuple[Publish, float]]) -> None:
        self._spill.extend((stream, m, created) for m, created in messages)
        self._unwritten[stream] = self._unwritten.get(stream, 0) + len(messages)
        self._spilled.set()

    def unwritten(self, stream: str) -> int:
        return self._unwritten.get(stream, 0)

    def acked(self, record_id: int) -> None:
        self._acks.append(record_id)

    async def flush_acks(self) -> None:
        if self._acks and self.queue is not None:
            ids, self._acks = self._acks, []
            await self.queue.ack(ids)

    async def _write_spills(self) -> None:
        """Messages for the disk, written in batches off the event loop (one writer keeps them in order)."""
        while True:
            await self._spilled.wait()
            self._spilled.clear()
            if self._spill:
                batch, self._spill = self._spill, []
                try:
                    await self.queue.put(batch)
                finally:
                    for stream, _, _ in batch:
                        self._unwritten[stream] -= 1
                for link in self.links:
                    link.wake.set()
            await self.flush_acks()

    def tls_context(self) -> ssl.SSLContext:
        tls = self.cfg.tls
        context = ssl.create_default_context(cafile=tls.ca if tls is not None and tls.ca else None)
        if tls is not None and tls.cert:
            context.load_cert_chain(tls.cert, tls.key or None)
        return context


EXPECTED = (aiomqtt.MqttError, OSError, ssl.SSLError, TimeoutError)  # what a network or a broker does


class _PahoLog(logging.LoggerAdapter):
    """paho logs a broker that went away as an error ("failed to receive on socket"): a normal event,
    which the link reports itself (one warning, the connection lost). Its lines go out at debug level."""

    def log(self, level, msg, *args, **kwargs):
        super().log(logging.DEBUG, msg, *args, **kwargs)


_PAHO_LOG = _PahoLog(logging.getLogger("bridge.mqtt.client"), {})


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _first(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _virtual(config: Config) -> list[VirtualDevice]:
    """The virtual meters with intervals: each a Sparkplug device and a JSON state topic of its own."""
    meters = {m.name: m for m in config.meters}
    return [VirtualDevice(name, LiveProfile(virtual_measurements([meters[t] for _, t in v.terms])), v.formula)
            for name, (_, v) in energy_meters(config).items() if v is not None]


def _energy_of(config: Config) -> dict[str, tuple[str, ...]]:
    """Meter or virtual meter -> the quantities of its intervals (its Sparkplug ``Energy/`` metrics)."""
    return {name: quantities for name, (quantities, _) in energy_meters(config).items()}


def _now_ms() -> int:
    return int(time.time() * 1000)
