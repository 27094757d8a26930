"""The agent path: RL + memory vs RL alone vs memory alone at equal steps (issue #28, evidence (c)).

    python benchmarks/memory_agent.py --seeds 6 7 8 --out benchmarks/results/memory_agent

Env: ``critique_rl.tasks.experience_multiturn`` (a wrong first answer reveals the entity's code and gets one more
try; success = right at the first try, which only memory of earlier episodes makes possible). Per seed, every
arm starts from the same warm-up: a tiny model imitating :func:`~critique_rl.tasks.experience_multiturn.reader`
episodes on fresh entities (never the task's own) whose record is in the context among irrelevant ones (it
answers from the record), on fresh entities with only irrelevant records (it guesses, then copies the code the
env reveals), and on known entities (it answers from the weights, ignoring noise), rendered exactly as the
episode runner renders them (plain text). Recipe v2 (default): the tokenizer never sees entity names, chunk 0
without distractors, fresh rows per chunk, training until the first-answer reading check on held-out reading
rows reaches ``--reading-target`` (cap ``--warm-max-steps``), as in ``memory_evidence.py``; ``--warm-recipe v1``:
the 600-step warm-up of the seeds 6-8 table.

Arms (fixed before any result): ``rl_only`` (episode Critique-GRPO, memory off); ``rl_memory`` (the same with
memory: lessons retrieved at reset, failures abstracted into lessons, successes kept as demonstrations);
``memory_only`` (the same run with memory and learning rate 1e-12: the weights stay as warmed up, the bank
fills from the same number of episodes). Memory: lexical, 1 lesson, no demonstrations, ``min_score`` at its
default 0.0 (applied at reset by ``EpisodeMemory`` since 4d6a463): the lesson about the task's entity or none. Evaluation: the trainer's own
held-out greedy episodes (numbers never trained on, memory read-only for the memory arms), success rate.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from critique_rl.agents.trajectory import TurnRenderer
from critique_rl.config import MemoryConfig, TrainConfig
from critique_rl.config_sections import AgentConfig
from critique_rl.models import build_tiny_model, build_tiny_tokenizer
from critique_rl.tasks.experience import (
    _distractors,
    _lesson_text,
    fresh_entity,
    reading_rows,
    render_context,
)
from critique_rl.tasks.experience_multiturn import reader_episode
from critique_rl.train.experience_reader import greedy_success, tokenizer_texts, train_until
from critique_rl.train.sft import sft_warmup
from critique_rl.train.trainer import CritiqueGRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_evidence import add_warm_up_args, warm_text  # noqa: E402
from memory_on_off import _ms, _paired  # noqa: E402

ARMS = ("rl_only", "memory_only", "rl_memory")
ENV = "critique_rl.tasks.experience_multiturn:spec"
MEMORY = dict(embeddings="lexical", top_k_demos=0, top_k_lessons=1, token_budget=60)


def warm_rows(n: int, seed: int, max_distractors: int = 2) -> list[dict[str, Any]]:
    """``reading_rows`` plus a third as many fresh entities whose record is missing (irrelevant ones only)."""
    rows = reading_rows(n, seed, max_distractors=max_distractors)
    rng = random.Random(seed * 7 + 3)
    for _ in range(n // 3):
        entity, code, number = fresh_entity(rng), rng.randrange(100, 1000), rng.randrange(10, 100)
        noise = _distractors(rng, rng.randint(0, max_distractors), entity)
        rows.append({"prompt": f"{entity}:{number}=", "answer": f"{code}{number}", "entity": entity, "code": code,
                     "a": number, "context": render_context([], [_lesson_text(e, c) for e, c in noise])})
    rng.shuffle(rows)
    return rows


def episode_pairs(renderer: TurnRenderer, rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(context so far, action) per turn of the reader's episode on each row, as the runner renders text."""
    pairs = []
    for r in rows:
        traj = reader_episode(r, r["context"] or None)
        text = renderer.first_text(traj.turns[0].observation, traj.context)
        for i, t in enumerate(traj.turns):
            if i:
                text += renderer.observation_text(t.observation, True)
            pairs.append((text, t.action_text))
            text += t.action_text + renderer.eos_text
    return pairs


