"""Memory at inference only vs no memory on the experience task (issue #28, evidence (a) and an inference-only (d)).

    python benchmarks/memory_evidence.py --seeds 0 1 2 --out benchmarks/results/memory_evidence

The task (``critique_rl/tasks/experience.py``): ``"qix:47="`` -> the entity's secret code then the number
(``"58347"``); the code is learnable only from earlier episodes. Per seed, from scratch:

1. **Reading warm-up** (SFT): a tiny model learns to read retrieved records, on fresh random entities whose
   code only the context tells (their lesson or a solved demonstration, among irrelevant records) and on
   entities it knows, with irrelevant records only (so it learns to ignore noise). The task's own entities
   never appear in the warm-up.
   Recipe v2 (default, ``critique_rl/train/experience_reader.py``): the tokenizer never sees entity names (a
   name is spelled the same in the question and in a record), the first chunk shows records without
   distractors, every chunk draws fresh rows, and training stops when the held-out reading check reaches
   ``--reading-target`` (at most ``--warm-max-steps``; both reported per seed). ``--warm-recipe v1``: the first
   recipe (600 steps), which the tables for seeds 0-8 used.
2. **Earlier episodes** (frozen policy, no weight update): ``--episodes`` training questions of the task,
   in batches, through the production :class:`~critique_rl.train.memory_hook.MemoryHook`: retrieval before
   answering, then failures become lessons (the rule abstraction reads the code off the verifier's reference
   answer) and successes become demonstrations. Retrieval quality (hit rate, context tokens) is logged every
   batch.
3. **Held-out evaluation** (greedy, the bank read-only): new questions (numbers disjoint from training) about
   the same entities, in every arm; plus the control: questions about ``NOVEL`` entities no earlier episode
   met, where memory cannot know the code.

Arms (fixed before any result was seen): ``no_memory``; ``lessons`` (3 lessons, no demonstrations);
``demos`` (2 demonstrations, no lessons); ``both`` (2 lessons + 1 demonstration, the primary arm). Lexical
retrieval (BM25), records that match no query word are kept (the bank tops up with its most useful records:
realistic noise). Reported: mean ± std over seeds and the paired difference to ``no_memory`` per seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from critique_rl.config import MemoryConfig
from critique_rl.memory import MemoryBank
from critique_rl.models import build_tiny_model, build_tiny_tokenizer
from critique_rl.rollout import HFGenerator, SamplingParams
from critique_rl.tasks.experience import EXPERIENCE, make_experience, make_novel_eval, reading_rows
from critique_rl.train.experience_reader import (  # noqa: E402
    READING_CAP,
    READING_TARGET,
    context_prompt,
    greedy_success,
    reading_warm_up,
)
from critique_rl.train.memory_hook import MemoryHook, retrieval_quality
from critique_rl.train.sft import sft_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_on_off import _ms  # noqa: E402  (mean ± std, the sibling benchmark's table helper)

ARMS: dict[str, tuple[int, int] | None] = {"no_memory": None, "lessons": (0, 3), "demos": (2, 0), "both": (1, 2),
                                          "lessons_matched": (0, 3)}
"""Arm -> (top_k_demos, top_k_lessons); None: no retrieval. ``lessons_matched`` was added after the first run's
results (post hoc): the same as ``lessons`` but records that match no query word are dropped (``min_score=0``),
so the policy's context holds only lessons about the question's entity."""
MIN_SCORE: dict[str, float | None] = {"lessons_matched": 0.0}
PRIMARY = "both"
"""The retrieval the earlier episodes run with (the bank is filled by them)."""

ARM_SETS: dict[str, tuple[dict[str, tuple[int, int] | None], dict[str, float | None], str]] = {
    "a": (ARMS, MIN_SCORE, PRIMARY),
    # (d) lessons vs demonstrations vs both, fixed before its run (seeds 6 7 8, sharing memory_rl.py's warm-ups):
    # every arm keeps only records matching a word of the question (min_score 0, the setting evidence (a)
    # supported); the earlier episodes retrieve like both_matched, so their successes leave demonstrations
    "d": ({"no_memory": None, "lessons_matched": (0, 3), "demos_matched": (2, 0), "both_matched": (1, 2)},
          {"lessons_matched": 0.0, "demos_matched": 0.0, "both_matched": 0.0}, "both_matched"),
}


prompt_text = context_prompt  # what the trainer's ``prompt_text`` builds for a raw (non-chat) policy


def mem_config(bank: Path, arm: tuple[int, int]) -> MemoryConfig:
    return MemoryConfig(enabled=True, bank_path=str(bank), top_k_demos=arm[0], top_k_lessons=arm[1],
                        token_budget=256, embeddings="lexical", dedup_threshold=0.9, abstraction="rule")


@torch.no_grad()
def answer(model: Any, tok: Any, prompts: list[str], batch: int = 128) -> list[str]:
    gen = HFGenerator(model, tok, batch_size=batch)
    out: list[str] = []
    for s in range(0, len(prompts), batch):
        for (c,) in gen.generate(prompts[s:s + batch], SamplingParams(n=1, max_new_tokens=EXPERIENCE.max_new_tokens,
                                                                        greedy=True)):
            out.append(c.text)
    return out


def accuracy(model: Any, tok: Any, rows: list[dict], contexts: list[str] | None) -> float:
    prompts = [prompt_text(r, contexts[i] if contexts else None) for i, r in enumerate(rows)]
    return greedy_success(model, tok, prompts, [r["answer"] for r in rows])


def warm_up(seed: int, args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """The reading warm-up of one seed: (model, tokenizer, {reading_check, warm_steps, sft_seconds, ...}).

    ``args.warm_recipe`` ``v2`` (default): :func:`~critique_rl.train.experience_reader.reading_warm_up` (names
    spelled letter by letter, curriculum, chunks of ``sft_steps`` until the reading check reaches
    ``reading_target`` or ``warm_max_steps``); ``v1``: the first recipe (``sft_steps`` steps on ``reading_n``
    rows, tokenizer trained on them), which every table before the v2 sections used."""
    cache = Path(args.warm_cache) / f"seed{seed}.pt" if getattr(args, "warm_cache", None) else None
    recipe = getattr(args, "warm_recipe", "v1")
    names = ["reading_n", "vocab", "hidden", "layers", "heads", "sft_steps", "sft_batch", "sft_lr"]
    if recipe != "v1":
        names = [n for n in names if n != "sft_steps"] + ["warm_recipe", "warm_chunk", "reading_target",
                                                          "warm_max_steps"]
    key = {k: getattr(args, k) for k in names}
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=False)
        if saved["key"] == key:
            print(f"seed {seed}: warm-up loaded from {cache}", file=sys.stderr)
            return saved["model"], saved["tok"], saved["info"]
    if recipe == "v1":
        model, tok, out = _warm_up_v1(seed, args)
    else:
        model, tok, out = reading_warm_up(seed, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                          vocab=args.vocab, rows_per_chunk=args.reading_n, chunk_steps=args.warm_chunk,
                                          max_steps=args.warm_max_steps, target=args.reading_target,
                                          batch=args.sft_batch, lr=args.sft_lr)
    print(f"seed {seed}: warm-up done ({recipe}), {out.setdefault('warm_steps', args.sft_steps)} steps, loss "
          f"{out['sft_final_loss']:.3f}, reading check {out['reading_check']:.3f} ({out['sft_seconds']:.0f}s)",
          file=sys.stderr)
    if cache is not None:  # the same seed and settings give the same warm-up: later benchmarks reuse it
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "model": model, "tok": tok, "info": out}, cache)
    return model, tok, out


def add_warm_up_args(ap: argparse.ArgumentParser) -> None:
    """The reading warm-up's recipe options (shared by memory_rl.py)."""
    ap.add_argument("--warm-recipe", choices=("v1", "v2"), default="v2",
                    help="v2: names spelled letter by letter, curriculum, train until the reading check reaches "
                         "--reading-target (at most --warm-max-steps); v1: the first recipe (--sft-steps steps)")
    ap.add_argument("--warm-chunk", type=int, default=300, help="v2: SFT steps per chunk (check after each)")
    ap.add_argument("--warm-max-steps", type=int, default=READING_CAP, help="v2: cap on SFT steps")
    ap.add_argument("--reading-target", type=float, default=READING_TARGET,
                    help="v2: stop when the reading check reaches it")


