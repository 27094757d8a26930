"""Refinement literacy without losing base skill (issue #13 item 5): what refinement demos in the SFT warm-up
cost in plain accuracy, and whether giving them their own steps removes the cost.

Arms (SFT only, the demo's warm-up: addition with the demonstrator dropping the carry 60% of the time,
``sft_steps`` 1000), per seed from the same initial weights:

- ``plain``: no refinement demos (``sft_refine_fraction: 0``): the plain-accuracy reference;
- ``shared``: 30% of rows add a refinement demo that takes its share of the 1000 steps (the demo preset);
- ``added``: the same demos with ``sft_refine_steps: added`` (plain demonstrations keep their 1000 steps'
  worth of batches; the warm-up runs ~1300 steps).

Measured on held-out problems: plain greedy accuracy (the RL start), and refinement literacy: greedy answers to
refinement prompts (question, a wrong answer -- the task's typical mistake where it applies, else another
problem's answer -- and the ground-truth critique) that are right.

    python benchmarks/refinement_literacy.py --seeds 0 1 2 --jobs 2

Writes results.json / results.md under --out (default benchmarks/results/refinement_literacy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ARMS: dict[str, dict[str, Any]] = {
    "plain": {"sft_refine_fraction": 0.0},
    "shared": {"sft_refine_fraction": 0.3, "sft_refine_steps": "shared"},
    "added": {"sft_refine_fraction": 0.3, "sft_refine_steps": "added"},
}


def run(arm: str, seed: int, root: str, eval_n: int, extra: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from critique_rl.config import DEMO_PRESET, TrainConfig, from_dict
    from critique_rl.models import format_prompt
    from critique_rl.rollout.factory import build_generator
    from critique_rl.tasks import get_task
    from critique_rl.train.critique_step import refinement_demos
    from critique_rl.train.evaluate import EVAL_SEED, greedy_records
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    out = Path(root) / f"{arm}_s{seed}"
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(out, ignore_errors=True)
    kw = {k: v for k, v in DEMO_PRESET.items() if k != "memory"}
    kw.update(seed=seed, output_dir=str(out), max_steps=0, eval_n=eval_n, eval_batch_size=250, progress=False,
              memory={"enabled": False}, **extra)
    kw.update(ARMS[arm])
    t0 = time.perf_counter()
    trainer = CritiqueGRPOTrainer(args=from_dict(TrainConfig, kw))
    summary = trainer.train()
    task = get_task(kw["task"])
    rows = task.make_examples("eval", eval_n, EVAL_SEED)[:eval_n]
    # every row that gets a demo: (refinement prompt, the reference answer to check the greedy answer against)
    refine_rows = [{"prompt": p, "answer": a} for p, a in refinement_demos(task, rows, 1.0, seed, lambda r: r["answer"])]
    tok = trainer.tokenizer
    gen = build_generator("hf", trainer._policy(), tok, batch_size=250)
    recs = greedy_records(gen, refine_rows, lambda r: format_prompt(tok, r["prompt"], trainer.use_chat), task.verify,
                          task.max_new_tokens, batch_size=250)
    result = {"arm": arm, "seed": seed, "plain_accuracy": summary["eval_accuracy_before_rl"],
              "refine_success": float(np.mean([r[0] for r in recs])), "refine_n": len(recs),
              "sft_steps_run": summary.get("sft_steps_run", kw.get("sft_steps", 1000)),
              "sft_final_loss": summary.get("sft_final_loss"), "wall_s": time.perf_counter() - t0}
    done.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--eval-n", type=int, default=500)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="key=value (YAML) for every arm, e.g. task=reverse")
    ap.add_argument("--out", default="benchmarks/results/refinement_literacy")
    args = ap.parse_args()
    import yaml

    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        # arm-major: the first arm's checkpoints (e.g. `shared`, the demo's warm-up) are ready first for other uses
        futures = [pool.submit(run, arm, seed, args.out, args.eval_n, extra) for arm in args.arms for seed in args.seeds]
        results = [f.result() for f in futures]
    Path(args.out, "results.json").write_text(json.dumps(results, indent=1))
    by = {(r["arm"], r["seed"]): r for r in results}
    lines = [f"`python benchmarks/refinement_literacy.py {' '.join(sys.argv[1:])}`", "",
             "| arm | SFT steps | plain accuracy (per seed) | vs plain, paired | refinement success (per seed) |",
             "|---|---|---|---|---|"]
    for arm in args.arms:
        rs = [by[(arm, s)] for s in args.seeds]
        acc = [r["plain_accuracy"] for r in rs]
        ref = [r["refine_success"] for r in rs]
        diff = [by[(arm, s)]["plain_accuracy"] - by[("plain", s)]["plain_accuracy"] for s in args.seeds
                if ("plain", s) in by] if arm != "plain" else []
        lines.append(f"| {arm} | {np.mean([r['sft_steps_run'] for r in rs]):.0f} | "
                     f"{100 * np.mean(acc):.1f}% ({' / '.join(f'{100 * a:.1f}' for a in acc)}) | "
                     + (f"{100 * np.mean(diff):+.1f} ({' / '.join(f'{100 * d:+.1f}' for d in diff)})" if diff else "-")
                     + f" | {100 * np.mean(ref):.1f}% ({' / '.join(f'{100 * a:.1f}' for a in ref)}) |")
    Path(args.out, "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
