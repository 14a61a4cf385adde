"""Interval energy end to end: simulated meters on ptys whose energy counters advance at known rates,
the bridge polling them, intervals read back over HTTP (``/api/energy``, ``/api/energy/report``), from
the store by the command line, and across a ``kill -9`` of a bridge process.

Intervals here are 1 second long (``EnergyConfig.seconds``, a test-only knob: the file takes minutes),
so that a test sees several boundaries in a few seconds; everything else is the product's code path."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from support import until

from bridge.core.model import BalanceAlarmConfig, EnergyConfig, VirtualMeterConfig
from bridge.energy.store import STORE_FILE, EnergyDb, StoreError
from bridge.south.simulator import SimMeter, SimulatedBus
from bridge.config.profiles import get_builtin
from bridge.testing import MeterSpec, free_port, running_bridge
from test_http import request, sample, scrape_families

SECONDS = 1  # interval length
RATES = {"incomer": 36.0, "lighting": 9.0, "sockets": 18.0}  # kW: the unmetered rest is 9 kW, 25 % of the incomer
LAYOUT = {"a": [MeterSpec("incomer", 1, 11, animate=False), MeterSpec("lighting", 2, 12, animate=False)],
          "b": [MeterSpec("sockets", 1, 21, animate=False)]}
UNMETERED = VirtualMeterConfig("unmetered", ((1, "incomer"), (-1, "lighting"), (-1, "sockets")),
                               "incomer - lighting - sockets", BalanceAlarmConfig("incomer", 10.0, 2))
ENERGY = EnergyConfig(seconds=SECONDS, max_gap=1.0, virtual=(UNMETERED,))


class Counters:
    """Drives each meter's import energy register at its rate: value = start + kW × hours since t0."""

    def __init__(self, sims: dict[str, SimMeter], rates: dict[str, float], start: float = 100.0):
        self.sims, self.rates, self.start = sims, dict(rates), {n: start for n in rates}
        self.t0 = time.time()
        self.paused: set[str] = set()

    def value(self, name: str, at: float | None = None) -> float:
        return self.start[name] + self.rates[name] * ((at or time.time()) - self.t0) / 3600.0

    def replace_meter(self, name: str) -> None:
        """A new meter: its counter starts again from 0 now."""
        self.start[name] = -self.rates[name] * (time.time() - self.t0) / 3600.0

    async def run(self) -> None:
        """Each meter computes its registers as it answers (``SimMeter.tick`` runs before every reply), so
        a reply carries the counter of that instant whatever the event loop was doing."""
        for name, sim in self.sims.items():
            if name in self.rates:
                sim.tick = lambda name=name, sim=sim: sim.set_values(
                    {"import_active_energy": self.value(name), "active_power": self.rates[name] * 1000.0})
        await asyncio.Event().wait()


async def api(port: int, path: str) -> dict:
    status, _, body = await request(port, path)
    assert status == 200, body
    return json.loads(body)


def energies(intervals: list[dict], q: str = "import_active_energy") -> list[float]:
    return [i[q] for i in intervals if q in i]


