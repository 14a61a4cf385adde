"""A virtual meter as a Modbus TCP unit (``energy.virtual[].unit``): one fixed register map (pure).

Big-endian float32 (ABCD), the same for FC3 and FC4, NaN where a value is unknown:

====  ==========================================================
0     active_power now, W (Σ sign × the terms' last values)
2     reactive_power now, var
4     the last closed interval: import_active_energy, kWh
6     … export_active_energy, kWh
8     … import_reactive_energy, kvarh
10    … export_reactive_energy, kvarh
12    … total_active_energy, kWh
14    … total_reactive_energy, kvarh
16    … demand (average active power drawn), W
18    … end: uint32, UTC epoch seconds (0: no interval yet)
20    … status: uint16, 0 complete, 1 estimated, 2 rollover, 3 reset, 4 missing (0xFFFF: none yet)
====  ==========================================================
"""
from __future__ import annotations

import math
import struct
from collections.abc import Mapping

from bridge.energy.meters import VIRTUAL_LIVE
from bridge.energy.types import QUANTITIES, STATUSES, Interval

LIVE = VIRTUAL_LIVE  # registers 0 and 2, whether or not a given virtual meter has both
FLOATS = (*LIVE, *QUANTITIES, "demand")  # float32 each, from register 0 on
END_REGISTER = 2 * len(FLOATS)  # 18
STATUS_REGISTER = END_REGISTER + 2  # 20
REGISTERS = STATUS_REGISTER + 1  # 21
NO_STATUS = 0xFFFF

_F32 = struct.Struct(">f")


def _float32(value: float | None) -> bytes:
    if value is None:
        return _F32.pack(math.nan)
    try:
        return _F32.pack(value)
    except OverflowError:  # beyond float32: say so rather than a wrong number
        return _F32.pack(math.copysign(math.inf, value))


def virtual_registers(live: Mapping[str, float | None], interval: Interval | None) -> bytes:
    """The whole map (``REGISTERS`` registers): ``live`` power by name, the last closed ``interval``."""
    values: dict[str, float | None] = dict(live)
    if interval is not None:
        values.update(interval.energy)
        values["demand"] = interval.demand
    out = b"".join(_float32(values.get(name)) for name in FLOATS)
    end = interval.end if interval is not None else 0
    status = STATUSES.index(interval.status) if interval is not None else NO_STATUS
    return out + struct.pack(">IH", end & 0xFFFFFFFF, status)
