"""Interval energy on the status page (a chart per meter, the last interval, the balance alarms) in a real
headless Chromium, and on ``/metrics``.

The first test runs the bridge with its energy recorder over simulated meters whose counters advance at
known rates (``test_energy_e2e``: 2-second intervals, the virtual meter ``unmetered`` at 25 % of the
incomer, so its balance alarm rises); the second puts a stand-in recorder with chosen intervals behind a
running bridge's read model, for the statuses a live run does not produce on demand (gaps, estimated,
reset, rollover, a negative balance)."""
from __future__ import annotations

import asyncio
import re
import tempfile
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from support import until
from test_energy_e2e import ENERGY, LAYOUT, RATES, SECONDS, Counters
from test_http import request, run_chromium, sample, scrape_families

from bridge.energy.recorder import fill_missing
from bridge.energy.types import Interval
from bridge.testing import MeterSpec, running_bridge

SCREENSHOT = Path(tempfile.gettempdir()) / "modbus-bridge-energy.png"  # for a person to look at


class _EnergyReader(HTMLParser):
    """The energy section of the rendered page: each meter card's data attributes, its bars (the chart's
    rects, with their attributes and tooltip), the text of its badges and whether a zero line is drawn."""

    def __init__(self):
        super().__init__()
        self.section: dict | None = None
        self.meters: dict[str, dict] = {}
        self._meter: dict | None = None
        self._badge: str | None = None
        self._tip: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and "data-energy" in a:
            self.section = a
        elif "data-energy-meter" in a:
            self._meter = {"attrs": a, "bars": [], "badges": {}, "zero": False, "chart": None}
            self.meters[a["data-energy-meter"]] = self._meter
        elif self._meter is not None:
            cls = a.get("class", "")
            if tag == "svg":
                self._meter["chart"] = a
            elif tag == "rect":
                self._meter["bars"].append({**a, "tip": ""})
            elif tag == "title" and self._meter["bars"]:
                self._tip = self._meter["bars"][-1]
            elif tag == "line" and "zero" in cls.split():
                self._meter["zero"] = True
            elif tag == "span" and "badge" in cls.split():
                self._badge = cls.split()[-1]
                self._meter["badges"][self._badge] = ""

    def handle_endtag(self, tag):
        if tag == "span":
            self._badge = None
        elif tag == "title":
            self._tip = None

    def handle_data(self, data):
        if self._badge is not None and self._meter is not None:
            self._meter["badges"][self._badge] += data
        if self._tip is not None:
            self._tip["tip"] += data


async def read_page(port: int, profile: str) -> _EnergyReader:
    page = _EnergyReader()
    page.feed(await run_chromium(f"http://127.0.0.1:{port}/", profile, "--dump-dom"))
    return page


async def steady_scrape(port: int, recorder, names: list[str]) -> tuple[dict, dict, int]:
    """A /metrics scrape during which no interval closed: the families, each meter's last interval and
    the recorder's closed count, all as of the scrape."""
    for _ in range(5):
        last = {m: recorder.last(m) for m in names}
        closed = recorder.closed_total
        families = scrape_families((await request(port, "/metrics"))[2])
        if closed == recorder.closed_total and all(recorder.last(m) is last[m] for m in names):
            return families, last, closed
    raise AssertionError("an interval closed during every one of five scrapes")


