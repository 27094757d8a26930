"""RL + memory vs RL alone vs memory alone at equal steps, on held-out items (issue #28, evidence (b)).

    python benchmarks/memory_rl.py --seeds 6 7 8 --out benchmarks/results/memory_rl

Task: the experience task (``critique_rl/tasks/experience.py``): ``"qix:47="`` -> the entity's secret code then
the number; the code is learnable only from earlier episodes. Per seed, every arm starts from the same
reading warm-up (``memory_evidence.warm_up``: a tiny model that learned to read retrieved records on fresh
entities, never the task's own) and sees the same training questions in the same order:

- ``rl_only``: ``CritiqueGRPOTrainer`` for ``--steps`` steps, memory off (the toolkit's defaults: the rule
  critic's ground-truth critique on every wrong answer, refinements trained off-policy). Evaluated without
  memory (it has none).
- ``memory_only``: the same questions, ``--steps`` x ``--prompts`` x ``num_generations`` episodes sampled
  at the trainer's temperature from the frozen warm-up policy through the production ``MemoryHook``
  (retrieval before answering, lessons from failures, demonstrations from successes, lift credit); no weight
  update. Evaluated with retrieval from its bank.
- ``rl_memory``: the trainer with ``memory.enabled`` (the same steps and hyper-parameters); evaluated with
  retrieval from the bank it built, and also without it (what the weights alone learnt).

Memory settings (fixed before any result of this benchmark, from evidence (a)): lexical retrieval, 3 lessons,
0 demonstrations, ``min_score 0`` (only records that match a word of the question), ``usefulness_weight``
at its default. Held-out: greedy success on questions with numbers never trained on, about the task's
entities; control: ``NOVEL`` entities no episode met. Reported: mean ± std over seeds, paired differences
per seed, retrieval hit rate, and step time: every arm's mean wall time per step (retrieval, abstraction and
bank writes included: ``_step`` is timed whole) and, inside the ``rl_memory`` run, the share of it spent in the
memory hook.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from critique_rl.config import MemoryConfig, TrainConfig
from critique_rl.memory import MemoryBank
from critique_rl.rollout import HFGenerator, SamplingParams
from critique_rl.tasks.experience import EXPERIENCE, make_experience, make_novel_eval
from critique_rl.train.memory_hook import MemoryHook, retrieval_quality
from critique_rl.train.sampler import PromptSampler
from critique_rl.train.trainer import CritiqueGRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_evidence import accuracy, add_warm_up_args, prompt_text, warm_text, warm_up  # noqa: E402
from memory_on_off import _ms, _paired  # noqa: E402

ARMS = ("rl_only", "memory_only", "rl_memory")
"""Fixed before any result: see the module docstring."""
MEMORY = dict(top_k_demos=0, top_k_lessons=3, min_score=0.0, token_budget=256, embeddings="lexical",
              dedup_threshold=0.9, abstraction="rule")


class HookClock:
    """Seconds spent in ``MemoryHook.contexts`` and ``MemoryHook.update`` (retrieval; abstraction, writes,
    credit), summed over the process: the class methods are wrapped while the clock is installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._orig: dict[str, Any] = {}

    def install(self) -> None:
        for name in ("contexts", "update"):
            fn = getattr(MemoryHook, name)
            self._orig[name] = fn

            def timed(*a: Any, _fn: Any = fn, **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    self.seconds += time.perf_counter() - t
            setattr(MemoryHook, name, timed)

    def remove(self) -> None:
        for name, fn in self._orig.items():
            setattr(MemoryHook, name, fn)
        self._orig = {}


def train_config(seed: int, out: Path, args: argparse.Namespace, memory: bool, bank: Path | None) -> TrainConfig:
    mem = MemoryConfig(enabled=True, bank_path=str(bank), **MEMORY) if memory else MemoryConfig()
    return TrainConfig(task=EXPERIENCE.name, seed=seed, output_dir=str(out), progress=False, sft_steps=0,
                       max_steps=args.steps, num_generations=args.n, generation_batch_size=args.prompts * args.n,
                       mini_batch_size=args.prompts * args.n // 2, learning_rate=args.lr, eval_n=32,
                       eval_batch_size=32, checkpoint_every=10_000, keep_checkpoints=1, log_rollouts=0,
                       sft_examples=args.train_n, memory=mem)


def run_trainer(model: Any, tok: Any, cfg: TrainConfig, clock: HookClock | None) -> tuple[Any, list[float], list[str]]:
    """Train a copy of ``model``; returns (trained model, wall seconds of each ``_step``, training prompts)."""
    tr = CritiqueGRPOTrainer(model=copy.deepcopy(model), tokenizer=tok, args=cfg)
    times: list[float] = []
    inner = tr._step

    def timed_step() -> dict[str, Any]:
        t = time.perf_counter()
        out = inner()
        times.append(time.perf_counter() - t)
        return out
    tr._step = timed_step  # type: ignore[method-assign]
    if clock is not None:
        clock.install()
    try:
        tr.train()
    finally:
        if clock is not None:
            clock.remove()
    return tr.accelerator.unwrap_model(tr.model).eval(), times, [r["prompt"] for r in tr.train_rows]


def memory_only(model: Any, tok: Any, rows: list[dict], seed: int, bank_path: Path, args: argparse.Namespace,
                temperature: float) -> tuple[list[float], list[dict[str, Any]]]:
    """The frozen policy answers the trainer's question sequence (same sampler, seed and batch) through the
    hook; returns the wall seconds per step and the per-step hook metrics."""
    mem = MemoryConfig(enabled=True, bank_path=str(bank_path), **MEMORY)
    bank = MemoryBank(bank_path, config=mem)
    hook = MemoryHook(bank, mem, EXPERIENCE.name, f"memory_only_s{seed}", min_score=mem.min_score)
    sampler = PromptSampler(rows, seed)
    gen = HFGenerator(model, tok, batch_size=args.prompts * args.n)
    torch.manual_seed(seed)
    times, steps = [], []
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        batch = sampler.next_batch(args.prompts)
        ctx = hook.contexts(batch)
        groups = gen.generate([prompt_text(r, c) for r, c in zip(batch, ctx, strict=True)],
                              SamplingParams(n=args.n, temperature=temperature,
                                             max_new_tokens=EXPERIENCE.max_new_tokens))
        flat = [r for r in batch for _ in range(args.n)]
        texts = [c.text for g in groups for c in g]
        ok = [EXPERIENCE.verify(x, r["answer"]) for x, r in zip(texts, flat, strict=True)]
        m = hook.update(flat, texts, ok, [None] * len(flat), step, args.n)
        times.append(time.perf_counter() - t)
        steps.append({"step": step, "success": sum(ok) / len(ok), **m})
    bank.close()
    return times, steps


def evaluate(model: Any, tok: Any, rows: list[dict], bank_path: Path | None) -> dict[str, Any]:
    """Greedy held-out success, with retrieval from ``bank_path`` (read-only, nothing counted) or without."""
    if bank_path is None:
        return {"success": accuracy(model, tok, rows, None)}
    mem = MemoryConfig(enabled=True, bank_path=str(bank_path), **MEMORY)
    with MemoryBank(bank_path, config=mem, create=False) as b:
        got = MemoryHook(b, mem, EXPERIENCE.name, "eval", min_score=mem.min_score).retrieve(rows)
    q = retrieval_quality(rows, got)
    return {"success": accuracy(model, tok, rows, [g.text for g in got]), "hit_rate": q["memory/hit_rate"],
            "context_tokens": q["memory/context_tokens"]}


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, tok, out = warm_up(seed, args)
    held, novel = make_experience("eval", args.eval_n, seed), make_novel_eval(args.eval_n, seed)
    out["before"] = {"held_out": evaluate(model, tok, held, None)["success"]}
    root = work / f"seed{seed}"
    for arm in ARMS:
        arm_dir = root / arm
        bank = arm_dir / "memory.sqlite" if arm != "rl_only" else None
        if arm_dir.exists():
            import shutil

            shutil.rmtree(arm_dir)
        arm_dir.mkdir(parents=True)
        res: dict[str, Any] = {}
        if arm == "memory_only":
            cfg = train_config(seed, arm_dir, args, False, None)
            times, steps = memory_only(model, tok, out["_train_rows"], seed, bank, args, cfg.temperature)  # type: ignore[arg-type]
            trained = model
            res["train_success"] = [s["success"] for s in steps]
            res["train_hit_rate"] = [s["memory/hit_rate"] for s in steps]
        else:
            clock = HookClock() if arm == "rl_memory" else None
            cfg = train_config(seed, arm_dir, args, arm == "rl_memory", bank)
            trained, times, prompts = run_trainer(model, tok, cfg, clock)
            if arm == "rl_only":
                rows = EXPERIENCE.make_examples("train", args.train_n, seed)
                if [r["prompt"] for r in rows] != prompts:
                    raise SystemExit("memory_only would not see the trainer's questions: the trainer's train rows "
                                     "are not make_experience('train', train_n, seed)")
                out["_train_rows"] = rows
            metrics = [json.loads(x) for x in (arm_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
            res["train_success"] = [m.get("train/accuracy") for m in metrics if m.get("step", 0) > 0]
            if clock is not None:
                res["hook_seconds"] = clock.seconds
                res["train_hit_rate"] = [m.get("memory/hit_rate") for m in metrics if m.get("step", 0) > 0]
        res["step_seconds"] = statistics.fmean(times)
        for split, rows in (("held_out", held), ("novel_control", novel)):
            got = evaluate(trained, tok, rows, bank)
            res[split] = got["success"]
            for k in ("hit_rate", "context_tokens"):
                if k in got:
                    res[f"{split}_{k}"] = got[k]
        if bank is not None and arm == "rl_memory":
            res["held_out_weights_only"] = evaluate(trained, tok, held, None)["success"]
        out[arm] = res
        print(f"seed {seed} {arm}: " + json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}),
              file=sys.stderr)
    out.pop("_train_rows", None)
    out["seconds"] = time.perf_counter() - t0
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| arm | held-out success % | paired diff vs rl_only (per seed) | paired diff vs memory_only | "
             "hit rate % | novel-entity control % | s / step |", "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        d_rl = [r[arm]["held_out"] - r["rl_only"]["held_out"] for r in results]
        d_mem = [r[arm]["held_out"] - r["memory_only"]["held_out"] for r in results]
        lines.append(f"| {arm} | {_ms([r[arm]['held_out'] for r in results])} | {_paired(d_rl)} | {_paired(d_mem)} | "
                     f"{_ms([r[arm].get('held_out_hit_rate') for r in results])} | "
                     f"{_ms([r[arm]['novel_control'] for r in results])} | "
                     f"{_ms([r[arm]['step_seconds'] for r in results], 1.0)} |")
    return "\n".join(lines)


def write(results: list[dict[str, Any]], args: argparse.Namespace, t0: float, load: str) -> str:
    md = table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "seeds": results, "table_markdown": md,
                                                    "wall_seconds": time.perf_counter() - t0, "uptime": load},
                                                   indent=2))
    ratio = [r["rl_memory"]["step_seconds"] / r["rl_only"]["step_seconds"] for r in results]
    share = [r["rl_memory"]["hook_seconds"] / (r["rl_memory"]["step_seconds"] * args.steps) for r in results]
    weights_only = [r["rl_memory"]["held_out_weights_only"] for r in results]
    notes = [f"# RL + memory vs RL alone vs memory alone at {args.steps} steps: experience task "
             f"({len(results)} seeds, mean ± std)", "",
             "Greedy success on held-out questions (numbers never trained on) about the task's entities; control: "
             "entities no episode met. Every arm starts from the same reading warm-up and sees the same questions "
             f"({args.prompts} per step x {args.n} samples).", "", md, "",
             f"Before training (warm-up only, no memory): {_ms([r['before']['held_out'] for r in results])} %. "
             f"rl_memory evaluated without its bank (weights only): {_ms(weights_only)} %.", "",
             f"Step time, memory on / off (rl_memory / rl_only mean wall seconds per `_step`, retrieval, abstraction "
             f"and bank writes included; the arms ran one after the other on a shared CPU): "
             f"{', '.join(f'{x:.2f}' for x in ratio)} (mean {statistics.fmean(ratio):.2f}). Share of the "
             f"rl_memory step spent in the memory hook, measured inside that run: "
             f"{', '.join(f'{100 * x:.1f}%' for x in share)}.", "",
             f"Setup: tiny Llama {args.layers}x{args.hidden}, reading warm-up {warm_text(results, args)}; RL lr {args.lr}, "
             f"{args.steps} steps; memory {MEMORY}. Wall time "
             f"{(time.perf_counter() - t0) / 60:.1f} min on a shared 2-core CPU (uptime at the start: {load})."]
    out.with_suffix(".md").write_text("\n".join(notes) + "\n")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[6, 7, 8])
    ap.add_argument("--out", default="benchmarks/results/memory_rl")
    ap.add_argument("--work", default="runs/bench_memory_rl")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8, help="samples per question (num_generations)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train-n", type=int, default=2000)
    ap.add_argument("--eval-n", type=int, default=240)
    ap.add_argument("--reading-n", type=int, default=4000)
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--sft-batch", type=int, default=32)
    ap.add_argument("--sft-lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warm-cache", default=None, help="folder to save / reuse each seed's warm-up (same settings)")
    add_warm_up_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import os

    load = os.popen("uptime").read().strip()
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    for s in args.seeds:
        results.append(run_seed(s, args, Path(args.work)))
        write(results, args, t0, load)
    print(write(results, args, t0, load))


if __name__ == "__main__":
    main()
