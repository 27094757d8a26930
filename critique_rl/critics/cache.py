"""On-disk SQLite cache of critic replies, so a resumed run never pays twice for the same critique.

Key: sha256 of the canonical JSON of ``(model, messages, params)``. Stored: the reply text and its token
usage. Never stored: the API key, request headers, or the base URL's credentials.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

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
            self._conn.commit()

    def get(self, key: str) -> tuple[str, int, int] | None:
        """``(text, prompt_tokens, completion_tokens)`` for ``key``, or None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT text, prompt_tokens, completion_tokens FROM critic_cache WHERE key = ?", (key,)
            ).fetchone()
        return (str(row[0]), int(row[1]), int(row[2])) if row else None

    def put(self, key: str, model: str, text: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Store a reply (last write wins)."""
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO critic_cache (key, model, text, prompt_tokens, completion_tokens, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key, model, text, int(prompt_tokens), int(completion_tokens), time.time()),
            )
            self._conn.commit()

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
