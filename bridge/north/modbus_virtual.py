"""Virtual meters with a unit id of their own (``energy.virtual[].unit``) on the Modbus TCP server.

Their registers (``bridge.energy.modbus_map``) are made per request from the image (the terms' live
power) and the energy store's last closed interval: a virtual unit is read rarely, and a sum kept up
to date on every block of every term would cost the serial side for nothing. Like a meter's, a virtual
unit answers only while it is fresh: all its terms fresh, else exception 0x0B."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from bridge.core import pdu as P
from bridge.core.image import Health, RegisterImage
from bridge.core.model import Measurement, MeterConfig, VirtualMeterConfig
from bridge.energy.meters import virtual_live
from bridge.energy.modbus_map import REGISTERS, virtual_registers
from bridge.energy.types import Interval

LastInterval = Callable[[str], Interval | None]  # a meter's last closed interval, from the energy side


class VirtualUnits:
    def __init__(self, virtual: Sequence[VirtualMeterConfig], meters: Sequence[MeterConfig], image: RegisterImage,
                 last: LastInterval):
        by_name = {m.name: m for m in meters}
        self.image, self.last = image, last
        # unit -> (virtual meter, its terms as (sign, meter), its live quantities as [(sign, meter, Measurement)])
        self.units: dict[int, tuple[VirtualMeterConfig, list[tuple[int, MeterConfig]],
                                    dict[str, list[tuple[int, MeterConfig, Measurement]]]]] = {}
        for v in virtual:
            if v.unit is None or not all(t in by_name for _, t in v.terms):
                continue
            terms = [(sign, by_name[t]) for sign, t in v.terms]
            live = {q: [(sign, m, next(x for x in m.profile.measurements if x.name == q)) for sign, m in terms]
                    for q in virtual_live([m for _, m in terms])}
            self.units[v.unit] = (v, terms, live)

    def __contains__(self, unit: int) -> bool:
        return unit in self.units

    def read(self, unit: int, request: P.ReadRequest) -> bytes:
        """The registers, or the PduException a meter's unit would give: 0x02 outside the map, 0x0B
        while a term is not fresh."""
        v, terms, live = self.units[unit]
        if request.address + request.count > REGISTERS:
            raise P.PduException(request.function, P.ILLEGAL_DATA_ADDRESS)
        for _, meter in terms:
            u = self.image.unit(meter.unit)
            if u is None or u.meter != meter or self.image.health(meter.unit) is not Health.FRESH:
                raise P.PduException(request.function, P.GATEWAY_TARGET_FAILED)
        values = {}
        for q, parts in live.items():
            total = 0.0
            for sign, meter, m in parts:
                raw = self.image.value_registers(meter.unit, m.function, m.address, m.count)
                total += sign * m.value(raw)
            values[q] = total
        data = virtual_registers(values, self.last(v.name))
        return data[2 * request.address: 2 * (request.address + request.count)]
