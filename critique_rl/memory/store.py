"""SQLite store for memory records.

- WAL mode, so readers never block the writer and several processes can share one bank file.
- Versioned schema: ``PRAGMA user_version`` plus the :data:`MIGRATIONS` list, applied in order inside one
  ``BEGIN IMMEDIATE`` transaction (safe when several processes open a new bank at once).
- Every write is its own ``BEGIN IMMEDIATE`` transaction, run through :meth:`MemoryStore.write`, which retries
  "database is locked"/"busy" with jittered backoff on top of SQLite's ``busy_timeout``. After
  ``lock_timeout_s`` it raises a one-line :class:`~critique_rl.errors.UserError`; a raw lock error never
  reaches the user.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from critique_rl.errors import UserError
from critique_rl.memory.records import Demonstration, Lesson, Record

T = TypeVar("T")

MIGRATIONS: list[list[str]] = [
    # v1: one row per record; kind-specific fields as JSON; counters for things that are counted, not stored.
    [
        """CREATE TABLE records (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL CHECK (kind IN ('demonstration', 'lesson')),
            key_text TEXT NOT NULL,
            dedup_hash TEXT NOT NULL,
            payload TEXT NOT NULL,
            tags TEXT NOT NULL DEFAULT '[]',
            source_run TEXT,
            source_step INTEGER,
            retrieved INTEGER NOT NULL DEFAULT 0,
            helped INTEGER NOT NULL DEFAULT 0,
            merged INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            embedding BLOB,
            embed_model TEXT
        )""",
        "CREATE INDEX records_kind_hash ON records (kind, dedup_hash)",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    ],
    # v2: usefulness order, used to fill lexical results and to prune.
    [
        "CREATE INDEX records_usefulness ON records "
        "(kind, ((helped + 1.0) / (retrieved + 2.0)) DESC, merged DESC, updated_at DESC)",
    ],
    # v3: ``lift``, the summed outcome-minus-baseline of the episodes whose prompt held the record (see
    # MemoryHook.update / MemoryBank.credit); usefulness is its smoothed mean, the helped ratio breaks ties.
    [
        "ALTER TABLE records ADD COLUMN lift REAL NOT NULL DEFAULT 0",
        "DROP INDEX IF EXISTS records_usefulness",
        "CREATE INDEX records_usefulness ON records "
        "(kind, (lift / (retrieved + 2.0)) DESC, ((helped + 1.0) / (retrieved + 2.0)) DESC, merged DESC, "
        "updated_at DESC)",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)

USEFULNESS_PRIOR = 2.0
"""Pseudo-episodes of zero lift in the usefulness score: ``lift / (retrieved + USEFULNESS_PRIOR)``, so a record
seen in one lucky episode does not outrank one that helped in fifty."""
USEFULNESS_EXPR = "(lift / (retrieved + 2.0))"
"""SQL of :func:`usefulness` (the smoothed mean lift)."""
USEFULNESS_SQL = (f"{USEFULNESS_EXPR} DESC, ((helped + 1.0) / (retrieved + 2.0)) DESC, merged DESC, "
                  "updated_at DESC")
"""Most useful first: smoothed mean lift; ties (e.g. records credited without a baseline, whose lift is 0) go to
the Laplace-smoothed helped ratio, then the most merged, then the most recent."""
LEAST_USEFUL_SQL = (f"{USEFULNESS_EXPR} ASC, ((helped + 1.0) / (retrieved + 2.0)) ASC, retrieved DESC, "
                    "updated_at ASC")
"""The reverse: lowest smoothed mean lift first, then lowest helped ratio; ties go to the most retrieved (more
evidence), then the oldest."""


def usefulness(lift: float, retrieved: int) -> float:
    """Smoothed mean lift of a record: ``lift / (retrieved + 2)``. ``lift`` sums, over the episodes whose
    prompt held the record, the episode's outcome (1 success, 0 failure) minus the baseline outcome it is
    compared with; so the value is in [-1, 1], 0 for a record never credited, and it approaches the record's
    mean lift as evidence accumulates."""
    return lift / (retrieved + USEFULNESS_PRIOR)


_COLUMNS = ("seq, id, kind, key_text, dedup_hash, payload, tags, source_run, source_step, retrieved, helped, "
            "merged, created_at, updated_at, lift")


SQLITE_HEADER = b"SQLite format 3\x00"
"""The first 16 bytes of every SQLite 3 database file."""


def sqlite_file_problem(path: str | Path) -> str | None:
    """Why the existing file ``path`` cannot be a memory bank (a folder, unreadable, not SQLite), or None when it
    is an SQLite file or empty (SQLite treats an empty file as a new database). A missing path is None too."""
    p = Path(path).expanduser()
    if not p.exists():
        return None
    if p.is_dir():
        return "is a folder; give a .sqlite file path"
    try:
        with p.open("rb") as fh:
            head = fh.read(len(SQLITE_HEADER))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if head and head != SQLITE_HEADER:
        return ("is not a readable SQLite bank (the file does not start with the SQLite header); point it at a "
                "memory bank (.sqlite) or at a new path, where one is created")
    return None


def _is_lock_error(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg)


def embedding_to_blob(vec: np.ndarray | None) -> bytes | None:
    """float32 little-endian bytes of a 1-D vector (None stays None)."""
    if vec is None:
        return None
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()


def blob_to_embedding(blob: bytes | None) -> np.ndarray | None:
    """Inverse of :func:`embedding_to_blob`."""
    if blob is None:
        return None
    return np.frombuffer(blob, dtype="<f4")


def row_to_record(row: sqlite3.Row | tuple) -> Record:
    """Build a record from a ``SELECT {_COLUMNS}`` row."""
    (_seq, rid, kind, _key, _hash, payload, tags, source_run, source_step, retrieved, helped, merged,
     created_at, updated_at, lift) = tuple(row)[:15]
    data = json.loads(payload)
    common = dict(id=rid, tags=tuple(json.loads(tags)), source_run=source_run, source_step=source_step,
                  retrieved=retrieved, helped=helped, merged=merged, created_at=created_at, updated_at=updated_at,
                  lift=float(lift))
    if kind == "demonstration":
        return Demonstration(question=data["question"], trajectory=data["trajectory"],
                             reward=float(data.get("reward", 0.0)), **common)
    return Lesson(situation=data["situation"], mistake=data["mistake"], instead=data["instead"],
                  applies_when=data.get("applies_when", ""), source_ids=data.get("source_ids", []),
                  example=data.get("example", ""), **common)


class MemoryStore:
    """One SQLite connection to a bank file. Thread-safe (one lock); process-safe through SQLite locking."""

    def __init__(self, path: str | Path, *, create: bool = True, lock_timeout_s: float = 120.0,
                 busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path).expanduser()
        self.lock_timeout_s = lock_timeout_s
        self._lock = threading.RLock()
        self.lock_retries = 0
        """How many times a locked database was retried by this process (for metrics)."""
        if not self.path.exists():
            if not create:
                raise UserError(f"memory bank '{self.path}' does not exist; pass --bank with an existing "
                                "bank file (it is created by training or `memory import`)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif self.path.is_dir():
            raise UserError(f"memory bank '{self.path}' is a directory; pass a .sqlite file path")
        elif (problem := sqlite_file_problem(self.path)) is not None:
            raise UserError(f"memory bank '{self.path}' {problem}")
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=busy_timeout_ms / 1000, isolation_level=None,
                                        check_same_thread=False)
            self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            self._retry(self._set_wal)
            self._retry(self._migrate)
        except sqlite3.DatabaseError as exc:
            if _is_lock_error(exc):
                raise
            raise UserError(f"memory bank '{self.path}' is not a readable SQLite bank: {exc}") from None

    # ---- connection setup ---------------------------------------------------------------------------------
    def _set_wal(self) -> None:
        mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError("database is locked (could not switch to WAL)")
        self.conn.execute("PRAGMA synchronous = NORMAL")

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UserError(f"memory bank '{self.path}' has schema version {version}, newer than this "
                            f"critique-rl understands ({SCHEMA_VERSION}); upgrade critique-rl")
        if version == SCHEMA_VERSION:
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have won
            for v in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[v]:
                    self.conn.execute(stmt)
                self.conn.execute(f"PRAGMA user_version = {v + 1}")
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        """``PRAGMA user_version`` of the file."""
        return self.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0])

    # ---- transactions -------------------------------------------------------------------------------------
    def _retry(self, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.005
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _is_lock_error(exc):
                    raise
                if time.monotonic() > deadline:
                    raise UserError(f"memory bank '{self.path}' stayed locked by another process for "
                                    f"{self.lock_timeout_s:.0f}s; is a stuck process holding it?") from None
                self.lock_retries += 1
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 0.25)

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in its own ``BEGIN IMMEDIATE`` transaction, retried as a whole while locked.

        ``fn`` must be safe to re-run (it sees the database as of its own transaction)."""
        def attempt() -> T:
            with self._lock:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(self.conn)
                    self.conn.execute("COMMIT")
                    return out
                except BaseException:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise
        return self._retry(attempt)

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on one consistent read snapshot (retried while locked)."""
        def attempt() -> T:
            with self._lock:
                if self.conn.in_transaction:  # nested inside write(): reuse its transaction
                    return fn(self.conn)
                self.conn.execute("BEGIN")
                try:
                    return fn(self.conn)
                finally:
                    if self.conn.in_transaction:
                        self.conn.execute("COMMIT")
        return self._retry(attempt)

    # ---- rows ---------------------------------------------------------------------------------------------
    @staticmethod
    def insert(conn: sqlite3.Connection, rec: Record, embedding: np.ndarray | None = None,
               embed_model: str | None = None) -> int:
        """Insert ``rec`` (inside a write transaction); returns its ``seq``."""
        cur = conn.execute(
            "INSERT INTO records (id, kind, key_text, dedup_hash, payload, tags, source_run, source_step, "
            "retrieved, helped, merged, created_at, updated_at, embedding, embed_model, lift) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rec.id, rec.kind, rec.key_text, rec.dedup_hash, json.dumps(rec.payload()), json.dumps(list(rec.tags)),
             rec.source_run, rec.source_step, rec.retrieved, rec.helped, rec.merged, rec.created_at,
             rec.updated_at, embedding_to_blob(embedding), embed_model if embedding is not None else None,
             float(rec.lift)),
        )
        return int(cur.lastrowid)

    @staticmethod
    def get_in(conn: sqlite3.Connection, rid: str) -> Record | None:
        """The record with id ``rid`` using ``conn`` (inside a transaction), or None."""
        row = conn.execute(f"SELECT {_COLUMNS} FROM records WHERE id = ?", (rid,)).fetchone()
        return row_to_record(row) if row else None

    def get(self, rid: str) -> Record | None:
        """The record with id ``rid``, or None."""
        return self.read(lambda c: self.get_in(c, rid))

    def resolve_id(self, prefix: str) -> list[str]:
        """Ids equal to ``prefix`` or starting with it (for the CLI's `show`)."""
        def q(c: sqlite3.Connection) -> list[str]:
            exact = c.execute("SELECT id FROM records WHERE id = ?", (prefix,)).fetchall()
            if exact:
                return [exact[0][0]]
            like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            return [r[0] for r in c.execute("SELECT id FROM records WHERE id LIKE ? ESCAPE '\\' LIMIT 10",
                                             (like,))]
        return self.read(q)

    def get_many(self, ids: Sequence[str]) -> dict[str, Record]:
        """Records by id (missing ids are left out)."""
        if not ids:
            return {}

        def q(c: sqlite3.Connection) -> dict[str, Record]:
            out: dict[str, Record] = {}
            for i in range(0, len(ids), 500):
                chunk = list(ids[i:i + 500])
                marks = ",".join("?" * len(chunk))
                for row in c.execute(f"SELECT {_COLUMNS} FROM records WHERE id IN ({marks})", chunk):
                    rec = row_to_record(row)
                    out[rec.id] = rec
            return out
        return self.read(q)

    def list(self, kind: str | None = None, limit: int | None = None, order: str = "recent",
             tag: str | None = None) -> list[Record]:
        """Records, newest first (``order="recent"``), most useful first (``"useful"``) or least useful first
        (``"least_useful"``)."""
        where, args = [], []
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if tag:
            where.append("EXISTS (SELECT 1 FROM json_each(records.tags) WHERE value = ?)")
            args.append(tag)
        sql = f"SELECT {_COLUMNS} FROM records"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY " + {"useful": USEFULNESS_SQL, "least_useful": LEAST_USEFUL_SQL}.get(order, "seq DESC")
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return self.read(lambda c: [row_to_record(r) for r in c.execute(sql, args)])

    def iter_all(self, batch: int = 1000) -> Iterable[Record]:
        """Every record in insertion order, read in batches."""
        last = 0
        while True:
            rows = self.read(lambda c, last=last: c.execute(
                f"SELECT {_COLUMNS} FROM records WHERE seq > ? ORDER BY seq LIMIT ?", (last, batch)).fetchall())
            if not rows:
                return
            for r in rows:
                yield row_to_record(r)
            last = rows[-1][0]

    def add_credit(self, credits: dict[str, tuple[int, int, float]], now: float | None = None) -> int:
        """Add ``(retrieved, helped, lift)`` to each record id in one transaction; returns rows changed (ids
        pruned meanwhile are skipped)."""
        if not credits:
            return 0
        now = time.time() if now is None else now
        items = [(int(r), int(h), float(lf), now, rid) for rid, (r, h, lf) in credits.items()]

        def w(c: sqlite3.Connection) -> int:
            n = 0
            for item in items:
                n += c.execute("UPDATE records SET retrieved = retrieved + ?, helped = helped + ?, lift = lift + ?, "
                               "updated_at = ? WHERE id = ?", item).rowcount
            return n
        return self.write(w)

    def usefulness_of(self, ids: Sequence[str]) -> dict[str, float]:
        """:func:`usefulness` of each id (missing ids are left out)."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return {}

        def q(c: sqlite3.Connection) -> dict[str, float]:
            out: dict[str, float] = {}
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                for rid, lift, retrieved in c.execute(
                        f"SELECT id, lift, retrieved FROM records WHERE id IN ({marks})", chunk):
                    out[rid] = usefulness(float(lift), int(retrieved))
            return out
        return self.read(q)

    def bump(self, ids: Sequence[str], column: str, now: float | None = None) -> int:
        """Add 1 to ``retrieved`` or ``helped`` for ``ids`` in one transaction; returns rows changed."""
        if column not in ("retrieved", "helped"):
            raise ValueError(column)
        ids = list(dict.fromkeys(ids))
        if not ids:
            return 0
        now = time.time() if now is None else now

        def w(c: sqlite3.Connection) -> int:
            n = 0
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                n += c.execute(f"UPDATE records SET {column} = {column} + 1, updated_at = ? WHERE id IN ({marks})",
                               [now, *chunk]).rowcount
            return n
        return self.write(w)

    @staticmethod
    def add_counter(conn: sqlite3.Connection, name: str, by: int = 1) -> None:
        """Add ``by`` to counter ``name`` (inside a write transaction)."""
        conn.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
                     "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, by))

    def counters(self) -> dict[str, int]:
        """All counters."""
        return self.read(lambda c: dict(c.execute("SELECT name, value FROM counters").fetchall()))

    def count_state(self, conn: sqlite3.Connection | None = None) -> tuple[int, int]:
        """(number of rows, largest seq ever used): what the retrieval cache checks to stay in sync."""
        def q(c: sqlite3.Connection) -> tuple[int, int]:
            n = c.execute("SELECT count(*) FROM records").fetchone()[0]
            row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
            return int(n), int(row[0]) if row else 0
        return q(conn) if conn is not None else self.read(q)

    def stats(self) -> dict[str, Any]:
        """Counts and sums per kind, plus counters."""
        def q(c: sqlite3.Connection) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for kind, n, r, h, m, emb, lf in c.execute(
                    "SELECT kind, count(*), sum(retrieved), sum(helped), sum(merged), count(embedding), sum(lift) "
                    "FROM records GROUP BY kind"):
                out[kind] = {"count": n, "retrieved": r or 0, "helped": h or 0, "merged": m or 0, "embedded": emb,
                             "lift": float(lf or 0.0)}
            return out
        return self.read(q)

    def backup(self, dest: str | Path) -> Path:
        """Consistent copy of the bank via SQLite's online backup API, written to a temp file and renamed."""
        dest = Path(dest).expanduser()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        if tmp.exists():
            tmp.unlink()

        def attempt() -> None:
            target = sqlite3.connect(str(tmp))
            try:
                with self._lock:
                    self.conn.backup(target)
            finally:
                target.close()
        self._retry(attempt)
        os.replace(tmp, dest)
        return dest

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if getattr(self, "conn", None) is not None:
                self.conn.close()
                self.conn = None  # type: ignore[assignment]
