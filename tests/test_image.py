"""bridge.core.image: the register image (served registers, reads with Modbus exceptions, freshness, changes)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import f32_bytes, meas

from bridge.core.errors import ImageReadError, NoSuchUnit, NotFresh, OutsideImage
from bridge.core.codec import DataType, Function, WordOrder, registers_to_bytes
from bridge.core.image import Change, Health, RegisterImage
from bridge.core.model import served_intervals
from bridge.core.model import MeterConfig, Profile, RegisterRange

FC3, FC4 = 3, 4


# an SDM120-like input-only meter: voltage@0, current@6, active_power@12 (float32)
INPUT_PROFILE = Profile(
    "sdm-like",
    "test",
    Function.INPUT,
    WordOrder.BIG,
    (meas("voltage", 0x00), meas("current", 0x06), meas("active_power", 0x0C)),
)

# a holding-register meter with a mirrored range
HOLDING_PROFILE = Profile(
    "holding-like",
    "test",
    Function.HOLDING,
    WordOrder.LITTLE,
    (meas("energy", 0x100, DataType.UINT32, Function.HOLDING), meas("freq", 0x110, DataType.UINT16, Function.HOLDING)),
    ranges=(RegisterRange(Function.HOLDING, 0x200, 8),),
)


def meter(unit, profile=INPUT_PROFILE, **kw) -> MeterConfig:
    return MeterConfig(name=f"meter{unit}", slave=unit, unit=unit, profile=profile, **kw)


def regs(*values) -> bytes:
    return registers_to_bytes(values)


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Recorder:
    def __init__(self):
        self.calls: list[tuple[Change | None, int, Health]] = []

    def __call__(self, change, unit, health):
        self.calls.append((change, unit, health))

    @property
    def changes(self):
        return [c for c, _, _ in self.calls if c is not None]

    @property
    def healths(self):
        return [(u, h) for c, u, h in self.calls if c is None]


def read_error(image: RegisterImage, unit, function, address, count) -> type:
    """Why the image refuses a read (the Modbus TCP side turns each into its exception code)."""
    with pytest.raises(ImageReadError) as info:
        image.read(unit, function, address, count)
    return type(info.value)


def poll_input_meter(image: RegisterImage, unit: int, volts=230.0, amps=1.5, watts=345.0, stamp=1.7e9) -> None:
    """One complete good poll as the segment does it: 1 block 0..14, then mark_good."""
    block = f32_bytes(volts) + regs(0xAAAA, 0xBBBB, 0xCCCC, 0xDDDD) + f32_bytes(amps) + regs(0xEEEE, 0xFFFF, 0x1111, 0x2222) + f32_bytes(watts)
    assert len(block) == 28
    image.store_block(unit, Function.INPUT, 0, block, stamp)
    image.mark_good(unit, stamp)


# ---------------------------------------------------------------- served_intervals

def test_served_intervals_merges_measurements_and_ranges():
    assert served_intervals(meter(1)) == {Function.INPUT: [(0, 2), (6, 8), (12, 14)]}
    m = meter(2, HOLDING_PROFILE, ranges=(RegisterRange(Function.HOLDING, 0x102, 2), RegisterRange(Function.INPUT, 5, 3)))
    assert served_intervals(m) == {
        Function.HOLDING: [(0x100, 0x104), (0x110, 0x111), (0x200, 0x208)],
        Function.INPUT: [(5, 8)],
    }


def test_served_intervals_overlapping_range_and_measurement():
    profile = Profile(
        "p", "", Function.INPUT, WordOrder.BIG, (meas("a", 0), meas("b", 10)),
        ranges=(RegisterRange(Function.INPUT, 1, 4), RegisterRange(Function.INPUT, 9, 2)),
    )
    assert served_intervals(meter(1, profile)) == {Function.INPUT: [(0, 5), (9, 12)]}


# ----------------------------------------------------------------------- reads

def test_units_and_lookup():
    image = RegisterImage([meter(11), meter(3, HOLDING_PROFILE)])
    assert image.units() == [3, 11]
    assert image.unit(11).meter.unit == 11
    assert image.unit(99) is None
    assert image.health(11) is Health.NEVER_READ


def test_read_before_any_poll_is_gateway_target_failed():
    image = RegisterImage([meter(1)])
    assert read_error(image, 1, FC4, 0, 2) is NotFresh
    assert read_error(image, 1, FC4, 6, 2) is NotFresh


def test_read_after_store_and_mark_good():
    clock = Clock()
    image = RegisterImage([meter(1)], clock=clock)
    poll_input_meter(image, 1)
    assert image.health(1) is Health.FRESH
    assert image.read(1, FC4, 0, 2) == bytes.fromhex("4366 0000")
    assert image.read(1, FC4, 6, 2) == f32_bytes(1.5)
    assert image.read(1, FC4, 12, 2) == f32_bytes(345.0)
    assert image.read(1, FC4, 1, 1) == bytes.fromhex("0000")
    assert image.read(1, FC4, 12, 1) == f32_bytes(345.0)[:2]


def test_store_without_mark_good_is_not_served():
    image = RegisterImage([meter(1)], clock=Clock())
    image.store_block(1, Function.INPUT, 0, f32_bytes(230.0), 1.0)
    assert read_error(image, 1, FC4, 0, 2) is NotFresh
    assert image.value_registers(1, Function.INPUT, 0, 2) == f32_bytes(230.0)


@pytest.mark.parametrize(
    "address,count",
    [(0, 8), (0, 3), (1, 6), (2, 2), (2, 1), (5, 2), (7, 2), (8, 4), (12, 3), (14, 1), (0, 14), (100, 1), (0xFFFF, 1)],
)
def test_read_touching_unserved_registers_is_illegal_data_address(address, count):
    image = RegisterImage([meter(1)], clock=Clock())
    poll_input_meter(image, 1)
    assert read_error(image, 1, FC4, address, count) is OutsideImage


def test_illegal_address_takes_precedence_over_never_read():
    image = RegisterImage([meter(1)])
    assert read_error(image, 1, FC4, 2, 2) is OutsideImage
    assert read_error(image, 1, FC3, 0, 2) is OutsideImage


def test_wrong_function_for_the_table_is_illegal_data_address():
    image = RegisterImage([meter(1), meter(2, HOLDING_PROFILE)], clock=Clock())
    poll_input_meter(image, 1)
    assert read_error(image, 1, FC3, 0, 2) is OutsideImage  # FC3 on an input-only meter
    image.store_block(2, Function.HOLDING, 0x100, regs(1, 2, 3, 4), 1.0)
    image.mark_good(2, 1.0)
    assert image.read(2, FC3, 0x100, 2) == regs(1, 2)
    assert read_error(image, 2, FC4, 0x100, 2) is OutsideImage


@pytest.mark.parametrize("function", [FC3, FC4])
def test_unknown_unit_is_gateway_path_unavailable(function):
    image = RegisterImage([meter(1)])
    assert read_error(image, 2, function, 0, 2) is NoSuchUnit
    assert read_error(image, 0, function, 0xFFFF, 1) is NoSuchUnit


def test_ranges_make_verbatim_registers_readable():
    image = RegisterImage([meter(2, HOLDING_PROFILE, ranges=(RegisterRange(Function.HOLDING, 0x300, 3),))], clock=Clock())
    image.store_block(2, Function.HOLDING, 0x200, regs(*range(10, 18)), 1.0)
    image.store_block(2, Function.HOLDING, 0x300, regs(7, 8, 9), 1.0)
    image.mark_good(2, 1.0)
    assert image.read(2, FC3, 0x200, 8) == regs(*range(10, 18))
    assert image.read(2, FC3, 0x203, 2) == regs(13, 14)
    assert image.read(2, FC3, 0x300, 3) == regs(7, 8, 9)  # the meter's own range
    assert read_error(image, 2, FC3, 0x200, 9) is OutsideImage
    assert read_error(image, 2, FC3, 0x1FF, 2) is OutsideImage
    assert read_error(image, 2, FC3, 0x303, 1) is OutsideImage


def test_range_adjacent_to_measurements_reads_across_them():
    profile = Profile(
        "p", "", Function.INPUT, WordOrder.BIG, (meas("a", 0), meas("b", 6)),
        ranges=(RegisterRange(Function.INPUT, 2, 4),),
    )
    image = RegisterImage([meter(1, profile)], clock=Clock())
    image.store_block(1, Function.INPUT, 0, regs(*range(8)), 1.0)
    image.mark_good(1, 1.0)
    assert image.read(1, FC4, 0, 8) == regs(*range(8))


def test_block_covering_gap_registers_does_not_make_them_readable():
    image = RegisterImage([meter(1)], clock=Clock())
    poll_input_meter(image, 1)
    for address in (2, 3, 4, 5, 8, 9, 10, 11):
        assert read_error(image, 1, FC4, address, 1) is OutsideImage
    assert image.value_registers(1, Function.INPUT, 2, 1) is None


def test_block_partially_overlapping_a_measurement_stores_only_its_part():
    image = RegisterImage([meter(1)], clock=Clock())
    poll_input_meter(image, 1)
    image.store_block(1, Function.INPUT, 5, regs(0x9999, 0x1234), 2.0)  # gap register 5 + first word of current
    image.store_block(1, Function.INPUT, 13, regs(0x5678, 0x9999), 2.0)  # second word of power + register 14
    assert image.read(1, FC4, 6, 2) == regs(0x1234) + f32_bytes(1.5)[2:]
    assert image.read(1, FC4, 12, 2) == f32_bytes(345.0)[:2] + regs(0x5678)


def test_store_block_for_a_table_the_unit_does_not_serve():
    image = RegisterImage([meter(1)], clock=Clock())
    rec = Recorder()
    image.subscribe(rec)
    assert image.store_block(1, Function.HOLDING, 0, regs(1, 2), 1.0) is False
    assert rec.calls == []


def test_units_are_independent():
    image = RegisterImage([meter(1), meter(2)], clock=Clock())
    poll_input_meter(image, 1, volts=230.0)
    poll_input_meter(image, 2, volts=240.0)
    assert image.read(1, FC4, 0, 2) == f32_bytes(230.0)
    assert image.read(2, FC4, 0, 2) == f32_bytes(240.0)
    image.mark_failed(2, "gone", offline=True)
    assert image.read(1, FC4, 0, 2) == f32_bytes(230.0)
    assert read_error(image, 2, FC4, 0, 2) is NotFresh


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 20), st.integers(1, 20))
def test_read_succeeds_exactly_inside_served_intervals(address, count):
    image = RegisterImage([meter(1)], clock=Clock())
    poll_input_meter(image, 1)
    inside = any(s <= address and address + count <= e for s, e in [(0, 2), (6, 8), (12, 14)])
    if inside:
        assert len(image.read(1, FC4, address, count)) == 2 * count
    else:
        assert read_error(image, 1, FC4, address, count) is OutsideImage


# --------------------------------------------------------------- notifications

def test_store_block_notifies_change_with_unit_function_range():
    clock = Clock()
    image = RegisterImage([meter(7)], clock=clock)
    rec = Recorder()
    image.subscribe(rec)
    assert image.store_block(7, Function.INPUT, 0, f32_bytes(230.0) + regs(0, 0, 0, 0) + f32_bytes(1.0), 1.7e9) is True
    assert rec.calls == [(Change(7, Function.INPUT, 0, 8, 1.7e9), 7, Health.NEVER_READ)]


def test_same_data_again_reports_no_change_and_notifies_nobody():
    image = RegisterImage([meter(1)], clock=Clock())
    poll_input_meter(image, 1)
    rec = Recorder()
    image.subscribe(rec)
    block = f32_bytes(230.0) + regs(0xAAAA, 0xBBBB, 0xCCCC, 0xDDDD) + f32_bytes(1.5) + regs(0xEEEE, 0xFFFF, 0x1111, 0x2222) + f32_bytes(345.0)
    assert image.store_block(1, Function.INPUT, 0, block, 2e9) is False
    assert rec.calls == []


def test_change_only_in_gap_registers_is_no_change():
    image = RegisterImage([meter(1)], clock=Clock())
    poll_input_meter(image, 1)
    rec = Recorder()
    image.subscribe(rec)
    block = f32_bytes(230.0) + regs(1, 2, 3, 4) + f32_bytes(1.5) + regs(5, 6, 7, 8) + f32_bytes(345.0)  # only gaps differ
    assert image.store_block(1, Function.INPUT, 0, block, 2e9) is False
    assert rec.calls == []


def test_all_zero_first_poll_is_no_change():
    """The image starts zeroed; a first block of zeros changes nothing (and health still says never read)."""
    image = RegisterImage([meter(1)], clock=Clock())
    rec = Recorder()
    image.subscribe(rec)
    assert image.store_block(1, Function.INPUT, 0, bytes(28), 1.0) is False
    assert rec.changes == []


def test_every_listener_is_told_of_a_change():
    clock = Clock()
    image = RegisterImage([meter(1)], clock=clock)
    poll_input_meter(image, 1)
    a, b = Recorder(), Recorder()
    image.subscribe(a)
    image.subscribe(b)
    assert image.store_block(1, Function.INPUT, 6, f32_bytes(2.0), 5.0) is True
    expected = [(Change(1, Function.INPUT, 6, 8, 5.0), 1, Health.FRESH)]
    assert a.calls == expected and b.calls == expected


def test_health_notifications():
    clock = Clock()
    image = RegisterImage([meter(1, stale_after=10.0)], clock=clock)
    rec = Recorder()
    image.subscribe(rec)
    poll_input_meter(image, 1)
    assert rec.healths == [(1, Health.FRESH)]
    image.mark_good(1, 2.0)  # already fresh: no new notification
    assert rec.healths == [(1, Health.FRESH)]
    image.mark_failed(1, "timeout", offline=False)  # a single failure does not change health
    assert rec.healths == [(1, Health.FRESH)]
    assert image.health(1) is Health.FRESH
    assert image.unit(1).last_error == "timeout"
    image.mark_failed(1, "no answer", offline=True)
    assert rec.healths == [(1, Health.FRESH), (1, Health.OFFLINE)]
    image.mark_failed(1, "no answer", offline=True)  # already offline: nothing new
    assert rec.healths == [(1, Health.FRESH), (1, Health.OFFLINE)]
    image.mark_good(1, 3.0)
    assert rec.healths == [(1, Health.FRESH), (1, Health.OFFLINE), (1, Health.FRESH)]
    assert image.unit(1).last_error == ""
    clock.t += 11
    assert image.sweep() == [1]
    assert rec.healths[-1] == (1, Health.STALE)
    assert len(rec.healths) == 4


def test_mark_failed_offline_from_never_read():
    image = RegisterImage([meter(1)], clock=Clock())
    rec = Recorder()
    image.subscribe(rec)
    image.mark_failed(1, "port lost", offline=True)
    assert image.health(1) is Health.OFFLINE
    assert rec.calls == [(None, 1, Health.OFFLINE)]


# ------------------------------------------------------------------- freshness

def test_freshness_with_fake_clock():
    t = [100.0]
    image = RegisterImage([meter(1, stale_after=5.0)], clock=lambda: t[0])
    rec = Recorder()
    image.subscribe(rec)
    poll_input_meter(image, 1, stamp=1.7e9)
    u = image.unit(1)
    assert u.last_good == 100.0 and u.last_good_wall == 1.7e9

    t[0] = 104.9
    assert image.health(1) is Health.FRESH
    assert image.read(1, FC4, 0, 2) == f32_bytes(230.0)
    assert image.sweep() == []

    t[0] = 105.1  # past stale_after without a good poll
    assert image.health(1) is Health.STALE
    assert read_error(image, 1, FC4, 0, 2) is NotFresh
    assert read_error(image, 1, FC4, 2, 2) is OutsideImage  # address errors still come first
    assert image.value_registers(1, Function.INPUT, 0, 2) == f32_bytes(230.0)  # last values kept
    assert image.sweep() == [1]
    assert rec.healths == [(1, Health.FRESH), (1, Health.STALE)]
    assert image.sweep() == []  # reported once
    t[0] = 200.0
    assert image.sweep() == []
    assert image.health(1) is Health.STALE

    image.mark_good(1, 1.8e9)  # fresh again
    assert image.health(1) is Health.FRESH
    assert image.read(1, FC4, 0, 2) == f32_bytes(230.0)
    assert rec.healths[-1] == (1, Health.FRESH)
    assert image.unit(1).last_good == 200.0

    image.mark_failed(1, "offline", offline=True)
    assert image.health(1) is Health.OFFLINE
    assert read_error(image, 1, FC4, 0, 2) is NotFresh
    t[0] = 1000.0
    assert image.sweep() == []  # offline is not turned into stale
    assert image.health(1) is Health.OFFLINE


def test_stale_without_sweep_then_mark_good_notifies_fresh():
    t = [0.0]
    image = RegisterImage([meter(1, stale_after=1.0)], clock=lambda: t[0])
    poll_input_meter(image, 1)
    rec = Recorder()
    image.subscribe(rec)
    t[0] = 5.0
    assert image.health(1) is Health.STALE
    image.mark_good(1, 5.0)  # it was stale (by time): listeners learn it is fresh again
    assert rec.healths == [(1, Health.FRESH)]


def test_sweep_only_reports_units_that_went_stale():
    t = [0.0]
    image = RegisterImage([meter(1, stale_after=1.0), meter(2, stale_after=10.0), meter(3)], clock=lambda: t[0])
    poll_input_meter(image, 1)
    poll_input_meter(image, 2)
    t[0] = 2.0
    assert image.sweep() == [1]
    assert image.health(2) is Health.FRESH
    assert image.health(3) is Health.NEVER_READ
    t[0] = 20.0
    assert image.sweep() == [2]


def test_store_block_notification_carries_current_health():
    t = [0.0]
    image = RegisterImage([meter(1, stale_after=1.0)], clock=lambda: t[0])
    poll_input_meter(image, 1)
    rec = Recorder()
    image.subscribe(rec)
    t[0] = 3.0
    image.store_block(1, Function.INPUT, 0, f32_bytes(231.0), 9.0)
    assert rec.calls == [(Change(1, Function.INPUT, 0, 2, 9.0), 1, Health.STALE)]


def test_a_failing_listener_is_skipped_counted_and_reported_never_raised_to_the_segment():
    image = RegisterImage([meter(1)], clock=Clock())
    rec, failures = Recorder(), []

    def broken(change, unit, health):
        raise KeyError("a bug in a north side")

    image.subscribe(broken)
    image.subscribe(rec)
    image.on_listener_error = lambda listener, exc: failures.append((listener, type(exc)))
    poll_input_meter(image, 1)  # one block stored (a change), then the unit turns fresh
    assert image.listener_errors == 2 and failures == [(broken, KeyError)] * 2
    assert rec.changes and rec.healths == [(1, Health.FRESH)]  # the next listener still heard both
    assert image.read(1, FC4, 0, 2) == f32_bytes(230.0)
