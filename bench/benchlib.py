"""Helpers every benchmark script shares: CPU accounting from /proc, other processes' load, statistics,
formatting, versions, the machine, the bridge as a measured process, and the Modbus TCP client.

The scripts import it by name (``python bench/x.py`` puts this folder on sys.path).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from bridge.core.errors import ProtocolError
from bridge.testing import RawModbusClient, free_port  # noqa: F401 (re-exported for the scripts)

__all__ = ["HOST", "NOISY_PCT", "REQUEST_TIMEOUT", "TERM_TIMEOUT", "BridgeProcess", "Conn", "OtherCpu",
           "RawModbusClient", "arg_parser", "command_line", "dist_version", "emit", "fmt", "free_port", "git_describe",
           "latency_ms", "log", "machine_info", "median", "mib", "new_uvloop", "percentile", "proc_cpu_seconds",
           "proc_fds", "proc_status", "stat_ticks", "user_process_ticks", "user_ticks", "wait_quiet"]

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
REQUEST_TIMEOUT = 2.0  # seconds for any Modbus TCP reply
NOISY_PCT = 10  # other processes' CPU use (% of a core) above which a measurement is flagged as disturbed
TERM_TIMEOUT = 5.0  # seconds the bridge has to exit after SIGTERM


def log(msg: str) -> None:
    """Progress on stderr, with the time of day (stdout carries the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def command_line() -> str:
    """How this script was run, for the report (the interpreter relative to the working directory when inside it)."""
    return shlex.join([os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd())
                       else sys.executable] + sys.argv)


def emit(result: dict, markdown, json_path: str | None) -> None:
    """The results: ``markdown(result)`` on stdout and, with ``--json PATH``, the JSON in PATH too (``-``: the
    JSON on stdout instead of the Markdown)."""
    text = json.dumps(result, indent=2, default=str)
    if json_path == "-":
        print(text)
        return
    print(markdown(result))
    if json_path:
        Path(json_path).write_text(text + "\n")


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the script's docstring's first paragraph."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def user_process_ticks() -> dict[int, int]:
    """CPU ticks (user + system) of every user-space process, by pid (Linux /proc)."""
    ticks = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[6]) & 0x00200000:  # PF_KTHREAD: kernel threads carry our own loopback work
            continue
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
    return ticks