async def test_intervals_follow_the_rates_and_the_balance_shows_the_unmetered_load(tmp_path, caplog):
    since = int(time.time()) - 2  # the queries ask from here: the last 24 h would be 86,400 slots of 1 s
    async with running_bridge(LAYOUT, http=True, energy=ENERGY, state_dir=str(tmp_path)) as h:
        counters = Counters(h.sims, RATES)
        task = asyncio.create_task(counters.run())
        try:
            recorder = h.app.north["energy"]
            await until(lambda: recorder.last("unmetered") is not None and recorder.closed_total >= 10,
                        timeout=20, what="three closed intervals per meter")
            port = h.app.http.port
            plain = await api(port, f"/api/energy?meter=incomer&from={since}")
            assert not any("boundaries" in i or "evidence" in i for i in plain["intervals"])  # only when asked
            doc = await api(port, f"/api/energy?meter=incomer&from={since}&detail=1")
            assert doc["interval"] == SECONDS
            # (an interval may close between the two requests: compare those closed in the first)
            same = {i["start"]: i.get("import_active_energy") for i in plain["intervals"] if i["status"] != "missing"}
            detailed = {i["start"]: i.get("import_active_energy") for i in doc["intervals"] if i["start"] in same}
            assert len(detailed) >= 3 and detailed == {k: same[k] for k in detailed}
            closed = [i for i in doc["intervals"] if i["status"] != "missing"]
            assert len(closed) >= 3
            for i in closed[1:]:  # the first may have begun before the counters moved
                assert i["status"] == "complete"
                assert i["import_active_energy"] == pytest.approx(36.0 * SECONDS / 3600, rel=0.03)
                assert i["demand"] == pytest.approx(36000.0, rel=0.03)
                assert i["boundaries"]["import_active_energy"]["end"] - i["boundaries"]["import_active_energy"]["start"] \
                    == pytest.approx(i["import_active_energy"], abs=1e-6)
                ev = i["evidence"]["import_active_energy"]["end"]  # the readings either side of the end
                end = datetime.fromisoformat(i["end"].replace("Z", "+00:00")).timestamp()
                assert ev["before"]["time"] <= end <= ev["after"]["time"]
                assert ev["after"]["time"] - ev["before"]["time"] <= 1.0
            # the virtual meter: incomer - lighting - sockets, interval by interval
            doc = await api(port, f"/api/energy?meter=unmetered&from={since}")
            virtual = [i for i in doc["intervals"] if i["status"] != "missing"]
            assert len(virtual) >= 3
            terms = {}
            for name in ("incomer", "lighting", "sockets"):
                terms[name] = {i["start"]: i["import_active_energy"] for i in (await api(port, f"/api/energy?meter={name}&from={since}"))
                               ["intervals"] if i["status"] != "missing"}
            for i in virtual:  # its formula, slot by slot, to the store's micro-unit
                if all(i["start"] in t for t in terms.values()):
                    assert i["import_active_energy"] == pytest.approx(
                        terms["incomer"][i["start"]] - terms["lighting"][i["start"]] - terms["sockets"][i["start"]], abs=3e-6)
            # and the rates where every term was read on time: an estimated interval of 1 s carries the skew of
            # replies read late on a loaded machine (a stall of 0.1 s is 40 % of this balance)
            complete = [i for i in virtual[1:] if i["status"] == "complete"]
            assert complete and all(i["import_active_energy"] == pytest.approx(9.0 * SECONDS / 3600, rel=0.1)
                                    for i in complete)
            # 25 % of the incomer for 2 intervals in a row: the alarm is up, on /metrics and in the log
            await until(lambda: recorder.alarm_state()["unmetered"]["active"], timeout=10, what="the balance alarm")
            assert "energy balance unmetered" in caplog.text
            status = h.app.view.north()["energy"]
            assert status.by_label["alarm"]["unmetered"] == 1.0
            # live: the virtual meter's power now is the sum of its terms' (36 - 9 - 18 kW), beside the meters
            for _ in range(50):  # good once every term is (stale_after is 1 s here: a busy machine flickers)
                live = (await api(port, "/status.json"))["energy"]["live"]["unmetered"]
                metrics = scrape_families((await request(port, "/metrics"))[2])
                if live["quality"] == "good" and sample(metrics, "modbus_bridge_virtual_good", meter="unmetered"):
                    break
                await asyncio.sleep(0.1)
            assert live["quality"] == "good" and live["formula"] == "incomer - lighting - sockets"
            assert live["values"]["active_power"] == pytest.approx(9000.0)
            assert sample(metrics, "modbus_bridge_virtual_active_power_watts", meter="unmetered") == pytest.approx(9000.0)
            assert sample(metrics, "modbus_bridge_virtual_good", meter="unmetered") == 1.0
            # CSV of the same
            status_code, headers, body = await request(port, "/api/energy?meter=lighting&format=csv")
            lines = body.decode().splitlines()
            assert status_code == 200 and lines[0].startswith("meter,start,end,status,import_active_energy")
            # a bad query is one line, 400
            status_code, _, body = await request(port, "/api/energy?meter=nope")
            assert status_code == 400 and b"unknown meter 'nope'" in body
            status_code, _, body = await request(port, "/api/energy?meter=incomer&from=yesterday")
            assert status_code == 400 and b"cannot read the time" in body
        finally:
            task.cancel()


async def test_offline_across_boundaries_is_estimated_and_conserved_and_a_replaced_meter_is_a_reset(tmp_path):
    async with running_bridge(LAYOUT, http=True, energy=ENERGY, state_dir=str(tmp_path), demote_interval=0.3) as h:
        counters = Counters(h.sims, RATES)
        task = asyncio.create_task(counters.run())
        try:
            recorder = h.app.north["energy"]
            await until(lambda: recorder.closed_total >= 6, timeout=15, what="intervals")
            t_first = time.time()
            h.sims["lighting"].faults.silent = True
            await asyncio.sleep(2.5 * SECONDS)
            h.sims["lighting"].faults.silent = False
            counters.replace_meter("sockets")
            back = time.time()
            await until(lambda: (recorder.last("lighting") and recorder.last("lighting").start > back + SECONDS
                                 and recorder.last("sockets").start > back + SECONDS), timeout=10,
                        what="intervals after the gap and the reset")
            port = h.app.http.port
            doc = await api(port, f"/api/energy?meter=lighting&from={int(t_first) - 10}&detail=1")
            lighting = [i for i in doc["intervals"] if i["status"] != "missing"]
            assert "estimated" in [i["status"] for i in lighting], [i["status"] for i in lighting]
            # conserved: the intervals add up to the counter's travel between their ends, exactly
            b = [i["boundaries"]["import_active_energy"] for i in lighting]
            total = sum(i["import_active_energy"] for i in lighting)
            assert total == pytest.approx(b[-1]["end"] - b[0]["start"], abs=1e-5)
            assert total == pytest.approx(9.0 * SECONDS * len(lighting) / 3600, rel=0.05)
            doc = await api(port, f"/api/energy?meter=sockets&from={int(t_first) - 10}")
            sockets = [i for i in doc["intervals"] if i["status"] != "missing"]
            assert "reset" in [i["status"] for i in sockets]
            assert all(e >= 0 for e in energies(sockets))
            # the report: statuses counted, energy per meter
            report = await api(port, f"/api/energy/report?from={int(t_first) - 10}&to={int(time.time())}")
            by = {r["meter"]: r for r in report["meters"]}
            assert by["lighting"]["statuses"].get("estimated", 0) >= 1
            assert by["sockets"]["statuses"].get("reset", 0) == 1
        finally:
            task.cancel()


