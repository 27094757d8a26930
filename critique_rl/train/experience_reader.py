"""The reading warm-up of the experience task, made robust across seeds (issue #28).

A tiny model must learn to *read* its memory: find the record that names the question's entity among
irrelevant ones and copy the code it holds. The first recipe (600 SFT steps on 4,000 rows, tokenizer trained
on the rows) read 34% to 61% of its own held-out check depending on the seed, and memory at inference followed
it. Three changes, the same for every seed:

1. **Names spelled the same everywhere.** The tokenizer is trained on the rows with the entity names removed
   (:func:`tokenizer_texts`), so a name is spelled letter by letter, identically in the question (``qix:47=``)
   and in a record (``names qix,``). Trained on the names, byte-level BPE merged random letter pairs and split
   one name two ways (``nj x p`` at a line start, ``Ġn j x p`` in a record), so matching a record to the
   question was a different problem for every name.
2. **Curriculum.** The first chunk shows a fresh entity's record alone (no distractors): the policy learns to
   copy a code; later chunks add 0-2 irrelevant records: it learns to pick the right one. Every chunk draws
   fresh rows (new random entities), so the policy cannot memorise warm-up codes.
3. **Train until it reads.** After each chunk, greedy accuracy on a held-out reading check (rows from a seed
   never trained on); stop when it reaches ``target`` or after ``max_steps`` (both reported: a warm-up that
   stops at the cap without reaching the target says so).

Each chunk is one :func:`~critique_rl.train.sft.sft_warmup` call (its own warm-up ramp and linear decay: warm
restarts). Chosen by measuring the reading check only, on seeds 20-22 (``benchmarks/memory_reading_tune.py``),
never by memory results.
"""

from __future__ import annotations

import random
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from critique_rl.tasks.experience import EXPERIENCE, reading_rows

READING_TARGET = 0.55
"""Stop once the held-out reading check reaches this. Measured on the tuning seeds 20-22 (reading check only):
the check rose to 55-58% by 600 steps on seeds 20-21 (54.5% on seed 22) and flattened near 60%: the 2-layer
reader copies a record shown alone (about two times in three) but barely tells records apart by name. 55%
certifies the copying; a seed that learns slower trains longer."""
READING_CAP = 1800
"""At most this many SFT steps (6 chunks of 300): a warm-up that stops here reports ``reached_target`` False."""

_NAME = re.compile(r"\b[a-z]{3,4}\b(?=[:,]| has code)")
"""An entity name where the task's texts put one: before ``:`` (question, demonstration), before ``,``
(lesson), before `` has code`` (the multi-turn env's reveal). Template words never sit there."""


def tokenizer_texts(texts: list[str]) -> list[str]:
    """``texts`` with the entity names removed, for training the tiny tokenizer: it then learns the template's
    words and no merges of random letters, so every name is spelled letter by letter wherever it appears."""
    return [_NAME.sub("", t) for t in texts]


def context_prompt(row: dict[str, Any], context: str | None) -> str:
    """The prompt a raw (non-chat) policy sees: the rendered records, a newline, the question."""
    return row["prompt"] if not context else f"{context}\n{row['prompt']}"


@torch.no_grad()
def greedy_success(model: Any, tok: Any, prompts: list[str], answers: list[str], batch: int = 128) -> float:
    """Share of ``prompts`` whose greedy completion the experience verifier accepts."""
    from critique_rl.rollout import HFGenerator, SamplingParams

    was_training = model.training
    model.eval()
    gen = HFGenerator(model, tok, batch_size=batch)
    ok = 0
    for s in range(0, len(prompts), batch):
        outs = gen.generate(prompts[s:s + batch], SamplingParams(n=1, max_new_tokens=EXPERIENCE.max_new_tokens,
                                                                  greedy=True))
        ok += sum(EXPERIENCE.verify(c.text, a) for (c,), a in zip(outs, answers[s:s + batch], strict=True))
    model.train(was_training)
    return ok / max(1, len(prompts))


