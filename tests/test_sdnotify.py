"""The sd_notify client against a real AF_UNIX datagram socket, as systemd would hold it."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid

import pytest

from bridge.sdnotify import Notifier, watchdog, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A bound datagram socket in tmp_path, exported as NOTIFY_SOCKET; yields the receiving socket."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def recv(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def nothing_pending(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(2.0)
    return False


def test_ready_and_status_datagram(notify_socket):
    n = Notifier.from_env()
    assert n.enabled
    assert n.notify(READY=1, STATUS="serving 2 segments, 5 meters")
    assert recv(notify_socket) == b"READY=1\nSTATUS=serving 2 segments, 5 meters"
    n.close()


def test_each_message_is_one_datagram(notify_socket):
    n = Notifier.from_env()
    n.notify(STATUS="starting")
    n.notify(STOPPING=1)
    n.notify(WATCHDOG=True)
    assert recv(notify_socket) == b"STATUS=starting"
    assert recv(notify_socket) == b"STOPPING=1"
    assert recv(notify_socket) == b"WATCHDOG=1"
    assert nothing_pending(notify_socket)
    n.close()


def test_status_newlines_are_flattened(notify_socket):
    n = Notifier.from_env()
    n.notify(STATUS="line one\nline two")
    assert recv(notify_socket) == b"STATUS=line one line two"
    n.close()


def test_reloading_carries_monotonic_usec(notify_socket):
    n = Notifier.from_env()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.notify(RELOADING=1)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = recv(notify_socket).decode().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    n.notify(READY=1)
    assert recv(notify_socket) == b"READY=1"
    n.close()


def test_explicit_monotonic_usec_is_kept(notify_socket):
    n = Notifier.from_env()
    n.notify(RELOADING=1, MONOTONIC_USEC=1234)
    assert recv(notify_socket) == b"RELOADING=1\nMONOTONIC_USEC=1234"
    n.close()


def test_abstract_socket_name(monkeypatch):
    name = f"modbus-bridge-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        n = Notifier.from_env()
        assert n.notify(READY=1, STATUS="ok")
        assert recv(sock) == b"READY=1\nSTATUS=ok"
        n.close()
    finally:
        sock.close()


def test_no_op_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier.from_env()
    assert not n.enabled
    assert n.notify(READY=1) is False
    assert n.notify(STOPPING=1) is False
    n.close()


def test_from_env_mapping_and_unset(notify_socket, monkeypatch):
    assert not Notifier.from_env({}).enabled
    assert Notifier.from_env({"NOTIFY_SOCKET": "/run/x"}).address == "/run/x"
    n = Notifier.from_env(unset=True)
    assert n.enabled
    assert "NOTIFY_SOCKET" not in os.environ
    assert n.notify(READY=1)
    assert recv(notify_socket) == b"READY=1"
    n.close()


def test_unusable_address_turns_notifications_off(caplog):
    with caplog.at_level(logging.WARNING, logger="bridge.sdnotify"):
        n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert "neither a path nor an abstract name" in caplog.text


def test_send_errors_never_raise_and_are_logged_once(tmp_path, caplog):
    n = Notifier(str(tmp_path / "gone"))
    with caplog.at_level(logging.DEBUG, logger="bridge.sdnotify"):
        assert n.notify(READY=1) is False
        assert n.notify(WATCHDOG=1) is False
        assert n.notify(STOPPING=1) is False
    levels = [r.levelno for r in caplog.records if r.name == "bridge.sdnotify"]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_sending_recovers_when_the_socket_comes_back(tmp_path):
    path = tmp_path / "n"
    n = Notifier(str(path))
    assert n.notify(READY=1) is False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        assert n.notify(WATCHDOG=1)
        assert recv(sock) == b"WATCHDOG=1"
    finally:
        sock.close()
        n.close()


# --- watchdog_interval -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # inherited
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "abc"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env, expected):
    assert watchdog_interval(env) == expected


def test_watchdog_interval_reads_os_environ(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 2.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None


# --- the watchdog coroutine --------------------------------------------------------------------

async def arecv(sock: socket.socket, timeout: float = 2.0) -> bytes:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)


async def test_watchdog_pings_while_healthy_and_stops_when_not(notify_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pings every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notify_socket.setblocking(False)
    n = Notifier.from_env()
    state = {"healthy": True}
    task = asyncio.create_task(watchdog(n, lambda: state["healthy"]))
    try:
        times = []
        for _ in range(4):
            assert await arecv(notify_socket) == b"WATCHDOG=1"
            times.append(time.monotonic())
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(0.05 < g < 0.5 for g in gaps), gaps

        state["healthy"] = False
        # at most the ping already on its way, then silence for several intervals
        with pytest.raises(asyncio.TimeoutError):
            while True:
                await arecv(notify_socket, timeout=0.35)
        assert not task.done()

        state["healthy"] = True  # a transient problem: pings resume
        assert await arecv(notify_socket) == b"WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        n.close()


async def test_watchdog_treats_a_failing_health_check_as_unhealthy(notify_socket, caplog):
    notify_socket.setblocking(False)
    n = Notifier.from_env()

    def broken() -> bool:
        raise RuntimeError("wedged")

    task = asyncio.create_task(watchdog(n, broken, interval=0.05))
    try:
        with pytest.raises(asyncio.TimeoutError):
            await arecv(notify_socket, timeout=0.3)
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        n.close()
    assert "health check failed" in caplog.text


async def test_watchdog_stalled_loop_sends_nothing(notify_socket):
    """A blocked event loop cannot ping: the gap seen by systemd is the stall itself."""
    notify_socket.setblocking(False)
    n = Notifier.from_env()
    task = asyncio.create_task(watchdog(n, lambda: True, interval=0.05))
    try:
        assert await arecv(notify_socket) == b"WATCHDOG=1"
        time.sleep(0.3)  # the stall, deliberately blocking
        # during the stall nothing could be sent: at most one datagram is queued
        await asyncio.sleep(0)
        received = 0
        while True:
            try:
                notify_socket.recv(4096)
                received += 1
            except BlockingIOError:
                break
        assert received <= 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        n.close()


async def test_watchdog_returns_at_once_without_watchdog(notify_socket, monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    n = Notifier.from_env()
    await asyncio.wait_for(watchdog(n, lambda: True), 1.0)  # no WATCHDOG_USEC: nothing to do
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", "1" if os.getpid() != 1 else "2")  # meant for another process
    await asyncio.wait_for(watchdog(n, lambda: True), 1.0)
    notify_socket.setblocking(False)
    assert nothing_pending(notify_socket)
    n.close()


async def test_watchdog_without_notify_socket_returns_at_once(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    await asyncio.wait_for(watchdog(Notifier.from_env(), lambda: True), 1.0)