async def test_a_meter_without_load_closes_every_interval_complete_with_zero_energy(tmp_path):
    """Counters that do not move (an idle tenant at night) change nothing in the image, so its listeners
    hear nothing after the first poll; the intervals must close on time all the same, complete and 0 kWh,
    not later and estimated as if the meter had been away."""
    layout = {"a": [MeterSpec("idle", 1, 11, animate=False)]}
    began = int(time.time())
    async with running_bridge(layout, energy=EnergyConfig(seconds=SECONDS, max_gap=3.0),
                              state_dir=str(tmp_path)) as h:
        recorder = h.app.north["energy"]
        await until(lambda: recorder.closed_total >= 4, timeout=10, what="four intervals closed")
        rows = await recorder.intervals("idle", began - 5, int(time.time()) + 1)
        closed = [i for i in rows if i.status != "missing"][1:]  # the first began before the first poll
        assert len(closed) >= 3
        assert all(i.status == "complete" and i.energy["import_active_energy"] == 0.0 for i in closed), closed
        assert time.time() - closed[-1].end < 2 * SECONDS + 1.0  # on time, not when something next changes


# ---------------------------------------------------------------------------------- a real process

# `modbus-bridge run`, but with the test's interval length (the file can only say minutes)
CHILD = """
import dataclasses, sys
from bridge.cli import _serve
from bridge.config.loader import load_config
from bridge.service import serve
config = load_config(sys.argv[1])
config = dataclasses.replace(config, energy=dataclasses.replace(config.energy, seconds=int(sys.argv[2])))
sys.exit(_serve(lambda stop: serve(sys.argv[1], config, stop)))
"""


def bridge_yaml(tmp_path: Path, ports: dict[str, str], http_port: int) -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(f"""
segments:
  - name: a
    port: {ports['a']}
    timeout: 0.1
    meters:
      - {{name: incomer, slave: 1, unit: 11, profile: eastron-sdm120, poll_interval: 0.1}}
modbus_tcp: {{listen: "127.0.0.1:{free_port()}"}}
opcua: {{enabled: false}}
http: {{listen: "127.0.0.1:{http_port}"}}
state_dir: {tmp_path / 'state'}
energy:
  interval: 1
  max_gap: 1.0
""")
    return path


async def test_kill_9_mid_interval_then_restart_neither_loses_nor_double_counts(tmp_path):
    sim = SimMeter(1, get_builtin("eastron-sdm120"), animate=False)
    async with SimulatedBus([sim]) as bus:
        counters = Counters({"incomer": sim}, {"incomer": 36.0})
        task = asyncio.create_task(counters.run())
        http_port = free_port()
        config = bridge_yaml(tmp_path, {"a": bus.path}, http_port)
        store = tmp_path / "state" / STORE_FILE

        def start() -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-c", CHILD, str(config), str(SECONDS)],
                                    stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)

        def stored() -> list:
            try:
                db = EnergyDb(store, read_only=True)
            except StoreError:  # not there yet, or being created
                return []
            try:
                return db.intervals("incomer", 0, 2**40, detail=True)
            finally:
                db.close()

        proc = start()
        try:
            await until(lambda: len(stored()) >= 2, timeout=30, what="two stored intervals")
            await asyncio.sleep(SECONDS * 0.5)  # mid-interval
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = time.time()
            await asyncio.sleep(0.3)
            proc = start()
            await until(lambda: stored() and stored()[-1].end > killed_at + 2 * SECONDS, timeout=30,
                        what="intervals after the restart")
            # the command line reads the store while the bridge runs
            out = subprocess.run([sys.executable, "-m", "bridge", "energy", "report", "-c", str(config),
                                  "--from", str(int(counters.t0) - 60), "--format", "json"],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            report = json.loads(out.stdout)["meters"][0]
            assert report["meter"] == "incomer" and report["energy"]["import_active_energy"] > 0
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            finally:
                proc.kill()
            task.cancel()
    rows = stored()
    starts = [i.start for i in rows]
    assert starts == sorted(set(starts)), "an interval stored twice"
    assert all(b - a == SECONDS for a, b in zip(starts, starts[1:])), "a slot lost across the kill -9"
    total = sum(i.energy["import_active_energy"] for i in rows)
    first, last = rows[0].start_values["import_active_energy"], rows[-1].end_values["import_active_energy"]
    assert total == pytest.approx(last - first, abs=1e-5)  # telescoping: nothing counted twice
    assert total == pytest.approx(36.0 * SECONDS * len(rows) / 3600, rel=0.05)
    assert all(i.energy["import_active_energy"] >= 0 for i in rows)
