"""The Sparkplug B edge node session (bridge.core.sparkplug), checked against Sparkplug 3.0.

Every payload is decoded with the generated protobuf module and read field by field; each test's
docstring names the specification's requirements (tck-id-…) it covers. The table of all edge node
requirements and their tests is in docs/mqtt.md.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from bridge.core import sparkplug_b_pb2 as pb
from bridge.core.codec import DataType, Function, WordOrder
from bridge.core.model import Measurement, SparkplugConfig
from bridge.core.mqtt_types import MeterSample, Publish
from bridge.core.sparkplug import (
    QUALITY_GOOD, QUALITY_STALE, REBIRTH, EdgeNode, next_bd_seq,
)

ROOT = Path(__file__).resolve().parent.parent
GROUP, NODE = "site-a", "panel-7"
T0 = 1_764_000_000_000  # ms since the epoch


def meas(name: str, unit: str) -> Measurement:
    return Measurement(name, 0, DataType.FLOAT32, Function.INPUT, WordOrder.BIG, unit=unit)


VOLTS, AMPS, ENERGY, PF = meas("Voltage L1", "V"), meas("Current L1", "A"), meas("Energy", "kWh"), meas("PF", "")
M1 = SimpleNamespace(name="m1", profile=SimpleNamespace(measurements=(VOLTS, AMPS, ENERGY)))
M2 = SimpleNamespace(name="m2", profile=SimpleNamespace(measurements=(VOLTS, PF)))


def cfg(**kw) -> SparkplugConfig:
    return SparkplugConfig(group_id=GROUP, edge_node_id=NODE, **kw)


def sample(name: str, quality: str = "good", ts: int | None = T0, **values) -> MeterSample:
    meter = {"m1": M1, "m2": M2}[name]
    default = {"Voltage L1": 230.0, "Current L1": 1.5, "Energy": 1234.5, "PF": 0.98}
    vals = tuple((m, None if ts is None else values.get(m.name.replace(" ", "_"), default[m.name]))
                 for m in meter.profile.measurements)
    return MeterSample(name, quality, ts, vals)


def decode(p: Publish) -> pb.Payload:
    return pb.Payload.FromString(p.payload)


def kind(p: Publish) -> str:
    return p.topic.split("/")[2]


def by_name(payload: pb.Payload) -> dict[str, pb.Payload.Metric]:
    return {m.name: m for m in payload.metrics}


def prop(metric: pb.Payload.Metric, key: str) -> pb.Payload.PropertyValue | None:
    props = metric.properties
    assert len(props.keys) == len(props.values)
    return dict(zip(props.keys, props.values)).get(key)


def value(metric: pb.Payload.Metric):
    field = metric.WhichOneof("value")
    return None if field is None else getattr(metric, field)


def started(node_cfg: SparkplugConfig | None = None, bd_seq: int = 0, samples=None, node_metrics=None,
            meters=(M1, M2)) -> tuple[EdgeNode, list[Publish]]:
    node = EdgeNode(node_cfg or cfg(), list(meters))
    node.will(bd_seq)
    births = node.online(bd_seq, T0 + 5, samples if samples is not None else [sample("m1"), sample("m2")],
                         node_metrics or {"Segments/bus1/Utilisation": (0.25, pb.Double)})
    return node, births


def seqs(messages: list[Publish]) -> list[int]:
    return [decode(p).seq for p in messages]


# ----------------------------------------------------------------------------- the payload schema

def test_schema_is_the_standard_one():
    """The checked-in generated module matches bridge/core/sparkplug_b.proto, and encodes like any
    Sparkplug B peer: an NDEATH's bytes as written out by hand from the standard's field numbers.
    (tck-id-message-flow-edge-node-birth-publish-will-message-payload,
    tck-id-message-flow-edge-node-birth-publish-nbirth-payload,
    tck-id-message-flow-device-birth-publish-dbirth-payload: Sparkplug Google Protobuf encoding)"""
    text = (ROOT / "bridge/core/sparkplug_b.proto").read_text()
    declared = Counter(re.findall(r"^\s*(?:optional|repeated)?\s*[\w.]+\s+(\w+)\s*=\s*(\d+);", text, re.M))
    declared = Counter({(n, int(v)): c for (n, v), c in declared.items() if not n[0].isupper()})

    def fields(desc):
        for f in desc.fields:
            yield f.name, f.number
        for nested in desc.nested_types:
            yield from fields(nested)

    assert Counter(fields(pb.Payload.DESCRIPTOR)) == declared
    assert dict(pb.DataType.items())["Double"] == 10 and dict(pb.DataType.items())["DateTimeArray"] == 34
    node = EdgeNode(cfg(), [])
    # Payload.metrics (2) { name (1) "bdSeq", datatype (4) = 4 Int64, long_value (11) = 3 }
    assert node.will(3).payload == b"\x12\x0b\x0a\x05bdSeq\x20\x04\x58\x03"


# ---------------------------------------------------------------------------------------- topics

def test_topics_follow_the_namespace():
    """tck-id-topic-structure, tck-id-topic-structure-namespace-a, tck-id-topics-nbirth-topic,
    tck-id-topics-ndata-topic, tck-id-topics-ndeath-topic, tck-id-topics-ncmd-topic,
    tck-id-topics-dbirth-topic, tck-id-topics-ddata-topic, tck-id-topics-ddeath-topic,
    tck-id-topics-dcmd-topic, tck-id-topic-structure-namespace-device-id-associated-message-types,
    tck-id-topic-structure-namespace-device-id-non-associated-message-types,
    tck-id-message-flow-edge-node-birth-publish-nbirth-topic,
    tck-id-message-flow-device-birth-publish-dbirth-topic,
    tck-id-message-flow-device-birth-publish-dbirth-match-edge-node-topic"""
    node, births = started()
    assert [p.topic for p in births] == [
        "spBv1.0/site-a/NBIRTH/panel-7", "spBv1.0/site-a/DBIRTH/panel-7/m1", "spBv1.0/site-a/DBIRTH/panel-7/m2"]
    assert node.will(0).topic == "spBv1.0/site-a/NDEATH/panel-7"
    assert node.node_topic("NDATA") == "spBv1.0/site-a/NDATA/panel-7"
    assert node.node_topic("NCMD") == "spBv1.0/site-a/NCMD/panel-7"
    assert node.device_topic("DDATA", "m1") == "spBv1.0/site-a/DDATA/panel-7/m1"
    assert node.device_topic("DDEATH", "m1") == "spBv1.0/site-a/DDEATH/panel-7/m1"
    assert node.device_topic("DCMD", "m1") == "spBv1.0/site-a/DCMD/panel-7/m1"


@pytest.mark.parametrize("group, edge, meter", [
    ("site/a", NODE, "m1"), ("site+a", NODE, "m1"), (GROUP, "panel#7", "m1"), (GROUP, "", "m1"),
    (GROUP, NODE, "m/1"), (GROUP, NODE, "m+"), (GROUP, NODE, ""),
])
def test_identifiers_with_reserved_characters_are_refused(group, edge, meter):
    """tck-id-topic-structure-namespace-valid-group-id, tck-id-topic-structure-namespace-valid-edge-node-id,
    tck-id-topic-structure-namespace-valid-device-id, tck-id-intro-group-id-chars,
    tck-id-intro-edge-node-id-chars, tck-id-intro-device-id-chars"""
    meter_like = SimpleNamespace(name=meter, profile=SimpleNamespace(measurements=()))
    with pytest.raises(ValueError):
        EdgeNode(SparkplugConfig(group_id=group, edge_node_id=edge), [meter_like])


def test_device_ids_are_unique_per_edge_node():
    """tck-id-topic-structure-namespace-unique-device-id"""
    with pytest.raises(ValueError, match="twice"):
        EdgeNode(cfg(), [M1, M1])


def test_subscriptions():
    """tck-id-message-flow-edge-node-ncmd-subscribe (NCMD, QoS 1),
    tck-id-message-flow-device-dcmd-subscribe (DCMD, QoS 1: the writes are refused, and logged),
    tck-id-operational-behavior-primary-application-state-with-multiple-servers-state-subs (STATE)"""
    assert EdgeNode(cfg(), [M1]).subscriptions() == [
        ("spBv1.0/site-a/NCMD/panel-7", 1), ("spBv1.0/site-a/DCMD/panel-7/+", 1)]
    assert EdgeNode(cfg(primary_host="scada-1"), [M1]).subscriptions()[-1] == ("spBv1.0/STATE/scada-1", 1)
    assert EdgeNode(cfg(primary_host="scada-1", state_v22=True), [M1]).subscriptions()[-1] == ("STATE/scada-1", 1)


# ---------------------------------------------------------------------------------------- NDEATH

def test_will_is_the_ndeath_with_only_bdseq():
    """tck-id-message-flow-edge-node-birth-publish-will-message-topic,
    tck-id-message-flow-edge-node-birth-publish-will-message-payload-bdSeq (Int64),
    tck-id-message-flow-edge-node-birth-publish-will-message-qos (1),
    tck-id-message-flow-edge-node-birth-publish-will-message-will-retained (false),
    tck-id-payloads-ndeath-will-message-qos, tck-id-payloads-ndeath-will-message-retain,
    tck-id-topics-ndeath-payload (only bdSeq), tck-id-topics-ndeath-seq, tck-id-payloads-ndeath-seq
    (no seq), tck-id-payloads-sequence-num-always-included (except NDEATH)"""
    node = EdgeNode(cfg(), [M1])
    will = node.will(7)
    assert (will.qos, will.retain) == (1, False)
    payload = decode(will)
    assert not payload.HasField("seq") and not payload.HasField("timestamp")
    [metric] = payload.metrics
    assert (metric.name, metric.datatype, value(metric)) == ("bdSeq", pb.Int64, 7)
    assert not metric.HasField("alias")
    # the NDEATH published before an intentional disconnect carries the time it was sent
    clean = decode(node.will(7, now_ms=T0))
    assert clean.timestamp == T0 and not clean.HasField("seq") and [m.name for m in clean.metrics] == ["bdSeq"]


def test_bdseq_starts_at_zero_and_wraps():
    """tck-id-topics-nbirth-bdseq-increment,
    tck-id-message-flow-edge-node-birth-publish-will-message-payload-bdSeq (0..255, wraps to 0)"""
    assert [next_bd_seq(None), next_bd_seq(0), next_bd_seq(41), next_bd_seq(255)] == [0, 1, 42, 0]
    with pytest.raises(ValueError):
        EdgeNode(cfg(), []).will(256)


# ---------------------------------------------------------------------------------------- NBIRTH

def test_nbirth():
    """tck-id-topics-nbirth-mqtt, tck-id-payloads-nbirth-qos, tck-id-payloads-nbirth-retain,
    tck-id-message-flow-edge-node-birth-publish-nbirth-qos, -nbirth-retained, -nbirth-payload-seq,
    tck-id-message-flow-edge-node-birth-publish-nbirth-payload-bdSeq, tck-id-topics-nbirth-seq-num,
    tck-id-payloads-nbirth-seq, tck-id-payloads-sequence-num-zero-nbirth, tck-id-topics-nbirth-timestamp,
    tck-id-payloads-nbirth-timestamp, tck-id-topics-nbirth-bdseq-included, tck-id-topics-nbirth-bdseq-matching,
    tck-id-payloads-nbirth-bdseq, tck-id-payloads-nbirth-bdseq-repeat, tck-id-payloads-ndeath-bdseq,
    tck-id-topics-nbirth-rebirth-metric, tck-id-payloads-nbirth-rebirth-req,
    tck-id-operational-behavior-data-commands-rebirth-name, -rebirth-datatype, -rebirth-value,
    -rebirth-name-aliases, tck-id-topics-nbirth-metrics, tck-id-topics-nbirth-metric-reqs,
    tck-id-operational-behavior-data-publish-nbirth, -nbirth-values, tck-id-payloads-name-birth-data-requirement,
    tck-id-payloads-metric-datatype-req, tck-id-payloads-metric-datatype-value,
    tck-id-payloads-alias-birth-requirement"""
    node, births = started(bd_seq=42, node_metrics={
        "Segments/bus1/Utilisation": (0.25, pb.Double), "Segments/bus1/Requests": (1000, pb.Int64),
        "Meters online": (2, pb.Int32), "Segments/bus1/Cycle time": (None, pb.Double)})
    nbirth = births[0]
    assert kind(nbirth) == "NBIRTH" and (nbirth.qos, nbirth.retain) == (0, False)
    payload = decode(nbirth)
    assert payload.seq == 0 and payload.timestamp == T0 + 5
    metrics = by_name(payload)
    assert value(metrics["bdSeq"]) == 42 and metrics["bdSeq"].datatype == pb.Int64
    assert [m.long_value for m in decode(node.will(42)).metrics] == [42]
    rebirth = metrics[REBIRTH]
    assert rebirth.datatype == pb.Boolean and rebirth.WhichOneof("value") == "boolean_value"
    assert rebirth.boolean_value is False and not rebirth.HasField("alias")
    assert value(metrics["Segments/bus1/Utilisation"]) == 0.25
    assert metrics["Segments/bus1/Requests"].long_value == 1000 and metrics["Meters online"].int_value == 2
    assert metrics["Segments/bus1/Cycle time"].is_null and value(metrics["Segments/bus1/Cycle time"]) is None
    for m in payload.metrics:
        assert m.name and m.HasField("datatype") and m.timestamp == T0 + 5
        assert m.datatype in pb.DataType.values()
        assert m.is_null or value(m) is not None
        assert m.HasField("alias") == (m.name != REBIRTH)


# ---------------------------------------------------------------------------------------- DBIRTH

def test_dbirth_has_every_measurement_with_unit_and_value():
    """tck-id-topics-dbirth-mqtt, tck-id-payloads-dbirth-qos, tck-id-payloads-dbirth-retain,
    tck-id-message-flow-device-birth-publish-dbirth-qos, -dbirth-retained, -dbirth-payload-seq,
    tck-id-message-flow-device-birth-publish-nbirth-wait, tck-id-payloads-dbirth-order,
    tck-id-topics-dbirth-seq, tck-id-payloads-dbirth-seq, tck-id-payloads-dbirth-seq-inc,
    tck-id-topics-dbirth-timestamp, tck-id-payloads-dbirth-timestamp, tck-id-topics-dbirth-metric-reqs,
    tck-id-topics-dbirth-metrics, tck-id-operational-behavior-data-publish-dbirth, -dbirth-values,
    tck-id-payloads-metric-propertyvalue-type-type, -type-value, -type-req,
    tck-id-payloads-propertyset-keys-array-size, tck-id-payloads-propertyset-values-array-size"""
    _, births = started(samples=[sample("m1", ts=T0 - 300, Voltage_L1=231.5), sample("m2", ts=T0 - 200)])
    assert [kind(p) for p in births] == ["NBIRTH", "DBIRTH", "DBIRTH"]
    assert seqs(births) == [0, 1, 2]
    dbirth = births[1]
    assert (dbirth.qos, dbirth.retain) == (0, False)
    payload = decode(dbirth)
    assert payload.timestamp == T0 + 5
    assert [m.name for m in payload.metrics] == ["Voltage L1", "Current L1", "Energy"]
    metrics = by_name(payload)
    assert value(metrics["Voltage L1"]) == 231.5 and value(metrics["Energy"]) == 1234.5
    for m, unit in zip(payload.metrics, ["V", "A", "kWh"]):
        assert m.datatype == pb.Double and m.timestamp == T0 - 300 and m.HasField("alias")
        eng = prop(m, "engUnit")
        assert eng.type == pb.String and eng.string_value == unit
        assert prop(m, "Quality") is None  # GOOD is the default
    pf = by_name(decode(births[2]))["PF"]
    assert prop(pf, "engUnit") is None and pf.timestamp == T0 - 200


def test_never_read_meter_is_born_with_null_metrics():
    """tck-id-operational-behavior-data-publish-dbirth-values (is_null and no value when the current
    value is null), tck-id-payloads-name-birth-data-requirement (a timestamp all the same)"""
    _, births = started(samples=[sample("m1", quality="unread", ts=None)], meters=(M1,))
    payload = decode(births[1])
    assert len(payload.metrics) == 3
    for m in payload.metrics:
        assert m.is_null and m.WhichOneof("value") is None
        assert m.datatype == pb.Double and m.timestamp == T0 + 5 and prop(m, "engUnit") is not None


def test_stale_meter_is_born_with_quality_stale():
    """tck-id-payloads-propertyset-quality-value-type (Int32),
    tck-id-payloads-propertyset-quality-value-value (500)"""
    _, births = started(samples=[sample("m1", quality="stale", ts=T0 - 60_000)], meters=(M1,))
    for m in decode(births[1]).metrics:
        quality = prop(m, "Quality")
        assert quality.type == pb.Int32 and quality.WhichOneof("value") == "int_value"
        assert quality.int_value == QUALITY_STALE and m.timestamp == T0 - 60_000 and value(m) is not None


def test_offline_meter_is_not_born_until_it_answers():
    """tck-id-operational-behavior-device-ddeath (an unreachable device is not reported alive);
    a device that answers again is born again, complete (tck-id-topics-dbirth-metric-reqs)"""
    node, births = started(samples=[sample("m1"), sample("m2", quality="offline", ts=T0 - 99_000)])
    assert [p.topic.rsplit("/", 1)[-1] for p in births[1:]] == ["m1"]
    [dbirth] = node.sample(sample("m2", ts=T0 + 1000, PF=0.5), T0 + 1001)
    assert kind(dbirth) == "DBIRTH" and decode(dbirth).seq == 2
    metrics = by_name(decode(dbirth))
    assert set(metrics) == {"Voltage L1", "PF"} and value(metrics["PF"]) == 0.5


# ----------------------------------------------------------------------------------------- aliases

def test_aliases_are_unique_and_stable_across_rebirths():
    """tck-id-payloads-alias-uniqueness, tck-id-payloads-alias-birth-requirement,
    tck-id-operational-behavior-data-commands-rebirth-name-aliases"""
    node, births = started()

    def aliases(messages):
        return {(p.topic, m.name): m.alias for p in messages for m in decode(p).metrics if m.HasField("alias")}

    first = aliases(births)
    assert len(set(first.values())) == len(first) == 1 + 1 + 3 + 2  # bdSeq, node metric, m1, m2
    rebirth, _ = node.command(node.node_topic("NCMD"), _ncmd(REBIRTH, True), T0 + 10)
    assert aliases(rebirth) == first


def test_without_aliases_metrics_go_by_name():
    """tck-id-payloads-name-requirement (the name in every metric when aliases are not used)"""
    node, births = started(node_cfg=cfg(aliases=False))
    assert all(not m.HasField("alias") for p in births for m in decode(p).metrics)
    [ddata] = node.sample(sample("m1", ts=T0 + 1000, Voltage_L1=229.0), T0 + 1001)
    [metric] = decode(ddata).metrics
    assert metric.name == "Voltage L1" and not metric.HasField("alias") and value(metric) == 229.0


# ----------------------------------------------------------------------------------------- DDATA

def test_ddata_reports_by_exception():
    """tck-id-principles-rbe-recommended, tck-id-operational-behavior-data-publish-dbirth-change,
    tck-id-topics-ddata-payload, tck-id-topics-ddata-mqtt, tck-id-payloads-ddata-qos,
    tck-id-payloads-ddata-retain, tck-id-topics-ddata-seq-num, tck-id-payloads-ddata-seq,
    tck-id-payloads-ddata-seq-inc, tck-id-topics-ddata-timestamp, tck-id-payloads-ddata-timestamp,
    tck-id-payloads-alias-data-cmd-requirement (alias only, no name), tck-id-payloads-name-birth-data-requirement,
    tck-id-operational-behavior-data-publish-dbirth-order (metric timestamps in order)"""
    node, births = started()
    assert node.sample(sample("m1", ts=T0 + 1000), T0 + 1001) == []  # nothing changed
    [ddata] = node.sample(sample("m1", ts=T0 + 2000, Current_L1=2.0), T0 + 2001)
    assert kind(ddata) == "DDATA" and ddata.topic.endswith("/m1") and (ddata.qos, ddata.retain) == (0, False)
    payload = decode(ddata)
    assert payload.seq == 3 and payload.timestamp == T0 + 2001
    [metric] = payload.metrics
    birth_alias = by_name(decode(births[1]))["Current L1"].alias
    assert metric.alias == birth_alias and not metric.HasField("name")
    assert value(metric) == 2.0 and metric.timestamp == T0 + 2000
    assert not metric.is_historical and prop(metric, "Quality") is None
    [ddata] = node.sample(sample("m1", ts=T0 + 3000, Current_L1=2.5, Voltage_L1=232.0), T0 + 3001)
    assert decode(ddata).seq == 4 and len(decode(ddata).metrics) == 2


def test_ddata_keeps_the_datatype_for_decoders():
    """tck-id-payloads-metric-datatype-not-req is a SHOULD NOT that we do not follow, on purpose:
    Eclipse Tahu's decoders (sparkplug-payload among them) decode a value through its datatype."""
    node, _ = started()
    [ddata] = node.sample(sample("m1", ts=T0 + 1000, Energy=1235.0), T0 + 1001)
    assert [m.datatype for m in decode(ddata).metrics] == [pb.Double]


