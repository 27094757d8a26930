"""On-disk SQLite cache of critic replies, so a resumed run never pays twice for the same critique.

Key: sha256 of the canonical JSON of ``(model, messages, params)``. Stored: the reply text and its token
usage, and what the critique was about (question, response, reference, the verifier's verdict, the
regeneration index, whether the prompt showed the reference) so a filled cache is also a data set
(``critique-rl critic distill``, :meth:`CritiqueCache.records`). Never stored: the API key, request headers, or
the base URL's credentials. Caches written before these columns existed are upgraded in place (the new columns
stay NULL for old rows).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from critique_rl.critics.base import CritiqueRequest

logger = logging.getLogger("critique_rl.critics")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS critic_cache (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
)
"""
_EXTRA_COLUMNS = (("question", "TEXT"), ("response", "TEXT"), ("reference", "TEXT"), ("verdict", "INTEGER"),
                  ("regeneration", "INTEGER"), ("reference_shown", "INTEGER"))
"""Columns added after the first schema (ALTER TABLE on older files)."""


def cache_key(model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
    """sha256 hex digest of the canonical JSON of ``(model, messages, params)``."""
    blob = json.dumps(
        {"model": model, "messages": messages, "params": params},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class CritiqueCache:
    """A small SQLite key -> reply store (WAL mode, safe across threads and processes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0)
        with self._lock:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.DatabaseError:  # e.g. a filesystem without shared memory; still works
                logger.debug("critic cache: WAL mode unavailable for %s", self.path)
            self._conn.execute(_SCHEMA)
            have = {row[1] for row in self._conn.execute("PRAGMA table_info(critic_cache)")}
            for name, sql_type in _EXTRA_COLUMNS:
                if name not in have:
                    self._conn.execute(f"ALTER TABLE critic_cache ADD COLUMN {name} {sql_type}")
            self._conn.commit()

    def get(self, key: str) -> tuple[str, int, int] | None:
        """``(text, prompt_tokens, completion_tokens)`` for ``key``, or None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT text, prompt_tokens, completion_tokens FROM critic_cache WHERE key = ?", (key,)
            ).fetchone()
        return (str(row[0]), int(row[1]), int(row[2])) if row else None

    def put(self, key: str, model: str, text: str, prompt_tokens: int = 0, completion_tokens: int = 0, *,
            request: CritiqueRequest | None = None, regeneration: int | None = None,
            reference_shown: bool | None = None) -> None:
        """Store a reply (last write wins), with the request it answered when given."""
        q = r = ref = None
        verdict: int | None = None
        if request is not None:
            q, r = request.question, request.response
            ref = request.reference if request.reference not in (None, "") else None
            verdict = None if request.verdict is None else int(bool(request.verdict))
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO critic_cache (key, model, text, prompt_tokens, completion_tokens, created,"
                " question, response, reference, verdict, regeneration, reference_shown)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, model, text, int(prompt_tokens), int(completion_tokens), time.time(), q, r, ref, verdict,
                 regeneration, None if reference_shown is None else int(bool(reference_shown))),
            )
            self._conn.commit()

    def records(self) -> list[dict[str, Any]]:
        """Every stored reply as a dict (``key, model, text, prompt_tokens, completion_tokens, created, question,
        response, reference, verdict, regeneration, reference_shown``), oldest first; ``verdict`` is the
        verifier's (True/False/None), the other new columns are None for rows cached before they existed."""
        cols = ("key", "model", "text", "prompt_tokens", "completion_tokens", "created", "question", "response",
                "reference", "verdict", "regeneration", "reference_shown")
        with self._lock:
            rows = self._conn.execute(f"SELECT {', '.join(cols)} FROM critic_cache ORDER BY created, key").fetchall()
        out = []
        for row in rows:
            rec = dict(zip(cols, row, strict=True))
            for flag in ("verdict", "reference_shown"):
                rec[flag] = None if rec[flag] is None else bool(rec[flag])
            out.append(rec)
        return out

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM critic_cache").fetchone()[0])

    def close(self) -> None:
        """Close the connection (checkpointing the WAL into the main file)."""
        with self._lock:
            try:
                self._conn.close()
            except sqlite3.Error:  # already closed
                pass
