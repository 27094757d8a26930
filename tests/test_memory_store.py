"""SQLite store: WAL, schema versioning, and several processes writing to one bank at once."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import time
from pathlib import Path

import pytest

from critique_rl.config import MemoryConfig
from critique_rl.errors import UserError
from critique_rl.memory import Demonstration, MemoryBank
from critique_rl.memory.store import SCHEMA_VERSION, MemoryStore


def test_new_bank_is_wal_and_versioned(tmp_path: Path) -> None:
    store = MemoryStore(tmp_path / "b.sqlite")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.schema_version == SCHEMA_VERSION >= 2
    names = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")}
    assert {"records", "counters", "records_usefulness"} <= names
    store.close()


def test_migrates_old_schema_in_place(tmp_path: Path) -> None:
    from critique_rl.memory.store import MIGRATIONS

    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    for stmt in MIGRATIONS[0]:
        conn.execute(stmt)
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = MemoryStore(path)
    assert store.schema_version == SCHEMA_VERSION
    assert store.conn.execute("SELECT name FROM sqlite_master WHERE name = 'records_usefulness'").fetchone()


def test_newer_schema_and_garbage_files_are_user_errors(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    with pytest.raises(UserError, match="newer"):
        MemoryStore(path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all, just some bytes" * 100)
    with pytest.raises(UserError, match="not a readable SQLite bank"):
        MemoryStore(junk)
    with pytest.raises(UserError, match="does not exist"):
        MemoryStore(tmp_path / "missing.sqlite", create=False)
    assert not (tmp_path / "missing.sqlite").exists()


def test_write_retries_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    store = MemoryStore(path, busy_timeout_ms=50)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # hold the write lock
    import threading

    threading.Timer(0.5, lambda: other.execute("COMMIT")).start()
    t0 = time.monotonic()
    store.write(lambda c: MemoryStore.insert(c, Demonstration(question="q", trajectory="t")))
    assert time.monotonic() - t0 >= 0.4
    assert store.lock_retries > 0
    assert len(store.list()) == 1


def test_lock_timeout_is_one_line_user_error(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    store = MemoryStore(path, busy_timeout_ms=20, lock_timeout_s=0.3)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(UserError, match="stayed locked") as info:
        store.write(lambda c: MemoryStore.insert(c, Demonstration(question="q", trajectory="t")))
    assert "\n" not in str(info.value)
    other.execute("ROLLBACK")


def _writer(path: str, worker: int, n: int, go: object, out: object) -> None:
    """Child process: n records, each its own transaction; successes are distinct demos, every third
    episode fails into the same lesson (merges). All workers start writing together."""
    bank = MemoryBank(path, MemoryConfig(embeddings="lexical"))
    go.wait(60)  # type: ignore[attr-defined]  # a Barrier: every worker has opened the bank
    t0 = time.time()
    for i in range(n):
        if i % 3 == 0:
            bank.record(task=f"{10 + i % 7}+{19 + i % 5}=", trajectory="hmm", reward=0.0, task_name="addition",
                        episode_id=f"w{worker}-{i}")
        else:
            bank.record(task=f"worker {worker} question {i}", trajectory=f"answer {i}", reward=1.0)
    out.put((t0, time.time(), bank.store.lock_retries))  # type: ignore[attr-defined]
    bank.close()


def _hammer(tmp_path: Path, workers: int, n: int) -> None:
    path = str(tmp_path / "shared.sqlite")
    ctx = mp.get_context("spawn")
    go, out = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, w, n, go, out)) for w in range(workers)]
    for p in procs:
        p.start()
    spans = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers
    assert max(s[0] for s in spans) < min(s[1] for s in spans)  # the writers really overlapped
    bank = MemoryBank(path, MemoryConfig(embeddings="lexical"))
    failures = workers * len(range(0, n, 3))
    demos = bank.list(kind="demonstration")
    lessons = bank.list(kind="lesson")
    assert len(demos) == workers * n - failures              # every success stored, none lost
    assert len({d.question for d in demos}) == len(demos)
    assert len(lessons) == 1                                  # all "no number" failures merged into one lesson
    assert sum(ls.merged + 1 for ls in lessons) == failures   # no lost merge updates
    assert len({s for ls in lessons for s in ls.source_ids}) == failures
    assert bank.store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_four_processes_500_records_each(tmp_path: Path) -> None:
    """4 spawned processes x 500 records, one transaction each: no lost write, no lock error."""
    _hammer(tmp_path, workers=4, n=500)
