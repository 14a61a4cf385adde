"""The HTTP side (SPEC §7): status page, status JSON, health, readiness, Prometheus metrics.

A small asyncio HTTP/1.1 server, read-only: GET (and HEAD) only, no request bodies.
Every input boundary is bounded: the request head must fit ``MAX_HEAD`` bytes and
arrive within ``READ_TIMEOUT``; at most ``MAX_CONNECTIONS`` at once and
``MAX_REQUESTS`` per keep-alive connection; anything that is not a well-formed
request gets 400 and the connection is closed.

Everything served is computed from the app's live state when asked; nothing here
polls or counts (except the utilisation window, sampled once a second).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING

from bridge.core import codec
from bridge.core.image import Health
from bridge.north.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from bridge.north.metrics import exposition, make_registry
from bridge.core.model import HttpConfig

if TYPE_CHECKING:
    from bridge.app import App

log = logging.getLogger("bridge.http")

MAX_HEAD = 8192  # bytes: request line and headers together
MAX_HEADERS = 64
READ_TIMEOUT = 10.0  # seconds for a request head to arrive (also the keep-alive idle limit)
WRITE_TIMEOUT = 10.0  # seconds for a client to take a response
MAX_CONNECTIONS = 64
MAX_REQUESTS = 1000  # per keep-alive connection
UTILISATION_WINDOW = 10  # seconds of history behind the utilisation figure
SAMPLE_PERIOD = 1.0

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}
_TEXT = "text/plain; charset=utf-8"
_PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
             "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class _BadRequest(Exception):
    pass


class Utilisation:
    """Busy fraction of each segment's line over the last ``UTILISATION_WINDOW`` seconds."""

    def __init__(self, app: "App"):
        self.app = app
        self._samples: dict[str, deque[tuple[float, float]]] = {
            seg.cfg.name: deque(maxlen=int(UTILISATION_WINDOW / SAMPLE_PERIOD) + 1) for seg in app.segments}

    def sample(self) -> None:
        now = time.monotonic()
        for seg in self.app.segments:
            self._samples[seg.cfg.name].append((now, seg.diag.busy_time))

    def __call__(self, segment: str) -> float:
        seg = next(s for s in self.app.segments if s.cfg.name == segment)
        d = seg.diag
        samples = self._samples.get(segment)
        if samples:
            since, since_busy = samples[0]
        elif d.started:
            since, since_busy = d.started, 0.0
        else:
            return 0.0
        return d.utilisation(since_busy, since, time.monotonic())