def test_deadband_holds_back_small_moves():
    """Report by exception with an absolute deadband per measurement
    (tck-id-operational-behavior-data-publish-dbirth-change: DDATA only on change)"""
    node, _ = started(node_cfg=cfg(deadband=(("Voltage L1", 1.0),)))
    assert node.sample(sample("m1", ts=T0 + 1000, Voltage_L1=230.6), T0 + 1001) == []
    assert node.sample(sample("m1", ts=T0 + 2000, Voltage_L1=231.0), T0 + 2001) == []  # 1.0: not beyond
    [ddata] = node.sample(sample("m1", ts=T0 + 3000, Voltage_L1=231.2), T0 + 3001)  # 1.2 from the last sent
    assert [value(m) for m in decode(ddata).metrics] == [231.2]
    assert node.sample(sample("m1", ts=T0 + 4000, Voltage_L1=230.5), T0 + 4001) == []  # 0.7 from 231.2
    # a measurement without a deadband: any change
    [ddata] = node.sample(sample("m1", ts=T0 + 5000, Voltage_L1=230.5, Current_L1=1.5001), T0 + 5001)
    assert [value(m) for m in decode(ddata).metrics] == [1.5001]


def test_stale_and_good_again_change_every_metric_quality():
    """tck-id-payloads-propertyset-quality-value-type, tck-id-payloads-propertyset-quality-value-value
    (500 STALE, 192 GOOD), tck-id-topics-ddata-payload (a change of quality is a change)"""
    node, _ = started()
    [stale] = node.sample(sample("m1", quality="stale", ts=T0), T0 + 11_000)
    metrics = decode(stale).metrics
    assert len(metrics) == 3
    for m in metrics:
        assert prop(m, "Quality").int_value == QUALITY_STALE and prop(m, "Quality").type == pb.Int32
        assert m.timestamp == T0 and value(m) is not None
    assert node.sample(sample("m1", quality="stale", ts=T0), T0 + 12_000) == []  # once
    [good] = node.sample(sample("m1", ts=T0 + 13_000), T0 + 13_001)
    metrics = decode(good).metrics
    assert len(metrics) == 3 and {prop(m, "Quality").int_value for m in metrics} == {QUALITY_GOOD}
    [later] = node.sample(sample("m1", ts=T0 + 14_000, Energy=1300.0), T0 + 14_001)
    assert prop(decode(later).metrics[0], "Quality") is None


