"""Commissioning: find who answers on a bus, read one meter once, and the points list.

``scan`` and ``read`` open the port exclusively, so they refuse a port a
running bridge holds rather than disturbing its bus silently. ``points_rows``
is pure: the integrator's points list from a validated configuration.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bridge.core import codec
from bridge.core import pdu as P
from bridge.core.errors import ExceptionReply, PortError, TransactionError
from bridge.core.model import Config, MeterConfig, Profile
from bridge.core.plan import plan_meter
from bridge.config.profiles import builtin_profile_names, get_builtin
from bridge.energy.meters import energy_meters, virtual_live
from bridge.energy.modbus_map import END_REGISTER, FLOATS, LIVE, STATUS_REGISTER
from bridge.south.rtu_master import RtuMaster
from bridge.south.serial_link import PySerialLink

SCAN_TIMEOUT = 0.1  # seconds per probe: a meter answers within a few character times


@dataclass(frozen=True)
class Found:
    slave: int
    baudrate: int
    profiles: tuple[str, ...]  # built-in profiles whose first register this meter answers

    def as_dict(self) -> dict:
        return {"slave": self.slave, "baudrate": self.baudrate, "profiles": list(self.profiles)}


def _open(port: str, baudrate: int, parity: str, stopbits: int) -> RtuMaster:
    try:
        link = PySerialLink(port, baudrate, parity, stopbits)
    except PortError as exc:
        if "lock" in str(exc).lower():  # exclusive: a running bridge holds it; never share its bus
            raise PortError(f"{port} is in use (a running bridge or another program has it open)") from None
        raise
    return RtuMaster(link, baudrate, parity, stopbits)


async def _answers(master: RtuMaster, slave: int, request: P.Request, timeout: float, tries: int = 2) -> bool | None:
    """True for a normal reply, False for a Modbus exception (the meter is there), None for silence."""
    for _ in range(tries):
        try:
            await master.transact(slave, request, timeout)
            return True
        except ExceptionReply:
            return False
        except TransactionError:
            continue
    return None


async def scan(port: str, baudrates: Iterable[int], slaves: Iterable[int], *, parity: str = "N",
               stopbits: int = 1, timeout: float = SCAN_TIMEOUT,
               progress: Callable[[int, int, int], None] = lambda baud, slave, found: None) -> list[Found]:
    """Probe each address (one register, one retry) at each baud rate; identify what answers."""
    found: list[Found] = []
    slaves = list(slaves)
    for baud in baudrates:
        master = _open(port, baud, parity, stopbits)
        try:
            for slave in slaves:
                progress(baud, slave, len(found))
                if await _answers(master, slave, P.ReadRequest(P.READ_HOLDING, 0, 1), timeout) is None:
                    continue
                found.append(Found(slave, baud, await _identify(master, slave, timeout)))
        finally:
            master.link.close()
    return found


async def _identify(master: RtuMaster, slave: int, timeout: float) -> tuple[str, ...]:
    """The built-in profiles whose first measurement this meter answers with a normal reply."""
    fits = []
    for name in builtin_profile_names():
        m = get_builtin(name).measurements[0]
        if await _answers(master, slave, P.ReadRequest(int(m.function), m.address, m.count), timeout, 1):
            fits.append(name)
    return tuple(fits)


async def read_meter(port: str, slave: int, profile: Profile, *, baudrate: int = 9600, parity: str = "N",
                     stopbits: int = 1, timeout: float = 0.5, retries: int = 1) -> dict[str, float]:
    """Every measurement of ``profile`` read once from ``slave``, decoded and scaled."""
    meter = MeterConfig("read", slave, slave, profile)
    master = _open(port, baudrate, parity, stopbits)
    registers: dict[tuple[int, int], bytes] = {}
    try:
        for block in plan_meter(meter):
            request = P.ReadRequest(int(block.function), block.address, block.count)
            for attempt in range(retries + 1):
                try:
                    reply = await master.transact(slave, request, timeout)
                    break
                except ExceptionReply:
                    raise
                except TransactionError:
                    if attempt == retries:
                        raise
            for i in range(block.count):
                registers[(int(block.function), block.address + i)] = reply.payload[2 * i:2 * i + 2]
    finally:
        master.link.close()
    values = {}
    for m in profile.measurements:
        raw = b"".join(registers[(int(m.function), m.address + i)] for i in range(m.count))
        values[m.name] = codec.decoder(m.dtype, m.word_order)(raw) * m.scale
    return values


# ------------------------------------------------------------------ points list

def reference(function: int, address: int) -> str:
    """The 3xxxx/4xxxx register reference integrators use: 1-based, 6 digits above 9999."""
    base = 3 if function == P.READ_INPUT else 4
    number = address + 1
    return f"{base}{number:04d}" if number <= 9999 else f"{base}{number:05d}"


def points_rows(config: Config) -> list[dict]:
    rows = []
    namespace = config.opcua.namespace
    mqtt = config.mqtt
    sparkplug = mqtt.sparkplug if mqtt is not None else None
    json_topics = mqtt.json if mqtt is not None else None
    for seg in config.segments:
        for meter in seg.meters:
            for m in meter.profile.measurements:
                rows.append({
                    "meter": meter.name,
                    "measurement": m.name,
                    "segment": seg.name,
                    "slave": meter.slave,
                    "unit_id": meter.unit,
                    "function": int(m.function),
                    "address": m.address,
                    "reference": reference(int(m.function), m.address),
                    "registers": m.count,
                    "type": m.dtype.value,
                    "word_order": m.word_order.value,
                    "scale": m.scale,
                    "unit": m.unit,
                    "description": m.description,
                    "nodeid": f"nsu={namespace};s={meter.name}.{m.name}",
                    "browse_path": f"Objects/Meters/{meter.name}/{m.name}",
                    # where MQTT consumers find it: the Sparkplug device metric, the JSON topic and path
                    "sparkplug": (f"spBv1.0/{sparkplug.group_id}/DDATA/{sparkplug.edge_node_id}/{meter.name}"
                                  f" : {m.name}") if sparkplug is not None else "",
                    "json": f"{json_topics.topic}/{meter.name} : values.{m.name}" if json_topics is not None else "",
                })
    cmap = config.modbus_tcp.consolidated
    if cmap is not None:  # the same values again, as scaled float32 under the consolidated unit
        for k, meter in enumerate(config.meters):
            for j, m in enumerate(meter.profile.measurements):
                address = cmap.base + k * cmap.stride + 2 * j
                rows.append({**next(r for r in rows if r["meter"] == meter.name and r["measurement"] == m.name),
                             "segment": "(consolidated)", "unit_id": cmap.unit, "function": P.READ_INPUT,
                             "address": address, "reference": reference(P.READ_INPUT, address), "registers": 2,
                             "type": "float32", "word_order": "big", "scale": 1.0})
    rows += _virtual_rows(config)
    return rows


_VIRTUAL_UNITS = {"active_power": "W", "reactive_power": "var", "demand": "W"}
_VIRTUAL_NODES = {"demand": "Energy.Demand", "interval_end": "Energy.IntervalEnd", "interval_status": "Energy.Status"}
_VIRTUAL_SPARKPLUG = {"demand": "Energy/Demand", "interval_status": "Energy/Status"}


def _virtual_rows(config: Config) -> list[dict]:
    """The virtual meters with a unit of their own (``bridge.energy.modbus_map``): the values they carry,
    and where OPC UA and MQTT have the same."""
    rows = []
    namespace = config.opcua.namespace
    mqtt = config.mqtt
    sparkplug = mqtt.sparkplug if mqtt is not None else None
    json_topics = mqtt.json if mqtt is not None else None
    meters = {m.name: m for m in config.meters}
    for name, (quantities, v) in energy_meters(config).items():
        if v is None or v.unit is None:
            continue
        live = virtual_live([meters[t] for _, t in v.terms])
        has = {*live, *quantities, *(("demand",) if "import_active_energy" in quantities else ())}
        points = [(q, 2 * i, "float32", 2) for i, q in enumerate(FLOATS) if q in has]
        points += [("interval_end", END_REGISTER, "uint32", 2), ("interval_status", STATUS_REGISTER, "uint16", 1)]
        for q, address, dtype, count in points:
            camel = "".join(w.capitalize() for w in q.split("_"))
            node = camel if q in LIVE else _VIRTUAL_NODES.get(q, "Energy." + camel)
            metric = q if q in LIVE else _VIRTUAL_SPARKPLUG.get(q, "Energy/" + q)
            unit = _VIRTUAL_UNITS.get(q) or ("kvarh" if "reactive" in q else "kWh" if "energy" in q else "")
            json_at = (f"{name} : values.{q}" if q in LIVE else
                       f"{name}/energy : {'end' if q == 'interval_end' else 'status' if q == 'interval_status' else q}")
            rows.append({
                "meter": name, "measurement": q, "segment": "(virtual)", "slave": "", "unit_id": v.unit,
                "function": P.READ_INPUT, "address": address, "reference": reference(P.READ_INPUT, address),
                "registers": count, "type": dtype, "word_order": "big", "scale": 1.0, "unit": unit,
                "description": f"now: {v.formula}" if q in LIVE else f"last closed interval of {v.formula}",
                "nodeid": f"nsu={namespace};s={name}.{node}", "browse_path": f"Objects/Meters/{name}",
                "sparkplug": (f"spBv1.0/{sparkplug.group_id}/DDATA/{sparkplug.edge_node_id}/{name} : {metric}"
                              if sparkplug is not None and q != "interval_end" else ""),
                "json": f"{json_topics.topic}/{json_at}" if json_topics is not None else "",
            })
    return rows
