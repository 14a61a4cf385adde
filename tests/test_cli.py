"""The command line as a user meets it: real subprocesses, real ptys, real clients."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess

import pytest
from support import BRIDGE, f32

from bridge.config.profiles import get_builtin
from bridge.demo import UNMETERED_UNIT, UNMETERED_W
from bridge.south.simulator import SimMeter, SimulatedBus
from bridge.testing import RawModbusClient, free_port


async def _wait_for_line(stream: asyncio.StreamReader, pattern: str, timeout: float = 15.0) -> re.Match:
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"process ended before printing {pattern!r}: {''.join(seen)}")
            seen.append(line)
            if m := re.search(pattern, line):
                return m


async def test_run_serves_meters_and_stops_cleanly_on_sigterm(tmp_path):
    sim = SimMeter(7, get_builtin("eastron-sdm120"), animate=False)
    sim.set_value("voltage", 229.5)
    async with SimulatedBus([sim]) as bus:
        cfg = tmp_path / "bridge.yaml"
        cfg.write_text(
            "segments:\n"
            f"  - name: seg\n    port: {bus.path}\n    timeout: 0.2\n"
            "    meters:\n      - {name: m, slave: 7, unit: 70, profile: eastron-sdm120, poll_interval: 0.1}\n"
            "modbus_tcp:\n  listen: 127.0.0.1:0\nopcua:\n  enabled: false\n"
        )
        proc = await asyncio.create_subprocess_exec(*BRIDGE, "run", "-c", str(cfg), stderr=asyncio.subprocess.PIPE)
        try:
            port = int((await _wait_for_line(proc.stderr, r"Modbus TCP listening on 127\.0\.0\.1:(\d+)")).group(1))
            client = await RawModbusClient.connect(port)
            try:
                async with asyncio.timeout(5):
                    while (reply := await client.read(70, 4, 0, 2)) == b"\x84\x0b":
                        await asyncio.sleep(0.05)
                assert f32(reply, 2) == 229.5
            finally:
                await client.close()
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):
                assert await proc.wait() == 0
            rest = (await proc.stderr.read()).decode()
            assert "Traceback" not in rest
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def test_demo_is_read_by_mbpoll():
    """`modbus-bridge demo` on the ports asked for, read by libmodbus's mbpoll."""
    mbpoll = shutil.which("mbpoll")
    assert mbpoll, "mbpoll is installed by `make test` (Debian package mbpoll)"
    port = free_port()
    proc = subprocess.Popen(
        [*BRIDGE, "demo", "--modbus-port", str(port), "--opcua-port", str(free_port()), "--http-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in proc.stdout:
            if "Modbus TCP:" in line:
                assert line.strip().endswith(f"127.0.0.1:{port}")
                break
        else:
            raise AssertionError(f"demo printed no endpoint: {proc.stderr.read()}")
        values = []
        for _ in range(50):  # the first poll may not have completed yet
            out = subprocess.run(
                [mbpoll, "-m", "tcp", "-p", str(port), "-a", "1", "-t", "3:float", "-B", "-r", "1", "-c", "1",
                 "-1", "127.0.0.1"], capture_output=True, text=True, timeout=10,
            )
            values = re.findall(r"^\[1\]:\s+(\S+)", out.stdout, re.M)
            if out.returncode == 0 and values:
                break
            subprocess.run(["sleep", "0.1"])
        assert values, out.stdout + out.stderr
        assert 220.0 < float(values[0]) < 240.0, f"unit 1 voltage is {values[0]}"
        # the virtual meter ``unmetered`` under its own unit: the incomer's power minus its sub-meters' now,
        # the demo's known unmetered load give or take the loads' moves between the terms' polls (±200 W
        # seen): the median of a few seconds' reads
        readings = []
        for _ in range(7):
            out = subprocess.run(
                [mbpoll, "-m", "tcp", "-p", str(port), "-a", str(UNMETERED_UNIT), "-t", "3:float", "-B", "-r", "1",
                 "-c", "1", "-1", "127.0.0.1"], capture_output=True, text=True, timeout=10,
            )
            readings += [float(v) for v in re.findall(r"^\[1\]:\s+(\S+)", out.stdout, re.M)]
            subprocess.run(["sleep", "0.4"])
        assert len(readings) == 7, out.stdout + out.stderr
        assert sorted(readings)[3] == pytest.approx(UNMETERED_W, rel=0.5), readings
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=5) == 0
        finally:
            proc.kill()


def test_profiles_json_and_show():
    out = subprocess.run([*BRIDGE, "profiles", "--json"], capture_output=True, text=True, check=True)
    names = [p["name"] for p in json.loads(out.stdout)]
    assert "eastron-sdm120" in names and "eastron-sdm630" in names
    out = subprocess.run([*BRIDGE, "profiles", "eastron-sdm120", "--json"], capture_output=True, text=True, check=True)
    shown = json.loads(out.stdout)
    assert [m["name"] for m in shown["measurements"]][:3] == ["voltage", "current", "active_power"]


@pytest.mark.parametrize("argv", [["profiles", "no-such-meter"], ["check", "-c", "/nonexistent/bridge.yaml"]])
def test_bad_input_is_one_line_and_exit_2(argv):
    out = subprocess.run([*BRIDGE, *argv], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modbus-bridge: error:"), out.stderr


def test_hash_password_reads_stdin_and_verifies():
    from bridge.core.passwords import verify_password

    out = subprocess.run([*BRIDGE, "hash-password"], input="correct horse\n", capture_output=True, text=True,
                         check=True)
    stored = out.stdout.strip()
    assert stored.startswith("scrypt$") and "correct horse" not in stored
    assert verify_password("correct horse", stored) and not verify_password("wrong", stored)


async def test_sigterm_finishes_the_transaction_in_flight_then_exits_0(tmp_path):
    sim = SimMeter(7, get_builtin("eastron-sdm120"), animate=False)
    sim.faults.delay = 1.0  # every reply takes a second: a transaction is always in flight
    async with SimulatedBus([sim]) as bus:
        cfg = tmp_path / "bridge.yaml"
        cfg.write_text(
            "segments:\n"
            f"  - name: seg\n    port: {bus.path}\n    timeout: 2.0\n"
            "    meters:\n      - {name: m, slave: 7, profile: eastron-sdm120, poll_interval: 0}\n"
            "modbus_tcp:\n  listen: 127.0.0.1:0\nopcua:\n  enabled: false\n"
        )
        proc = await asyncio.create_subprocess_exec(*BRIDGE, "run", "-c", str(cfg), stderr=asyncio.subprocess.PIPE)
        try:
            await _wait_for_line(proc.stderr, r"Modbus TCP listening")
            async with asyncio.timeout(5):
                while bus.stats.requests < 2:
                    await asyncio.sleep(0.01)
            requests = bus.stats.requests
            while bus.stats.requests == requests:  # the moment a new request went out
                await asyncio.sleep(0.005)
            loop = asyncio.get_running_loop()
            signalled = loop.time()
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):
                assert await proc.wait() == 0
            took = loop.time() - signalled
            # it waited for the reply (due a second after the request), and no longer than 5 s
            assert 0.8 < took < 5.0, took
            assert "Traceback" not in (await proc.stderr.read()).decode()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
