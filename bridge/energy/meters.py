"""Which meters have energy intervals, and of what (pure): the one rule the recorder, the OPC UA side,
the MQTT side and the command line all follow."""
from __future__ import annotations

from collections.abc import Sequence

from bridge.core.model import Config, Measurement, MeterConfig, VirtualMeterConfig
from bridge.energy.types import QUANTITIES, Counter

# what a virtual meter has live: the measurements that add up across meters (W and var do; A, V, VA and
# power factors do not), where every term has them
VIRTUAL_LIVE = ("active_power", "reactive_power")


def counters_of(meter: MeterConfig) -> dict[str, Counter]:
    """The meter's energy counters and how each counts (an integer register wraps at its width)."""
    out = {}
    for m in meter.profile.measurements:
        if m.name in QUANTITIES:
            if m.dtype.is_float:
                out[m.name] = Counter(None, 0.0)
            else:
                bits = 16 * m.dtype.registers
                out[m.name] = Counter(float(2 ** bits) * m.scale, abs(m.scale))
    return out


def quantities_of(meter: MeterConfig) -> tuple[str, ...]:
    """The energy quantities of a meter's intervals, in the standard order."""
    counters = counters_of(meter)
    return tuple(q for q in QUANTITIES if q in counters)


def energy_meters(config: Config) -> dict[str, tuple[tuple[str, ...], VirtualMeterConfig | None]]:
    """Meter name -> (its energy quantities, its virtual meter configuration or None), in order: the meters
    whose profile has energy counters, then the virtual meters all of whose terms are among them, with
    the quantities every term has. Empty while interval energy is off."""
    if config.energy is None:
        return {}
    out: dict[str, tuple[tuple[str, ...], VirtualMeterConfig | None]] = {}
    for meter in config.meters:
        quantities = quantities_of(meter)
        if quantities:
            out[meter.name] = (quantities, None)
    real = dict(out)
    for v in config.energy.virtual:
        if v.terms and all(t in real for _, t in v.terms):
            common = set.intersection(*(set(real[t][0]) for _, t in v.terms))
            out[v.name] = (tuple(q for q in QUANTITIES if q in common), v)
    return out


def virtual_live(terms: Sequence[MeterConfig]) -> tuple[str, ...]:
    """What a virtual meter over meters ``terms`` has live: the ``VIRTUAL_LIVE`` measurements they all have."""
    have = [{m.name for m in meter.profile.measurements} for meter in terms]
    return tuple(q for q in VIRTUAL_LIVE if have and all(q in h for h in have))


def virtual_measurements(terms: Sequence[MeterConfig]) -> tuple[Measurement, ...]:
    """The live measurements of a virtual meter over ``terms``, each its first term's (name, unit, digits)."""
    first = {m.name: m for m in terms[0].profile.measurements} if terms else {}
    return tuple(first[q] for q in virtual_live(terms))
