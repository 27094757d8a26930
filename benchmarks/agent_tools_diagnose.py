"""Diagnostics for the price-lookup agent demo (examples/agent_tools_cpu.yaml): why RL does or does not learn.

Runs the warm-up and RL of the example config through the one trainer, and prints, before RL and every
``--every`` steps:

- held-out greedy success by item kind (fruit / metal) and the first mistake of every failed episode (the env
  critic's own classification: skipped lookup, wrong item, wrong add, wrong answer, malformed call, no answer);
- on training tasks sampled at the RL temperature: success, the share of GRPO groups with mixed outcomes
  (the only groups with a non-zero advantage), all-wrong groups, how often the first call is a lookup;
- the first prompt's length in tokens and the warm-up's demonstrator success (what imitation can reach);
- per RL step: train accuracy, critique refinement success, kept refinements, loss, seconds.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/agent_tools_diagnose.py --seed 0 --set max_steps=20
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import yaml

MISTAKES = (("not a valid tool call", "malformed"), ("looked up another item", "wrong_item"),
            ("never looked up", "skipped_lookup"), ("should add", "wrong_add"),
            ("answered without looking up", "answer_no_lookup"), ("is not the price", "wrong_answer"),
            ("no answer(", "no_answer"), ("Every step", "ok"))


def first_mistake(traj: Any) -> str:
    from critique_rl.agents.lookup_env import critique_text

    text = critique_text(traj)
    return next((name for key, name in MISTAKES if key in text), "other")


def profile(trajs: list[Any], n: int = 1) -> dict[str, Any]:
    """Success by kind, first mistakes, first-call shares and (n > 1) the group outcome mix."""
    out: dict[str, Any] = {"n": len(trajs), "success": sum(t.success for t in trajs) / max(1, len(trajs))}
    for kind in ("fruit", "metal"):
        ts = [t for t in trajs if t.task["kind"] == kind]
        out[f"success_{kind}"] = round(sum(t.success for t in ts) / max(1, len(ts)), 3)
        first = Counter((t.turns[0].info or {}).get("tool") if t.turns else None for t in ts)
        out[f"first_lookup_{kind}"] = round(first.get("lookup", 0) / max(1, len(ts)), 3)
    out["mistakes"] = dict(Counter(first_mistake(t) for t in trajs if not t.success).most_common())
    out["mean_turns"] = round(sum(t.num_turns for t in trajs) / max(1, len(trajs)), 2)
    if n > 1:
        groups = [trajs[i:i + n] for i in range(0, len(trajs), n)]
        wins = [sum(t.success for t in g) for g in groups]
        out["groups_mixed"] = round(sum(0 < w < n for w in wins) / len(groups), 3)
        out["groups_all_wrong"] = round(sum(w == 0 for w in wins) / len(groups), 3)
        out["groups_all_right"] = round(sum(w == n for w in wins) / len(groups), 3)
    return out


def examples(trajs: list[Any], k: int = 2) -> list[str]:
    """Up to ``k`` failed episodes per first mistake: the calls, then the question and the hidden price."""
    out, seen = [], Counter()
    for t in trajs:
        kind = first_mistake(t)
        if t.success or seen[kind] >= k:
            continue
        seen[kind] += 1
        calls = " | ".join(x.action_text for x in t.turns)
        out.append(f"{kind}: {calls}  <- {t.task['prompt']} (price {t.task['prices'][t.task['key']]})")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="examples/agent_tools_cpu.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=10, help="diagnose every this many RL steps")
    p.add_argument("--probe-tasks", type=int, default=32, help="training tasks sampled per diagnosis (x n)")
    p.add_argument("--set", nargs="*", default=[], help="config overrides key=value (YAML values)")
    p.add_argument("--out", default="runs/agent_tools_diag")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from critique_rl.agents.warmup import play_scripted
    from critique_rl.config import TrainConfig, from_dict
    from critique_rl.train.metrics import JsonlWriter
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    raw = yaml.safe_load(Path(args.config).read_text())
    for kv in args.set:
        key, val = kv.split("=", 1)
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(val)
    raw.update(seed=args.seed, output_dir=f"{args.out}/seed{args.seed}", progress=False)
    cfg = from_dict(TrainConfig, raw)
    print("config:", json.dumps({k: v for k, v in raw.items() if k != "agent"}), json.dumps(raw["agent"]))

    t = CritiqueGRPOTrainer(args=cfg)
    t0 = time.perf_counter()
    t._setup(False)
    src = t.episodes
    spec = src.spec
    rng = random.Random(0)
    demo = [play_scripted(spec, src.env_kwargs, task, spec.demonstrator, rng, cfg.agent.max_turns)
            for task in src.train_tasks[:500]]
    print(f"demonstrator on train tasks: {json.dumps(profile(demo))}")
    first = src.renderer.first(spec.make_env(**src.env_kwargs).reset(src.eval_tasks[0]))
    print(f"first prompt: {len(first)} tokens; vocab {len(t.tokenizer)}; "
          f"params {sum(x.numel() for x in t.model.parameters())}")
    t.out.mkdir(parents=True, exist_ok=True)
    t.metrics_log = JsonlWriter(t.out / "metrics.jsonl")
    t.rollout_log = JsonlWriter(t.out / "rollouts.jsonl")
    t._warmup(None)
    print(f"warm-up: {time.perf_counter() - t0:.1f}s wall, {time.process_time():.1f}s CPU, final loss {t.summary.get('sft_final_loss'):.4f}")
    t._build_optim()

    def diagnose(label: str) -> None:
        td = time.perf_counter()
        gen = t.generator
        held = src.run(gen, src.eval_tasks, 1, greedy=True)
        probe = src.run(gen, src.train_tasks[:args.probe_tasks], cfg.num_generations)
        print(f"[{label}] held-out greedy: {json.dumps(profile(held))}")
        print(f"[{label}] train sampled (T={cfg.temperature}): {json.dumps(profile(probe, cfg.num_generations))}")
        for line in examples(held):
            print(f"[{label}]   failed: {line}")
        print(f"[{label}] diagnosis took {time.perf_counter() - td:.1f}s", flush=True)

    diagnose("step 0")
    for _ in range(cfg.max_steps):
        ts = time.perf_counter()
        m = t._step()
        t.step += 1
        keys = ("train/accuracy", "train/all_wrong_groups", "train/all_right_groups", "critique/refine_success_rate",
                "critique/kept", "critique/groups_rescued", "loss/total", "episode/mean_turns")
        row = {k.split("/")[-1]: (round(m[k], 3) if isinstance(m.get(k), float) else m.get(k)) for k in keys}
        print(f"step {t.step}: {json.dumps(row)} {time.perf_counter() - ts:.1f}s", flush=True)
        if t.step % args.every == 0 or t.step == cfg.max_steps:
            diagnose(f"step {t.step}")
    print(f"total {time.perf_counter() - t0:.1f}s wall, {time.process_time():.1f}s CPU (one thread: about the "
          "wall time on an idle core)")


if __name__ == "__main__":
    sys.exit(main())
