"""Tuning the experience task's reading warm-up on the READING CHECK only (issue #28).

    python benchmarks/memory_reading_tune.py --recipe fixed --seed 20 --out /tmp/tune.jsonl

Trains one seed's reader with a recipe and logs, every ``--chunk`` steps, the held-out reading check (rows of
``reading_rows`` from a seed never trained on) overall and per row kind (fresh entity told by a lesson, by a
demonstration, by both; known entity with noise). Nothing here looks at the task's own entities or at memory:
the seeds used here (20-22) are not used for evidence.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from critique_rl.models import build_tiny_model, build_tiny_tokenizer
from critique_rl.tasks.experience import EXPERIENCE, KNOWN, reading_rows
from critique_rl.train.sft import sft_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_evidence import answer, prompt_text  # noqa: E402


def kind(row: dict[str, Any]) -> str:
    e, ctx = row["entity"], row["context"]
    if e in KNOWN:
        return "known"
    lesson, demo = f"names {e}," in ctx, f"Q: {e}:" in ctx
    return "both" if lesson and demo else "lesson" if lesson else "demo"


def check(model: Any, tok: Any, rows: list[dict[str, Any]]) -> dict[str, float]:
    model.eval()
    texts = answer(model, tok, [prompt_text(r, r["context"]) for r in rows])
    model.train()
    ok = [EXPERIENCE.verify(t, r["answer"]) for t, r in zip(texts, rows, strict=True)]
    out = {"all": sum(ok) / len(ok)}
    for k in ("lesson", "demo", "both", "known"):
        sel = [o for o, r in zip(ok, rows, strict=True) if kind(r) == k]
        out[k] = sum(sel) / max(1, len(sel))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="fixed")
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--cap", type=int, default=1800)
    ap.add_argument("--chunk", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tok", choices=("full", "template"), default="full",
                    help="template: the tokenizer never sees the entity names (they split into letters)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seed = args.seed
    torch.manual_seed(seed)
    warm = reading_rows(4000, seed)
    texts = [prompt_text(r, r["context"]) + r["answer"] for r in warm[:3000]]
    if args.tok == "template":
        texts = [re.sub(r"\b[a-z]{3,4}(?=[:,])", "", t) for t in texts]
    tok = build_tiny_tokenizer(texts, 512)
    model = build_tiny_model(tok, args.hidden, args.layers, args.heads, max_positions=384, seed=seed)
    held = reading_rows(400, seed + 10_000)
    done = 0
    t0 = time.perf_counter()
    chunk_i = 0
    while done < args.cap:
        if args.recipe == "fixed":  # the old recipe, continued with warm restarts on the same 4000 rows
            rows = warm
        elif args.recipe == "fresh":  # fresh rows every chunk
            rows = reading_rows(4000, seed * 100 + chunk_i)
        elif args.recipe == "curriculum":  # first chunk: the record alone; then fresh rows with distractors
            rows = reading_rows(4000, seed * 100 + chunk_i, max_distractors=0 if chunk_i == 0 else 2)
        else:
            raise SystemExit(f"unknown recipe {args.recipe}")
        pairs = [(prompt_text(r, r["context"]), r["answer"]) for r in rows]
        losses = sft_warmup(model, tok, pairs, args.chunk, 32, args.lr, seed=seed * 1000 + chunk_i)
        done += args.chunk
        chunk_i += 1
        res = {"recipe": args.recipe, "tok": args.tok, "seed": seed, "steps": done, "loss": sum(losses[-20:]) / 20,
               **check(model, tok, held), "seconds": time.perf_counter() - t0}
        print(json.dumps(res), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
