"""scan, read and points over real ptys and real subprocesses, as an installer uses them."""
from __future__ import annotations

import csv
import io
import json

import pytest
from support import BRIDGE, run

from bridge.south.commissioning import points_rows, read_meter, reference, scan
from bridge.core.errors import PortError
from bridge.config.profiles import get_builtin
from bridge.south.simulator import SimMeter, SimulatedBus
from bridge.testing import MeterSpec, running_bridge


async def run_cli(*argv: str) -> tuple[int, str, str]:
    return await run(*BRIDGE, *argv, timeout=60)


async def test_scan_finds_who_answers_and_what_they_look_like():
    meters = [SimMeter(3, get_builtin("eastron-sdm120")), SimMeter(17, get_builtin("eastron-sdm630")),
              SimMeter(40, get_builtin("abb-b2x"))]
    async with SimulatedBus(meters) as bus:
        rc, out, err = await run_cli("scan", "--port", bus.path, "--slaves", "1-45", "--timeout", "0.03", "--json")
        assert rc == 0, err
        found = json.loads(out)
        assert [f["slave"] for f in found] == [3, 17, 40]
        by_slave = {f["slave"]: set(f["profiles"]) for f in found}
        assert "eastron-sdm120" in by_slave[3] and "abb-b2x" not in by_slave[3]
        assert "abb-b2x" in by_slave[40] and "eastron-sdm120" not in by_slave[40]
        assert "scanning" in err  # progress goes to stderr, the JSON alone to stdout


async def test_scan_tries_several_baud_rates():
    async with SimulatedBus([SimMeter(5, get_builtin("eastron-sdm120"))]) as bus:
        found = await scan(bus.path, [4800, 9600], [4, 5, 6], timeout=0.03)
    # a pty carries any speed, so the meter answers at both: each is reported with its speed
    assert [(f.slave, f.baudrate) for f in found] == [(5, 4800), (5, 9600)]


async def test_scan_refuses_a_port_a_running_bridge_holds():
    async with running_bridge({"s": [MeterSpec("m", 1, 11)]}) as h:
        await h.polls("m", 1)
        with pytest.raises(PortError, match="in use"):
            await scan(h.buses["s"].path, [9600], [1], timeout=0.03)
        rc, out, err = await run_cli("scan", "--port", h.buses["s"].path, "--slaves", "1")
        assert rc == 1 and err.count("\n") == 1 and "in use" in err
        await h.polls("m", 1)  # the bridge's bus was not disturbed


async def test_read_prints_every_measurement():
    sim = SimMeter(9, get_builtin("eastron-sdm120"), animate=False)
    sim.set_value("voltage", 231.25)
    sim.set_value("total_active_energy", 1234.5)
    async with SimulatedBus([sim]) as bus:
        values = await read_meter(bus.path, 9, get_builtin("eastron-sdm120"), timeout=0.2)
        assert values["voltage"] == 231.25 and values["total_active_energy"] == 1234.5
        assert set(values) == {m.name for m in get_builtin("eastron-sdm120").measurements}
        rc, out, err = await run_cli("read", "--port", bus.path, "--slave", "9", "--profile", "eastron-sdm120",
                                     "--json")
        assert rc == 0, err
        assert json.loads(out)["voltage"] == 231.25
        rc, out, err = await run_cli("read", "--port", bus.path, "--slave", "9", "--profile", "eastron-sdm120")
        assert rc == 0 and "voltage" in out and "231.2500 V" in out


async def test_read_of_a_silent_slave_is_one_line():
    async with SimulatedBus([]) as bus:
        rc, out, err = await run_cli("read", "--port", bus.path, "--slave", "9", "--profile", "eastron-sdm120",
                                     "--timeout", "0.05")
        assert rc == 1 and err.count("\n") == 1 and "no reply" in err and "Traceback" not in err


def test_register_references():
    assert reference(4, 0) == "30001" and reference(3, 0x0012) == "40019"
    assert reference(3, 19000) == "419001"  # above 9999: six digits


@pytest.fixture
def example_config():
    from bridge.config.loader import load_config
    return load_config("config/example.yaml")


