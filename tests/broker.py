"""Real peers for the MQTT tests: a mosquitto broker per test on a free port, and an independent
subscriber (mqtt.js with the Eclipse Tahu Sparkplug B decoder) whose lines the test reads."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from bridge.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
SUBSCRIBER = ROOT / "tests" / "mqtt_node_client" / "subscribe.mjs"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Mosquitto:
    """``mosquitto`` on 127.0.0.1:<port>, persistence in ``directory``; start, stop, kill -9, again."""

    def __init__(self, directory: Path, port: int | None = None, extra: str = "", save_every_change: bool = True):
        """``save_every_change``: persist after every change (tests: a kill -9 loses nothing the broker
        took); False saves once a second instead, as a broker under load must (the benchmark)."""
        self.directory = directory
        self.port = port or free_port()
        self.extra = extra
        self.save_every_change = save_every_change
        self.proc: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "mosquitto.conf"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        self.conf.write_text(
            # as root, mosquitto would switch to its own user, who cannot read the test's files
            "user root\n"
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"persistence true\npersistence_location {self.directory}/\n"
            + ("autosave_interval 1\nautosave_on_changes true\n" if self.save_every_change
               else "autosave_interval 1\nautosave_on_changes false\n") +
            "max_queued_messages 100000\n"
            "log_dest stderr\nlog_type error\nlog_type warning\n" + self.extra)
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.directory / "mosquitto.log", "ab"))
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not start: {(self.directory / 'mosquitto.log').read_text()}")
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: an outage with no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class Subscriber:
    """The independent subscriber as a child process; ``messages`` fills as lines arrive."""

    def __init__(self, url: str, *filters: str, persistent_id: str = ""):
        self.url, self.filters, self.persistent_id = url, filters, persistent_id
        self.messages: list[dict] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._new = asyncio.Event()

    async def __aenter__(self) -> Subscriber:
        self.proc = await asyncio.create_subprocess_exec(
            "node", str(SUBSCRIBER), self.url, *self.filters, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "NODE_NO_WARNINGS": "1", "SUBSCRIBER_ID": self.persistent_id})
        line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        assert json.loads(line) == {"subscribed": True}, line
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None
        while line := await self.proc.stdout.readline():
            self.messages.append(json.loads(line))
            self._new.set()

    async def wait_for(self, predicate, timeout: float = 10.0, what: str = "") -> list[dict]:
        """Until ``predicate(messages)`` is true; returns the messages."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self.messages):
                    self._new.clear()
                    await self._new.wait()
        except TimeoutError:
            last = {m["topic"]: str(m["payload"])[:80] for m in self.messages}  # each topic's last payload
            seen = "\n  ".join(f"{t}: {p}" for t, p in sorted(last.items()))
            raise AssertionError(f"no {what or 'match'} within {timeout} s; {len(self.messages)} message(s), "
                                 f"last on each topic:\n  {seen}") from None
        return self.messages

    def on(self, topic_part: str) -> list[dict]:
        return [m for m in self.messages if topic_part in m["topic"]]

    async def __aexit__(self, *exc) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
        if self._reader is not None:
            self._reader.cancel()
