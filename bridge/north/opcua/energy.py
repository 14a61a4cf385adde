"""Interval energy in the OPC UA address space (docs/energy.md, docs/opcua.md): the last closed interval of every meter that
has energy counters and of every virtual meter, and the history of their intervals (OPC UA Part 11),
read from the energy store through the read model (``BridgeView.energy``), never from memory.

NodeIds, string identifiers in the bridge's namespace like the meters' own (``<meter>.<measurement>``):

=====================================  ==================================================================
``<meter>.Energy``                     object, a component of ``Meters/<meter>``
``<meter>.Energy.IntervalStart``       DateTime (UTC): start of the last closed interval
``<meter>.Energy.IntervalEnd``         DateTime (UTC): its end
``<meter>.Energy.Status``              String: complete | estimated | rollover | reset | missing
``<meter>.Energy.<Quantity>``          Double, kWh or kvar·h over that interval (AnalogItemType with
                                       EngineeringUnits), one per energy quantity the meter's intervals
                                       have: ImportActiveEnergy, ExportActiveEnergy, ImportReactiveEnergy,
                                       ExportReactiveEnergy, TotalActiveEnergy, TotalReactiveEnergy;
                                       Historizing
``<meter>.Energy.Demand``              Double, W: average active power drawn (import) over the interval;
                                       Historizing (only where the meter has ImportActiveEnergy)
``<virtual>``                          a virtual meter: an object under ``Meters`` with only the property
                                       ``<virtual>.Formula`` (String, as configured) and its ``Energy``
``<virtual>.ActivePower``              Double, W, live: the sum of its terms' active power (and
``<virtual>.ReactivePower``            ReactivePower, var, where every term has it); SourceTimestamp the
                                       oldest term's poll, StatusCode by the worst term's quality as for a
                                       meter's value (stale: UncertainLastUsableValue, offline:
                                       BadCommunicationError, never read: BadWaitingForInitialData)
``<virtual>.Energy.BalanceAlarm``      Boolean: the balance alarm is up (only with ``alarm:``)
``<virtual>.Energy.BalancePercent``    Double, %: the last balance as a signed share of the reference
=====================================  ==================================================================

The live variables change when a new interval closes (the side looks once a second). Their DataValues
carry SourceTimestamp = the interval's end and a StatusCode from its status (``STATUS_CODES``):
complete → Good; estimated, rollover, reset → UncertainSubNormal (the value is right but partly
derived: interpolated across a gap, or across a counter's wrap or reset); missing, or a quantity the
interval lacks → BadNoData. Before the first interval closes: BadWaitingForInitialData.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from asyncua import ua
from asyncua.server.address_space import NodeData
from asyncua.server.history import HistoryStorageInterface

from bridge.core.model import VirtualMeterConfig
from bridge.core.units import CEFACT_NAMESPACE, unit_for
from bridge.energy.types import COMPLETE, DEMAND_QUANTITY, ESTIMATED, MISSING, RESET, ROLLOVER, Interval
from bridge.north.opcua.nodes import ANALOG_ITEM_TYPE, HAS_COMPONENT, NodeBuilder
from bridge.view import BridgeView

log = logging.getLogger("bridge.opcua")

DEMAND = "demand"  # the history key of a Demand variable (the others are keyed by quantity)
MAX_SLOTS = 10_000  # interval slots one HistoryRead of one node looks at; a longer range is paged

_DT = ua.ObjectIds
_SC = ua.StatusCodes
LIVE_NODES = {"active_power": ("ActivePower", "W"), "reactive_power": ("ReactivePower", "var")}
LIVE_STATUS = {"good": ua.StatusCode(_SC.Good), "stale": ua.StatusCode(_SC.UncertainLastUsableValue),
               "offline": ua.StatusCode(_SC.BadCommunicationError)}  # unread: _WAITING
STATUS_CODES = {
    COMPLETE: ua.StatusCode(_SC.Good),
    ESTIMATED: ua.StatusCode(_SC.UncertainSubNormal),
    ROLLOVER: ua.StatusCode(_SC.UncertainSubNormal),
    RESET: ua.StatusCode(_SC.UncertainSubNormal),
    MISSING: ua.StatusCode(_SC.BadNoData),
}
_NO_DATA = ua.StatusCode(_SC.BadNoData)
_WAITING = ua.StatusCode(_SC.BadWaitingForInitialData)
_GOOD = ua.StatusCode(_SC.Good)
_NULL = ua.Variant(None, ua.VariantType.Null)
_EPOCH_1601 = datetime(1601, 1, 2, tzinfo=timezone.utc)  # at or before: "not specified" (DateTime 0)


def browse_name(quantity: str) -> str:
    """``import_active_energy`` → ``ImportActiveEnergy``."""
    return "".join(part.capitalize() for part in quantity.split("_"))


def energy_unit(quantity: str) -> str:
    return "kvarh" if "reactive" in quantity else "kWh"


# ------------------------------------------------------------------------------ the live nodes
@dataclass(eq=False)
class EnergyNodes:
    """One meter's ``Energy`` object and what its variables last showed."""

    meter: str
    key: tuple  # what was built from (quantities, virtual configuration): built anew when it changes
    root: ua.NodeId  # what a reload removes: the Energy object, or the whole virtual meter
    quantities: tuple[str, ...]
    variables: dict[str, NodeData]  # IntervalStart, IntervalEnd, Status, each quantity, DEMAND, the alarm's
    history: dict[ua.NodeId, str]  # NodeId -> quantity or DEMAND, for HistoryRead
    shown: Interval | None = None  # the interval shown (by identity)
    shown_alarm: tuple | None = None
    has_alarm: bool = False
    live: dict[str, NodeData] | None = None  # a virtual meter's live variables, by measurement
    shown_live: tuple | None = None

    async def show_live(self, values: Mapping[str, float | None], quality: str, ts: float | None,
                        now: datetime) -> None:
        """A virtual meter's live values (``VirtualMeterView``), where they changed."""
        shown = (tuple(values.items()), quality, ts)
        if not self.live or shown == self.shown_live:
            return
        self.shown_live = shown
        status = LIVE_STATUS.get(quality, _WAITING)
        source = _utc(ts) if ts is not None else now
        for q, var in self.live.items():
            value = values.get(q)
            await _write(var, _dv(value, ua.VariantType.Double, status if value is not None else _WAITING,
                                  source, now))

    @property
    def virtual(self) -> VirtualMeterConfig | None:
        return self.key[1]

    async def show(self, interval: Interval | None, alarm: Mapping[str, Any] | None, now: datetime) -> None:
        if interval is not None and interval is not self.shown:
            self.shown = interval
            end = _utc(interval.end)
            await _write(self.variables["IntervalStart"], _dv(_utc(interval.start), ua.VariantType.DateTime,
                                                              _GOOD, end, now))
            await _write(self.variables["IntervalEnd"], _dv(end, ua.VariantType.DateTime, _GOOD, end, now))
            await _write(self.variables["Status"], _dv(interval.status, ua.VariantType.String, _GOOD, end, now))
            status = STATUS_CODES.get(interval.status, _NO_DATA)
            for q in self.quantities:
                value = interval.energy.get(q)
                await _write(self.variables[q], _dv(value, ua.VariantType.Double,
                                                    status if value is not None else _NO_DATA, end, now))
            if DEMAND in self.variables:
                demand = interval.demand
                await _write(self.variables[DEMAND], _dv(demand, ua.VariantType.Double,
                                                           status if demand is not None else _NO_DATA, end, now))
        if self.has_alarm and alarm is not None:
            shown = (bool(alarm.get("active")), alarm.get("percent"))
            if shown != self.shown_alarm:
                self.shown_alarm = shown
                active, percent = shown
                await _write(self.variables["BalanceAlarm"], _dv(active, ua.VariantType.Boolean, _GOOD, now, now))
                await _write(self.variables["BalancePercent"],
                             _dv(percent, ua.VariantType.Double, _GOOD if percent is not None else _NO_DATA,
                                 now, now))


