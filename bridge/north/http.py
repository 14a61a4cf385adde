"""The HTTP side: status page, status JSON, health, readiness, Prometheus metrics.

A small asyncio HTTP/1.1 server, read-only: GET (and HEAD) only, no request bodies.
Every input boundary is bounded: the request head must fit ``MAX_HEAD`` bytes and
arrive within ``READ_TIMEOUT``; at most ``MAX_CONNECTIONS`` at once and
``MAX_REQUESTS`` per keep-alive connection; anything that is not a well-formed
request gets 400 and the connection is closed.

Everything served is computed from the read model (``BridgeView``) when asked; nothing here
polls or counts. At ``MAX_CONNECTIONS`` a new connection takes the place of the one that has
waited longest for its request, so a flood of slow connections cannot keep a health check out.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from importlib import resources

from bridge.core.errors import BridgeError
from bridge.core.image import Health
from bridge.core.model import Config, HttpConfig
from bridge.north import energy_api
from bridge.north.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from bridge.north.metrics import exposition, make_registry
from bridge.north.side import Staged, listen_error
from bridge.view import BridgeView, NorthStatus

log = logging.getLogger("bridge.http")

MAX_HEAD = 8192  # bytes: request line and headers together
MAX_HEADERS = 64
READ_TIMEOUT = 10.0  # seconds for a request head to arrive (also the keep-alive idle limit)
WRITE_TIMEOUT = 10.0  # seconds for a client to take a response
MAX_CONNECTIONS = 64
MAX_REQUESTS = 1000  # per keep-alive connection

ENERGY_ROUTES = ("/api/energy", "/api/energy/report")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}
_TEXT = "text/plain; charset=utf-8"
_PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
             "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class _BadRequest(Exception):
    pass


def _clean(value: float | int | None) -> float | int | None:
    """A number for JSON: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class HttpServer:
    """``HttpServer(config, view)``; ``await start()``, ``port``, ``await stop()``."""

    name = "http"

    def __init__(self, config: Config | HttpConfig, view: BridgeView):
        self.cfg = config.http if isinstance(config, Config) else config
        self.view = view
        self.registry = make_registry(view)
        self._server: asyncio.AbstractServer | None = None
        self._handlers: dict[asyncio.Task, float | None] = {}  # handler -> since when it waits for a request
        self.stats = {"requests": 0, "bad_requests": 0, "refused": 0, "evicted": 0}
        self._page = resources.files(__package__).joinpath("static/status.html").read_bytes()
        self._routes: dict[str, Callable[[], tuple[int, str, bytes, dict[str, str]]]] = {
            "/": self._index,
            "/index.html": self._index,
            "/status.json": self._status_json,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
        }

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._server = await self._listen(self.cfg)
        log.info("HTTP listening on %s:%d", self.cfg.host, self.port)

    async def _listen(self, cfg: HttpConfig) -> asyncio.AbstractServer:
        try:
            return await asyncio.start_server(self._handle, cfg.host, cfg.port, limit=MAX_HEAD, reuse_address=True)
        except OSError as exc:
            raise BridgeError(listen_error("HTTP", cfg.host, cfg.port, exc)) from None

    async def run(self) -> None:
        return None  # nothing in the background: every figure is read when asked

    async def stage(self, config: Config) -> Staged:
        cfg = config.http
        assert cfg is not None  # the App retires the side when the key goes
        if (cfg.host, cfg.port) == (self.cfg.host, self.cfg.port):
            return Staged()
        new_server = await self._listen(cfg)

        async def commit() -> None:
            old, self._server, self.cfg = self._server, new_server, cfg
            if old is not None:
                old.close()  # connections in progress finish; keep-alive ones end at their next request
            log.info("HTTP listening on %s:%d", cfg.host, self.port)

        async def abort() -> None:
            new_server.close()
        return Staged(commit, abort)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def status(self) -> NorthStatus:
        listening = self._server is not None
        return NorthStatus(self.name, listening,
                           f"{self.cfg.host}:{self.port if listening else self.cfg.port}",
                           counters={**self.stats, "connections": len(self._handlers)})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=1.0)
            await self._server.wait_closed()
            self._server = None

    # ------------------------------------------------------------ connections
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._handlers) >= MAX_CONNECTIONS and not self._evict():
            self.stats["refused"] += 1
            writer.write(_response(503, _TEXT, b"too many connections\n", {}, keep_alive=False))
            await _close(writer)
            return
        self._handlers[task] = time.monotonic()
        try:
            for _ in range(MAX_REQUESTS):
                self._handlers[task] = time.monotonic()
                try:
                    async with asyncio.timeout(READ_TIMEOUT):
                        head = await reader.readuntil(b"\r\n\r\n")
                    self._handlers[task] = None  # answering: not a candidate for eviction
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return  # the client went away or went quiet: nothing to answer
                except (asyncio.LimitOverrunError, ValueError):
                    await self._bad(reader, writer, "request head too large")
                    return
                try:
                    method, target, keep_alive = _parse(head)
                except _BadRequest as exc:
                    await self._bad(reader, writer, str(exc))
                    return
                self.stats["requests"] += 1
                if method not in ("GET", "HEAD"):
                    writer.write(_response(405, _TEXT, b"method not allowed\n", {"Allow": "GET, HEAD"},
                                           keep_alive=False))
                    return
                path = target.split("?", 1)[0]
                route = self._routes.get(path)
                if path in ENERGY_ROUTES:
                    status, ctype, body, extra = await self._energy(path, target)
                elif route is None:
                    status, ctype, body, extra = 404, _TEXT, b"not found\n", {}
                else:
                    status, ctype, body, extra = route()
                writer.write(_response(status, ctype, body, extra, keep_alive, head_only=method == "HEAD"))
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
                if not keep_alive:
                    return
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("HTTP request failed")
        finally:
            self._handlers.pop(task, None)
            await _close(writer)

    def _evict(self) -> bool:
        """Make room by closing the connection that has waited longest for a request (a slow or idle
        client); False if every connection is busy answering."""
        waiting = [(since, task) for task, since in self._handlers.items() if since is not None]
        if not waiting:
            return False
        _, task = min(waiting, key=lambda w: w[0])
        self._handlers.pop(task, None)
        task.cancel()
        self.stats["evicted"] += 1
        return True

    async def _bad(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, why: str) -> None:
        """Answer 400, then read and drop what the client still sends for a moment before closing, so
        the close does not reset the connection before the client has read the answer."""
        self.stats["bad_requests"] += 1
        writer.write(_response(400, _TEXT, f"bad request: {why}\n".encode(), {}, keep_alive=False))
        try:
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(1.0):
                for _ in range(16):
                    if not await reader.read(MAX_HEAD):
                        break
        except (ConnectionError, OSError, TimeoutError, asyncio.LimitOverrunError, ValueError):
            pass

    # ------------------------------------------------------------ endpoints
    async def _energy(self, path: str, target: str):
        """The interval energy API (``energy_api``); 404 while ``energy:`` is off, 400 for a bad query."""
        energy = self.view.energy
        if energy is None:
            return 404, _TEXT, b"interval energy is off: add an energy: section to the configuration\n", {}
        try:
            params = energy_api.query(target)
            now = int(time.time())
            if path == "/api/energy":
                ctype, body = await energy_api.answer_intervals(energy, params, now)
            else:
                ctype, body = await energy_api.answer_report(energy, params, now)
        except energy_api.BadQuery as exc:
            return 400, _TEXT, f"{exc}\n".encode(), {}
        return 200, ctype, body, {}

    def _index(self):
        return 200, "text/html; charset=utf-8", self._page, {"Content-Security-Policy": _PAGE_CSP}

    def _healthz(self):
        """Liveness: 200 while the process runs (the contract). A part failing in a restart loop is
        named on a second line; the systemd watchdog (and the metric ``healthy``) act on it."""
        problems = self.view.problems()
        note = ("unhealthy: " + "; ".join(problems) + "\n") if problems else ""
        return 200, _TEXT, f"ok\n{note}".encode(), {}

    def _readyz(self):
        missing = self.view.not_ready()
        # MQTT pushes to a broker that may be away (a normal event: the data wait on disk), so it
        # never holds readiness back; its state is said here for the person reading the probe
        mqtt = self.view.north().get("mqtt")
        extra = ""
        if mqtt is not None:
            up = mqtt.counters.get("connected")
            extra = f"mqtt: {'connected to ' + mqtt.address if up else 'not connected: ' + (mqtt.note or mqtt.address)}\n"
        if missing:
            return 503, _TEXT, f"not ready: {missing}\n{extra}".encode(), {}
        return 200, _TEXT, f"ready\n{extra}".encode(), {}

    def _metrics(self):
        return 200, METRICS_CONTENT_TYPE, exposition(self.registry), {}

    def _status_json(self):
        body = json.dumps(self.status_document(), allow_nan=False, separators=(",", ":")).encode()
        return 200, "application/json", body, {}

    def status_document(self) -> dict:
        """What the status page shows: segments, their meters, the meters' live values."""
        now = time.monotonic()
        segments = []
        for seg in self.view.segments():
            d = seg.diag
            meters = []
            for mv in seg.meters:
                health = mv.health
                md = mv.diag
                meters.append({
                    "name": mv.name, "unit": mv.unit, "slave": mv.meter.slave,
                    "profile": mv.meter.profile.name,
                    "health": health.value, "online": health is Health.FRESH, "demoted": md.demoted,
                    "last_poll_age": _clean(None if mv.last_good is None else round(max(0.0, now - mv.last_good), 3)),
                    "last_poll_time": mv.last_good_wall,
                    "last_error": mv.last_error,
                    "turnaround": _clean(md.turnaround),
                    "requests": md.requests, "good": md.good, "timeouts": md.timeouts, "errors": md.errors,
                    "values": [{"name": m.name, "value": _clean(value), "unit": m.unit, "description": m.description}
                               for m, value in mv.readings()],
                })
            segments.append({
                "name": seg.name, "port": seg.cfg.port, "port_open": d.port_open,
                "state": "open" if d.port_open else "lost",
                "utilisation": _clean(round(seg.utilisation(now), 4)),
                "cycle_time": _clean(d.cycle_time),
                "requests": d.requests, "good": d.good, "timeouts": d.timeouts, "errors": d.errors,
                "ready": seg.ready,
                "meters": meters,
            })
        upstream: dict[str, object] = {}
        for name, st in self.view.north().items():
            if name in ("http", "energy"):
                continue
            shown = st.counters if name == "mqtt" else {
                k: v for k, v in st.counters.items() if k in ("connections", "requests", "sessions")}
            upstream[name] = {"address": st.address, "listening": st.listening, "note": st.note, **shown}
        missing = self.view.not_ready()
        return {"time": time.time(), "ready": not missing, "not_ready": missing,
                "healthy": not self.view.problems(), "segments": segments, "upstream": upstream,
                "energy": self._energy_summary()}

    def _energy_summary(self) -> dict | None:
        """The meters with intervals (the page fetches their charts from /api/energy), each one's last
        closed interval, and the balance alarms; None while interval energy is off."""
        energy = self.view.energy
        if energy is None:
            return None
        last = {}
        for name in energy.meter_names():
            i = energy.last(name)
            if i is not None:
                last[name] = {"end": i.end, "status": i.status,
                              "import_active_energy": _clean(i.energy.get("import_active_energy")),
                              "demand": _clean(i.demand)}
        live = {v.name: {"formula": v.formula, "quality": v.quality, "time": v.last_good_wall,
                         "values": {m.name: _clean(value) for m, value in v.readings()}}
                for v in self.view.virtual_meters()}
        return {"interval": energy.interval_s, "meters": energy.meter_names(), "virtual": energy.virtual_names(),
                "last": last, "live": live,
                "alarms": energy.alarm_state()}


def _parse(head: bytes) -> tuple[str, str, bool]:
    """Method, target (path and query) and whether to keep the connection open; _BadRequest if malformed."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest("non-ASCII request head") from None
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _BadRequest("malformed request line")
    method, target, version = parts
    if not method.isalpha() or not method.isupper():
        raise _BadRequest("malformed method")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest("unsupported HTTP version")
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
        raise _BadRequest("malformed request target")
    if len(lines) - 1 > MAX_HEADERS:
        raise _BadRequest("too many headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name or "\t" in name:
            raise _BadRequest("malformed header line")
        headers[name.lower()] = value.strip()
    if version == "HTTP/1.1" and "host" not in headers:
        raise _BadRequest("missing Host header")
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        raise _BadRequest("request bodies are not accepted")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
    return method, target, keep_alive


def _response(status: int, content_type: str, body: bytes, extra: dict[str, str], keep_alive: bool,
              head_only: bool = False) -> bytes:
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(body)),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Connection": "keep-alive" if keep_alive else "close",
        **extra,
    }
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
    except (ConnectionError, OSError, TimeoutError):
        pass


__all__ = ["HttpServer", "MAX_HEAD", "READ_TIMEOUT"]
