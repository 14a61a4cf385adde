"""The MQTT store-and-forward queue (bridge.north.mqtt.queue): order, bounds, acknowledgement, a kill -9,
a full disk and an unusable file."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import threading
from pathlib import Path

import pytest

from bridge.core.mqtt_types import Publish
from bridge.north.mqtt.queue import DiskQueue

ROOT = Path(__file__).resolve().parent.parent
BIG = 1 << 30
LONG = 1e9


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def msg(i: int, stream: str = "json", size: int = 20) -> tuple[str, Publish, float]:
    return (stream, Publish(f"t/{i:04d}", f"{i:04d}".encode().ljust(size, b"."), 1, False), 1000.0 + i)


def size_of(record: tuple[str, Publish, float]) -> int:
    return len(record[1].topic.encode()) + len(record[1].payload)


async def everything(q: DiskQueue, stream: str | None = None) -> list[tuple[int, Publish, float, str]]:
    return await q.peek(1_000_000, stream)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "mqtt-queue.sqlite3"


async def test_put_peek_in_order_with_every_field(path: Path):
    q = await DiskQueue.open(path, BIG, LONG, clock=Clock())
    records = [
        ("json", Publish("a/é", b"\x00\x01\xff", qos=0, retain=True), 1001.5),
        ("sparkplug", Publish("spBv1.0/g/DDATA/n/m", b"", qos=1, retain=False), 1002.0),
        ("json", Publish("a/b", b"{}", qos=1, retain=True), 999.0),  # created out of order: kept in put order
    ]
    await q.put(records)
    got = await everything(q)
    assert [(stream, m, created) for _, m, created, stream in got] == records
    ids = [i for i, *_ in got]
    assert ids == sorted(ids) and len(set(ids)) == 3
    s = q.stats()
    assert s["queued"] == 3 and s["queued_bytes"] == sum(map(size_of, records))  # topic bytes as UTF-8
    assert s["oldest_age"] == pytest.approx(1000.0 - 999.0)
    assert s["dropped"] == s["dropped_disk_full"] == s["acked"] == 0 and s["last_error"] == ""
    await q.close()


async def test_order_survives_reopen_and_ids_are_never_reused(path: Path):
    q = await DiskQueue.open(path, BIG, LONG, clock=Clock())
    await q.put([msg(i, "json" if i % 3 else "sparkplug") for i in range(10)])
    await q.put([msg(i) for i in range(10, 15)])
    before = await everything(q)
    await q.close()
    q = await DiskQueue.open(path, BIG, LONG, clock=Clock())
    assert await everything(q) == before
    assert q.stats()["queued"] == 15
    await q.ack([i for i, *_ in before])  # empty the queue: the next id still follows the last one
    await q.close()
    q = await DiskQueue.open(path, BIG, LONG, clock=Clock())
    await q.put([msg(99)])
    [(new_id, *_)] = await everything(q)
    assert new_id > before[-1][0]
    await q.close()


async def test_peek_by_stream_and_limit(path: Path):
    q = await DiskQueue.open(path, BIG, LONG, clock=Clock())
    await q.put([msg(i, "sparkplug" if i % 2 else "json") for i in range(10)])
    spark = await q.peek(3, "sparkplug")
    assert [m.topic for _, m, _, _ in spark] == ["t/0001", "t/0003", "t/0005"]
    assert {s for *_, s in spark} == {"sparkplug"}
    assert [m.topic for _, m, _, _ in await q.peek(100, "json")] == [f"t/{i:04d}" for i in range(0, 10, 2)]
    assert [m.topic for _, m, _, _ in await q.peek(2)] == ["t/0000", "t/0001"]
    assert await q.peek(5, "nothing") == [] and await q.peek(0) == []
    await q.close()


async def test_ack_removes_only_the_acked_ids(path: Path):
    q = await DiskQueue.open(path, BIG, LONG, clock=Clock())
    records = [msg(i) for i in range(6)]
    await q.put(records)
    ids = [i for i, *_ in await everything(q)]
    await q.ack([ids[1], ids[4], 987654])  # an id not queued (dropped, or acked twice) is ignored
    left = await everything(q)
    assert [i for i, *_ in left] == [ids[0], ids[2], ids[3], ids[5]]
    s = q.stats()
    assert s["acked"] == 2 and s["queued"] == 4
    assert s["queued_bytes"] == sum(size_of(records[k]) for k in (0, 2, 3, 5))
    await q.ack([ids[1]])
    assert q.stats()["acked"] == 2
    await q.close()


async def test_size_bound_drops_the_oldest_first_and_counts(path: Path):
    one = size_of(msg(0))
    q = await DiskQueue.open(path, 10 * one, LONG, clock=Clock(2000))
    await q.put([msg(i) for i in range(4)])
    await q.put([msg(i) for i in range(4, 14)])
    assert [m.topic for _, m, _, _ in await everything(q)] == [f"t/{i:04d}" for i in range(4, 14)]
    s = q.stats()
    assert (s["queued"], s["queued_bytes"], s["dropped"]) == (10, 10 * one, 4)
    await q.put([msg(i) for i in range(14, 40)])  # one put larger than the bound: its own oldest go too
    assert [m.topic for _, m, _, _ in await everything(q)] == [f"t/{i:04d}" for i in range(30, 40)]
    assert q.stats()["dropped"] == 30
    await q.close()
    q = await DiskQueue.open(path, 5 * one, LONG, clock=Clock(2000))  # a smaller bound applies at open
    assert [m.topic for _, m, _, _ in await everything(q)] == [f"t/{i:04d}" for i in range(35, 40)]
    assert q.stats()["dropped"] == 5
    await q.close()


async def test_age_bound_on_put_and_on_peek(path: Path):
    clock = Clock(100.0)
    q = await DiskQueue.open(path, BIG, 20.0, clock=clock)
    topic = {10.0: "a", 50.0: "b", 95.0: "c", 99.0: "d"}
    await q.put([("json", Publish(topic[c], b"x"), c) for c in (10.0, 95.0, 50.0, 99.0)])
    assert [m.topic for _, m, _, _ in await everything(q)] == ["c", "d"]  # older than 80: dropped
    assert q.stats()["dropped"] == 2 and q.stats()["oldest_age"] == pytest.approx(5.0)
    clock.now = 118.0  # "c" (95) is now too old, though nothing was put since
    assert [m.topic for _, m, _, _ in await everything(q)] == ["d"]
    s = q.stats()
    assert (s["queued"], s["dropped"], s["queued_bytes"]) == (1, 3, 2)
    assert s["oldest_age"] == pytest.approx(19.0)
    await q.close()


async def test_calls_wait_for_the_worker_without_blocking_the_loop(path: Path):
    q = await DiskQueue.open(path, BIG, LONG, clock=Clock())
    gate = threading.Event()
    q._pool.submit(gate.wait)  # the queue's one worker is busy
    put = asyncio.create_task(q.put([msg(1)]))
    peek = asyncio.create_task(q.peek(10))
    for _ in range(20):
        await asyncio.sleep(0)  # the loop runs on
    assert not put.done() and not peek.done()
    gate.set()
    await put
    assert [m.topic for _, m, _, _ in await peek] == ["t/0001"]  # in call order: the put first
    await q.close()
    await q.close()
    with pytest.raises(RuntimeError):
        await q.put([msg(2)])


async def test_an_unusable_file_is_moved_aside_with_its_wal(path: Path):
    path.write_bytes(b"not a database at all " * 300)
    Path(f"{path}-wal").write_bytes(b"stale wal")
    q = await DiskQueue.open(path, BIG, LONG, clock=Clock())
    s = q.stats()
    assert s["corrupt"] == 1 and "moved aside" in s["last_error"]
    [aside] = path.parent.glob("mqtt-queue.sqlite3.corrupt-*[0-9TZ]")
    assert aside.read_bytes().startswith(b"not a database")
    assert Path(f"{aside}-wal").read_bytes() == b"stale wal"
    await q.put([msg(1)])
    assert len(await everything(q)) == 1
    await q.close()


@pytest.mark.parametrize("setup", ["newer schema", "another program's database"])
def test_a_database_that_is_not_this_queue_is_moved_aside(path: Path, setup: str):
    db = sqlite3.connect(path)
    if setup == "newer schema":
        db.execute("PRAGMA user_version = 99")
    else:
        db.execute("CREATE TABLE stuff (x)")
    db.commit()
    db.close()

    async def main() -> None:
        q = await DiskQueue.open(path, BIG, LONG, clock=Clock())
        assert q.stats()["corrupt"] == 1
        await q.put([msg(1)])
        assert len(await everything(q)) == 1
        await q.close()

    asyncio.run(main())
    [aside] = path.parent.glob("mqtt-queue.sqlite3.corrupt-*[0-9TZ]")
    db = sqlite3.connect(aside)  # left as it was
    assert db.execute("SELECT name FROM sqlite_master").fetchall() == ([] if setup == "newer schema" else [("stuff",)])
    assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    db.close()


async def test_a_damaged_page_is_found_at_open(path: Path):
    q = await DiskQueue.open(path, BIG, LONG, clock=Clock())
    await q.put([msg(i, size=300) for i in range(200)])
    await q.close()  # checkpointed: everything is in the main file
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 10 * page
    for start in range(2 * page, len(data) - page, page):  # every page after the schema's, scrambled
        data[start:start + page] = bytes((i * 37 + 11) % 256 for i in range(page))
    path.write_bytes(bytes(data))
    q = await DiskQueue.open(path, BIG, LONG, clock=Clock())
    assert q.stats()["corrupt"] == 1 and q.stats()["queued"] == 0
    await q.put([msg(1)])
    assert len(await everything(q)) == 1
    await q.close()


async def test_open_raises_oserror_when_the_operator_must_act(tmp_path: Path):
    with pytest.raises(OSError):
        await DiskQueue.open(tmp_path, BIG, LONG)  # a folder where the file should be


KILL_SCRIPT = """
import asyncio, sys, time
from pathlib import Path
from bridge.core.mqtt_types import Publish
from bridge.north.mqtt.queue import DiskQueue

