"""`modbus-bridge demo`: simulated meters on pseudo-terminals and a real bridge on them.

The demo goes through the same path as `run`: it writes a configuration file
naming the ptys, loads and validates it, and runs the App on it.
"""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from bridge.app import App
from bridge.config.loader import load_config
from bridge.config.profiles import get_builtin
from bridge.south.simulator import SimMeter, SimulatedBus

# segment -> [(meter name, slave, upstream unit, profile)]
DEMO_LAYOUT = {
    "panel-a": [("incomer", 1, 1, "eastron-sdm630"), ("hvac", 2, 2, "eastron-sdm630")],
    "panel-b": [("lighting", 1, 11, "eastron-sdm120"), ("sockets", 2, 12, "eastron-sdm120")],
}
INCOMER, SUBMETERS = "incomer", ("hvac", "lighting", "sockets")  # the incomer feeds the others …
UNMETERED_W = 400.0  # … and a load no sub-meter sees: what the energy balance must show
UNMETERED_UNIT = 100  # the virtual meter ``unmetered`` on Modbus TCP


def demo_config_text(ports: dict[str, str], modbus_port: int, opcua_port: int, http_port: int = 8080,
                     host: str = "127.0.0.1", mqtt: str = "") -> str:
    lines = ["# written by `modbus-bridge demo`: simulated meters on pseudo-terminals", "segments:"]
    for segment, meters in DEMO_LAYOUT.items():
        lines += [f"  - name: {segment}", f"    port: {ports[segment]}", "    baudrate: 9600", "    meters:"]
        for name, slave, unit, profile in meters:
            lines += [
                f"      - name: {name}",
                f"        slave: {slave}",
                f"        unit: {unit}",
                f"        profile: {profile}",
                "        poll_interval: 0.5",
                f"        writable: {'true' if name == 'sockets' else 'false'}",
            ]
            if name == INCOMER:  # mirror the meter's first 80 input registers, as PLC drivers read them
                lines += ["        ranges:", "          - {function: input, start: 0x0000, count: 80}"]
    lines += [
        "stale_after: 5.0",
        "modbus_tcp:",
        f"  listen: {host}:{modbus_port}",
        "opcua:",
        f"  endpoint: opc.tcp://{host}:{opcua_port}/bridge",
        "  security: [None]  # the demo only: a real installation signs and encrypts",
        "http:",
        f"  listen: {host}:{http_port}",
        "state_dir: state",
        "energy:  # one-minute intervals so that the demo shows some soon (15 is usual)",
        "  interval: 1",
        "  timezone: Europe/Berlin",
        "  tariffs:",
        '    - {name: peak, days: mon-fri, from: "08:00", to: "20:00"}',
        "    - {name: offpeak}",
        "  virtual:",
        "    - name: unmetered",
        f"      formula: {INCOMER} - {' - '.join(SUBMETERS)}",
        f"      alarm: {{reference: {INCOMER}, above_percent: 10, intervals: 3}}",
        f"      unit: {UNMETERED_UNIT}  # its live power and last interval on Modbus TCP (docs/modbus.md)",
    ]
    if mqtt:  # a broker the user runs: the demo starts none
        lines += [
            "mqtt:",
            f"  brokers: [{mqtt}]",
            "  client_id: modbus-bridge-demo",
            "  sparkplug: {group_id: demo, edge_node_id: demo-panel}",
            "  json: {topic: modbus-bridge/demo, homeassistant: true}",
        ]
    return "\n".join(lines) + "\n"


def banner(app: App, config_path: Path) -> str:
    port = app.modbus.port if app.modbus else None
    rows = [
        "modbus-bridge demo is running (Ctrl-C to stop)",
        f"  configuration: {config_path}",
        f"  Modbus TCP:    127.0.0.1:{port}",
        f"  OPC UA:        {app.config.opcua.endpoint}  (namespace {app.config.opcua.namespace}, no security)",
        f"  status page:   http://127.0.0.1:{app.http.port}/   (also /metrics, /healthz, /readyz)",
        f"  energy:        http://127.0.0.1:{app.http.port}/api/energy?meter=unmetered   "
        f"(1-minute intervals; /api/energy/report)",
    ]
    if app.config.mqtt is not None:
        rows.append(f"  MQTT:          {', '.join(app.config.mqtt.brokers)}  (Sparkplug B spBv1.0/demo/+/demo-panel/#,"
                    " JSON modbus-bridge/demo/#)")
    rows += [
        "  meters:",
    ]
    for seg in app.config.segments:
        for m in seg.meters:
            rows.append(f"    unit {m.unit:<3} {m.name:<10} {m.profile.name:<16} segment {seg.name} slave {m.slave}")
    for v in app.config.virtual_meters:
        if v.unit is not None:
            rows.append(f"    unit {v.unit:<3} {v.name:<10} {'virtual':<16} {v.formula}")
    rows += [
        "  try, from another terminal:",
        f"    mbpoll -m tcp -p {port} -a 1 -t 3:float -B -r 1 -c 1 -1 127.0.0.1     # unit 1 voltage L1 (V)",
        f"    mbpoll -m tcp -p {port} -a 1 -t 3:float -B -r 1 -c 40 -1 127.0.0.1    # unit 1, 80 mirrored registers",
        f"    mbpoll -m tcp -p {port} -a 12 -t 3:float -B -r 13 -c 1 127.0.0.1      # unit 12 active power, every second",
        f"    mbpoll -m tcp -p {port} -a {UNMETERED_UNIT} -t 3:float -B -r 1 -c 2 127.0.0.1      "
        f"# unit {UNMETERED_UNIT}: unmetered active, reactive power",
        f"    .venv/bin/uaread -u {app.config.opcua.endpoint} -n 'ns=2;s=incomer.voltage_l1'",
        f"    .venv/bin/uabrowse -u {app.config.opcua.endpoint} -n 'ns=2;s=Meters/' -l 2",
    ]
    return "\n".join(rows)


def demo_meters() -> dict[str, SimMeter]:
    """The demo's simulated meters by name: the incomer feeds the sub-meters and a known unmetered load."""
    sims = {name: SimMeter(slave, get_builtin(profile)) for meters in DEMO_LAYOUT.values()
            for name, slave, _, profile in meters if name != INCOMER}
    for meters in DEMO_LAYOUT.values():
        for name, slave, _, profile in meters:
            if name == INCOMER:
                sims[name] = SimMeter(slave, get_builtin(profile), feeds=[sims[s] for s in SUBMETERS],
                                      extra_w=UNMETERED_W)
    return sims


async def run_demo(modbus_port: int, opcua_port: int, stop: asyncio.Event | None = None,
                   http_port: int = 8080, mqtt: str = "") -> None:
    """Run until ``stop`` is set (or cancelled)."""
    sims = demo_meters()
    buses = {segment: SimulatedBus([sims[name] for name, *_ in meters]) for segment, meters in DEMO_LAYOUT.items()}
    ports = {segment: bus.open() for segment, bus in buses.items()}
    try:
        with tempfile.TemporaryDirectory(prefix="modbus-bridge-demo-") as tmp:
            path = Path(tmp) / "demo.yaml"
            path.write_text(demo_config_text(ports, modbus_port, opcua_port, http_port, mqtt=mqtt))
            async with App(load_config(path)) as app, asyncio.TaskGroup() as tg:
                print(banner(app, path), flush=True)
                stopper = tg.create_task((stop or asyncio.Event()).wait())
                runner = tg.create_task(app.wait())  # raises if the bridge fails rather than stops
                await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                runner.cancel()
    finally:
        for bus in buses.values():
            bus.close()
