"""Calibration (issue 5 (a)): [correctness] vs [correctness, brier] on `addition_conf`, >= 3 seeds.

Per seed one SFT checkpoint (benchmarks/multi_objective.py's warm-up) and, per reward aggregator, two RL arms
from it that differ only in ``reward_funcs``. Same steps, batch, learning rate and held-out set everywhere.

- ``weighted_sum``: ``R = sum_k b_k r_k`` then the trainer's scalar estimator (``dr_grpo``, no std division);
- ``dvao``: per-objective group z-scores weighted by their group spread (arXiv:2605.25604). With the single
  [correctness] objective it is GRPO's ``(r - mean) / std``.

Reported per arm: greedy accuracy, ECE (10 equal-width bins), Brier score, AUROC of the confidence for
correct vs wrong (0.5 = no ranking: a constant confidence can have ECE 0 and still AUROC 0.5), how many
distinct confidence values the greedy answers state, and the mean confidence.

    python benchmarks/calibration_brier.py --seeds 0 1 2 --max-steps 200 --aggregators weighted_sum dvao

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

from critique_rl.train.evaluate import evaluate_calibration

ARMS = {"correctness": ["correctness"], "brier": ["correctness", "brier"]}
TARGET = "ECE down >= 50% at accuracy within 2 points"


def _ms_opt(values: list[float | None], scale: float, digits: int = 1) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    note = "" if len(vals) == len(values) else f" ({len(vals)}/{len(values)} seeds)"
    return ms(vals, scale, digits) + note


def key(args: argparse.Namespace, agg: str, arm: str) -> dict:
    """What an arm's result depends on (a saved result is reused only when this matches; runs are deterministic)."""
    return {"max_steps": args.max_steps, "eval_n": args.eval_n, "aggregator": agg, "reward_funcs": ARMS[arm]}


def target(per_seed: dict, seeds: list[int], agg: str) -> dict[str, float | bool]:
    col = lambda arm, key: [per_seed[str(s)][agg][arm][key] for s in seeds]  # noqa: E731
    ece_red = 1 - statistics.mean(col("brier", "ece")) / max(statistics.mean(col("correctness", "ece")), 1e-12)
    acc_diff = (statistics.mean(col("brier", "accuracy")) - statistics.mean(col("correctness", "accuracy"))) * 100
    return {"ece_reduction": ece_red, "accuracy_diff_points": acc_diff, "met": ece_red >= 0.5 and abs(acc_diff) <= 2.0}


def table(per_seed: dict, sft: dict, seeds: list[int], aggs: list[str]) -> list[str]:
    lines = ["| aggregator | arm | accuracy | ECE | Brier score | AUROC | distinct q | mean confidence |",
             "|---|---|---|---|---|---|---|---|"]

    def row(label: str, agg: str, rs: list[dict]) -> str:
        c = lambda key: [r[key] for r in rs]  # noqa: E731
        return (f"| {agg} | {label} | {ms(c('accuracy'), 100)} | {ms(c('ece'), 100)} | "
                f"{ms(c('brier_score'), 100)} | {_ms_opt(c('auroc'), 1, 2)} | {ms(c('distinct_confidences'), 1)} | "
                f"{ms(c('mean_confidence'), 1, 3)} |")

    lines.append(row("after SFT (start)", "-", [sft[str(s)] for s in seeds]))
    for agg in aggs:
        for arm, label in (("correctness", "[correctness]"), ("brier", "[correctness, brier]")):
            lines.append(row(label, agg, [per_seed[str(s)][agg][arm] for s in seeds]))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--aggregators", nargs="+", default=["weighted_sum", "dvao"], choices=["weighted_sum", "gdpo", "dvao"])
    ap.add_argument("--reuse-arms", action="store_true",
                    help="reuse an arm's saved result from <work> when steps, eval set and rewards match")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_calibration"))
    ap.add_argument("--out", default="benchmarks/results/calibration_brier")
    args = ap.parse_args()
    args.reuse_sft = True
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    per_seed: dict[str, dict] = {}
    sft: dict[str, dict] = {}
    for seed in args.seeds:
        sft_dir, _ = sft_checkpoint(args.work, seed, args)
        sft[str(seed)] = evaluate_calibration(sft_dir, TASK, n=args.eval_n)
        per_seed[str(seed)] = {}
        for agg in args.aggregators:
            per_seed[str(seed)][agg] = {}
            for arm, funcs in ARMS.items():
                saved = args.work / f"seed{seed}" / f"cal_{agg}_{arm}" / "calibration.json"
                if args.reuse_arms and saved.is_file() and json.loads(saved.read_text()).get("key") == key(args, agg, arm):
                    res = json.loads(saved.read_text())["result"]
                else:
                    final, summary = rl(args.work, f"cal_{agg}_{arm}", seed, sft_dir, args, reward_funcs=funcs,
                                        reward_aggregator=agg)
                    res = evaluate_calibration(final, TASK, n=args.eval_n) | {"seconds": summary["arm_seconds"]}
                    saved.write_text(json.dumps({"key": key(args, agg, arm), "result": res}))
                per_seed[str(seed)][agg][arm] = res
                print(f"seed {seed} {agg} {arm}: acc {res['accuracy']:.3f} ECE {res['ece']:.3f} "
                      f"AUROC {res['auroc']} distinct {res['distinct_confidences']} ({res['seconds']:.0f}s)", flush=True)
    targets = {agg: target(per_seed, args.seeds, agg) for agg in args.aggregators}
    lines = [f"# Calibration on `{TASK}`: [correctness] vs [correctness, brier]", "",
             f"{len(args.seeds)} seeds ({args.seeds}), {args.max_steps} RL steps per arm from the seed's SFT checkpoint, "
             f"greedy answers on {args.eval_n} held-out problems; ECE with 10 equal-width bins, Brier score and ECE "
             "in points (x100), unparsable confidence = 0; mean ± std over seeds.", "",
             *table(per_seed, sft, args.seeds, args.aggregators), ""]
    for agg, t in targets.items():
        lines.append(f"- {agg}: ECE reduction {t['ece_reduction']:+.0%}, accuracy difference "
                     f"{t['accuracy_diff_points']:+.1f} points; target ({TARGET}): **{'met' if t['met'] else 'not met'}**.")
    lines += ["", f"Wall {time.perf_counter() - t0:.0f} s (`python benchmarks/calibration_brier.py --seeds "
              f"{' '.join(map(str, args.seeds))} --max-steps {args.max_steps} --aggregators {' '.join(args.aggregators)}"
              f"{' --reuse-arms' if args.reuse_arms else ''}`)."]
    md = "\n".join(lines) + "\n"
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"settings": vars(args) | {"work": str(args.work)}, "sft": sft,
                                                    "per_seed": per_seed, "targets": targets}, indent=2))


if __name__ == "__main__":
    main()