def build_energy(b: NodeBuilder, meters_folder: ua.NodeId, meter: str, quantities: tuple[str, ...],
                 virtual: VirtualMeterConfig | None, live: tuple[str, ...] = ()) -> EnergyNodes:
    """The ``Energy`` object of ``meter`` (whose object exists, unless it is ``virtual``: then its object too,
    with the ``live`` measurements)."""
    live_vars: dict[str, NodeData] = {}
    if virtual is not None:
        root = parent = b.object(meters_folder, meter, meter, f"Virtual meter: {virtual.formula}")
        b.property(parent, f"{meter}.Formula", "Formula", ua.Variant(virtual.formula, ua.VariantType.String),
                   _DT.String)
        for q in live:
            name, unit = LIVE_NODES[q]
            var = b.variable(parent, f"{meter}.{name}", name, _NULL, _DT.Double,
                             f"{name} now: {virtual.formula}, {unit}", type_def=ANALOG_ITEM_TYPE, status=_WAITING)
            b.property(var.nodeid, f"{meter}.{name}.EngineeringUnits", "EngineeringUnits",
                       ua.Variant(eu(unit), ua.VariantType.ExtensionObject), _DT.EUInformation, standard=True)
            live_vars[q] = var
    else:
        parent = b.nodeid(meter)
    ident = f"{meter}.Energy"
    node = b.object(parent, ident, "Energy", "The last closed energy interval; the intervals' history",
                    ref=HAS_COMPONENT)
    if virtual is None:
        root = node
    variables: dict[str, NodeData] = {}
    history: dict[ua.NodeId, str] = {}
    for name, datatype, description in (
        ("IntervalStart", _DT.DateTime, "Start of the last closed interval (UTC)"),
        ("IntervalEnd", _DT.DateTime, "End of the last closed interval (UTC)"),
        ("Status", _DT.String, "The last closed interval's status: complete, estimated, rollover, reset or missing"),
    ):
        variables[name] = b.variable(node, f"{ident}.{name}", name, _NULL, datatype, description, status=_WAITING)

    def analog(key: str, name: str, unit: str, description: str) -> None:
        var = b.variable(node, f"{ident}.{name}", name, _NULL, _DT.Double, description, type_def=ANALOG_ITEM_TYPE,
                         status=_WAITING, history=True)
        b.property(var.nodeid, f"{ident}.{name}.EngineeringUnits", "EngineeringUnits",
                   ua.Variant(eu(unit), ua.VariantType.ExtensionObject), _DT.EUInformation, standard=True)
        variables[key] = var
        history[var.nodeid] = key

    for q in quantities:
        unit = energy_unit(q)
        analog(q, browse_name(q), unit, f"{q.replace('_', ' ').capitalize()} over the interval, {unit}")
    if DEMAND_QUANTITY in quantities:
        analog(DEMAND, "Demand", "W", "Average active power drawn (import) over the interval, W")
    has_alarm = virtual is not None and virtual.alarm is not None
    if has_alarm:
        variables["BalanceAlarm"] = b.variable(
            node, f"{ident}.BalanceAlarm", "BalanceAlarm", _NULL, _DT.Boolean,
            f"True while the balance stays above {virtual.alarm.above_percent:g} % of {virtual.alarm.reference} "
            f"for {virtual.alarm.intervals} interval(s) in a row", status=_WAITING)
        variables["BalancePercent"] = b.variable(
            node, f"{ident}.BalancePercent", "BalancePercent", _NULL, _DT.Double,
            f"The last interval's balance as a signed percentage of {virtual.alarm.reference}", status=_WAITING)
        b.property(variables["BalancePercent"].nodeid, f"{ident}.BalancePercent.EngineeringUnits",
                   "EngineeringUnits", ua.Variant(eu("%"), ua.VariantType.ExtensionObject), _DT.EUInformation,
                   standard=True)
    return EnergyNodes(meter, (quantities, virtual, live), root, quantities, variables, history,
                       has_alarm=has_alarm, live=live_vars)