# ------------------------------------------------------------------------------- DDEATH and back

def test_offline_meter_dies_once_and_is_reborn_when_it_answers():
    """tck-id-operational-behavior-device-ddeath, tck-id-topics-ddeath-mqtt, tck-id-topics-ddeath-seq-num,
    tck-id-payloads-ddeath-timestamp, tck-id-payloads-ddeath-seq, tck-id-payloads-ddeath-seq-inc,
    tck-id-payloads-ddeath-seq-number, tck-id-topics-dbirth-metric-reqs (the DBIRTH after it is complete)"""
    node, _ = started()
    [ddeath] = node.sample(sample("m2", quality="offline", ts=T0), T0 + 30_000)
    assert kind(ddeath) == "DDEATH" and ddeath.topic.endswith("/m2") and (ddeath.qos, ddeath.retain) == (0, False)
    payload = decode(ddeath)
    assert payload.seq == 3 and payload.timestamp == T0 + 30_000 and not payload.metrics
    assert node.sample(sample("m2", quality="offline", ts=T0), T0 + 40_000) == []  # once
    [dbirth] = node.sample(sample("m2", ts=T0 + 50_000, PF=0.9), T0 + 50_001)
    assert kind(dbirth) == "DBIRTH" and decode(dbirth).seq == 4
    metrics = decode(dbirth).metrics
    assert [m.name for m in metrics] == ["Voltage L1", "PF"] and all(m.HasField("alias") for m in metrics)
    assert value(by_name(decode(dbirth))["PF"]) == 0.9
    [ddata] = node.sample(sample("m2", ts=T0 + 60_000, PF=0.8), T0 + 60_001)  # then DDATA as usual
    assert kind(ddata) == "DDATA" and decode(ddata).seq == 5