def stat_ticks() -> tuple[int, int]:
    """Machine-wide (user + nice, steal) ticks from /proc/stat."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(f[1]) + int(f[2]), int(f[8])


def user_ticks(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11])
    except OSError:
        return 0


def proc_cpu_seconds(pid: int | str = "self") -> float | None:
    """User + system CPU time of a process so far, in seconds (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def new_uvloop():
    import uvloop

    return uvloop.new_event_loop()


def fmt(v, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def mib(kib) -> str:
    return fmt(kib / 1024 if kib is not None else None, ".1f")


# ---------------------------------------------------------------------------------- statistics
def percentile(sorted_values, q: float) -> float:
    """Nearest-rank percentile of already sorted values (NaN for none)."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def median(values) -> float | None:
    """The median of the values that are neither None nor NaN; None if there are none."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else None


def latency_ms(values_s) -> dict:
    """Count, p50, p99, max and mean of latencies given in seconds, in milliseconds."""
    v = sorted(values_s)
    return {"n": len(v), "p50_ms": percentile(v, 0.5) * 1e3, "p99_ms": percentile(v, 0.99) * 1e3,
            "max_ms": (v[-1] * 1e3) if v else math.nan, "mean_ms": (statistics.fmean(v) * 1e3) if v else math.nan}


def machine_info(nproc: int | None = None, pinned: dict | None = None,
                 packages: tuple[str, ...] = ("asyncua", "uvloop"), **extra) -> dict:
    """What a result was measured on: CPUs (this process's affinity unless given), CPU model, RAM, kernel,
    Python, the versions of ``packages``, the commit, the CPU pinning, and ``extra``."""
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = None
    try:
        mem_total = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return {"nproc": len(os.sched_getaffinity(0)) if nproc is None else nproc, "cpu": cpu_model,
            "mem_total_kib": mem_total, "kernel": platform.release(), "python": platform.python_version(),
            **{name: dist_version(name) for name in packages}, "commit": git_describe(), "pinning": pinned, **extra}


def git_describe() -> str:
    """`git describe --always --dirty`, plus a hash of the uncommitted diff when dirty."""
    try:
        describe = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=5).stdout.strip()
        if describe.endswith("-dirty"):
            diff = subprocess.run(["git", "diff", "HEAD"], cwd=ROOT, capture_output=True, timeout=10).stdout
            describe += f" (uncommitted diff {hashlib.sha1(diff).hexdigest()[:8]})"
        return describe
    except (OSError, subprocess.SubprocessError):
        return ""


def proc_status(pid: int) -> dict[str, int]:
    """Memory (kiB) and thread count of a process from /proc/PID/status; empty once it is gone."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def proc_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class OtherCpu:
    """CPU used by other processes between two snapshots, and time stolen by the hypervisor.

    Other processes' user time comes from /proc/stat minus ours, so processes that started and
    exited in between count too; their system time only for the ones still alive.
    """

    def __init__(self, ours: set[int]):
        self.ours = ours
        self.before = user_process_ticks()
        self.stat = stat_ticks()
        self.our_user = sum(user_ticks(p) for p in ours)
        self.t0 = time.monotonic()

    def measure(self) -> tuple[float, float]:
        """(% of a core used by others, % of a core stolen)."""
        after = user_process_ticks()
        user, steal = stat_ticks()
        our_user = sum(user_ticks(p) for p in self.ours)
        others_user = (user - self.stat[0]) - (our_user - self.our_user)
        others_alive = sum(t - self.before.get(pid, 0) for pid, t in after.items() if pid not in self.ours)
        elapsed = (time.monotonic() - self.t0) * os.sysconf("SC_CLK_TCK")
        return 100 * max(others_user, others_alive) / elapsed, 100 * (steal - self.stat[1]) / elapsed

    def pct(self) -> float:
        return self.measure()[0]


def wait_quiet(limit: float, window: float = 2.0, steal: bool = False) -> float:
    """Wait (up to ``limit`` s) for a ``window`` in which other processes use at most NOISY_PCT of a core (plus
    the hypervisor's stolen time when ``steal``); return what they used in the last window. Blocks: from a
    running event loop, call it with ``asyncio.to_thread``."""
    deadline = time.monotonic() + limit
    while True:
        probe = OtherCpu({os.getpid()})
        time.sleep(window)
        others, stolen = probe.measure()
        pct = others + stolen if steal else others
        if pct <= NOISY_PCT or time.monotonic() >= deadline:
            return pct
        log(f"  other processes use {pct:.0f} % of a core: waiting for a quiet machine ...")


# ---------------------------------------------------------------------------------- the bridge, measured
class BridgeProcess:
    """``python -m bridge ARGS``, the process measured: started (pinned to ``cpu`` if given) with its stdout and
    stderr in temporary files, sampled from /proc, stopped with SIGTERM (SIGKILL after TERM_TIMEOUT)."""

    def __init__(self, args: list[str], cpu: int | None, prefix: str):
        self.argv = [sys.executable, "-m", "bridge", *args]
        self.stdout = tempfile.NamedTemporaryFile(prefix=prefix, suffix=".out")
        self.stderr = tempfile.NamedTemporaryFile(prefix=prefix, suffix=".log")
        preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.stdout, stderr=self.stderr,
                                     cwd=ROOT, preexec_fn=preexec)
        self.pid = self.proc.pid
        self.exit_code: int | None = None
        self.exit_seconds: float | None = None
        self.killed = False

    def sample(self) -> dict:
        st = proc_status(self.pid)
        return {"t": time.monotonic(), "rss_kib": st.get("VmRSS"), "hwm_kib": st.get("VmHWM"),
                "anon_kib": st.get("RssAnon"), "file_kib": st.get("RssFile"), "threads": st.get("Threads"),
                "cpu_s": proc_cpu_seconds(self.pid), "fds": proc_fds(self.pid)}

    def terminate(self) -> None:
        """SIGTERM; record the exit status and how long it took (SIGKILL after TERM_TIMEOUT)."""
        if self.proc.poll() is not None:
            self.exit_code = self.proc.returncode
            return
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout=TERM_TIMEOUT)
            self.exit_seconds = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            self.killed = True
            self.proc.kill()
            self.proc.wait()
            self.exit_code = self.proc.returncode

    def stdout_text(self) -> str:
        return Path(self.stdout.name).read_text(errors="replace")

    def log_text(self) -> str:
        return Path(self.stderr.name).read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stdout.close()
        self.stderr.close()


# ---------------------------------------------------------------------------------- Modbus TCP client
class Conn(RawModbusClient):
    """bridge.testing's raw Modbus TCP client, with what a load generator adds: a bounded connect with
    TCP_NODELAY, and a request that returns its latency and raises ValueError for a reply that cannot be
    its own (a header that cannot be Modbus, another transaction id or unit)."""

    @classmethod
    async def open(cls, port: int, host: str = HOST, timeout: float = REQUEST_TIMEOUT) -> "Conn":
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def timed_request(self, unit: int, pdu: bytes, timeout: float = REQUEST_TIMEOUT) -> tuple[bytes, float]:
        """Send one request; return (reply PDU, seconds from sending to the whole reply)."""
        t0 = time.perf_counter()
        tid = self.send(unit, pdu)
        try:
            frame = await self.receive(timeout)
        except ProtocolError as exc:
            raise ValueError(f"bad MBAP header: {exc}") from None
        latency = time.perf_counter() - t0
        if frame.tid != tid or frame.unit != unit:
            raise ValueError(f"reply tid {frame.tid} unit {frame.unit} for request tid {tid} unit {unit}")
        return frame.pdu, latency
