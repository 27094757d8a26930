"""Why a plateau gain is large or small: per-arm diagnostics read from finished learning_evidence runs.

    python benchmarks/plateau_diagnostics_evidence.py --out benchmarks/results/learning_evidence/constraints_plateau \
        --arms grpo critique_wrong_unshaped --seeds 0 1

For every (arm, seed) run under ``--out`` (``<arm>_s<seed>/metrics.jsonl``), over the first quarter of the RL
steps and over all of them: right answers the policy is shown per step (right refinements kept, right on-policy
samples), the refinements' share of the update (``offpolicy/grad_weight_share``: sum |A| x c over refinement
tokens / over all tokens), the mean log-prob of refinement tokens under the plain prompt (first -> last quarter)
and the distillation loss (the teacher's dense per-token signal, where the arm has one). Compare the right
answers per step with the warm-up's ``sft_batch_size`` right demonstrations per step (at ``sft_learning_rate``).
Writes ``diagnostics.md`` next to the runs and prints it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np


def steps_of(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss/total" in r]


def mean(rows: list[dict[str, Any]], key: str, scale: float = 1.0) -> float | None:
    vals = [r[key] * scale for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def diagnostics(rows: list[dict[str, Any]], samples_per_step: int) -> dict[str, float | None]:
    """Per-step means over ``rows``: all-wrong groups rescued by a right refinement (``critique/groups_rescued``),
    right on-policy samples, the refinements' share of the update, their log-prob, the distillation loss."""
    return {"right_refinements": mean(rows, "critique/groups_rescued"),
            "right_onpolicy": mean(rows, "train/accuracy", samples_per_step),
            "share": mean(rows, "offpolicy/grad_weight_share"),
            "logp": mean(rows, "offpolicy/logp_mean"),
            "distill": mean(rows, "loss/distill")}


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(root: Path, arms: list[str], seeds: list[int], samples_per_step: int) -> str:
    lines = ["| arm | seed | after RL | all-wrong groups rescued by a right refinement / step (first quarter; all) | right on-policy samples / "
             "step (first quarter; all) | refinements' share of the update (first quarter; all) | refinement log-prob "
             "under the plain prompt (first → last quarter) | distillation loss (mean) |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        for seed in seeds:
            run = root / f"{arm}_s{seed}"
            if not (run / "result.json").is_file():
                continue
            rows = steps_of(run)
            q = max(1, len(rows) // 4)
            first, last, every = diagnostics(rows[:q], samples_per_step), diagnostics(rows[-q:], samples_per_step), \
                diagnostics(rows, samples_per_step)
            after = json.loads((run / "result.json").read_text())["after"]
            lines.append(
                f"| {arm} | {seed} | {100 * after:.1f}% | {fmt(first['right_refinements'], '.1f')}; "
                f"{fmt(every['right_refinements'], '.1f')} | {fmt(first['right_onpolicy'], '.1f')}; "
                f"{fmt(every['right_onpolicy'], '.1f')} | {fmt(first['share'], '.2f')}; {fmt(every['share'], '.2f')} | "
                f"{fmt(first['logp'], '.2f')} → {fmt(last['logp'], '.2f')} | {fmt(every['distill'], '.3f')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="a learning_evidence --out folder")
    ap.add_argument("--arms", nargs="+", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples-per-step", type=int, default=96, help="generation_batch_size of the runs")
    args = ap.parse_args()
    text = table(Path(args.out), args.arms, args.seeds, args.samples_per_step)
    (Path(args.out) / "diagnostics.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