# ----------------------------------------------------------------------------------------- NDATA

def test_ndata_reports_changed_node_metrics():
    """tck-id-topics-ndata-mqtt, tck-id-payloads-ndata-qos, tck-id-payloads-ndata-retain,
    tck-id-topics-ndata-seq-num, tck-id-payloads-ndata-seq, tck-id-payloads-ndata-seq-inc,
    tck-id-topics-ndata-timestamp, tck-id-payloads-ndata-timestamp, tck-id-topics-ndata-payload,
    tck-id-operational-behavior-data-publish-nbirth-change, tck-id-payloads-alias-data-cmd-requirement"""
    figures = {"Segments/bus1/Utilisation": (0.25, pb.Double), "Segments/bus1/Errors": (0, pb.Int64)}
    node, births = started(node_metrics=figures)
    assert node.node_data(T0 + 1000, figures) == []
    [ndata] = node.node_data(T0 + 2000, {**figures, "Segments/bus1/Errors": (3, pb.Int64)})
    assert kind(ndata) == "NDATA" and (ndata.qos, ndata.retain) == (0, False)
    payload = decode(ndata)
    assert payload.seq == 3 and payload.timestamp == T0 + 2000
    [metric] = payload.metrics
    assert metric.alias == by_name(decode(births[0]))["Segments/bus1/Errors"].alias and not metric.name
    assert metric.long_value == 3 and metric.timestamp == T0 + 2000


