"""The price-lookup agent demo over seeds: held-out success before -> after RL, per seed, with wall and CPU time.

Runs ``critique-rl train --config examples/agent_tools_cpu.yaml --seed S`` once per seed (the config as it is:
one arm, fixed before the runs), then prints one row per seed and the mean: held-out greedy success before
and after RL (``eval_n`` episodes never trained on), the change, RL steps, warm-up seconds, seconds per RL
step, wall seconds, CPU seconds of the run (one thread: about its wall time on an idle core) and the load
average before and after (the machine may be shared).

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/agent_tools_seeds.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_seed(config: str, seed: int, out: Path) -> dict:
    before_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "critique_rl.cli", "train", "--config", config, "--seed", str(seed),
           "--output-dir", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    cpu = (after_cpu.ru_utime - before_cpu.ru_utime) + (after_cpu.ru_stime - before_cpu.ru_stime)
    steps = int(s["steps"])
    rl_seconds = float(s["wall_seconds"]) - float(s.get("sft_seconds", 0.0))
    return {"seed": seed, "before": s["eval_accuracy_before_rl"], "after": s["eval_accuracy_after_rl"],
            "eval_n": s["eval_n"], "steps": steps, "sft_seconds": round(float(s.get("sft_seconds", 0.0)), 1),
            "seconds_per_step": round(rl_seconds / max(1, steps), 2), "wall_seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1), "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="examples/agent_tools_cpu.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/agent_tools_seeds")
    args = p.parse_args(argv)
    rows = []
    for seed in args.seeds:
        row = run_seed(args.config, seed, Path(args.out) / f"seed{seed}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| seed | before | after | change (points) | RL steps | warm-up s | s / RL step | wall s | CPU s | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {100 * r['before']:.1f}% | {100 * r['after']:.1f}% | "
              f"{100 * (r['after'] - r['before']):+.1f} | {r['steps']} | {r['sft_seconds']} | {r['seconds_per_step']} | "
              f"{r['wall_seconds']} | {r['cpu_seconds']} | {r['load_before']}-{r['load_after']} |")
    n = len(rows)
    mb, ma = sum(r["before"] for r in rows) / n, sum(r["after"] for r in rows) / n
    print(f"| mean | {100 * mb:.1f}% | {100 * ma:.1f}% | {100 * (ma - mb):+.1f} | | | | | | |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "seeds.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