def _clean(value: float | int | None) -> float | int | None:
    """A number for JSON: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class HttpServer:
    """``HttpServer(cfg, app)``; ``await start()``, ``port``, ``await stop()``."""

    def __init__(self, cfg: HttpConfig, app: "App"):
        self.cfg = cfg
        self.app = app
        self.utilisation = Utilisation(app)
        self.registry = make_registry(app, self.utilisation)
        self._server: asyncio.AbstractServer | None = None
        self._sampler: asyncio.Task | None = None
        self._handlers: set[asyncio.Task] = set()
        self.stats = {"requests": 0, "bad_requests": 0, "refused": 0}
        self._page = resources.files(__package__).joinpath("static/status.html").read_bytes()
        # per unit: (measurement, decoder) for the live values on the status page
        self._points = {m.unit: [(p, codec.decoder(p.dtype, p.word_order)) for p in m.profile.measurements]
                        for m in app.config.meters}
        self._routes: dict[str, Callable[[], tuple[int, str, bytes, dict[str, str]]]] = {
            "/": self._index,
            "/index.html": self._index,
            "/status.json": self._status_json,
            "/healthz": lambda: (200, _TEXT, b"ok\n", {}),
            "/readyz": self._readyz,
            "/metrics": self._metrics,
        }

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.cfg.host, self.cfg.port, limit=MAX_HEAD,
                                                  reuse_address=True)
        self.utilisation.sample()
        self._sampler = asyncio.get_running_loop().create_task(self._sample())
        log.info("HTTP listening on %s:%d", self.cfg.host, self.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            if self._handlers:
                await asyncio.wait(self._handlers, timeout=1.0)
            await self._server.wait_closed()
            self._server = None

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_PERIOD)
            self.utilisation.sample()

    # ------------------------------------------------------------ connections
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._handlers) >= MAX_CONNECTIONS:
            self.stats["refused"] += 1
            writer.write(_response(503, _TEXT, b"too many connections\n", {}, keep_alive=False))
            await _close(writer)
            return
        self._handlers.add(task)
        try:
            for _ in range(MAX_REQUESTS):
                try:
                    async with asyncio.timeout(READ_TIMEOUT):
                        head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return  # the client went away or went quiet: nothing to answer
                except (asyncio.LimitOverrunError, ValueError):
                    await self._bad(reader, writer, "request head too large")
                    return
                try:
                    method, path, keep_alive = _parse(head)
                except _BadRequest as exc:
                    await self._bad(reader, writer, str(exc))
                    return
                self.stats["requests"] += 1
                if method not in ("GET", "HEAD"):
                    writer.write(_response(405, _TEXT, b"method not allowed\n", {"Allow": "GET, HEAD"},
                                           keep_alive=False))
                    return
                route = self._routes.get(path)
                if route is None:
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
            self._handlers.discard(task)
            await _close(writer)

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
    def _index(self):
        return 200, "text/html; charset=utf-8", self._page, {"Content-Security-Policy": _PAGE_CSP}

    def _readyz(self):
        missing = self.not_ready()
        if missing:
            return 503, _TEXT, f"not ready: {missing}\n".encode(), {}
        return 200, _TEXT, b"ready\n", {}

    def not_ready(self) -> str:
        """What holds readiness back, in one line; "" when ready."""
        missing = []
        if not self.app.listening.is_set():
            missing.append("servers not listening yet")
        waiting = [seg.cfg.name for seg in self.app.segments if not seg.tried_all.is_set()]
        if waiting:
            missing.append("segments that have not yet tried each meter: " + ", ".join(waiting))
        return "; ".join(missing)

    def _metrics(self):
        return 200, METRICS_CONTENT_TYPE, exposition(self.registry), {}

    def _status_json(self):
        body = json.dumps(self.status(), allow_nan=False, separators=(",", ":")).encode()
        return 200, "application/json", body, {}

    def status(self) -> dict:
        """What the status page shows: segments, their meters, the meters' live values."""
        app, image = self.app, self.app.image
        now = time.monotonic()
        segments = []
        for seg in app.segments:
            d = seg.diag
            meters = []
            for unit, state in seg.meters.items():
                u = image.unit(unit)
                health = image.health(unit)
                values = []
                for p, decode in self._points[unit]:
                    value = None
                    if health is not Health.NEVER_READ:
                        raw = image.value_registers(unit, p.function, p.address, p.count)
                        if raw is not None:
                            value = decode(raw)
                            if p.scale != 1.0:
                                value = value * p.scale
                    values.append({"name": p.name, "value": _clean(value), "unit": p.unit,
                                   "description": p.description})
                md = state.diag
                meters.append({
                    "name": state.meter.name, "unit": unit, "slave": state.meter.slave,
                    "profile": state.meter.profile.name,
                    "health": health.value, "online": health is Health.FRESH, "demoted": md.demoted,
                    "last_poll_age": _clean(None if u.last_good is None else round(max(0.0, now - u.last_good), 3)),
                    "last_poll_time": u.last_good_wall,
                    "last_error": u.last_error,
                    "turnaround": _clean(md.turnaround),
                    "requests": md.requests, "good": md.good, "timeouts": md.timeouts, "errors": md.errors,
                    "values": values,
                })
            segments.append({
                "name": seg.cfg.name, "port": seg.cfg.port, "port_open": d.port_open,
                "state": "open" if d.port_open else "lost",
                "utilisation": _clean(round(self.utilisation(seg.cfg.name), 4)),
                "cycle_time": _clean(d.cycle_time),
                "requests": d.requests, "good": d.good, "timeouts": d.timeouts, "errors": d.errors,
                "ready": seg.tried_all.is_set(),
                "meters": meters,
            })
        upstream: dict[str, object] = {}
        if app.modbus is not None:
            upstream["modbus_tcp"] = {"connections": len(app.modbus.connections),
                                      "requests": app.modbus.stats.get("requests", 0)}
        if app.opcua is not None:
            upstream["opcua"] = {"endpoint": app.config.opcua.endpoint}
        missing = self.not_ready()
        return {"time": time.time(), "ready": not missing, "not_ready": missing, "segments": segments,
                "upstream": upstream}


def _parse(head: bytes) -> tuple[str, str, bool]:
    """Method, path (query dropped) and whether to keep the connection open; _BadRequest if malformed."""
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
    return method, target.split("?", 1)[0], keep_alive


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
