"""The read model (bridge/view.py) in the window of a reload where the image is already reconfigured
and the segments in force are not yet: a north side reading then must not fail (the reload matrix
caught the MQTT side failing there with KeyError and AttributeError)."""
from __future__ import annotations

from dataclasses import dataclass, field

from bridge.config.profiles import get_builtin
from bridge.core.diagnostics import SegmentDiagnostics
from bridge.core.image import Health, RegisterImage
from bridge.core.model import MeterConfig, SegmentConfig
from bridge.view import BridgeView

PROFILE = get_builtin("eastron-sdm120")


@dataclass
class Source:
    cfg: SegmentConfig
    diag: SegmentDiagnostics = field(default_factory=SegmentDiagnostics)
    ready: bool = True


def meter(name: str, unit: int) -> MeterConfig:
    return MeterConfig(name, unit, unit, PROFILE)


def test_a_view_built_before_its_unit_left_the_image_still_answers():
    a, b = meter("a", 1), meter("b", 2)
    image = RegisterImage([a, b])
    view = BridgeView(image)
    view.attach([Source(SegmentConfig("s", "/dev/null", meters=(a, b)))], {})
    image.mark_good(2, 1000.0)
    held = {mv.name: mv for mv in view.meters()}

    image.reconfigure([a])  # a reload removed b; the segments in force are still the old ones
    assert held["b"].health is Health.FRESH  # the unit it was built on, not a lookup that fails
    assert held["b"].last_good_wall == 1000.0
    assert [mv.name for mv in view.meters()] == ["a"]  # b is no longer offered


def test_a_unit_now_another_meters_is_not_offered_under_the_old_name():
    a, b = meter("a", 1), meter("b", 2)
    image = RegisterImage([a, b])
    view = BridgeView(image)
    view.attach([Source(SegmentConfig("s", "/dev/null", meters=(a, b)))], {})

    swapped_a, swapped_b = meter("a", 2), meter("b", 1)  # a reload swapped the unit ids
    image.reconfigure([swapped_a, swapped_b])
    assert list(view.meters()) == []
    view.attach([Source(SegmentConfig("s", "/dev/null", meters=(swapped_a, swapped_b)))], {})
    assert [(mv.name, mv.unit) for mv in view.meters()] == [("a", 2), ("b", 1)]


def test_a_kept_unit_takes_the_new_configuration_object():
    a = meter("a", 1)
    image = RegisterImage([a])
    image.mark_good(1, 5.0)
    again = meter("a", 1)
    image.reconfigure([again])
    u = image.unit(1)
    assert u.meter is again and u.last_good_wall == 5.0  # kept (values and all), compared by identity