def test_points_rows_cover_every_measurement(example_config):
    rows = points_rows(example_config)
    assert len(rows) == sum(len(m.profile.measurements) for m in example_config.meters)
    first = rows[0]
    assert {"meter", "measurement", "unit_id", "function", "address", "type", "unit", "nodeid"} <= set(first)
    assert first["nodeid"] == f"nsu=urn:modbus-bridge;s={first['meter']}.{first['measurement']}"


async def test_points_formats():
    rc, out, err = await run_cli("points", "-c", "config/example.yaml", "--format", "csv")
    assert rc == 0, err
    table = list(csv.DictReader(io.StringIO(out)))
    assert table[0]["meter"] == "incomer" and table[0]["reference"] == "30001"
    rc, out, _ = await run_cli("points", "-c", "config/example.yaml", "--format", "json")
    rows = json.loads(out)
    assert isinstance(rows[0]["address"], int) and isinstance(rows[0]["unit_id"], int)
    assert len(rows) == len(table)
    rc, out, _ = await run_cli("points", "-c", "config/example.yaml", "--format", "md")
    assert out.count("## ") == 7 and "| voltage_l1 | 4 | 0 (0x0000) | 30001 |" in out


def test_points_list_the_consolidated_unit(tmp_path):
    from bridge.config.loader import load_config

    path = tmp_path / "bridge.yaml"
    path.write_text(
        "segments:\n  - name: a\n    port: /dev/ttyS0\n    meters:\n"
        "      - {name: m1, slave: 1, profile: eastron-sdm120}\n"
        "      - {name: m2, slave: 2, profile: eastron-sdm120}\n"
        "modbus_tcp:\n  consolidated: {unit: 200, base: 0, stride: 32}\n"
    )
    rows = [r for r in points_rows(load_config(path)) if r["unit_id"] == 200]
    assert len(rows) == 28
    current_m2 = next(r for r in rows if (r["meter"], r["measurement"]) == ("m2", "current"))
    assert (current_m2["address"], current_m2["type"], current_m2["function"]) == (32 + 2, "float32", 4)


def test_points_name_the_sparkplug_metric_and_json_path(tmp_path):
    from bridge.config.loader import load_config

    path = tmp_path / "bridge.yaml"
    path.write_text(
        "segments:\n  - name: a\n    port: /dev/ttyS0\n    meters:\n"
        "      - {name: incomer, slave: 1, profile: eastron-sdm120}\n"
        "mqtt:\n  brokers: [mqtt://127.0.0.1]\n  client_id: panel-7\n"
        "  sparkplug: {group_id: site-a, edge_node_id: panel-7}\n  json: {topic: site-a/panel-7}\n"
    )
    rows = points_rows(load_config(path))
    voltage = next(r for r in rows if r["measurement"] == "voltage")
    assert voltage["sparkplug"] == "spBv1.0/site-a/DDATA/panel-7/incomer : voltage"
    assert voltage["json"] == "site-a/panel-7/incomer : values.voltage"
    assert all(r["sparkplug"] and r["json"] for r in rows)


def test_points_list_a_virtual_meters_unit(tmp_path):
    from bridge.config.loader import load_config

    path = tmp_path / "bridge.yaml"
    path.write_text(
        "segments:\n  - name: a\n    port: /dev/ttyS0\n    meters:\n"
        "      - {name: main, slave: 1, profile: eastron-sdm120}\n"
        "      - {name: pump, slave: 2, profile: eastron-sdm120}\n"
        "energy:\n  virtual:\n    - {name: rest, formula: main - pump, unit: 90}\n"
    )
    rows = {r["measurement"]: r for r in points_rows(load_config(path)) if r["unit_id"] == 90}
    assert rows["active_power"]["address"] == 0 and rows["active_power"]["type"] == "float32"
    assert rows["active_power"]["nodeid"] == "nsu=urn:modbus-bridge;s=rest.ActivePower"
    assert "reactive_power" in rows  # the SDM120 has it
    assert rows["import_active_energy"]["address"] == 4 and rows["import_active_energy"]["unit"] == "kWh"
    assert rows["import_active_energy"]["nodeid"] == "nsu=urn:modbus-bridge;s=rest.Energy.ImportActiveEnergy"
    assert (rows["demand"]["address"], rows["interval_end"]["address"], rows["interval_status"]["address"]) == (16, 18, 20)
    assert (rows["interval_status"]["type"], rows["interval_status"]["registers"]) == ("uint16", 1)
