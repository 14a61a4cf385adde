"""The HTTP side end to end: simulated meters on real ptys, real HTTP clients on loopback,
the status page in a real headless Chromium."""
from __future__ import annotations

import asyncio
import json
import math
import shutil
import tempfile
from contextlib import asynccontextmanager
from html.parser import HTMLParser
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import run, until

from bridge.north import http as http_server
from bridge.app import App
from bridge.north.http import HttpServer
from bridge.core.image import Health
from bridge.core.model import Config, HttpConfig, MeterConfig, ModbusTcpConfig, OpcUaConfig, SegmentConfig
from bridge.config.profiles import get_builtin
from bridge.testing import MeterSpec, RawModbusClient, running_bridge

SCREENSHOT = Path(tempfile.gettempdir()) / "modbus-bridge-status.png"


@asynccontextmanager
async def http_of(h):
    """The port of the bridge's HTTP server: the app's own once it runs one, else one started here."""
    own = getattr(h.app, "http", None)
    if own is not None and hasattr(own, "port"):
        yield own.port
        return
    server = HttpServer(h.app.config.http or HttpConfig("127.0.0.1", 0), h.app.view)
    await server.start()
    try:
        yield server.port
    finally:
        await server.stop()


async def request(port: int, path: str = "/", method: str = "GET", raw: bytes | None = None,
                  timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection; returns status, headers (lower-case names), body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if raw is None:
            raw = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        writer.write(raw)
        async with asyncio.timeout(timeout):
            data = await reader.read()  # the server closes after the answer
    finally:
        writer.close()
    return parse_response(data)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert body == b"" or int(headers["content-length"]) == len(body)
    return status, headers, body


async def get_json(port: int, path: str = "/status.json") -> dict:
    status, headers, body = await request(port, path)
    assert status == 200 and headers["content-type"] == "application/json"
    return json.loads(body)


def meter_of(status: dict, name: str) -> dict:
    return next(m for s in status["segments"] for m in s["meters"] if m["name"] == name)


# ------------------------------------------------------------------ protocol


async def test_health_not_found_method_and_head():
    async with running_bridge({"s": [MeterSpec("m", 1, 11)]}, http=True) as h, http_of(h) as port:
        assert (await request(port, "/healthz"))[::2] == (200, b"ok\n")
        assert (await request(port, "/healthz?verbose=1"))[0] == 200
        status, _, body = await request(port, "/nothing-here")
        assert status == 404
        status, headers, _ = await request(port, "/healthz", method="POST")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        assert (await request(port, "/metrics", method="DELETE"))[0] == 405
        status, headers, body = await request(port, "/healthz", method="HEAD")
        assert status == 200 and body == b"" and headers["content-length"] == "3"
        status, headers, body = await request(port, "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert b"status.json" in body and b"<script" in body
        assert "content-security-policy" in headers


async def test_keep_alive_serves_several_requests_on_one_connection():
    async with running_bridge({"s": [MeterSpec("m", 1, 11)]}) as h, http_of(h) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(3):
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
                assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: keep-alive" in head
                assert await reader.readexactly(3) == b"ok\n"
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 2)  # answered, then closed
            assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"ok\n")
        finally:
            writer.close()