def test_a_new_node_metric_brings_a_new_birth_sequence():
    """tck-id-topics-nbirth-metric-reqs, tck-id-operational-behavior-data-publish-nbirth (the NBIRTH
    lists every metric the node will report: a new one needs a new NBIRTH, and the DBIRTHs after it)"""
    node, _ = started()
    out = node.node_data(T0 + 1000, {"Segments/bus1/Utilisation": (0.25, pb.Double),
                                     "Segments/bus2/Utilisation": (0.5, pb.Double)})
    assert [kind(p) for p in out] == ["NBIRTH", "DBIRTH", "DBIRTH"] and seqs(out) == [0, 1, 2]
    assert "Segments/bus2/Utilisation" in by_name(decode(out[0]))


def test_nothing_is_published_outside_a_session():
    """tck-id-message-flow-edge-node-birth-publish-connect (births only once connected),
    tck-id-principles-birth-certificates-order, tck-id-payloads-ndata-order, tck-id-payloads-ddata-order
    (no data before the births)"""
    node = EdgeNode(cfg(), [M1])
    node.will(0)
    assert node.sample(sample("m1", ts=T0 + 1, Energy=2000.0), T0 + 2) == []
    assert node.node_data(T0 + 3, {"x": (1.0, pb.Double)}) == []
    births = node.online(0, T0 + 4, [])
    assert value(by_name(decode(births[1]))["Energy"]) == 2000.0  # kept for the births
    node.disconnected()
    assert node.sample(sample("m1", ts=T0 + 5, Energy=2001.0), T0 + 6) == []
    assert node.command(node.node_topic("NCMD"), _ncmd(REBIRTH, True), T0 + 7)[0] == []