async def test_page_charts_every_meter_with_the_balance_alarm_and_metrics_match_the_recorder(tmp_path):
    async with running_bridge(LAYOUT, http=True, energy=ENERGY, state_dir=str(tmp_path)) as h:
        port = h.app.http.port
        task = asyncio.create_task(Counters(h.sims, RATES).run())
        try:
            recorder = h.app.north["energy"]
            names = ["incomer", "lighting", "sockets", "unmetered"]
            assert recorder.meter_names() == names
            await until(lambda: recorder.alarm_state()["unmetered"]["active"]
                        and all(recorder.last(m) is not None for m in names),
                        timeout=20, what="the balance alarm of 'unmetered'")

            page = await read_page(port, str(tmp_path / "chromium"))
            assert page.section is not None and "hidden" not in page.section, "no energy section on the page"
            assert set(page.meters) == set(names)
            now = int(time.time())
            for name in names:
                card = page.meters[name]
                bars = card["bars"]
                assert int(card["attrs"]["data-bars"]) == len(bars) and int(card["chart"]["data-bars"]) == len(bars)
                assert len(bars) >= 2, f"{name}: {len(bars)} bar(s)"
                # each bar is one of the recorder's intervals, as it has it: start, status, energy
                stored = {i.start: i for i in await recorder.intervals(name, now - 3600, now + 10)}
                starts = [int(b["data-start"]) for b in bars]
                assert starts == sorted(starts) and all(s % SECONDS == 0 for s in starts)
                for b in bars:
                    interval = stored[int(b["data-start"])]
                    assert b["data-status"] == interval.status != "missing"
                    assert b["class"].split() == ["bar", interval.status]
                    assert float(b["data-kwh"]) == pytest.approx(interval.energy["import_active_energy"], abs=1e-6)
                    assert b["title"] == b["tip"] and f" kWh \u00b7 {interval.status}" in b["title"]
                    assert re.search(r"\d+:\d\d:\d\d", b["title"]), b["title"]  # its start, as a time of day
                # the slots without an interval (before the bridge ran) are gaps, counted
                assert int(card["attrs"]["data-missing"]) >= 1
                # the last closed interval as the page shows it: the recorder's, unrounded
                last = stored[int(card["attrs"]["data-last-end"]) - SECONDS]
                assert last.start in starts
                assert card["attrs"]["data-last-status"] == last.status
                assert float(card["attrs"]["data-last-kwh"]) == pytest.approx(last.energy["import_active_energy"],
                                                                            rel=1e-12)
                assert float(card["attrs"]["data-last-demand"]) == pytest.approx(last.demand, rel=1e-12)

            incomer = page.meters["incomer"]
            assert incomer["attrs"]["data-virtual"] == "false" and "data-alarm" not in incomer["attrs"]
            assert "virtual" not in incomer["badges"] and "alarm" not in incomer["badges"]
            assert float(incomer["attrs"]["data-last-kwh"]) > 0
            for name in ("lighting", "sockets"):
                assert page.meters[name]["attrs"]["data-virtual"] == "false"
            unmetered = page.meters["unmetered"]
            assert unmetered["attrs"]["data-virtual"] == "true" and "virtual" in unmetered["badges"]
            assert unmetered["attrs"]["data-alarm"] == "active"
            percent = float(unmetered["attrs"]["data-alarm-percent"])
            assert percent > 10.0  # above the alarm's threshold (about 25 %: 9 of 36 kW)
            badge = unmetered["badges"]["alarm"]
            assert badge.startswith("balance alarm ") and badge.endswith(" %"), badge
            assert float(badge.split()[2]) == pytest.approx(percent, abs=0.05)

            # /metrics: the recorder's figures, as of the scrape
            families, last, closed = await steady_scrape(port, recorder, names)
            # the real meters' intervals (a virtual meter's are not counted), two at least for each
            assert sample(families, "modbus_bridge_energy_intervals_closed_total") == closed >= 2 * 3
            assert sample(families, "modbus_bridge_energy_store_write_errors_total") == recorder.write_errors == 0
            for name in names:
                interval = last[name]
                assert sample(families, "modbus_bridge_energy_last_interval_kwh", meter=name) \
                    == pytest.approx(interval.energy["import_active_energy"], rel=1e-12)
                assert sample(families, "modbus_bridge_energy_last_interval_demand_watts", meter=name) \
                    == pytest.approx(interval.demand, rel=1e-12)
                assert sample(families, "modbus_bridge_energy_last_interval_end_timestamp_seconds",
                              meter=name) == interval.end
            assert sample(families, "modbus_bridge_energy_balance_alarm", meter="unmetered") == 1
            # only virtual meters with an alarm have the alarm series
            assert {s.labels["meter"] for s in families["modbus_bridge_energy_balance_alarm"].samples} == {"unmetered"}
        finally:
            task.cancel()


# ---------------------------------------------------------------------------------- a stand-in recorder

INTERVAL = 60


@dataclass
class _AlarmState:
    active: bool
    since: float | None
    percent: float | None


class FakeEnergy:
    """The read model's ``EnergySource`` with chosen intervals; ``fill_missing`` (the recorder's) fills the gaps."""

    interval_s = INTERVAL
    timezone = "UTC"
    billing_day = 1

    def __init__(self, now: float):
        base = int(now) // INTERVAL * INTERVAL  # the end of the last slot that has closed
        main = ["complete", "complete", "estimated", None, "reset", "rollover", "complete"]  # None: missing
        self.stored = {
            "main": [Interval("main", base - (len(main) - k) * INTERVAL, base - (len(main) - k - 1) * INTERVAL, s,
                              {"import_active_energy": 0.5 + 0.1 * k})
                     for k, s in enumerate(main) if s is not None],
            "balance": [Interval("balance", base - (3 - k) * INTERVAL, base - (2 - k) * INTERVAL, "complete",
                                 {"import_active_energy": e}) for k, e in enumerate((0.2, -0.1, -0.3))],
            "quiet": [],
        }
        self.alarms = {"balance": _AlarmState(True, now - 120, 12.5)}
        self.fetched: list[str] = []

    def meter_names(self) -> list[str]:
        return list(self.stored)

    def virtual_names(self) -> list[str]:
        return ["balance"]

    def virtual_meters(self) -> list:
        return []  # "balance" has no terms among the bridge's meters: intervals only, nothing live

    def last(self, meter: str):
        rows = self.stored.get(meter)
        return rows[-1] if rows else None

    def alarm_state(self) -> dict[str, dict]:
        return {n: {"active": a.active, "since": a.since, "percent": a.percent} for n, a in self.alarms.items()}

    async def intervals(self, meter: str, start: int, end: int, detail: bool = False) -> list[Interval]:
        self.fetched.append(meter)
        rows = [i for i in self.stored[meter] if start <= i.start < end]
        return fill_missing(meter, rows, start, min(end, int(time.time())), INTERVAL)

    async def report(self, start: int, end: int, meters: list[str]) -> list[dict]:
        return []


