"""Does a 2-process run learn like a 1-process run with the same global batch?

Runs the same config (same seed, same global generation batch) as one process and as two CPU processes
(``accelerate launch --config_file examples/accelerate/cpu_2proc.yaml -m critique_rl.cli train``), plus one
process with another seed as the noise reference: sampling differs between the runs (each process draws its
own completions), so curves cannot match step by step; what they must match is the learning, within the
seed-to-seed spread. Prints per-run eval accuracy before/after and the mean |difference| of the smoothed
train-accuracy and loss curves, and writes benchmarks/results/multiprocess_curve.json.

    python benchmarks/multiprocess_curve.py --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from critique_rl.train.metrics import read_jsonl  # noqa: E402

BASE = dict(task="addition", tiny_hidden_size=128, tiny_heads=4, tiny_layers=2, tiny_vocab_size=512,
            sft_steps=400, sft_examples=2000, sft_mistake_rate=0.6, num_generations=8, generation_batch_size=64,
            mini_batch_size=32, learning_rate=1e-4, eval_n=200, eval_batch_size=200, checkpoint_every=1000,
            progress=False, log_rollouts=0, critique_on="all_wrong_groups",
            critic={"backend": "rule", "kind": "ground_truth"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, out: Path, nproc: int, seed: int, steps: int) -> dict:
    cfg = dict(BASE, seed=seed, max_steps=steps, output_dir=str(out / name))
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    if nproc > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "examples/accelerate/cpu_2proc.yaml"), "--num_processes", str(nproc),
               "--main_process_port", str(free_port()), "-m", "critique_rl.cli", "train", str(path)]
    else:
        cmd = [sys.executable, "-m", "critique_rl.cli", "train", str(path)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    rows = [r for r in read_jsonl(out / name / "metrics.jsonl") if "loss/total" in r]
    summary = json.loads((out / name / "summary.json").read_text())
    return {"name": name, "processes": nproc, "seed": seed, "seconds": time.perf_counter() - t0,
            "eval_before": summary["eval_accuracy_before_rl"], "eval_after": summary["eval_accuracy_after_rl"],
            "train_accuracy": [r["train/accuracy"] for r in rows], "loss": [r["loss/total"] for r in rows]}


def smooth(xs: list[float], w: int = 10) -> list[float]:
    return [sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]


def gap(a: list[float], b: list[float]) -> float:
    sa, sb = smooth(a), smooth(b)
    return sum(abs(x - y) for x, y in zip(sa, sb, strict=True)) / len(sa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/multiprocess_curve")
    args = ap.parse_args()
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    runs = [run("one_process", out, 1, args.seed, args.steps), run("two_processes", out, 2, args.seed, args.steps),
            run("one_process_other_seed", out, 1, args.seed + 1, args.steps)]
    one, two, other = runs
    result = {
        "command": "python benchmarks/multiprocess_curve.py " + " ".join(sys.argv[1:]),
        "config": dict(BASE, max_steps=args.steps),
        "runs": runs,
        "train_accuracy_gap_two_vs_one": gap(one["train_accuracy"], two["train_accuracy"]),
        "train_accuracy_gap_seed_vs_seed": gap(one["train_accuracy"], other["train_accuracy"]),
        "loss_gap_two_vs_one": gap(one["loss"], two["loss"]),
        "loss_gap_seed_vs_seed": gap(one["loss"], other["loss"]),
    }
    (ROOT / "benchmarks/results").mkdir(exist_ok=True)
    (ROOT / "benchmarks/results/multiprocess_curve.json").write_text(json.dumps(result, indent=1))
    for r in runs:
        print(f"{r['name']:24s} processes={r['processes']} seed={r['seed']} eval {r['eval_before']:.1%} -> "
              f"{r['eval_after']:.1%}  ({r['seconds']:.0f} s)")
    print(f"smoothed train-accuracy gap: 2 vs 1 process {result['train_accuracy_gap_two_vs_one']:.3f}, "
          f"seed vs seed {result['train_accuracy_gap_seed_vs_seed']:.3f}")
    print(f"smoothed loss gap:           2 vs 1 process {result['loss_gap_two_vs_one']:.4f}, "
          f"seed vs seed {result['loss_gap_seed_vs_seed']:.4f}")


if __name__ == "__main__":
    main()
