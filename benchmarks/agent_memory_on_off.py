"""Agent training with memory on vs off (examples/agent_cpu.yaml), over seeds.

Each arm is the whole recipe (SFT warm-up, episode Critique-GRPO, held-out greedy evaluation) at one seed;
"on" retrieves lessons at reset (training and evaluation) and records episodes after each step. Runs one
arm after another in this process (one heavy job at a time) and writes benchmarks/results/agent_memory.json.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/agent_memory_on_off.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from critique_rl.agents.source import EpisodeTrainer
from critique_rl.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def run_arm(config: Path, seed: int, memory: bool, out_root: Path, **overrides: object) -> dict:
    out = out_root / f"memory_{'on' if memory else 'off'}_s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(config, output_dir=str(out), seed=seed, progress=False, **overrides)
    cfg.memory.enabled = memory
    t0 = time.perf_counter()
    s = EpisodeTrainer(cfg).train()
    return {"seed": seed, "memory": memory, "before": s["eval_accuracy_before_rl"],
            "after": s["eval_accuracy_after_rl"], "gain_points": 100 * (s["eval_accuracy_after_rl"]
                                                                         - s["eval_accuracy_before_rl"]),
            "eval_n": s["eval_n"], "wall_seconds": time.perf_counter() - t0,
            "memory_lessons": s.get("memory_lessons"), "memory_demonstrations": s.get("memory_demonstrations")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "examples" / "agent_cpu.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("/tmp/agent_memory_on_off"))
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "agent_memory.json")
    p.add_argument("--max-steps", type=int, default=None, help="RL steps (default: the config's)")
    args = p.parse_args()
    over = {"max_steps": args.max_steps} if args.max_steps is not None else {}
    rows = []
    for seed in args.seeds:
        for memory in (False, True):
            rows.append(run_arm(args.config, seed, memory, args.out, **over))
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for memory in (False, True):
        arm = [r for r in rows if r["memory"] is memory]
        summary["on" if memory else "off"] = {
            "mean_before": sum(r["before"] for r in arm) / len(arm),
            "mean_after": sum(r["after"] for r in arm) / len(arm),
            "mean_gain_points": sum(r["gain_points"] for r in arm) / len(arm)}
    result = {"config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config),
              "command": "python benchmarks/agent_memory_on_off.py --seeds " + " ".join(map(str, args.seeds))
              + (f" --max-steps {args.max_steps}" if args.max_steps is not None else ""),
              "runs": rows, "summary": summary}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
