"""Command line: parse, call, print. No logic of its own.

Errors are one line on stderr and a non-zero exit status, never a traceback:
2 for invalid input (configuration, arguments), 1 for anything else.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn

from bridge.core.errors import BridgeError, ConfigError
from bridge.config.profiles import UnknownProfile

PROG = "modbus-bridge"
STOP_TIMEOUT = 4.5  # seconds a stop may take before the rest is cancelled (SIGTERM: exit within 5 s)


class _Parser(argparse.ArgumentParser):
    """Argument errors are one line, like every other error (`--help` still shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Modbus RTU meters served over Modbus TCP and OPC UA.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="human", choices=["human", "json"],
                   help="human-readable lines (default) or one JSON object per line")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="run the bridge from a configuration file")
    run.add_argument("-c", "--config", required=True, metavar="FILE")

    check = sub.add_parser("check", help="validate a configuration and print a summary")
    check.add_argument("-c", "--config", required=True, metavar="FILE")

    demo = sub.add_parser("demo", help="simulated meters on virtual serial ports, and the bridge on them")
    demo.add_argument("--modbus-port", type=int, default=5020)
    demo.add_argument("--opcua-port", type=int, default=4840)
    demo.add_argument("--http-port", type=int, default=8080, help="status page, metrics and health")
    demo.add_argument("--mqtt", metavar="URL", default="",
                      help="also publish to this broker (one you run, e.g. mqtt://127.0.0.1:1883): Sparkplug B "
                           "group 'demo', edge node 'demo-panel', and JSON under modbus-bridge/demo")

    scan = sub.add_parser("scan", help="find which slave addresses answer on a bus (commissioning)")
    scan.add_argument("--port", required=True, metavar="DEV")
    scan.add_argument("--baudrate", type=int, default=9600)
    scan.add_argument("--baudrates", type=_int_list, metavar="LIST",
                      help="try several speeds, e.g. 2400,4800,9600,19200 (overrides --baudrate)")
    scan.add_argument("--parity", choices=["N", "E", "O"], default="N")
    scan.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    scan.add_argument("--slaves", type=_slave_set, default=list(range(1, 248)), metavar="RANGE",
                      help="addresses to probe, e.g. 1-247 or 1,2,10-20 (default 1-247)")
    scan.add_argument("--timeout", type=float, default=0.1, help="seconds per probe (default 0.1)")
    scan.add_argument("--json", action="store_true")

    read = sub.add_parser("read", help="read one meter once and print its measurements")
    read.add_argument("--port", required=True, metavar="DEV")
    read.add_argument("--slave", type=int, required=True)
    read.add_argument("--profile", required=True, metavar="NAME", help="a built-in profile name or a profile file")
    read.add_argument("--baudrate", type=int, default=9600)
    read.add_argument("--parity", choices=["N", "E", "O"], default="N")
    read.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    read.add_argument("--timeout", type=float, default=0.5)
    read.add_argument("--json", action="store_true")

    points = sub.add_parser("points", help="the points list: every measurement with its addresses and NodeId")
    points.add_argument("-c", "--config", required=True, metavar="FILE")
    points.add_argument("--format", choices=["csv", "json", "md"], default="csv")

    energy = sub.add_parser("energy", help="interval energy kept by the bridge (reads its store, also while it runs)")
    energy_sub = energy.add_subparsers(dest="energy_command", required=True, metavar="ACTION", parser_class=_Parser)
    report = energy_sub.add_parser("report", help="per meter for a billing period: energy per tariff, maximum "
                                                  "demand with its time, interval statuses")
    report.add_argument("-c", "--config", required=True, metavar="FILE")
    report.add_argument("--meter", metavar="M", help="one meter (real or virtual); default: all")
    report.add_argument("--from", dest="start", metavar="DATE",
                        help="a date (local midnight in energy.timezone) or an ISO time; default: the current "
                             "billing period")
    report.add_argument("--to", dest="end", metavar="DATE")
    report.add_argument("--format", choices=["csv", "json", "md"], default="md")

    sub.add_parser("hash-password", help="hash an OPC UA user's password for the configuration (reads stdin)")

    profiles = sub.add_parser("profiles", help="list the built-in meter profiles, or show one")
    profiles.add_argument("name", nargs="?")
    profiles.add_argument("--json", action="store_true")
    return p


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _slave_set(text: str) -> list[int]:
    """``1-247`` or ``1,2,10-20`` -> sorted addresses, each 1..247."""
    slaves: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            slaves.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected addresses like 1-247 or 1,2,10-20, got {text!r}") from None
    if not slaves or min(slaves) < 1 or max(slaves) > 247:
        raise argparse.ArgumentTypeError(f"slave addresses are 1..247, got {text!r}")
    return sorted(slaves)


