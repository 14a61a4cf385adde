"""Helpers every benchmark script shares: CPU accounting from /proc, formatting, versions.

The scripts import it by name (``python bench/x.py`` puts this folder on sys.path).
"""
from __future__ import annotations

import hashlib
import math
import os
import subprocess
import time
from importlib import metadata
from pathlib import Path

from bridge.testing import free_port  # noqa: F401 (re-exported for the scripts)

__all__ = ["OtherCpu", "dist_version", "fmt", "free_port", "git_describe", "mib", "new_uvloop", "proc_cpu_seconds",
           "stat_ticks", "user_process_ticks", "user_ticks"]

ROOT = Path(__file__).resolve().parent.parent


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


class OtherCpu:
    """CPU used by other processes between two snapshots, and time stolen by the hypervisor."""

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
