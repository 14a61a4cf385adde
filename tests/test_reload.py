"""SIGHUP reload of a running bridge (a real subprocess), and JSON log lines."""
from __future__ import annotations

import asyncio
import json
import signal
import sys

from bridge.config.profiles import get_builtin
from bridge.south.simulator import SimMeter, SimulatedBus
from bridge.testing import RawModbusClient

BRIDGE = [sys.executable, "-m", "bridge", "--log-format", "json"]


def config(path_a: str, path_b: str, b_meters: str) -> str:
    return (
        "segments:\n"
        f"  - name: a\n    port: {path_a}\n    timeout: 0.1\n"
        "    meters:\n      - {name: m1, slave: 1, unit: 11, profile: eastron-sdm120, poll_interval: 0.05}\n"
        f"  - name: b\n    port: {path_b}\n    timeout: 0.1\n"
        f"    meters:\n{b_meters}"
        "modbus_tcp:\n  listen: 127.0.0.1:0\nopcua:\n  enabled: false\n"
    )


M2 = "      - {name: m2, slave: 2, unit: 21, profile: eastron-sdm120, poll_interval: 0.05}\n"
M3 = "      - {name: m3, slave: 3, unit: 22, profile: eastron-sdm120, poll_interval: 0.05}\n"


class Log:
    """The bridge's stderr, parsed: every line must be one JSON object."""

    def __init__(self, stream: asyncio.StreamReader):
        self.stream = stream
        self.entries: list[dict] = []

    async def until(self, needle: str, timeout: float = 10.0) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                line = await self.stream.readline()
                assert line, f"the bridge exited before logging {needle!r}"
                entry = json.loads(line)  # raises if a line is not JSON
                assert {"time", "level", "logger", "message"} <= set(entry)
                self.entries.append(entry)
                if needle in entry["message"]:
                    return entry


async def fresh(client: RawModbusClient, unit: int, timeout: float = 5.0) -> bytes:
    async with asyncio.timeout(timeout):
        while (reply := await client.read(unit, 4, 0, 2))[0] != 4:
            await asyncio.sleep(0.05)
    return reply


async def test_sighup_applies_a_new_configuration_and_keeps_clients(tmp_path):
    profile = get_builtin("eastron-sdm120")
    bus_a = SimulatedBus([SimMeter(1, profile)])
    bus_b = SimulatedBus([SimMeter(2, profile), SimMeter(3, profile)])
    path = tmp_path / "bridge.yaml"
    async with bus_a, bus_b:
        path.write_text(config(bus_a.path, bus_b.path, M2))
        proc = await asyncio.create_subprocess_exec(*BRIDGE, "run", "-c", str(path), stderr=asyncio.subprocess.PIPE)
        log = Log(proc.stderr)
        try:
            port = int((await log.until("Modbus TCP listening"))["message"].rsplit(":", 1)[1])
            client = await RawModbusClient.connect(port)
            await fresh(client, 11)
            await fresh(client, 21)
            assert await client.read(22, 4, 0, 2) == b"\x84\x0a"
            polls_a = bus_a.stats.requests

            # add meter m3 to segment b: b restarts, a (and this connection) go on
            path.write_text(config(bus_a.path, bus_b.path, M2 + M3))
            proc.send_signal(signal.SIGHUP)
            assert "1 of 2 segment(s) kept" in (await log.until("reload applied"))["message"]
            await fresh(client, 22)
            await fresh(client, 21)
            assert (await client.read(11, 4, 0, 2))[0] == 4  # the same connection, never dropped
            assert bus_a.stats.requests > polls_a

            # a broken file is refused and the running bridge keeps its configuration
            path.write_text("segments: [\n")
            proc.send_signal(signal.SIGHUP)
            refused = await log.until("reload refused")
            assert refused["level"] == "error" and "bridge.yaml:" in refused["message"]
            assert (await client.read(22, 4, 0, 2))[0] == 4

            # remove m3 again: its unit is gone
            path.write_text(config(bus_a.path, bus_b.path, M2))
            proc.send_signal(signal.SIGHUP)
            await log.until("reload applied")
            assert await client.read(22, 4, 0, 2) == b"\x84\x0a"
            assert (await client.read(11, 4, 0, 2))[0] == 4
            await client.close()

            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_run_speaks_sd_notify(tmp_path):
    """Under systemd (Type=notify, WatchdogSec): READY, watchdog pings, RELOADING/READY, STOPPING."""
    import os
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()

    async def message(timeout: float = 10.0) -> str:
        async with asyncio.timeout(timeout):
            return (await loop.sock_recv(sock, 4096)).decode()

    bus = SimulatedBus([SimMeter(1, get_builtin("eastron-sdm120")), SimMeter(2, get_builtin("eastron-sdm120"))])
    path = tmp_path / "bridge.yaml"
    async with bus:
        other = SimulatedBus([])
        async with other:
            path.write_text(config(bus.path, other.path, M2.replace("slave: 2", "slave: 9")))
            env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"}
            proc = await asyncio.create_subprocess_exec(*BRIDGE, "run", "-c", str(path), env=env,
                                                        stderr=asyncio.subprocess.DEVNULL)
            try:
                ready = await message()
                assert "READY=1" in ready.splitlines() and "STATUS=serving 2 meters on 2 segments" in ready
                assert await message(2) == "WATCHDOG=1"
                proc.send_signal(signal.SIGHUP)
                while "RELOADING=1" not in (got := await message()):
                    assert got == "WATCHDOG=1"
                assert any(line.startswith("MONOTONIC_USEC=") for line in got.splitlines())
                while "READY=1" not in (got := await message()):
                    assert got == "WATCHDOG=1"
                proc.send_signal(signal.SIGTERM)
                while (got := await message()) != "STOPPING=1":
                    assert got == "WATCHDOG=1"
                async with asyncio.timeout(5):
                    assert await proc.wait() == 0
            finally:
                sock.close()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