def _warm_up_v1(seed: int, args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """The first reading warm-up (seeds 0-8 in docs/evidence/memory.md): one SFT run of ``sft_steps``."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    warm = reading_rows(args.reading_n, seed)
    texts = [prompt_text(r, r["context"]) + r["answer"] for r in warm[:3000]]
    tok = build_tiny_tokenizer(texts, args.vocab)
    model = build_tiny_model(tok, args.hidden, args.layers, args.heads, max_positions=384, seed=seed)
    pairs = [(prompt_text(r, r["context"]), r["answer"]) for r in warm]
    losses = sft_warmup(model, tok, pairs, args.sft_steps, args.sft_batch, args.sft_lr, seed=seed)
    model.eval()
    check = reading_rows(400, seed + 10_000)
    return model, tok, {"seed": seed, "sft_final_loss": statistics.fmean(losses[-20:]),
                        "reading_check": accuracy(model, tok, check, [r["context"] for r in check]),
                        "sft_seconds": time.perf_counter() - t0}


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, tok, out = warm_up(seed, args)
    out["seed"] = seed

    # earlier episodes: the frozen policy answers training questions with retrieval; the hook records them
    bank_path = work / f"seed{seed}" / "memory.sqlite"
    bank_path.parent.mkdir(parents=True, exist_ok=True)
    for f in bank_path.parent.glob("memory.sqlite*"):
        f.unlink()
    cfg = mem_config(bank_path, ARMS[PRIMARY])  # type: ignore[arg-type]
    bank = MemoryBank(bank_path, config=cfg)
    hook = MemoryHook(bank, cfg, EXPERIENCE.name, f"memory_evidence_s{seed}", max_lessons_per_step=args.batch,
                      min_score=MIN_SCORE.get(PRIMARY))
    episodes = make_experience("train", args.episodes, seed)
    steps: list[dict[str, Any]] = []
    for s in range(0, len(episodes), args.batch):
        rows = episodes[s:s + args.batch]
        ctx = hook.contexts(rows)
        done = answer(model, tok, [prompt_text(r, c) for r, c in zip(rows, ctx, strict=True)])
        ok = [EXPERIENCE.verify(t, r["answer"]) for t, r in zip(done, rows, strict=True)]
        m = hook.update(rows, done, ok, [None] * len(rows), step=s // args.batch + 1, group_size=1)
        steps.append({"step": s // args.batch + 1, "success": sum(ok) / len(ok), **m})
    out["episodes"] = steps
    stats = bank.stats()
    out["bank"] = {"lessons": stats["lessons"]["count"], "demonstrations": stats["demonstrations"]["count"]}
    bank.close()

    # held-out evaluation, the bank read-only (a fresh MemoryBank per arm: its own top-k)
    held = make_experience("eval", args.eval_n, seed)
    novel = make_novel_eval(args.eval_n, seed)
    for arm, ks in ARMS.items():
        res: dict[str, Any] = {}
        for split, rows in (("held_out", held), ("novel_control", novel)):
            if ks is None:
                res[split] = accuracy(model, tok, rows, None)
                continue
            arm_cfg = mem_config(bank_path, ks)
            with MemoryBank(bank_path, config=arm_cfg, create=False) as b:
                got = MemoryHook(b, arm_cfg, EXPERIENCE.name, "eval", min_score=MIN_SCORE.get(arm)).retrieve(rows)
            res[split] = accuracy(model, tok, rows, [g.text for g in got])
            q = retrieval_quality(rows, got)
            res[f"{split}_hit_rate"] = q["memory/hit_rate"]
            res[f"{split}_context_tokens"] = q["memory/context_tokens"]
        out[arm] = res
        print(f"seed {seed} {arm}: {json.dumps(res)}", file=sys.stderr)
    out["seconds"] = time.perf_counter() - t0
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| arm | held-out success % | paired diff vs no_memory (per seed) | hit rate % | memory tokens | "
             "novel-entity control % |", "|---|---|---|---|---|---|"]
    for arm in ARMS:
        diffs = [r[arm]["held_out"] - r["no_memory"]["held_out"] for r in results]
        per_seed = ", ".join(f"{100 * d:+.1f}" for d in diffs)
        lines.append(f"| {arm} | {_ms([r[arm]['held_out'] for r in results])} | "
                     f"{_ms(diffs)} ({per_seed}) | {_ms([r[arm].get('held_out_hit_rate') for r in results])} | "
                     f"{_ms([r[arm].get('held_out_context_tokens') for r in results], 1.0)} | "
                     f"{_ms([r[arm]['novel_control'] for r in results])} |")
    return "\n".join(lines)


def warm_text(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """How each seed's reading warm-up went: recipe, SFT steps (x batch) and reading check."""
    recipe = getattr(args, "warm_recipe", "v1")
    per_seed = [f"seed {r['seed']}: {r.get('warm_steps', args.sft_steps)} steps, check "
                + (f"{100 * r['reading_check']:.1f}%" if r.get("reading_check") is not None else "not measured")
                for r in results]
    extra = (f", chunks of {args.warm_chunk} x {args.reading_n} fresh rows until the check reaches "
             f"{100 * args.reading_target:.0f}% (cap {args.warm_max_steps})" if recipe == "v2" else
             f" on {args.reading_n} rows")
    return f"{recipe} ({'; '.join(per_seed)}) x {args.sft_batch}{extra}"


def write(results: list[dict[str, Any]], args: argparse.Namespace, t0: float) -> str:
    md = table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "seeds": results, "table_markdown": md,
                                                    "wall_seconds": time.perf_counter() - t0}, indent=2))
    ep_hits = [s["memory/hit_rate"] for r in results for s in r["episodes"][1:] if s["memory/hit_rate"] is not None]
    title = {"a": "Memory at inference only vs no memory",
             "d": "Lessons vs demonstrations vs both, at inference only"}[getattr(args, "arm_set", "a")]
    notes = [f"# {title}: experience task ({len(results)} seeds, mean ± std)", "",
             "Greedy success on held-out questions (numbers never seen in training) about entities met in earlier "
             "episodes; control: entities no earlier episode met. Frozen policy; the bank was filled by "
             f"{args.episodes} earlier episodes of the same frozen policy (batches of {args.batch}).", "", md, "",
             "Reading warm-up check (400 held-out warm-up rows: fresh entities with their record among 0-2 "
             "irrelevant ones, and known entities with noise only): "
             f"{_ms([r['reading_check'] for r in results])} %. Bank after the episodes: "
             + ", ".join(f"seed {r['seed']}: {r['bank']['lessons']} lessons, {r['bank']['demonstrations']} demos"
                         for r in results)
             + f". Hit rate during the episodes after the first batch: {_ms(ep_hits)} %.", "",
             f"Setup: tiny Llama {args.layers}x{args.hidden}, reading warm-up {warm_text(results, args)}; lexical "
             f"retrieval. Wall time {(time.perf_counter() - t0) / 60:.1f} min on a shared 2-core CPU."]
    out.with_suffix(".md").write_text("\n".join(notes) + "\n")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/results/memory_evidence")
    ap.add_argument("--work", default="runs/bench_memory_evidence")
    ap.add_argument("--reading-n", type=int, default=4000, help="reading rows (v2: per chunk)")
    ap.add_argument("--sft-steps", type=int, default=600, help="SFT steps of the v1 warm-up")
    ap.add_argument("--sft-batch", type=int, default=32)
    ap.add_argument("--sft-lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--episodes", type=int, default=192)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-n", type=int, default=240)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per seed (1: best on a busy box)")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes")
    ap.add_argument("--seed-out", default=None, help=argparse.SUPPRESS)  # a --jobs worker: one seed's JSON
    ap.add_argument("--warm-cache", default=None, help="folder to save / reuse each seed's warm-up (same settings)")
    add_warm_up_args(ap)
    ap.add_argument("--arm-set", choices=sorted(ARM_SETS), default="a",
                    help="a: memory at inference vs none (default retrieval and min_score 0); d: lessons vs "
                         "demonstrations vs both, each with min_score 0")
    args = ap.parse_args()
    global ARMS, MIN_SCORE, PRIMARY
    ARMS, MIN_SCORE, PRIMARY = ARM_SETS[args.arm_set]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = Path(args.work)
    if args.seed_out:
        Path(args.seed_out).write_text(json.dumps(run_seed(args.seeds[0], args, work)))
        return
    if args.jobs > 1:
        results = _run_parallel(args, work)
    else:
        results = []
        for s in args.seeds:
            results.append(run_seed(s, args, work))
            write(results, args, t0)
    print(write(results, args, t0))


def _run_parallel(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """One worker process per seed, ``--jobs`` at a time (same arguments, one seed each)."""
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    argv = [a for a in sys.argv[1:]]
    base = [sys.executable, __file__, *_strip(argv, "--seeds", "--jobs")]
    todo = list(args.seeds)
    running: list[tuple[int, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            s = todo.pop(0)
            running.append((s, subprocess.Popen([*base, "--seeds", str(s), "--seed-out", str(work / f"seed{s}.json")])))
        time.sleep(2)
        for item in [x for x in running if x[1].poll() is not None]:
            running.remove(item)
            if item[1].returncode:
                raise SystemExit(f"seed {item[0]} failed (exit {item[1].returncode})")
    return [json.loads((work / f"seed{s}.json").read_text()) for s in args.seeds]


def _strip(argv: list[str], *flags: str) -> list[str]:
    """``argv`` without ``flags`` and their values."""
    out, skip = [], False
    for a in argv:
        if a in flags:
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


if __name__ == "__main__":
    main()