# ------------------------------------------------------------------------------------- sequence

def test_seq_wraps_after_255():
    """tck-id-payloads-sequence-num-incrementing, tck-id-topics-ddata-seq-num, tck-id-payloads-ddata-seq-inc,
    tck-id-payloads-sequence-num-zero-nbirth (a rebirth starts again at 0)"""
    node, births = started()
    got = seqs(births)
    for i in range(300):
        got += seqs(node.sample(sample("m1", ts=T0 + i + 1, Energy=float(i)), T0 + i + 1))
    assert got == [i % 256 for i in range(303)]
    rebirth, _ = node.command(node.node_topic("NCMD"), _ncmd(REBIRTH, True), T0 + 999)
    assert seqs(rebirth) == [0, 1, 2]


# ------------------------------------------------------------------------------------- commands

def _ncmd(name: str, flag: bool, *, alias: int | None = None) -> bytes:
    payload = pb.Payload(timestamp=T0)
    metric = payload.metrics.add()
    if alias is None:
        metric.name = name
    else:
        metric.alias = alias
    metric.datatype = pb.Boolean
    metric.boolean_value = flag
    return payload.SerializeToString()


def test_rebirth_request_republishes_every_birth_with_the_same_bdseq():
    """tck-id-operational-behavior-data-commands-ncmd-rebirth-verb, -ncmd-rebirth-name, -ncmd-rebirth-value,
    tck-id-operational-behavior-data-commands-rebirth-action-1 (no DATA in between),
    -rebirth-action-2 (NBIRTH and every DBIRTH), -rebirth-action-3 (same bdSeq as the Will),
    tck-id-payloads-dbirth-order"""
    node, births = started(bd_seq=9)
    node.sample(sample("m1", ts=T0 + 1000, Energy=1300.0), T0 + 1001)
    out, reason = node.command("spBv1.0/site-a/NCMD/panel-7", _ncmd(REBIRTH, True), T0 + 2000)
    assert [kind(p) for p in out] == ["NBIRTH", "DBIRTH", "DBIRTH"] and seqs(out) == [0, 1, 2]
    assert "Rebirth" in reason
    nbirth = by_name(decode(out[0]))
    assert value(nbirth["bdSeq"]) == 9 and nbirth[REBIRTH].boolean_value is False
    assert value(by_name(decode(out[1]))["Energy"]) == 1300.0  # the current values
    # and report by exception goes on from the new births
    assert node.sample(sample("m1", ts=T0 + 3000, Energy=1300.0), T0 + 3001) == []