async def test_chart_leaves_gaps_colours_the_statuses_and_draws_negative_balances(tmp_path):
    async with running_bridge({"s": [MeterSpec("main", 1, 11), MeterSpec("quiet", 2, 12)]}, http=True) as h:
        port = h.app.http.port
        # energy off: no energy series at all, and status.json says null
        off = scrape_families((await request(port, "/metrics"))[2])
        assert not [name for name in off if name.startswith("modbus_bridge_energy")]
        fake = FakeEnergy(time.time())
        h.app.view.energy = fake  # what the App's attach does for a recorder

        page = await read_page(port, str(tmp_path / "chromium"))
        assert page.section is not None and "hidden" not in page.section
        # each chart fetched once: the page asks again only after an interval length (60 s here)
        assert sorted(fake.fetched) == ["balance", "main", "quiet"]
        main = page.meters["main"]
        stored = fake.stored["main"]
        assert [b["data-status"] for b in main["bars"]] == [i.status for i in stored]
        assert [int(b["data-start"]) for b in main["bars"]] == [i.start for i in stored]  # the missing slot: a gap
        assert int(main["attrs"]["data-bars"]) == 6 and int(main["attrs"]["data-missing"]) >= 1
        widths = {float(b["width"]) for b in main["bars"]}
        assert len(widths) == 1 and 0 < widths.pop() <= 1
        xs = [float(b["x"]) for b in main["bars"]]
        assert xs[3] - xs[2] == pytest.approx(2.0)  # one slot left empty between estimated and reset
        for b, i in zip(main["bars"], stored):
            assert b["class"].split() == ["bar", i.status]
            assert f"{i.energy['import_active_energy']:g} kWh" in b["title"] and i.status in b["title"]
        heights = [float(b["height"]) for b in main["bars"]]
        assert heights == sorted(heights) and heights[-1] == pytest.approx(100.0)  # scaled to the largest
        assert main["attrs"]["data-virtual"] == "false"
        assert main["attrs"]["data-last-status"] == "complete"
        assert float(main["attrs"]["data-last-kwh"]) == pytest.approx(1.1)
        assert float(main["attrs"]["data-last-demand"]) == pytest.approx(66000.0)
        # the statuses other than complete have their own colours
        html = (await request(port, "/"))[2].decode()
        fills = dict(re.findall(r"(svg\.chart \.bar(?:\.\w+)?) \{ fill: (#\w+); \}", html))
        assert fills["svg.chart .bar.estimated"] != fills["svg.chart .bar"]
        assert "svg.chart .bar.reset" in html and "svg.chart .bar.rollover" in html

        balance = page.meters["balance"]  # virtual: not a meter of any segment
        assert balance["attrs"]["data-virtual"] == "true" and balance["attrs"]["data-alarm"] == "active"
        assert balance["badges"]["alarm"].strip() == "balance alarm 12.5 %"
        assert [float(b["data-kwh"]) for b in balance["bars"]] == [0.2, -0.1, -0.3]
        assert balance["zero"], "a balance below zero needs its zero line"
        zero_y = float(balance["bars"][0]["y"]) + float(balance["bars"][0]["height"])
        assert all(float(b["y"]) == pytest.approx(zero_y) for b in balance["bars"][1:])  # drawn downwards

        quiet = page.meters["quiet"]
        assert quiet["bars"] == [] and quiet["attrs"]["data-bars"] == "0" and "data-last-end" not in quiet["attrs"]
        assert quiet["attrs"]["data-virtual"] == "false" and "data-alarm" not in quiet["attrs"]

        SCREENSHOT.unlink(missing_ok=True)
        await run_chromium(f"http://127.0.0.1:{port}/", str(tmp_path / "shot"), f"--screenshot={SCREENSHOT}",
                           "--window-size=1280,900", "--hide-scrollbars")
        assert SCREENSHOT.stat().st_size > 10_000

        families = scrape_families((await request(port, "/metrics"))[2])
        assert sample(families, "modbus_bridge_energy_last_interval_kwh", meter="main") == pytest.approx(1.1)
        assert sample(families, "modbus_bridge_energy_last_interval_demand_watts", meter="balance") \
            == pytest.approx(-0.3 * 1000 * 3600 / INTERVAL)
        assert sample(families, "modbus_bridge_energy_balance_alarm", meter="balance") == 1
        assert "quiet" not in {s.labels["meter"] for s in families["modbus_bridge_energy_last_interval_kwh"].samples}
        fake.alarms["balance"].active = False
        families = scrape_families((await request(port, "/metrics"))[2])
        assert sample(families, "modbus_bridge_energy_balance_alarm", meter="balance") == 0