def eu(symbol: str) -> ua.EUInformation:
    unit = unit_for(symbol)
    assert unit is not None, symbol
    return ua.EUInformation(NamespaceUri=CEFACT_NAMESPACE, UnitId=unit.unit_id,
                            DisplayName=ua.LocalizedText(unit.symbol), Description=ua.LocalizedText(unit.name))


# ------------------------------------------------------------------------------ history
class EnergyHistory(HistoryStorageInterface):
    """asyncua's history storage for one server: the energy variables' history from the energy store
    (``view.energy.intervals``); every other node is left to the storage asyncua had (``fallback``).

    HistoryRead with ReadRawModifiedDetails (IsReadModified is answered alike: intervals are never
    modified) on a quantity or Demand variable returns one DataValue per closed interval whose END lies
    within [StartTime, EndTime] (both inclusive): Value = the interval's energy (Double, kWh/kvarh) or
    demand (W), SourceTimestamp = ServerTimestamp = the interval's end, StatusCode by the interval's
    status as for the live value (complete → Good; estimated, rollover, reset → UncertainSubNormal).

    - Missing slots are skipped, as is an interval without that quantity: raw history holds what was
      recorded, and a gap in it is the absence of values (a client sees it from the timestamps).
    - Order: StartTime < EndTime oldest first; StartTime > EndTime newest first; StartTime not given:
      newest first back from EndTime; EndTime not given: oldest first from StartTime on. Neither given:
      no values. ReturnBounds is ignored (interval ends are the natural raw points; no bounding values).
    - NumValuesPerNode is honoured: when more values remain, the ContinuationPoint is the timestamp of
      the next one (asyncua hands it back as the next read's StartTime), except when StartTime was not
      given (a continued read would run forwards): then the values beyond NumValuesPerNode are dropped.
    - One read looks at no more than ``MAX_SLOTS`` slots and never before the store's retention: a longer
      range comes in pages, each with a ContinuationPoint (a page may be empty).
    - The current, still open interval is never part of it (not in the store yet).
    A failure of the store answers the request with BadInternalError.
    """

    def __init__(self, view: BridgeView, nodes: Mapping[ua.NodeId, tuple[str, str]],
                 retention_days: Callable[[], int], fallback: HistoryStorageInterface):
        super().__init__()
        self.view = view
        self.nodes = nodes  # NodeId -> (meter, quantity or DEMAND); updated in place by reloads
        self.retention_days = retention_days
        self.fallback = fallback

    # --- everything not ours goes where it went before
    async def init(self) -> None:
        await self.fallback.init()

    async def new_historized_node(self, node_id, period, count=0) -> None:
        await self.fallback.new_historized_node(node_id, period, count)

    async def save_node_value(self, node_id, datavalue) -> None:
        await self.fallback.save_node_value(node_id, datavalue)

    async def new_historized_event(self, source_id, evtypes, period, count=0) -> None:
        await self.fallback.new_historized_event(source_id, evtypes, period, count)

    async def save_event(self, event) -> None:
        await self.fallback.save_event(event)

    async def read_event_history(self, source_id, start, end, nb_values, evfilter):
        return await self.fallback.read_event_history(source_id, start, end, nb_values, evfilter)

    async def stop(self) -> None:
        await self.fallback.stop()

    # --- ours
    async def read_node_history(self, node_id: ua.NodeId, start: datetime | None, end: datetime | None,
                                nb_values: int) -> tuple[list[ua.DataValue], datetime | None]:
        what = self.nodes.get(node_id)
        if what is None:
            return await self.fallback.read_node_history(node_id, start, end, nb_values)
        energy = self.view.energy
        if energy is None:
            return [], None
        meter, key = what
        try:
            return await read_history(energy, meter, key, _epoch(start), _epoch(end), nb_values,
                                      time.time(), self.retention_days())
        except Exception as exc:  # noqa: BLE001 - a store that cannot be read: one line, and the request fails
            log.warning("OPC UA: history of %s %s: cannot read the energy store: %s", meter, key, exc)
            raise ua.UaStatusCodeError(_SC.BadInternalError) from None