@pytest.mark.parametrize("raw, why", [
    (b"HELLO\r\n\r\n", b"request line"),
    (b"GET /healthz\r\nHost: x\r\n\r\n", b"request line"),
    (b"GET healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"target"),
    (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", b"version"),
    (b"GET /healthz HTTP/1.1\r\n\r\n", b"Host"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", b"header"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", b"bodies"),
    (b"GET /h\xe9 HTTP/1.1\r\nHost: x\r\n\r\n", b"ASCII"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", b"too large"),
    (b"GET /" + b"a" * 10000, b"too large"),  # no end of head in sight
])
async def test_malformed_or_oversized_request_gets_400_and_close(raw, why):
    async with running_bridge({"s": [MeterSpec("m", 1, 11)]}) as h, http_of(h) as port:
        status, headers, body = await request(port, raw=raw)
        assert status == 400 and headers["connection"] == "close"
        assert why in body


async def test_a_client_that_sends_nothing_is_dropped_after_the_read_timeout(monkeypatch):
    monkeypatch.setattr(http_server, "READ_TIMEOUT", 0.3)
    async with running_bridge({"s": [MeterSpec("m", 1, 11)]}) as h, http_of(h) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHo")  # a head that never ends
            assert await asyncio.wait_for(reader.read(), 2) == b""  # closed by the server
        finally:
            writer.close()


async def test_a_flood_of_slow_connections_cannot_keep_the_health_checks_out():
    """More slow clients than MAX_CONNECTIONS, each holding a request head open: the probes of
    systemd, Docker or a load balancer still get their answer (the slowest client makes room)."""
    async with running_bridge({"s": [MeterSpec("m", 1, 11)]}, http=True) as h, http_of(h) as port:
        await until(lambda: not h.app.view.not_ready(), what="ready")
        slow = []
        try:
            for _ in range(http_server.MAX_CONNECTIONS + 8):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /status.json HTTP/1.1\r\nHo")  # and nothing more
                slow.append(writer)
            await asyncio.sleep(0)
            for path in ("/healthz", "/readyz"):
                status, _, body = await request(port, path)
                assert status == 200, body
            assert h.app.http.status().counters["evicted"] >= 8
        finally:
            for writer in slow:
                writer.close()


# ------------------------------------------------------------------ readiness


async def test_readyz_before_the_servers_listen():
    meter = MeterConfig("m", 1, 11, get_builtin("eastron-sdm120"))
    config = Config((SegmentConfig("s", "/dev/null", meters=(meter,)),),
                    modbus_tcp=ModbusTcpConfig(host="127.0.0.1", port=0), opcua=OpcUaConfig(enabled=False))
    app = App(config)  # never run: nothing listens, nothing polls
    server = HttpServer(HttpConfig("127.0.0.1", 0), app.view)
    await server.start()
    try:
        status, _, body = await request(server.port, "/readyz")
        assert status == 503
        assert body.count(b"\n") == 1 and b"not listening" in body and b"tried each meter: s" in body
        assert (await request(server.port, "/healthz"))[0] == 200
    finally:
        await server.stop()


async def test_readyz_waits_for_every_meter_to_be_tried_once_not_for_offline_ones():
    # a silent meter with a long timeout: the first round cannot end before it has timed out
    layout = {"quick": [MeterSpec("ok", 1, 11)],
              "slow": [MeterSpec("dead", 1, 21, silent=True), MeterSpec("alive", 2, 22)]}
    async with running_bridge(layout, timeout=1.5, retries=0) as h, http_of(h) as port:
        status, _, body = await request(port, "/readyz")
        assert status == 503 and b"slow" in body
        await asyncio.wait_for(h.segment("quick").tried_all.wait(), 2)
        status, _, body = await request(port, "/readyz")
        assert (status, body) == (503, b"not ready: segments that have not yet tried each meter: slow\n")
        assert (await get_json(port))["ready"] is False
        await asyncio.wait_for(h.segment("slow").tried_all.wait(), 5)
        status, _, body = await request(port, "/readyz")
        assert (status, body) == (200, b"ready\n")
        assert h.app.image.health(21) is not Health.FRESH  # the offline meter did not hold it back
        assert (await get_json(port))["ready"] is True


# ------------------------------------------------------------------ metrics


def scrape_families(body: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def sample(families: dict, name: str, **labels) -> float:
    family_name = name[:-len("_total")] if name.endswith("_total") else name
    fam = families[family_name]
    hits = [s.value for s in fam.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, f"{name} {labels}: {len(hits)} samples in {fam.samples}"
    return hits[0]


async def test_metrics_per_segment_and_meter_and_upstream():
    layout = {"panel-a": [MeterSpec("a1", 1, 11), MeterSpec("a2", 2, 12)],
              "panel-b": [MeterSpec("b1", 1, 21)]}
    async with running_bridge(layout) as h, http_of(h) as port:
        for name in ("a1", "a2", "b1"):
            await h.polls(name, 2)
        status, headers, body = await request(port, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        first = scrape_families(body)
        for seg in ("panel-a", "panel-b"):
            assert sample(first, "modbus_bridge_segment_requests_total", segment=seg) > 0
            assert sample(first, "modbus_bridge_segment_good_replies_total", segment=seg) > 0
            assert sample(first, "modbus_bridge_segment_port_open", segment=seg) == 1
            assert sample(first, "modbus_bridge_segment_cycle_time_seconds", segment=seg) > 0
            assert 0 < sample(first, "modbus_bridge_segment_utilisation_ratio", segment=seg) <= 1
            assert sample(first, "modbus_bridge_segment_errors_total", segment=seg, kind="noise") == 0
        for seg, meter in (("panel-a", "a1"), ("panel-a", "a2"), ("panel-b", "b1")):
            assert sample(first, "modbus_bridge_meter_requests_total", segment=seg, meter=meter) > 0
            assert sample(first, "modbus_bridge_meter_online", segment=seg, meter=meter) == 1
            assert sample(first, "modbus_bridge_meter_health", segment=seg, meter=meter, state="fresh") == 1
            assert sample(first, "modbus_bridge_meter_health", segment=seg, meter=meter, state="offline") == 0
            assert 0 <= sample(first, "modbus_bridge_meter_last_good_poll_age_seconds", segment=seg, meter=meter) < 1
            assert sample(first, "modbus_bridge_meter_turnaround_seconds", segment=seg, meter=meter) >= 0
            assert sample(first, "modbus_bridge_meter_timeouts_total", segment=seg, meter=meter) == 0
            assert sample(first, "modbus_bridge_meter_demotions_total", segment=seg, meter=meter) == 0
        # every per-meter series carries both labels, every per-segment one its segment
        for fam in first.values():
            for s in fam.samples:
                if fam.name.startswith("modbus_bridge_meter_"):
                    assert {"segment", "meter"} <= s.labels.keys(), s
                elif fam.name.startswith("modbus_bridge_segment_"):
                    assert "segment" in s.labels, s
        assert "process_cpu_seconds" in first and "python_info" in first

        # upstream traffic and a silenced meter move the figures
        client = await RawModbusClient.connect(h.modbus_port)
        try:
            assert (await client.read(11, 4, 0, 2))[:1] == b"\x04"
            assert await client.read(99, 4, 0, 2) == b"\x84\x0a"  # no such unit
            mid = scrape_families((await request(port, "/metrics"))[2])
            assert sample(mid, "modbus_bridge_modbus_tcp_connections") == 1
        finally:
            await client.close()
        h.sims["a2"].faults.silent = True
        await until(lambda: _is(h, 12, Health.OFFLINE))
        await h.polls("a1", 2)
        second = scrape_families((await request(port, "/metrics"))[2])
        assert (sample(second, "modbus_bridge_segment_requests_total", segment="panel-a")
                > sample(first, "modbus_bridge_segment_requests_total", segment="panel-a"))
        assert (sample(second, "modbus_bridge_meter_good_replies_total", segment="panel-a", meter="a1")
                > sample(first, "modbus_bridge_meter_good_replies_total", segment="panel-a", meter="a1"))
        assert sample(second, "modbus_bridge_meter_timeouts_total", segment="panel-a", meter="a2") >= 3
        assert sample(second, "modbus_bridge_segment_timeouts_total", segment="panel-a") >= 3
        assert sample(second, "modbus_bridge_meter_retries_total", segment="panel-a", meter="a2") >= 1
        assert sample(second, "modbus_bridge_meter_demotions_total", segment="panel-a", meter="a2") == 1
        assert sample(second, "modbus_bridge_meter_online", segment="panel-a", meter="a2") == 0
        assert sample(second, "modbus_bridge_meter_health", segment="panel-a", meter="a2", state="offline") == 1
        assert sample(second, "modbus_bridge_meter_online", segment="panel-b", meter="b1") == 1
        assert sample(second, "modbus_bridge_modbus_tcp_requests_total", function="4") == 2
        assert sample(second, "modbus_bridge_modbus_tcp_exceptions_total", code="10") == 1
        assert sample(second, "modbus_bridge_modbus_tcp_connections") == 0
        assert sample(second, "modbus_bridge_modbus_tcp_closed_connections_total", reason="idle") == 0
        assert sample(second, "modbus_bridge_modbus_tcp_refused_connections_total") == 0


async def test_metrics_count_opcua_sessions_and_subscriptions():
    from asyncua import Client

    async with running_bridge({"s": [MeterSpec("m", 1, 11)]}, opcua=True) as h, http_of(h) as port:
        before = scrape_families((await request(port, "/metrics"))[2])
        assert sample(before, "modbus_bridge_opcua_sessions") == 0
        assert sample(before, "modbus_bridge_opcua_subscriptions") == 0
        async with Client(h.opcua_endpoint) as client:
            await client.create_subscription(500, None)
            during = scrape_families((await request(port, "/metrics"))[2])
            assert sample(during, "modbus_bridge_opcua_sessions") == 1
            assert sample(during, "modbus_bridge_opcua_subscriptions") == 1


async def _is(h, unit: int, health: Health) -> bool:
    return h.app.image.health(unit) is health


# ------------------------------------------------------------------ status.json


async def test_status_json_shows_what_the_meters_hold_and_a_meter_going_silent():
    layout = {"panel-a": [MeterSpec("a1", 1, 11), MeterSpec("a2", 2, 12)],
              "panel-b": [MeterSpec("b3", 3, 23, profile="eastron-sdm630")]}
    async with running_bridge(layout) as h, http_of(h) as port:
        h.sims["a1"].set_values({"voltage": 231.5, "current": 4.25, "frequency": 50.0})
        h.sims["b3"].set_value("voltage_l3", 240.5)
        for name in ("a1", "a2", "b3"):
            await h.polls(name, 2)
        st = await get_json(port)
        assert [s["name"] for s in st["segments"]] == ["panel-a", "panel-b"]
        seg = st["segments"][0]
        assert seg["port"] == h.segment("panel-a").cfg.port and seg["port_open"] is True and seg["state"] == "open"
        assert seg["cycle_time"] > 0 and 0 <= seg["utilisation"] <= 1
        a1 = meter_of(st, "a1")
        assert a1["health"] == "fresh" and a1["online"] is True and 0 <= a1["last_poll_age"] < 1
        values = {v["name"]: v for v in a1["values"]}
        assert values["voltage"] == {"name": "voltage", "value": 231.5, "unit": "V",
                                     "description": values["voltage"]["description"]}
        assert values["current"]["value"] == 4.25 and values["current"]["unit"] == "A"
        assert values["frequency"]["value"] == 50.0 and values["frequency"]["unit"] == "Hz"
        # every value equals the simulated meter's, as float32 carries it
        for name, sim in h.sims.items():
            for v in meter_of(st, name)["values"]:
                assert v["value"] == pytest.approx(sim.value(v["name"]), rel=1e-6, abs=1e-6), (name, v)
        assert {v["name"]: v["value"] for v in meter_of(st, "b3")["values"]}["voltage_l3"] == 240.5

        # values follow the meter
        h.sims["a1"].set_value("voltage", 229.75)
        await h.polls("a1", 2)
        assert {v["name"]: v["value"] for v in meter_of(await get_json(port), "a1")["values"]}["voltage"] == 229.75

        # a meter going silent: offline (last values kept), its neighbour stays online
        h.sims["a2"].faults.silent = True
        await until(lambda: _is(h, 12, Health.OFFLINE))
        st = await get_json(port)
        a2 = meter_of(st, "a2")
        assert a2["health"] == "offline" and a2["online"] is False and a2["demoted"] is True
        assert a2["last_error"] and a2["timeouts"] >= 3
        assert meter_of(st, "a1")["health"] == "fresh"


async def test_status_json_has_null_for_values_never_read_and_for_nan():
    layout = {"s": [MeterSpec("m", 1, 11), MeterSpec("never", 2, 12, silent=True)]}
    async with running_bridge(layout, stale_after=0.5) as h, http_of(h) as port:
        h.sims["m"].set_value("power_factor", math.nan)
        await h.polls("m", 2)
        _, _, body = await request(port, "/status.json")
        assert b"NaN" not in body and b"Infinity" not in body
        st = json.loads(body)
        assert {v["name"]: v["value"] for v in meter_of(st, "m")["values"]}["power_factor"] is None
        never = meter_of(st, "never")
        assert never["health"] in ("never_read", "offline") and never["last_poll_age"] is None
        assert all(v["value"] is None for v in never["values"])
        # a meter whose polls stop without being demoted goes stale
        h.sims["m"].faults.silent = True
        await until(lambda: _health_in(port, "m", ("stale", "offline")))


async def _health_in(port: int, meter: str, states) -> bool:
    return meter_of(await get_json(port), meter)["health"] in states


# ------------------------------------------------------------------ the page in a browser


class _PageReader(HTMLParser):
    """Meter cards on the rendered page: health and the value shown for each point."""

    def __init__(self):
        super().__init__()
        self.meters: dict[str, dict] = {}
        self._meter: str | None = None
        self._point: str | None = None
        self._in_value = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-meter" in a:
            self._meter = a["data-meter"]
            self.meters[self._meter] = {"health": a.get("data-health"), "values": {}}
        elif "data-point" in a:
            self._point = a["data-point"]
        elif tag == "td" and a.get("class") == "v":
            self._in_value = True

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_value = False

    def handle_data(self, data):
        if self._in_value and self._meter and self._point:
            self.meters[self._meter]["values"][self._point] = data.strip()


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is not installed: the status page test needs a real headless browser "
                "(Debian: apt-get install -y chromium)")


async def run_chromium(url: str, profile: str, *extra: str) -> str:
    rc, out, err = await run(
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", "--virtual-time-budget=3000", *extra, url, timeout=60)
    assert rc == 0, f"chromium failed ({rc}): {err[-2000:]}"
    return out


async def test_status_page_in_headless_chromium_shows_live_values_and_a_meter_going_offline(tmp_path):
    layout = {"panel-a": [MeterSpec("a1", 1, 11), MeterSpec("a2", 2, 12)],
              "panel-b": [MeterSpec("b3", 3, 23, profile="eastron-sdm630")]}
    async with running_bridge(layout) as h, http_of(h) as port:
        url = f"http://127.0.0.1:{port}/"
        h.sims["a1"].set_values({"voltage": 231.5, "current": 4.25})
        h.sims["a2"].set_value("voltage", 228.25)
        for name in ("a1", "a2", "b3"):
            await h.polls(name, 2)

        page = _PageReader()
        page.feed(await run_chromium(url, str(tmp_path / "p1"), "--dump-dom"))
        assert set(page.meters) == {"a1", "a2", "b3"}, "the page did not render the meters from status.json"
        assert page.meters["a1"] == {"health": "fresh", "values": page.meters["a1"]["values"]}
        assert page.meters["a1"]["values"]["voltage"] == "231.5"
        assert page.meters["a1"]["values"]["current"] == "4.25"
        assert page.meters["a2"]["health"] == "fresh" and page.meters["a2"]["values"]["voltage"] == "228.25"

        # live: a new value on the meter shows on the page
        h.sims["a1"].set_value("voltage", 233.0)
        await h.polls("a1", 2)
        h.sims["a2"].faults.silent = True
        await until(lambda: _is(h, 12, Health.OFFLINE))
        page = _PageReader()
        page.feed(await run_chromium(url, str(tmp_path / "p2"), "--dump-dom"))
        assert page.meters["a1"]["values"]["voltage"] == "233"
        assert page.meters["a2"]["health"] == "offline"
        assert page.meters["a2"]["values"]["voltage"] == "228.25"  # last value kept, shown greyed
        assert page.meters["b3"]["health"] == "fresh"

        SCREENSHOT.unlink(missing_ok=True)
        await run_chromium(url, str(tmp_path / "p3"), f"--screenshot={SCREENSHOT}", "--window-size=1280,900",
                           "--hide-scrollbars")
        assert SCREENSHOT.stat().st_size > 10_000
