"""The ``energy`` section: a full section loads into frozen objects; every mistake is one issue naming the
file's line and the key (SPEC §9, docs/configuration.md §2.8)."""
from __future__ import annotations

import pytest
from support import write
from test_config import issues_of, no_systemd_state_directory, one_issue  # noqa: F401 (the fixture)

from bridge.config.loader import load_config, summary
from bridge.core.model import BalanceAlarmConfig, EnergyConfig, TariffConfig, VirtualMeterConfig

METERS = """
segments:
  - name: a
    port: /dev/ttyS0
    meters:
      - {name: incomer, slave: 1, profile: eastron-sdm630}
      - {name: lighting-1, slave: 2, profile: eastron-sdm120}
      - {name: sockets, slave: 3, profile: eastron-sdm120}
"""


def test_a_full_section_loads(tmp_path):
    config = load_config(write(tmp_path, METERS + """
energy:
  interval: 15
  timezone: Europe/Berlin
  retention_days: 30
  billing_day: 15
  demand_window: 30
  tariffs:
    - {name: peak, days: mon-fri, from: "08:00", to: "20:00"}
    - {name: night, from: 22:00, to: "06:00"}
    - {name: offpeak}
  virtual:
    - name: unmetered
      formula: incomer - lighting-1 - sockets
      alarm: {reference: incomer, above_percent: 5, intervals: 4}
"""))
    e = config.energy
    assert isinstance(e, EnergyConfig) and (e.interval, e.interval_s, e.timezone) == (15, 900, "Europe/Berlin")
    assert (e.retention_days, e.billing_day, e.demand_window) == (30, 15, 30)
    assert e.tariffs == (TariffConfig("peak", frozenset(range(5)), 480, 1200),
                         TariffConfig("night", None, 1320, 360),  # unquoted 22:00: YAML's 1320 minutes
                         TariffConfig("offpeak"))
    assert e.virtual == (VirtualMeterConfig("unmetered", ((1, "incomer"), (-1, "lighting-1"), (-1, "sockets")),
                                            "incomer - lighting-1 - sockets", BalanceAlarmConfig("incomer", 5, 4)),)
    assert "energy: 15-minute intervals, Europe/Berlin" in summary(config)


def test_a_virtual_meter_may_have_a_unit_of_its_own(tmp_path):
    config = load_config(write(tmp_path, METERS + """
energy:
  virtual:
    - {name: unmetered, formula: incomer - sockets, unit: 90}
    - {name: rest, formula: incomer - lighting-1}
"""))
    assert [(v.name, v.unit) for v in config.energy.virtual] == [("unmetered", 90), ("rest", None)]


def test_absent_is_off_and_empty_is_all_defaults(tmp_path):
    assert load_config(write(tmp_path, METERS)).energy is None
    assert load_config(write(tmp_path, METERS + "energy:\n")).energy == EnergyConfig()


@pytest.mark.parametrize("section, line, key, words", [
    ("energy:\n  interval: 7\n", 9, "energy.interval", "minutes dividing an hour"),
    ("energy:\n  timezone: Europe/Berlinn\n", 9, "energy.timezone", "unknown time zone"),
    ("energy:\n  billing_day: 31\n", 9, "energy.billing_day", "28"),
    ("energy:\n  interval: 15\n  demand_window: 20\n", 10, "energy.demand_window", "multiple of the interval"),
    ("energy:\n  tariffs:\n    - {name: peak, from: \"08:00\"}\n", 10, "energy.tariffs[0]", "both from: and to:"),
    ("energy:\n  tariffs:\n    - {name: peak, days: mon-fry}\n", 10, "energy.tariffs[0].days", "fry"),
    ("energy:\n  tariffs:\n    - {name: peak, from: \"25:00\", to: \"06:00\"}\n", 10, "energy.tariffs[0].from", "25:00"),
    ("energy:\n  virtual:\n    - {name: rest, formula: incomer - lightning}\n", 10, "energy.virtual[0].formula",
     "lightning"),
    ("energy:\n  virtual:\n    - {name: sockets, formula: incomer - lighting-1}\n", 10, "energy.virtual[0].name",
     "already the name of a meter"),
    ("energy:\n  virtual:\n    - name: rest\n      formula: incomer-sockets\n", 11, "energy.virtual[0].formula",
     "incomer-sockets"),
    ("energy:\n  virtual:\n    - name: rest\n      formula: incomer - sockets\n      alarm: {reference: main, above_percent: 5}\n",
     12, "energy.virtual[0].alarm.reference", "main"),
    ("energy:\n  virtual:\n    - name: rest\n      formula: incomer - sockets\n      alarm: {reference: incomer, above_percent: 0}\n",
     12, "energy.virtual[0].alarm.above_percent", ""),
    # a virtual meter's own Modbus TCP unit: free across the bridge (here the default unit of incomer: slave 1)
    ("energy:\n  virtual:\n    - name: rest\n      formula: incomer - sockets\n      unit: 1\n", 12,
     "energy.virtual[0].unit", "unit 1 is already used by meter 'incomer' (line 5)"),
    ("energy:\n  virtual:\n    - {name: r1, formula: incomer - sockets, unit: 90}\n"
     "    - {name: r2, formula: incomer - sockets, unit: 90}\n", 11, "energy.virtual[1].unit",
     "unit 90 is already used by meter 'r1' (line 10)"),
    ("energy:\n  virtual:\n    - {name: rest, formula: incomer - sockets, unit: 248}\n", 10, "energy.virtual[0].unit", "247"),
    ("modbus_tcp:\n  consolidated: {unit: 90}\nenergy:\n  virtual:\n    - {name: rest, formula: incomer - sockets, unit: 90}\n",
     9, "modbus_tcp.consolidated.unit", "unit 90 is already used by meter 'rest' (line 12)"),
])
def test_each_mistake_is_one_issue_at_its_line_and_key(tmp_path, section, line, key, words):
    issue = one_issue(tmp_path, METERS + section)
    assert (issue.line, issue.key) == (line, key), str(issue)
    assert words in issue.message, str(issue)