# SIGINT/SIGTERM that arrive while a long-running command is still starting (imports, loading the
# configuration, binding): remembered here and honoured as a clean stop once the event loop runs
_EARLY_STOP: list[int] = []


def _catch_early_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: _EARLY_STOP.append(signum))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("run", "demo"):
        _catch_early_signals()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if args.log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)
    # asyncua narrates every session at INFO; an appliance log wants our state changes, not that
    logging.getLogger("asyncua").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"{PROG}: error: {issue}", file=sys.stderr)
        return 2
    except UnknownProfile as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except BridgeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `modbus-bridge points ... | head`: the reader left, nothing to say
        sys.stderr.close()
        return 0


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _serve(make: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run a long-lived coroutine under uvloop until SIGINT/SIGTERM; exit 0 on a clean stop."""

    async def guarded() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if _EARLY_STOP:
            stop.set()
        task = asyncio.create_task(make(stop))
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        # stopping: the work winds down by itself (finishing a transaction in flight), within bounds
        done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT)
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    _run_loop(guarded())
    return 0


def _run_loop(coro: Awaitable[None]) -> None:
    try:
        import uvloop
    except ImportError:  # not on every platform; asyncio works, just slower
        asyncio.run(coro)
        return
    uvloop.run(coro)


def cmd_run(args: argparse.Namespace) -> int:
    from bridge.config.loader import load_config
    from bridge.service import serve

    config = load_config(args.config)
    return _serve(lambda stop: serve(args.config, config, stop))


def cmd_check(args: argparse.Namespace) -> int:
    from bridge.config.loader import load_config, summary

    print(summary(load_config(args.config)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from bridge.demo import run_demo

    return _serve(lambda stop: run_demo(args.modbus_port, args.opcua_port, stop, args.http_port, args.mqtt))


def cmd_profiles(args: argparse.Namespace) -> int:
    from bridge.config.profiles import builtin_profile_names, get_builtin

    if args.name:
        profile = get_builtin(args.name)
        rows = [
            {"name": m.name, "function": m.function.label, "address": m.address, "type": m.dtype.value,
             "word_order": m.word_order.value, "scale": m.scale, "unit": m.unit, "description": m.description}
            for m in profile.measurements
        ]
        if args.json:
            print(json.dumps({"name": profile.name, "description": profile.description, "measurements": rows}))
            return 0
        print(f"{profile.name}: {profile.description}")
        for r in rows:
            scale = f"x{r['scale']:g}" if r["scale"] != 1 else ""
            print(f"  {r['name']:<28} {r['function']:<8} 0x{r['address']:04X}  {r['type']:<8} "
                  f"{r['word_order']:<6} {scale:<8} {r['unit']}")
        return 0
    profiles = [get_builtin(n) for n in builtin_profile_names()]
    if args.json:
        print(json.dumps([{"name": p.name, "description": p.description} for p in profiles]))
    else:
        for p in profiles:
            print(f"{p.name:<20} {p.description.split('. ')[0].rstrip('.')}")
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    import getpass

    from bridge.core.passwords import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise BridgeError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        raise BridgeError("empty password")
    print(hash_password(password))
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from bridge.south.commissioning import scan

    baudrates = args.baudrates or [args.baudrate]
    tty = sys.stderr.isatty()

    def progress(baud: int, slave: int, found: int) -> None:
        line = f"scanning {args.port} at {baud} baud: address {slave} of {args.slaves[-1]}, {found} found"
        if tty:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        elif slave == args.slaves[0] or slave % 25 == 0:
            print(line, file=sys.stderr, flush=True)

    found = asyncio.run(scan(args.port, baudrates, args.slaves, parity=args.parity, stopbits=args.stopbits,
                             timeout=args.timeout, progress=progress))
    if tty:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps([f.as_dict() for f in found]))
        return 0
    if not found:
        print("no meter answered", file=sys.stderr)
        return 0
    print(f"{'slave':>5}  {'baud':>6}  fits profiles")
    for f in found:
        print(f"{f.slave:>5}  {f.baudrate:>6}  {', '.join(f.profiles) or '(none of the built-in profiles)'}")
    return 0


def cmd_read(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bridge.south.commissioning import read_meter
    from bridge.config.profiles import resolve_profile

    profile = resolve_profile(args.profile, Path.cwd())
    values = asyncio.run(read_meter(args.port, args.slave, profile, baudrate=args.baudrate, parity=args.parity,
                                    stopbits=args.stopbits, timeout=args.timeout))
    if args.json:
        print(json.dumps(values))
        return 0
    units = {m.name: m.unit for m in profile.measurements}
    print(f"{profile.name}, slave {args.slave} on {args.port}")
    for name, value in values.items():
        print(f"  {name:<28} {value:>14.4f} {units[name]}")
    return 0


def cmd_energy(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from bridge.config.loader import load_config
    import dataclasses

    from bridge.energy.meters import energy_meters
    from bridge.energy.recorder import build_reports, recorded_interval
    from bridge.energy.store import STORE_FILE, EnergyDb, StoreError
    from bridge.north import energy_api
    from bridge.energy.tariffs import billing_period

    config = load_config(args.config)
    if config.energy is None:
        print(f"{PROG}: {args.config}: no energy: section, so the bridge keeps no interval energy", file=sys.stderr)
        return 2
    cfg = config.energy
    names = list(energy_meters(config))
    if args.meter and args.meter not in names:
        print(f"{PROG}: no meter {args.meter!r} with energy counters; one of: {', '.join(names)}", file=sys.stderr)
        return 2
    try:
        now = int(time.time())
        params = {k: v for k, v in (("from", args.start), ("to", args.end)) if v}
        start, end = energy_api.time_range(params, cfg.timezone, billing_period(now, cfg.timezone, cfg.billing_day))
        db = EnergyDb(Path(config.state_dir) / STORE_FILE, read_only=True)
    except (energy_api.BadQuery, StoreError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    try:
        recorded = recorded_interval(db.states())  # the store's own interval length wins over the file's
        if recorded and recorded != cfg.interval_s:
            cfg = dataclasses.replace(cfg, seconds=recorded)
        reports = build_reports(db, cfg, [args.meter] if args.meter else names, start, end)
    finally:
        db.close()
    if args.format == "json":
        print(json.dumps({"from": energy_api.iso(start), "to": energy_api.iso(end), "meters": reports}, indent=1))
    elif args.format == "csv":
        sys.stdout.write(energy_api.report_csv(reports).decode())
    else:
        sys.stdout.write(energy_api.report_markdown(reports))
    return 0


def cmd_points(args: argparse.Namespace) -> int:
    import csv

    from bridge.south.commissioning import points_rows
    from bridge.config.loader import load_config

    config = load_config(args.config)
    rows = points_rows(config)
    if args.format == "json":
        print(json.dumps(rows, indent=1))
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        print(_points_markdown(config, rows))
    return 0


def _points_markdown(config, rows: list[dict]) -> str:
    """A points list an integrator can hand over: one table per meter."""
    out = [f"# Points list: {config.source}", ""]
    tcp, ua = config.modbus_tcp, config.opcua
    if tcp.enabled:
        out.append(f"Modbus TCP: `{tcp.host}:{tcp.port}`; each meter under its unit id, at its own addresses.")
    if ua.enabled:
        out.append(f"OPC UA: `{ua.endpoint}`, namespace `{ua.namespace}`; NodeIds below use the namespace URI.")
    if config.mqtt is not None:
        sp, js = config.mqtt.sparkplug, config.mqtt.json
        if sp is not None:
            out.append(f"Sparkplug B: group `{sp.group_id}`, edge node `{sp.edge_node_id}`; one device per meter, "
                       "metric = measurement name.")
        if js is not None:
            out.append(f"JSON: `{js.topic}/<meter>`, each value at `values.<measurement>`.")
    out.append("")
    for seg in config.segments:
        for meter in seg.meters:
            out += [f"## {meter.name}: unit {meter.unit}",
                    "",
                    f"Profile `{meter.profile.name}`, slave {meter.slave} on segment `{seg.name}` ({seg.port}).",
                    "",
                    "| measurement | FC | address | reference | type | word order | scale | unit | OPC UA NodeId |",
                    "|---|---|---:|---|---|---|---:|---|---|"]
            for r in rows:
                if r["meter"] == meter.name:
                    out.append(f"| {r['measurement']} | {r['function']} | {r['address']} (0x{r['address']:04X}) | "
                               f"{r['reference']} | {r['type']} | {r['word_order']} | {r['scale']:g} | "
                               f"{r['unit']} | `{r['nodeid']}` |")
            out.append("")
    for name in dict.fromkeys(r["meter"] for r in rows if r["segment"] == "(virtual)"):
        mine = [r for r in rows if r["meter"] == name and r["segment"] == "(virtual)"]
        out += [f"## {name}: unit {mine[0]['unit_id']} (virtual meter)", "",
                f"`{next(v.formula for v in config.energy.virtual if v.name == name)}`: live power, then its last closed interval "
                "(FC3 and FC4 alike; docs/modbus.md).", "",
                "| value | address | reference | type | unit | OPC UA NodeId |", "|---|---:|---|---|---|---|"]
        out += [f"| {r['measurement']} | {r['address']} | {r['reference']} | {r['type']} | {r['unit']} | `{r['nodeid']}` |"
                for r in mine]
        out.append("")
    return "\n".join(out)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "check": cmd_check,
    "demo": cmd_demo,
    "profiles": cmd_profiles,
    "hash-password": cmd_hash_password,
    "scan": cmd_scan,
    "read": cmd_read,
    "points": cmd_points,
    "energy": cmd_energy,
}