async def main():
    q = await DiskQueue.open(Path(sys.argv[1]), 1 << 30, 1e9)
    for i in range(int(sys.argv[2])):
        await q.put([("json" if i % 2 else "sparkplug", Publish(f"t/{i}", b"%d" % i), time.time())])
    print("done", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_kill_9_loses_nothing_queued(path: Path):
    n = 300
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", KILL_SCRIPT, str(path), str(n),
                                                cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line == b"done\n"
        assert Path(f"{path}-wal").stat().st_size > 0  # the latest records are in the WAL only
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    q = await DiskQueue.open(path, BIG, LONG)
    got = await everything(q)
    assert [(m.topic, m.payload) for _, m, _, _ in got] == [(f"t/{i}", b"%d" % i) for i in range(n)]
    assert [s for *_, s in got] == ["json" if i % 2 else "sparkplug" for i in range(n)]
    assert q.stats()["queued"] == n
    await q.close()


DISK_FULL_SCRIPT = """
import asyncio, json, logging, os, resource, signal, sys, time
from pathlib import Path
from bridge.core.mqtt_types import Publish
from bridge.north.mqtt.queue import DiskQueue

path = Path(sys.argv[1])
warnings = []
class Catch(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            warnings.append(record.getMessage())
logging.getLogger("bridge.mqtt.queue").addHandler(Catch())
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes beyond the limit fail with EFBIG instead
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

def largest():
    return max(p.stat().st_size for p in path.parent.iterdir())

def batch(k):
    return [("json", Publish(f"t/{k}/{i}", b"x" * 300), time.time()) for i in range(240)]

async def main():
    out = {}
    q = await DiskQueue.open(path, 1 << 30, 1e9)
    await q.put(batch(0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (largest() + 100_000, hard))
    kept = [0]
    for k in range(1, 5):
        before = q.stats()["dropped_disk_full"]
        await q.put(batch(k))
        if q.stats()["dropped_disk_full"] == before:
            kept.append(k)
    out["full"] = q.stats()
    out["kept"] = kept
    out["topics_when_full"] = [m.topic for _, m, _, _ in await q.peek(100000)]
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space returns
    await q.put(batch(5))
    out["recovered"] = q.stats()
    # an ack that cannot be written: peek skips the id; the next write that works deletes it
    first = (await q.peek(1))[0][0]
    resource.setrlimit(resource.RLIMIT_FSIZE, (largest(), hard))
    await q.ack([first])
    out["ack_failed"] = q.stats()
    out["peek_after_failed_ack"] = [i for i, *_ in await q.peek(2)]
    out["first"] = first
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    await q.put(batch(6))
    out["after_put"] = q.stats()
    out["topics"] = [m.topic for _, m, _, _ in await q.peek(100000)]
    out["warnings"] = warnings
    await q.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_a_full_disk_is_counted_not_raised_and_recovers(path: Path):
    import subprocess
    done = subprocess.run([sys.executable, "-c", DISK_FULL_SCRIPT, str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    full, kept = out["full"], out["kept"]
    failed = 5 - len(kept)
    assert failed >= 1
    assert full["dropped_disk_full"] == 240 * failed and full["write_failing"] is True
    assert full["last_error"] and full["queued"] == 240 * len(kept)
    expected = [f"t/{k}/{i}" for k in kept for i in range(240)]
    assert out["topics_when_full"] == expected  # what was written before is intact and readable
    rec = out["recovered"]
    assert rec["write_failing"] is False and rec["queued"] == 240 * (len(kept) + 1)
    assert rec["dropped_disk_full"] == 240 * failed
    assert out["ack_failed"]["acked"] == 0 and out["ack_failed"]["write_failing"] is True
    assert out["first"] not in out["peek_after_failed_ack"]
    assert out["after_put"]["acked"] == 1 and out["after_put"]["write_failing"] is False
    expected = [f"t/{k}/{i}" for k in (*kept, 5, 6) for i in range(240)][1:]
    assert out["topics"] == expected
    assert len([w for w in out["warnings"] if "cannot write" in w]) == 2  # once per episode (two here)

    async def reopen() -> None:
        q = await DiskQueue.open(path, BIG, LONG)
        assert [m.topic for _, m, _, _ in await everything(q)] == expected
        await q.close()

    asyncio.run(reopen())