def train_until(model: Any, tok: Any, make_pairs: Callable[[int], list[tuple[str, str]]],
                check: Callable[[], float], *, chunk_steps: int, max_steps: int, target: float, batch: int,
                lr: float, seed: int, label: str = "reading warm-up") -> dict[str, Any]:
    """SFT ``model`` chunk by chunk (chunk ``i`` on ``make_pairs(i)``, ``chunk_steps`` steps) until ``check()``
    reaches ``target`` or ``max_steps`` steps are spent. Returns ``{"steps", "check", "reached", "history",
    "final_loss"}`` (``history``: one ``{"steps", "check", "loss"}`` per chunk)."""
    from critique_rl.train.sft import sft_warmup

    if chunk_steps <= 0 or max_steps < chunk_steps:
        raise ValueError(f"chunk_steps = {chunk_steps}, max_steps = {max_steps}: need 0 < chunk_steps <= max_steps")
    history: list[dict[str, float]] = []
    steps, i, score, loss = 0, 0, 0.0, float("nan")
    t0 = time.perf_counter()
    while steps + chunk_steps <= max_steps:
        losses = sft_warmup(model, tok, make_pairs(i), chunk_steps, batch, lr, seed=seed * 1000 + i)
        steps, i = steps + chunk_steps, i + 1
        loss = sum(losses[-20:]) / max(1, len(losses[-20:]))
        score = check()
        history.append({"steps": steps, "check": score, "loss": loss})
        print(f"{label}: {steps}/{max_steps} steps, loss {loss:.3f}, reading check {score:.3f} "
              f"(target {target:.2f}, {time.perf_counter() - t0:.0f}s)", file=sys.stderr)
        if score >= target:
            break
    model.eval()
    return {"steps": steps, "check": score, "reached": score >= target, "history": history, "final_loss": loss}


def curriculum_rows(seed: int, chunk: int, n: int) -> list[dict[str, Any]]:
    """Fresh reading rows for chunk ``chunk``: the record alone in chunk 0, 0-2 distractors after."""
    return reading_rows(n, 1_000_003 + seed * 1009 + chunk, max_distractors=0 if chunk == 0 else 2)


def reading_warm_up(seed: int, *, hidden: int = 128, layers: int = 2, heads: int = 4, vocab: int = 512,
                    rows_per_chunk: int = 4000, chunk_steps: int = 300, max_steps: int = READING_CAP,
                    target: float = READING_TARGET, batch: int = 32, lr: float = 2e-3,
                    check_n: int = 400) -> tuple[Any, Any, dict[str, Any]]:
    """The single-turn reading warm-up of one seed: ``(model, tokenizer, info)``; ``info`` holds
    ``reading_check`` (greedy success on ``check_n`` held-out reading rows), ``warm_steps``, ``reached_target``
    and the per-chunk ``history``. The check rows come from a seed no chunk trains on (``seed + 10_000``)."""
    from critique_rl.models import build_tiny_model, build_tiny_tokenizer

    random.seed(seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    sample = reading_rows(3000, seed)
    tok = build_tiny_tokenizer(tokenizer_texts([context_prompt(r, r["context"]) + r["answer"] for r in sample]),
                               vocab)
    model = build_tiny_model(tok, hidden, layers, heads, max_positions=384, seed=seed)
    held = reading_rows(check_n, seed + 10_000)
    prompts, answers = [context_prompt(r, r["context"]) for r in held], [r["answer"] for r in held]
    got = train_until(
        model, tok,
        lambda i: [(context_prompt(r, r["context"]), r["answer"]) for r in curriculum_rows(seed, i, rows_per_chunk)],
        lambda: greedy_success(model, tok, prompts, answers),
        chunk_steps=chunk_steps, max_steps=max_steps, target=target, batch=batch, lr=lr, seed=seed,
        label=f"seed {seed} reading warm-up")
    info = {"seed": seed, "reading_check": got["check"], "warm_steps": got["steps"], "reached_target": got["reached"],
            "reading_target": target, "history": got["history"], "sft_final_loss": got["final_loss"],
            "sft_seconds": time.perf_counter() - t0}
    return model, tok, info


__all__ = ["READING_CAP", "READING_TARGET", "context_prompt", "curriculum_rows", "greedy_success", "reading_warm_up", "tokenizer_texts", "train_until"]