def warm_up(seed: int, args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """v2 (default): the tokenizer never sees entity names (spelled letter by letter everywhere), chunk 0 shows
    records without distractors, every chunk draws fresh rows, and training stops when the reading check (greedy
    first answer on 400 held-out reading rows, rendered as the runner renders them) reaches ``reading_target``
    or after ``warm_max_steps``. v1: ``sft_steps`` steps on ``reading_n`` rows (the seeds 6-8 table)."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    v2 = args.warm_recipe == "v2"
    rows = warm_rows(args.reading_n, seed)
    probe = build_tiny_tokenizer(["0123456789"], vocab_size=300)
    texts = [p + c for p, c in episode_pairs(TurnRenderer(probe, False), rows[:3000])]
    tok = build_tiny_tokenizer(tokenizer_texts(texts) if v2 else texts, args.vocab)
    model = build_tiny_model(tok, args.hidden, args.layers, args.heads, max_positions=384, seed=seed)
    renderer = TurnRenderer(tok, False)
    if not v2:
        pairs = episode_pairs(renderer, rows)
        losses = sft_warmup(model, tok, pairs, args.sft_steps, args.sft_batch, args.sft_lr, seed=seed)
        info = {"sft_final_loss": statistics.fmean(losses[-20:]), "sft_seconds": time.perf_counter() - t0,
                "warm_pairs": len(pairs), "warm_steps": args.sft_steps}
    else:
        held = episode_pairs(renderer, reading_rows(400, seed + 10_000))  # one turn each: the fact is knowable
        got = train_until(
            model, tok,
            lambda i: episode_pairs(renderer, warm_rows(args.reading_n, 1_000_003 + seed * 1009 + i,
                                                        max_distractors=0 if i == 0 else 2)),
            lambda: greedy_success(model, tok, [p for p, _ in held], [a for _, a in held]),
            chunk_steps=args.warm_chunk, max_steps=args.warm_max_steps, target=args.reading_target,
            batch=args.sft_batch, lr=args.sft_lr, seed=seed, label=f"seed {seed} agent warm-up")
        info = {"sft_final_loss": got["final_loss"], "sft_seconds": time.perf_counter() - t0,
                "warm_steps": got["steps"], "reading_check": got["check"], "reached_target": got["reached"],
                "history": got["history"]}
    print(f"seed {seed}: warm-up done {info}", file=sys.stderr)
    return model.eval(), tok, info


def config(seed: int, out: Path, args: argparse.Namespace, memory: bool, lr: float) -> TrainConfig:
    mem = MemoryConfig(enabled=True, bank_path=str(out / "memory.sqlite"), **MEMORY) if memory else MemoryConfig()
    return TrainConfig(seed=seed, output_dir=str(out), progress=False, use_chat_template="no", sft_steps=0,
                       sft_examples=args.train_n, max_steps=args.steps, num_generations=args.n,
                       generation_batch_size=args.prompts * args.n, mini_batch_size=args.prompts * args.n // 2,
                       learning_rate=lr, eval_n=args.eval_n, eval_batch_size=args.eval_n, checkpoint_every=10_000,
                       keep_checkpoints=1, log_rollouts=0, memory=mem,
                       agent=AgentConfig(env=ENV, max_turns=2, max_turn_tokens=8, critique_source="env"))


def run_arm(model: Any, tok: Any, cfg: TrainConfig) -> dict[str, Any]:
    tr = CritiqueGRPOTrainer(model=copy.deepcopy(model), tokenizer=tok, args=cfg)
    times: list[float] = []
    inner = tr._step

    def timed_step() -> dict[str, Any]:
        t = time.perf_counter()
        out = inner()
        times.append(time.perf_counter() - t)
        return out
    tr._step = timed_step  # type: ignore[method-assign]
    s = tr.train()
    metrics = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"before": s["eval_accuracy_before_rl"], "held_out": s["eval_accuracy_after_rl"],
            "step_seconds": statistics.fmean(times),
            "train_success": [m.get("train/accuracy") for m in metrics if m.get("step", 0) > 0],
            "memory_lessons": s.get("memory_lessons")}


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, tok, out = warm_up(seed, args)
    out["seed"] = seed
    for arm in ARMS:
        arm_dir = work / f"seed{seed}" / arm
        if arm_dir.exists():
            import shutil

            shutil.rmtree(arm_dir)
        lr = 1e-12 if arm == "memory_only" else args.lr
        out[arm] = run_arm(model, tok, config(seed, arm_dir, args, arm != "rl_only", lr))
        print(f"seed {seed} {arm}: " + json.dumps({k: v for k, v in out[arm].items() if not isinstance(v, list)}),
              file=sys.stderr)
    out["seconds"] = time.perf_counter() - t0
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| arm | held-out first-try success % | paired diff vs rl_only (per seed) | paired diff vs memory_only | "
             "before RL % | s / step |", "|---|---|---|---|---|---|"]
    for arm in ARMS:
        d_rl = [r[arm]["held_out"] - r["rl_only"]["held_out"] for r in results]
        d_mem = [r[arm]["held_out"] - r["memory_only"]["held_out"] for r in results]
        lines.append(f"| {arm} | {_ms([r[arm]['held_out'] for r in results])} | {_paired(d_rl)} | {_paired(d_mem)} | {_ms([r[arm]['before'] for r in results])} | "
                     f"{_ms([r[arm]['step_seconds'] for r in results], 1.0)} |")
    return "\n".join(lines)


def write(results: list[dict[str, Any]], args: argparse.Namespace, t0: float, load: str) -> str:
    md = table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "seeds": results, "table_markdown": md,
                                                    "wall_seconds": time.perf_counter() - t0, "uptime": load},
                                                   indent=2))
    notes = [f"# Agent path: RL + memory vs RL alone vs memory alone at {args.steps} steps, multi-turn experience env "
             f"({len(results)} seeds, mean ± std)", "", md, "",
             f"Setup: tiny Llama {args.layers}x{args.hidden}, warm-up {warm_text(results, args)}; "
             f"RL lr {args.lr}, {args.prompts} tasks x {args.n} episodes per step; memory {MEMORY}. Wall time "
             f"{(time.perf_counter() - t0) / 60:.1f} min on a shared 2-core CPU (uptime at the start: {load})."]
    out.with_suffix(".md").write_text("\n".join(notes) + "\n")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[6, 7, 8])
    ap.add_argument("--out", default="benchmarks/results/memory_agent")
    ap.add_argument("--work", default="runs/bench_memory_agent")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train-n", type=int, default=2000)
    ap.add_argument("--eval-n", type=int, default=120)
    ap.add_argument("--reading-n", type=int, default=3000)
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--sft-batch", type=int, default=32)
    ap.add_argument("--sft-lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    add_warm_up_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.popen("uptime").read().strip()
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    for s in args.seeds:
        results.append(run_seed(s, args, Path(args.work)))
        write(results, args, t0, load)
    print(write(results, args, t0, load))


if __name__ == "__main__":
    main()
