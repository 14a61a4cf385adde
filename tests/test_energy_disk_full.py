"""A full disk under the energy store is a normal event: closed intervals are kept in memory, the failure is
counted and said once, and once space returns every interval is written, none lost and none twice.

The disk fills for real: the bridge runs in a child process whose file-size limit (RLIMIT_FSIZE) is set
to the store's current size, so SQLite's next write fails with EFBIG as on a full file system."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import asyncio, json, logging, resource, signal, sys, time
sys.path.insert(0, "tests")
from support import until
from test_energy_e2e import Counters, LAYOUT, RATES
from bridge.core.model import EnergyConfig
from bridge.energy.store import EnergyDb
from bridge.testing import running_bridge

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes beyond the limit fail with EFBIG instead
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
warnings = []
class Catch(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING and record.name == "bridge.energy":
            warnings.append(record.getMessage())
logging.getLogger("bridge.energy").addHandler(Catch())

async def main():
    state = sys.argv[1]
    out = {}
    async with running_bridge(LAYOUT, energy=EnergyConfig(seconds=1, max_gap=1.0), state_dir=state) as h:
        task = asyncio.create_task(Counters(h.sims, RATES).run())
        rec = h.app.north["energy"]
        await until(lambda: rec.closed_total >= 6, timeout=20, what="intervals")
        await rec.flush()
        # the write-ahead log is where each commit is appended: no byte more may be written there
        wal = __import__("pathlib").Path(state) / "energy.sqlite3-wal"
        resource.setrlimit(resource.RLIMIT_FSIZE, (wal.stat().st_size, hard))
        full_from = rec.closed_total
        await until(lambda: rec.write_errors >= 2 and rec.closed_total >= full_from + 4, timeout=20, what="full")
        out["while_full"] = {"errors": rec.write_errors, "note": h.app.view.north()["energy"].note,
                             "kept_in_memory": len(rec._closed)}
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space returns
        await until(lambda: not rec._closed and not rec.last_error, timeout=20, what="written again")
        out["closed_total"] = rec.closed_total
        task.cancel()
    db = EnergyDb(f"{state}/energy.sqlite3", read_only=True)
    out["stored"] = {m: [(i.start, i.energy.get("import_active_energy")) for i in db.intervals(m, 0, 2**40)]
                     for m in ("incomer", "lighting", "sockets")}
    out["warnings"] = warnings
    print(json.dumps(out))

asyncio.run(main())
"""


def test_a_full_disk_keeps_the_intervals_in_memory_and_writes_them_all_when_space_returns(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    full = out["while_full"]
    assert full["errors"] >= 2 and full["kept_in_memory"] >= 1 and "cannot write the energy store" in full["note"]
    assert len([w for w in out["warnings"] if "cannot write" in w]) == 1  # said once, not at every retry
    total = 0
    for meter, rows in out["stored"].items():
        starts = [s for s, _ in rows]
        assert starts == sorted(set(starts)), f"{meter}: an interval stored twice"
        assert all(b - a == 1 for a, b in zip(starts, starts[1:])), f"{meter}: an interval lost"
        assert all(e is not None and e >= 0 for _, e in rows)
        total += len(rows)
    assert total == out["closed_total"]  # every interval closed reached the disk, once
