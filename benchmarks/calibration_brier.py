"""Calibration only (issue 5 (a)): [correctness] vs [correctness, brier] on `addition_conf`, >= 3 seeds.

The same arms, SFT checkpoints and evaluation as part (a) of benchmarks/multi_objective.py, without the
weight and diversity experiments, so the calibration result can be re-measured on its own:

    python benchmarks/calibration_brier.py --seeds 0 1 2 --max-steps 100

Writes <out>.md and <out>.json (default benchmarks/results/calibration_brier).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from multi_objective import TASK, ms, rl, sft_checkpoint

from critique_rl.train.calibration import evaluate_calibration

ARMS = {"correctness": ["correctness"], "brier": ["correctness", "brier"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_calibration"))
    ap.add_argument("--out", default="benchmarks/results/calibration_brier")
    args = ap.parse_args()
    args.reuse_sft = True
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    per_seed: dict[str, dict] = {}
    for seed in args.seeds:
        sft_dir, _ = sft_checkpoint(args.work, seed, args)
        res = {"sft": evaluate_calibration(sft_dir, TASK, n=args.eval_n)}
        for arm, funcs in ARMS.items():
            final, _ = rl(args.work, f"cal_{arm}", seed, sft_dir, args, reward_funcs=funcs)
            res[arm] = evaluate_calibration(final, TASK, n=args.eval_n)
            print(f"seed {seed} {arm}: acc {res[arm]['accuracy']:.3f} ECE {res[arm]['ece']:.3f}", flush=True)
        per_seed[str(seed)] = res
    col = lambda arm, key: [per_seed[str(s)][arm][key] for s in args.seeds]  # noqa: E731
    ece_red = 1 - statistics.mean(col("brier", "ece")) / max(statistics.mean(col("correctness", "ece")), 1e-12)
    acc_diff = (statistics.mean(col("brier", "accuracy")) - statistics.mean(col("correctness", "accuracy"))) * 100
    met = ece_red >= 0.5 and abs(acc_diff) <= 2.0
    lines = [f"# Calibration on `{TASK}`: [correctness] vs [correctness, brier]", "",
             f"{len(args.seeds)} seeds, {args.max_steps} RL steps, greedy answers on {args.eval_n} held-out problems, "
             "ECE with 10 equal-width bins (unparsable confidence = 0); mean ± std, in points.", "",
             "| arm | accuracy | ECE | unparsable | mean confidence |", "|---|---|---|---|---|"]
    for arm, label in (("sft", "after SFT"), ("correctness", "RL [correctness]"), ("brier", "RL [correctness, brier]")):
        lines.append(f"| {label} | {ms(col(arm, 'accuracy'), 100)} | {ms(col(arm, 'ece'), 100)} | "
                     f"{ms(col(arm, 'unparsable_rate'), 100)}% | {ms(col(arm, 'mean_confidence'), 1, 3)} |")
    lines += ["", f"ECE reduction {ece_red:+.0%}, accuracy difference {acc_diff:+.1f} points; target (ECE -50% at "
              f"accuracy within 2 points): **{'met' if met else 'not met'}**. Wall {time.perf_counter() - t0:.0f} s."]
    md = "\n".join(lines) + "\n"
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"per_seed": per_seed, "ece_reduction": ece_red,
                                                    "accuracy_diff_points": acc_diff, "met": met}, indent=2))


if __name__ == "__main__":
    main()
