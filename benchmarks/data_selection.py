"""Data selection evidence (issue #14 item 5), >= 3 seeds, at equal samples generated.

Two experiments on the tiny model and the addition task, plain GRPO (no critiques: the setting DAPO's dynamic
sampling was made for), every arm of a seed starting from the same SFT warm-up (one per seed, or with
``--shared-sft`` one for all seeds) and stopped by the same ``sample_budget`` (completions sampled, refills and pass-rate measurements included):

- ``dynamic``: DAPO dynamic sampling (zero-spread groups dropped, batch refilled up to 3 extra batches) vs none.
- ``too_hard``: an RL prompt pool where a share of the prompts is impossible (the reference answer has 9 digits;
  the policy's completions are at most 6 tokens, so it can never be written): pass-rate filter (4 samples per
  prompt before RL, prompts never solved are dropped) vs none vs an oracle pool without the impossible prompts.
  Evaluation is on the normal held-out (solvable) problems.

    python benchmarks/data_selection.py --seeds 0 1 2 --budget 2560 --shared-sft

Outputs under --out (default benchmarks/results/data_selection): results.json, results.md, curves.png.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

COMMON: dict[str, Any] = dict(
    task="addition", critique_on="none", num_generations=8, generation_batch_size=64, mini_batch_size=64,
    learning_rate=1e-4, lr_scheduler="constant", checkpoint_every=100_000, eval_n=500, progress=False,
    log_rollouts=0, memory={"enabled": False}, max_steps=100_000, eval_batch_size=250,
)
ARMS: dict[str, dict[str, dict[str, Any]]] = {
    "dynamic": {
        "none": {},
        "dynamic_sampling": {"dynamic_sampling": {"enabled": True, "max_refill_batches": 3}},
    },
    "too_hard": {
        "none": {},
        "pass_rate_filter": {"pass_rate_filter": {"enabled": True, "samples": 4, "too_hard_at_most": 0.0,
                                                  "too_easy_at_least": None}},
        "oracle_pool": {},  # the same pool without the impossible prompts (what a perfect filter would keep)
    },
}


def warm_start(seed: int, root: Path, sft_steps: int) -> Path:
    """The demo's imperfect demonstrator (drops the carry 60% of the time), SFT once per seed."""
    from critique_rl.config import load_config
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    out = root / f"sft_s{seed}"
    if not (out / "final" / "config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        cfg = load_config(None, seed=seed, output_dir=str(out), sft_steps=sft_steps, max_steps=0, eval_n=200,
                          progress=False, memory={"enabled": False})
        CritiqueGRPOTrainer(args=cfg).train()
    return out / "final"


def pools(seed: int, size: int, impossible_share: float) -> tuple[list[dict], list[dict]]:
    """(mixed pool, oracle pool): addition training rows, a share of them replaced by impossible prompts."""
    from critique_rl.tasks import get_task

    rows = get_task("addition").make_examples("train", size, seed + 100)
    rng = random.Random(seed + 7)
    bad = set(rng.sample(range(size), int(round(impossible_share * size))))
    mixed = []
    for i, r in enumerate(rows):
        if i in bad:  # same prompt form, an answer of 9 digits: inexpressible in 6 tokens
            mixed.append({"prompt": r["prompt"], "answer": str(rng.randrange(10**8, 10**9))})
        else:
            mixed.append({"prompt": r["prompt"], "answer": r["answer"]})
    return mixed, [r for i, r in enumerate(mixed) if i not in bad]


