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

from .errors import BridgeError, ConfigError
from .profiles import UnknownProfile

PROG = "modbus-bridge"
STOP_TIMEOUT = 4.5  # seconds a stop may take before the rest is cancelled (SIGTERM: exit within 5 s)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Modbus RTU meters served over Modbus TCP and OPC UA.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the bridge from a configuration file")
    run.add_argument("-c", "--config", required=True, metavar="FILE")

    check = sub.add_parser("check", help="validate a configuration and print a summary")
    check.add_argument("-c", "--config", required=True, metavar="FILE")

    demo = sub.add_parser("demo", help="simulated meters on virtual serial ports, and the bridge on them")
    demo.add_argument("--modbus-port", type=int, default=5020)
    demo.add_argument("--opcua-port", type=int, default=4840)

    sub.add_parser("hash-password", help="hash an OPC UA user's password for the configuration (reads stdin)")

    profiles = sub.add_parser("profiles", help="list the built-in meter profiles, or show one")
    profiles.add_argument("name", nargs="?")
    profiles.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )
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


def _serve(make: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run a long-lived coroutine under uvloop until SIGINT/SIGTERM; exit 0 on a clean stop."""

    async def guarded() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
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
    from .app import App
    from .config import load_config

    config = load_config(args.config)

    async def serve(stop: asyncio.Event) -> None:
        app = App(config)
        runner = asyncio.create_task(app.run())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        app.stop()
        stopper.cancel()
        await runner

    return _serve(serve)


def cmd_check(args: argparse.Namespace) -> int:
    from .config import load_config, summary

    print(summary(load_config(args.config)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return _serve(lambda stop: run_demo(args.modbus_port, args.opcua_port, stop))


def cmd_profiles(args: argparse.Namespace) -> int:
    from .profiles import builtin_profile_names, get_builtin

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

    from .passwords import hash_password

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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "check": cmd_check,
    "demo": cmd_demo,
    "profiles": cmd_profiles,
    "hash-password": cmd_hash_password,
}