def test_writes_are_refused_and_nothing_raises():
    """tck-id-operational-behavior-data-commands-dcmd-verb and -ncmd-verb (commands arrive on DCMD and
    NCMD): the meters' data are read-only from MQTT, so every write is refused with a reason for the
    log, and no payload, however malformed, makes the session raise."""
    node, _ = started()
    dcmd = node.device_topic("DCMD", "m1")
    out, reason = node.command(dcmd, _ncmd("Voltage L1", True), T0)
    assert out == [] and reason.startswith("DCMD refused: meter data are read-only from MQTT")
    assert "Voltage L1" in reason
    out, reason = node.command(dcmd, b"\xff\xff\xff", T0)
    assert out == [] and "refused" in reason and "malformed" in reason
    out, reason = node.command(node.node_topic("NCMD"), _ncmd("Segments/bus1/Utilisation", True), T0)
    assert out == [] and "refused" in reason
    out, reason = node.command(node.node_topic("NCMD"), _ncmd(REBIRTH, False), T0)
    assert out == [] and "ignored" in reason
    for junk in (b"\xff\xff\xff", b"\x12\x80", b"not protobuf at all", b""):
        out, reason = node.command(node.node_topic("NCMD"), junk, T0)
        assert out == [] and reason
    out, reason = node.command("spBv1.0/site-a/NCMD/other-node", _ncmd(REBIRTH, True), T0)
    assert out == [] and "ignored" in reason
    assert node.sample(sample("m1", ts=T0 + 1, Energy=1.0), T0 + 2)[0].topic.endswith("/m1")  # session intact


# ----------------------------------------------------------------------------------- historical

def test_historical_replay_keeps_timestamps_and_leaves_live_state_alone():
    """Store and forward: samples kept during an outage arrive as is_historical DDATA with the time
    they were taken, in the seq sequence, without disturbing report by exception of live data
    (tck-id-operational-behavior-data-publish-dbirth-order applies to is_historical=false only;
    tck-id-payloads-ddata-seq-inc)."""
    node = EdgeNode(cfg(), [M1])
    node.will(1)
    births = node.online(1, T0 + 100_000, [sample("m1", ts=T0 + 99_000, Energy=1400.0)], replay=True)
    kept = [sample("m1", ts=T0 + 10_000, Energy=1300.0), sample("m1", ts=T0 + 20_000, Energy=1300.0),
            sample("m1", ts=T0 + 30_000, Energy=1350.0),
            sample("m1", quality="stale", ts=T0 + 30_000, Energy=1350.0)]
    replay = [p for s in kept for p in node.historical(s, T0 + 100_001)]
    assert node.end_replay(T0 + 100_002) == []
    assert seqs(births + replay) == list(range(len(births) + len(replay)))
    first, second, third = (decode(p) for p in replay)
    assert all(m.is_historical for p in (first, second, third) for m in p.metrics)
    assert [m.timestamp for m in first.metrics] == [T0 + 10_000] * 3  # the whole meter first
    assert [(m.timestamp, value(m)) for m in second.metrics] == [(T0 + 30_000, 1350.0)]
    assert {prop(m, "Quality").int_value for m in third.metrics} == {QUALITY_STALE}
    assert all(not m.HasField("name") and m.HasField("alias") for m in first.metrics)
    # live data carry on from the births, not from the replay
    assert node.sample(sample("m1", ts=T0 + 101_000, Energy=1400.0), T0 + 101_001) == []
    [live] = node.sample(sample("m1", ts=T0 + 102_000, Energy=1401.0), T0 + 102_001)
    assert decode(live).seq == len(births) + len(replay) and not decode(live).metrics[0].is_historical