def run_arm(exp: str, arm: str, seed: int, model_dir: Path, root: Path, budget: int, eval_every: int,
            pool_size: int, impossible_share: float) -> dict[str, Any]:
    from critique_rl.config import TrainConfig, from_dict
    from critique_rl.tasks import get_task
    from critique_rl.train.evaluate import EVAL_SEED
    from critique_rl.train.metrics import read_jsonl
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    out = root / f"{exp}_s{seed}_{arm}"
    done = out / "summary.json"
    if done.is_file():  # resumable benchmark: a finished arm is read back
        return json.loads((out / "arm.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    kw = dict(COMMON, seed=seed, output_dir=str(out), model=str(model_dir), sft_steps=0, eval_every=eval_every,
              sample_budget=budget, max_new_tokens=6)
    kw.update(ARMS[exp][arm])
    cfg = from_dict(TrainConfig, kw)
    train = None
    if exp == "too_hard":
        mixed, oracle = pools(seed, pool_size, impossible_share)
        train = oracle if arm == "oracle_pool" else mixed
    eval_rows = get_task("addition").make_examples("eval", 500, EVAL_SEED)
    t0 = time.perf_counter()
    summary = CritiqueGRPOTrainer(args=cfg, train_dataset=train, eval_dataset=eval_rows).train()
    rows = read_jsonl(out / "metrics.jsonl")
    rl = [r for r in rows if "loss/total" in r]
    curve = [(0, rows[0].get("eval/accuracy"))] + [(r["selection/samples_total"], r["eval/accuracy"]) for r in rl
                                                   if r.get("eval/accuracy") is not None]
    final = next(r for r in rows if r.get("final"))
    result = {
        "exp": exp, "arm": arm, "seed": seed,
        "acc_before": summary["eval_accuracy_before_rl"], "acc_after": summary["eval_accuracy_after_rl"],
        "steps": summary["steps"], "samples": summary.get("samples_generated"),
        "zero_spread_mean": float(np.mean([r["train/zero_spread_groups"] for r in rl])) if rl else None,
        "refills_mean": float(np.mean([r.get("selection/refills", 0) for r in rl])) if rl else None,
        "padded_total": int(sum(r.get("selection/zero_spread_padded", 0) for r in rl)),
        "pass_rate": summary.get("pass_rate_filter"),
        "curve": curve + [(summary.get("samples_generated"), final["eval/accuracy"])],
        "wall_s": time.perf_counter() - t0,
    }
    (out / "arm.json").write_text(json.dumps(result))
    return result


def late_mean(r: dict) -> float:
    """Mean held-out accuracy over the evaluations taken in the second half of the sample budget (final included):
    less sensitive than the last point to the step-to-step swings of a tiny model."""
    pts = [(x, y) for x, y in r["curve"] if x is not None and y is not None]
    top = max(x for x, _ in pts)
    late = [y for x, y in pts if x >= top / 2]
    return float(np.mean(late))


def table(results: list[dict], exp: str) -> list[str]:
    arms = list(ARMS[exp])
    lines = ["| arm | eval acc before RL | eval acc after RL (mean +- std) | paired diff vs none | late mean acc "
             "| RL steps | samples | zero-spread share | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["arm"], r["seed"]): r for r in results if r["exp"] == exp}
    seeds = sorted({r["seed"] for r in results if r["exp"] == exp})
    for arm in arms:
        rs = [by[(arm, s)] for s in seeds if (arm, s) in by]
        if not rs:
            continue
        after = np.array([r["acc_after"] for r in rs])
        diffs = [by[(arm, s)]["acc_after"] - by[("none", s)]["acc_after"] for s in seeds
                 if (arm, s) in by and ("none", s) in by]
        diff = "-" if arm == "none" else f"{np.mean(diffs) * 100:+.1f} pts ({', '.join(f'{d * 100:+.1f}' for d in diffs)})"
        lines.append(f"| {arm} | {np.mean([r['acc_before'] for r in rs]):.3f} | {after.mean():.3f} +- {after.std():.3f} "
                     f"({', '.join(f'{a:.3f}' for a in after)}) | {diff} | {np.mean([late_mean(r) for r in rs]):.3f} | "
                     f"{np.mean([r['steps'] for r in rs]):.0f} | "
                     f"{np.mean([r['samples'] for r in rs]):.0f} | {np.mean([r['zero_spread_mean'] for r in rs]):.2f} | "
                     f"{np.mean([r['wall_s'] for r in rs]):.0f} |")
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = sorted({r["exp"] for r in results})
    fig, axes = plt.subplots(1, len(exps), figsize=(5.5 * len(exps), 4), squeeze=False)
    for ax, exp in zip(axes[0], exps, strict=True):
        for i, arm in enumerate(ARMS[exp]):
            for j, r in enumerate(r for r in results if r["exp"] == exp and r["arm"] == arm):
                xs, ys = zip(*[(x, y) for x, y in r["curve"] if y is not None], strict=True)
                ax.plot(xs, ys, color=f"C{i}", alpha=0.8, label=arm if j == 0 else None)
        ax.set_title(exp)
        ax.set_xlabel("completions sampled (refills and measurements included)")
        ax.set_ylabel("held-out accuracy (greedy)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--experiments", nargs="+", default=["dynamic", "too_hard"], choices=list(ARMS))
    ap.add_argument("--budget", type=int, default=3840, help="completions sampled per arm (60 plain steps of 64)")
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--arms", nargs="+", default=None, help="run only these arms (default: all)")
    ap.add_argument("--shared-sft", action="store_true",
                    help="one SFT warm-up (the first seed's) for every seed: seeds then vary the RL part only")
    ap.add_argument("--pool-size", type=int, default=400, help="RL prompts in the too_hard experiment")
    ap.add_argument("--impossible-share", type=float, default=0.3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/data_selection"))
    ap.add_argument("--work", type=Path, default=Path("runs/bench_data_selection"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        model = warm_start(args.seeds[0] if args.shared_sft else seed, args.work, args.sft_steps)
        for exp in args.experiments:
            for arm in ARMS[exp]:
                if args.arms and arm not in args.arms:
                    continue
                r = run_arm(exp, arm, seed, model, args.work, args.budget, args.eval_every, args.pool_size,
                            args.impossible_share)
                results.append(r)
                print(f"{exp} seed {seed} {arm}: acc {r['acc_before']:.3f} -> {r['acc_after']:.3f}, {r['steps']} steps, "
                      f"{r['samples']} samples, {r['wall_s']:.0f} s", flush=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results}, indent=1))
    md = [f"# Data selection: {len(args.seeds)} seeds, budget {args.budget} completions per arm", "",
          "late mean acc: mean held-out accuracy over the evaluations in the second half of the budget.", ""]
    for exp in args.experiments:
        md += [f"## {exp}", "", *table(results, exp), ""]
    (args.out / "results.md").write_text("\n".join(md))
    plot(results, args.out / "curves.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
