"""Clean edges of `modbus-bridge run`: one-line start-up errors on every supported Python (Debian
12's own 3.11.2 included), no library traceback, and SIGTERM honoured from the moment the process
can catch it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = Path("/usr/bin/python3.11")
DEBIAN_VENV = ROOT / ".venv-debian" / "bin" / "python"  # made by `make test` from DEBIAN_PYTHON


def interpreters() -> list:
    found = [pytest.param(sys.executable, id=f"python{sys.version_info.major}.{sys.version_info.minor}")]
    if DEBIAN_PYTHON.exists():
        # Debian 12's interpreter (3.11.2) wraps an exception raised in `except*` in a new group:
        # what once turned a one-line error into a 40-line traceback. `make test` builds its venv.
        assert DEBIAN_VENV.exists(), "run the suite with `make test`: it builds .venv-debian"
        found.append(pytest.param(str(DEBIAN_VENV), id="debian-python3.11"))
    return found


def write_config(tmp_path: Path, modbus: str, opcua: str = "  enabled: false\n", http: str = "") -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(
        "segments:\n"
        "  - name: a\n    port: /dev/null-nothing-here\n"
        "    meters:\n      - {name: m1, slave: 1, profile: eastron-sdm120}\n"
        f"modbus_tcp:\n  listen: {modbus}\n"
        f"opcua:\n{opcua}" + http
    )
    return path


def run(python: str, config: Path, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "bridge", "run", "-c", str(config)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("python", interpreters())
def test_a_listener_that_cannot_bind_is_one_line_naming_side_host_and_port(tmp_path, python):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run(python, write_config(tmp_path, f"127.0.0.1:{port}"))
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"modbus-bridge: error: Modbus TCP: cannot listen on 127.0.0.1:{port}: Address already in use"], out.stderr


@pytest.mark.parametrize("python", interpreters())
def test_an_opcua_endpoint_that_cannot_bind_is_one_line_without_asyncua_traceback(tmp_path, python):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        opcua = f"  endpoint: opc.tcp://127.0.0.1:{port}/bridge\n  security: [None]\n"
        out = run(python, write_config(tmp_path, f"127.0.0.1:{free_port()}", opcua))
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [f"modbus-bridge: error: OPC UA: cannot listen on 127.0.0.1:{port}: Address already in use"], \
        out.stderr


def test_an_unresolvable_listen_host_is_named(tmp_path):
    out = run(sys.executable, write_config(tmp_path, "no-such-host.invalid:5020"))
    assert out.returncode == 1
    [line] = out.stderr.splitlines()
    assert line.startswith("modbus-bridge: error: Modbus TCP: cannot listen on no-such-host.invalid:5020: "
                           "cannot resolve host name 'no-such-host.invalid'"), line


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has installed a handler for ``sig`` (its SigCgt mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask & (1 << (sig - 1)))


@pytest.mark.parametrize("after", [0.0, 0.3])
def test_sigterm_while_starting_is_a_clean_stop(tmp_path, after):
    """SIGTERM at the first instant the process catches it (during imports and start-up), or a
    little later: exit 0, nothing but log lines on stderr."""
    http = f"http:\n  listen: 127.0.0.1:{free_port()}\n"
    opcua = f"  endpoint: opc.tcp://127.0.0.1:{free_port()}/bridge\n  security: [None]\n"
    config = write_config(tmp_path, f"127.0.0.1:{free_port()}", opcua, http)
    proc = subprocess.Popen([sys.executable, "-m", "bridge", "run", "-c", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not _catches(proc.pid, signal.SIGTERM):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the bridge never installed a SIGTERM handler"
            time.sleep(0.001)
        time.sleep(after)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Error" not in err, err
