"""The App's contract in-process: every task owned and supervised, a failing image listener
contained, and a reload that is all or nothing (real ptys, real sockets)."""
from __future__ import annotations

import dataclasses
import gc
import logging
import socket
import weakref

import pytest
from support import until

from bridge.app import FULL_GC_GROWTH
from bridge.core.errors import BridgeError
from bridge.core.image import Health
from bridge.core.model import HttpConfig, ModbusTcpConfig
from bridge.south.simulator import SimMeter, SimulatedBus
from bridge.testing import MeterSpec, RawModbusClient, running_bridge

LAYOUT = {"a": [MeterSpec("m1", 1, 11)], "b": [MeterSpec("m2", 2, 21)]}


async def test_a_failing_image_listener_is_logged_once_counted_and_never_restarts_a_segment(caplog):
    layout = {"a": [MeterSpec("m1", 1, 11, animate=True)], "b": [MeterSpec("m2", 2, 21)]}  # values change
    async with running_bridge(layout) as h:
        await h.polls("m1")

        def broken(change, unit, health):
            raise RuntimeError("a north side's bug")

        h.app.image.subscribe(broken)
        task = h.app._tasks["segment a"]
        before = h.app.image.listener_errors
        await h.polls("m1", 3)
        await h.polls("m2", 3)
        assert h.app.image.listener_errors > before
        assert h.app._tasks["segment a"] is task and not task.done()
        assert len(h.app.view.parts["segment a"].failures) == 0
        logged = [r for r in caplog.records if "image listener" in r.getMessage()]
        assert len(logged) == 1 and logged[0].levelno == logging.ERROR  # not once per block
        assert not h.app.view.problems()


async def test_a_reload_whose_new_listener_cannot_bind_changes_nothing():
    async with running_bridge(LAYOUT, http=True) as h:
        old = h.app.config
        modbus_port = h.modbus_port
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = busy.getsockname()[1]
            # two changes at once: a meter removed (would apply) and HTTP moved to a busy port (cannot)
            new = dataclasses.replace(old, segments=old.segments[:1], http=HttpConfig("127.0.0.1", taken),
                                      modbus_tcp=ModbusTcpConfig(host="127.0.0.1", port=0))
            with pytest.raises(BridgeError, match=f"HTTP: cannot listen on 127.0.0.1:{taken}"):
                await h.app.reload(new)
        assert h.app.config is old
        assert set(h.app.segments) == {"a", "b"} and h.app.modbus.port == modbus_port
        client = await RawModbusClient.connect(modbus_port)  # the old listener, still serving both
        try:
            await until(lambda: h.app.image.health(21) is Health.FRESH, what="m2 fresh")
            assert (await client.read(21, 4, 0, 2))[0] == 4
        finally:
            await client.close()


async def test_a_meter_moved_to_another_bus_is_unread_until_its_first_poll_there():
    # stale_after 5 s: a reload's full garbage collection pauses the loop (0.2-1 s on a loaded test
    # machine), which must not make the unchanged meter stale here; what is asserted is that it kept its values
    async with running_bridge(LAYOUT, stale_after=5.0) as h:
        await h.polls("m1")
        await h.polls("m2")
        silent = SimulatedBus([SimMeter(2, h.meters["m2"].profile)])
        silent.meters[2].faults.silent = True
        try:
            old = h.app.config
            moved = dataclasses.replace(old.segments[1], port=silent.open())
            await h.app.reload(dataclasses.replace(old, segments=(old.segments[0], moved)))
            assert h.app.image.health(21) in (Health.NEVER_READ, Health.OFFLINE)  # never the old bus's values
            client = await RawModbusClient.connect(h.modbus_port)
            try:
                assert await client.read(21, 4, 0, 2) == b"\x84\x0b"
                assert (await client.read(11, 4, 0, 2))[0] == 4  # the unchanged segment kept its values
            finally:
                await client.close()
        finally:
            silent.close()


async def test_a_reload_collects_what_it_made_and_the_frozen_cycles_once_they_matter(caplog):
    """A reload's garbage collection skips the objects frozen at the start (a full pass over them holds
    the bridge up) until the cycles left among them have grown them by FULL_GC_GROWTH; then it makes the
    full pass, and they are freed."""
    caplog.set_level(logging.INFO, logger="bridge.app")
    async with running_bridge(LAYOUT) as h:
        await h.app.reload(h.app.config)
        assert "full garbage collection" not in caplog.text  # nothing grew: the short way

        class Link:
            pass

        def ring(n: int) -> Link:  # cyclic garbage, as a dropped part of a configuration may leave
            first = node = Link()
            for _ in range(n - 1):
                node.next = Link()
                node = node.next
            node.next = first
            return first

        small = ring(10)
        small_ref = weakref.ref(small)
        gc.freeze()  # frozen, as everything alive at the start is
        del small
        await h.app.reload(h.app.config)
        assert "full garbage collection" not in caplog.text and small_ref() is not None  # left for later

        big = ring(int(gc.get_freeze_count() * 2 * FULL_GC_GROWTH))
        big_ref = weakref.ref(big)
        gc.freeze()
        del big
        await h.app.reload(h.app.config)
        assert "full garbage collection" in caplog.text
        assert big_ref() is None and small_ref() is None