def test_replay_of_a_meter_offline_at_reconnect_then_its_ddeath():
    """A meter that went offline during the outage is born (stale) so its kept samples can be replayed,
    then dies (tck-id-operational-behavior-device-ddeath, tck-id-payloads-dbirth-order)."""
    node = EdgeNode(cfg(), [M1, M2])
    node.will(2)
    now = [sample("m1", ts=T0 + 99_000), sample("m2", quality="offline", ts=T0 + 50_000)]
    births = node.online(2, T0 + 100_000, now, replay=True)
    assert [p.topic.rsplit("/", 1)[-1] for p in births] == ["panel-7", "m1", "m2"]
    assert {prop(m, "Quality").int_value for m in decode(births[2]).metrics} == {QUALITY_STALE}
    assert node.sample(sample("m2", quality="offline", ts=T0 + 50_000), T0 + 100_001) == []  # not yet
    [hist] = node.historical(sample("m2", ts=T0 + 40_000, PF=0.7), T0 + 100_002)
    assert kind(hist) == "DDATA" and all(m.is_historical for m in decode(hist).metrics)
    [ddeath] = node.end_replay(T0 + 100_003)
    assert kind(ddeath) == "DDEATH" and ddeath.topic.endswith("/m2")
    assert seqs(births + [hist, ddeath]) == [0, 1, 2, 3, 4]
    assert node.historical(sample("m2", ts=T0 + 45_000, PF=0.6), T0 + 100_004) == []  # dead now


def test_meter_answering_during_the_replay_is_simply_alive():
    """A meter born for the replay that answers before it ends gets DDATA (good again), no DDEATH."""
    node = EdgeNode(cfg(), [M2])
    node.will(0)
    node.online(0, T0, [sample("m2", quality="offline", ts=T0 - 5000)], replay=True)
    [ddata] = node.sample(sample("m2", ts=T0 + 1000), T0 + 1001)
    assert kind(ddata) == "DDATA" and {prop(m, "Quality").int_value for m in decode(ddata).metrics} == {192}
    assert node.end_replay(T0 + 1002) == []


# ---------------------------------------------------------------------------------- primary host

def _state(online: bool, ts: int) -> bytes:
    return json.dumps({"online": online, "timestamp": ts}).encode()


def test_births_wait_for_the_primary_host():
    """tck-id-message-flow-edge-node-birth-publish-phid-wait,
    tck-id-operational-behavior-edge-node-birth-sequence-wait,
    tck-id-message-flow-edge-node-birth-publish-phid-wait-id (its own host id only),
    tck-id-message-flow-edge-node-birth-publish-phid-wait-online"""
    node = EdgeNode(cfg(primary_host="scada-1"), [M1])
    node.will(0)
    assert node.online(0, T0, [sample("m1")]) == []
    assert node.host_state("spBv1.0/STATE/scada-2", _state(True, T0)) is None
    assert node.online(0, T0, []) == []
    assert node.host_state("spBv1.0/STATE/scada-1", _state(True, T0)) is True
    assert [kind(p) for p in node.online(0, T0 + 1, [])] == ["NBIRTH", "DBIRTH"]
    assert node.host_state("spBv1.0/STATE/scada-1", _state(False, T0)) is False
    assert not node.is_online and node.sample(sample("m1", ts=T0 + 2, Energy=1.0), T0 + 3) == []


def test_primary_host_state_30():
    """tck-id-message-flow-edge-node-birth-publish-phid-wait-timestamp (an older STATE is ignored; the
    first one counts), tck-id-message-flow-edge-node-birth-publish-phid-offline and
    tck-id-operational-behavior-edge-node-termination-host-offline (offline is reported: the adapter
    publishes the NDEATH and disconnects),
    tck-id-operational-behavior-edge-node-termination-host-offline-timestamp"""
    node = EdgeNode(cfg(primary_host="scada-1"), [M1])
    topic = "spBv1.0/STATE/scada-1"
    assert node.host_state(topic, _state(True, T0)) is True and node.host_online
    assert node.host_state(topic, _state(False, T0 - 1)) is None and node.host_online  # older: ignored
    assert node.host_state(topic, _state(False, T0)) is False and not node.host_online  # its Will: same ts
    assert node.host_state(topic, _state(True, T0 + 5)) is True
    for junk in (b"ONLINE", b"{}", b"[]", b'{"online": "true", "timestamp": 1}', b'{"online": true}',
                 b'{"online": true, "timestamp": true}', b"\xff\xfe", b""):
        assert node.host_state(topic, junk) is None
    assert node.host_online
    node.will(1)  # a new session (perhaps on another server): earlier timestamps no longer count
    assert not node.host_online and node.host_state(topic, _state(True, T0 - 100)) is True
    assert EdgeNode(cfg(), [M1]).host_state(topic, _state(False, T0)) is None  # no primary host


def test_primary_host_state_22():
    """Sparkplug 2.2 hosts (cfg.state_v22): STATE/<host id>, text ONLINE / OFFLINE."""
    node = EdgeNode(cfg(primary_host="scada-1", state_v22=True), [M1])
    assert node.host_state("STATE/scada-1", b"ONLINE") is True
    assert node.host_state("STATE/scada-1", b"OFFLINE") is False
    assert node.host_state("STATE/scada-1", b"maybe") is None
    assert node.host_state("spBv1.0/STATE/scada-1", _state(True, T0)) is None
    assert node.host_state("STATE/scada-2", b"ONLINE") is None
