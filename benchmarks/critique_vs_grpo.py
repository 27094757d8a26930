"""GRPO vs Critique-GRPO vs Critique-GRPO + directive distillation, side by side, >= 3 seeds.

Same tiny model, task, SFT warm-up (one per task and seed, shared by the three arms), RL steps and eval set.
Writes eval-accuracy curves (PNG), a table of final mean +- std and step time relative to GRPO:

    python benchmarks/critique_vs_grpo.py --seeds 0 1 2 --tasks addition reverse --max-steps 100

Outputs under --out (default benchmarks/results/critique_vs_grpo): results.json, results.md, curves_<task>.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

EXTRA: dict = {}  # --set key=value overrides applied to the warm-up and every arm alike
ARMS = {
    "grpo": {"critique_on": "none", "distill_weight": 0.0},
    "critique_grpo": {"critique_on": "all_wrong_groups", "offpolicy_gamma": 0.1, "distill_weight": 0.0},
    "critique_grpo+distill": {"critique_on": "all_wrong_groups", "offpolicy_gamma": 0.1, "distill_weight": 0.2},
}


def base_config(task: str, seed: int, out: Path, max_steps: int, eval_every: int, sft_steps: int):
    kw = dict(task=task, seed=seed, output_dir=str(out), max_steps=max_steps, eval_every=eval_every,
              sft_steps=sft_steps, progress=False, checkpoint_every=10_000, eval_n=200)
    kw["memory"] = {"enabled": False}  # memory has its own benchmark
    kw.update(EXTRA)
    return kw


def warm_start(task: str, seed: int, root: Path, sft_steps: int) -> Path:
    """SFT once per (task, seed); every arm starts from this model directory."""
    from critique_rl.config import load_config
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    out = root / f"sft_{task}_s{seed}"
    if not (out / "final" / "config.json").is_file():
        cfg = load_config(None, **base_config(task, seed, out, 0, 0, sft_steps))
        CritiqueGRPOTrainer(args=cfg).train()
    return out / "final"


def run_arm(task: str, seed: int, arm: str, model_dir: Path, root: Path, max_steps: int, eval_every: int) -> dict:
    from critique_rl.config import load_config
    from critique_rl.train.metrics import read_jsonl
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    out = root / f"{task}_s{seed}_{arm}"
    shutil.rmtree(out, ignore_errors=True)  # an unfinished arm starts over
    kw = base_config(task, seed, out, max_steps, eval_every, 0)
    kw.update(ARMS[arm], model=str(model_dir))
    cfg = load_config(None, **kw)
    summary = CritiqueGRPOTrainer(args=cfg).train()
    rows = read_jsonl(out / "metrics.jsonl")
    curve = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
    steps = [r for r in rows if "time/step" in r]

    def mean(key: str) -> float | None:
        vals = [r[key] for r in steps if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    return {"task": task, "seed": seed, "arm": arm, "before": summary["eval_accuracy_before_rl"],
            "after": summary["eval_accuracy_after_rl"], "curve": curve, "step_time": mean("time/step"),
            "train_accuracy": mean("train/accuracy"), "refine_success_rate": mean("critique/refine_success_rate"),
            "groups_rescued": mean("critique/groups_rescued"), "all_wrong_groups": mean("critique/all_wrong_groups"),
            "distill_kl": mean("distill/kl")}


def report(results: list[dict], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| task | arm | eval acc before RL | eval acc after RL (mean ± std) | gain (points) | step time vs GRPO |"
             " refine success | groups rescued / step |", "|---|---|---|---|---|---|---|---|"]
    for task in sorted({r["task"] for r in results}):
        grpo_time = np.mean([r["step_time"] for r in results if r["task"] == task and r["arm"] == "grpo"])
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for arm in ARMS:
            rs = [r for r in results if r["task"] == task and r["arm"] == arm]
            if not rs:
                continue
            after = np.array([r["after"] for r in rs])
            before = np.array([r["before"] for r in rs])
            ratio = np.mean([r["step_time"] for r in rs]) / grpo_time
            rsr = [r["refine_success_rate"] for r in rs if r["refine_success_rate"] is not None]
            resc = [r["groups_rescued"] for r in rs if r["groups_rescued"] is not None]
            lines.append(
                f"| {task} | {arm} | {before.mean():.1%} | {after.mean():.1%} ± {after.std():.1%} | "
                f"{(after - before).mean() * 100:+.1f} | {ratio:.2f}x | "
                f"{f'{np.mean(rsr):.0%}' if rsr else '-'} | {f'{np.mean(resc):.1f}' if resc else '-'} |")
            steps = [s for s, _ in rs[0]["curve"]]
            accs = np.array([[a for _, a in r["curve"]] for r in rs])
            ax.plot(steps, accs.mean(0), marker=".", label=arm)
            ax.fill_between(steps, accs.mean(0) - accs.std(0), accs.mean(0) + accs.std(0), alpha=0.2)
        ax.set_title(f"{task}: held-out accuracy ({len(rs)} seeds)")
        ax.set_xlabel("RL step")
        ax.set_ylabel("eval accuracy (greedy)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"curves_{task}.png", dpi=100)
        plt.close(fig)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", default=["addition", "reverse"])
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--sft-steps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/critique_vs_grpo"))
    ap.add_argument("--work", type=Path, default=Path("runs/bench_critique"))
    ap.add_argument("--set", nargs="*", default=[], help="key=value config overrides for the RL arms")
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    args = ap.parse_args()
    import yaml

    EXTRA.update({k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results: list[dict] = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["task"], r["seed"], r["arm"]) for r in results}
    t0 = time.perf_counter()
    for task in args.tasks:
        for seed in args.seeds:
            model_dir = warm_start(task, seed, args.work, args.sft_steps)
            for arm in args.arms:
                if (task, seed, arm) in done:
                    continue
                r = run_arm(task, seed, arm, model_dir, args.work, args.max_steps, args.eval_every)
                results.append(r)
                results_path.write_text(json.dumps(results, indent=1))  # nothing lost if stopped
                print(f"{task} seed {seed} {arm}: {r['before']:.1%} -> {r['after']:.1%} "
                      f"({r['step_time']:.2f} s/step)", flush=True)
    table = report(results, args.out)
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