async def read_history(energy: Any, meter: str, key: str, start: float | None, end: float | None,
                       nb_values: int, now: float, retention_days: int
                       ) -> tuple[list[ua.DataValue], datetime | None]:
    """See ``EnergyHistory``: ``start``/``end`` in UTC epoch seconds, None when not given."""
    step = int(energy.interval_s)
    if start is None and end is None:
        return [], None
    # the range of interval ends [lo, hi], which way to read, and whether a continued read would go on
    if start is None:  # newest first, back from ``end``
        lo, hi, backwards, can_continue = -math.inf, end, True, False
    elif end is None:  # oldest first, from ``start`` on
        lo, hi, backwards, can_continue = start, now, False, True
    elif start > end:
        lo, hi, backwards, can_continue = end, start, True, True
    else:
        lo, hi, backwards, can_continue = start, end, False, True
    # the ends that can hold a closed interval: within retention, not in the future
    floor = now - (retention_days + 1) * 86400.0
    first = math.ceil(max(lo, floor) / step) * step
    last = math.floor(min(hi, now) / step) * step
    if first > last:
        return [], None
    # one page of at most MAX_SLOTS slots, from the side the read starts at
    if backwards:
        page_first, page_last = max(first, last - (MAX_SLOTS - 1) * step), last
        more = page_first > first and can_continue
        next_page = page_first - step
    else:
        page_first, page_last = first, min(last, first + (MAX_SLOTS - 1) * step)
        more = page_last < last
        next_page = page_last + step
    intervals = await energy.intervals(meter, page_first - step, page_last - step + 1)
    values = []
    for interval in intervals:
        if not page_first <= interval.end <= page_last or interval.status == MISSING:
            continue
        value = interval.demand if key == DEMAND else interval.energy.get(key)
        if value is None:
            continue
        stamp = _utc(interval.end)
        values.append(ua.DataValue(ua.Variant(float(value), ua.VariantType.Double),
                                   StatusCode=STATUS_CODES.get(interval.status, _NO_DATA),
                                   SourceTimestamp=stamp, ServerTimestamp=stamp))
    if backwards:
        values.reverse()
    if nb_values and len(values) > nb_values:
        cont = values[nb_values].SourceTimestamp if can_continue else None
        return values[:nb_values], cont
    return values, _utc(next_page) if more else None


# ------------------------------------------------------------------------------ helpers
def _epoch(t: datetime | None) -> float | None:
    """A HistoryRead time as UTC epoch seconds; None when not given (DateTime 0, the year 1601)."""
    if t is None:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    if t <= _EPOCH_1601:
        return None
    return t.timestamp()


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def _dv(value: Any, vtype: ua.VariantType, status: ua.StatusCode, source: datetime, now: datetime) -> ua.DataValue:
    variant = _NULL if value is None else ua.Variant(float(value) if vtype is ua.VariantType.Double else value, vtype)
    return ua.DataValue(variant, StatusCode=status, SourceTimestamp=source, ServerTimestamp=now)


async def _write(node: NodeData, dv: ua.DataValue) -> None:
    attr = node.attributes[ua.AttributeIds.Value]
    attr.value = dv
    for handle, callback in list(attr.datachange_callbacks.items()):
        await callback(handle, dv)

