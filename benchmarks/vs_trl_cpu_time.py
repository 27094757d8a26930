"""``benchmarks/vs_trl.py``'s CPU presets in process CPU seconds instead of wall seconds (a diagnostic for a shared box).

    python benchmarks/vs_trl_cpu_time.py --preset cpu-medium --trl-python /work/venv-trl/bin/python --rounds 3

Each arm runs in its own process with one torch thread and ``time.perf_counter`` replaced by
``time.process_time``, so the step and generation times that ``vs_trl.py``'s arms record (our trainer's
``time/step`` and ``time/generate``, TRL's step callback and ``trainer._generate`` wrapper) become the CPU
seconds the arm's process used. With one thread, CPU seconds do not grow when other jobs hold the cores (wall
seconds do, several-fold), though shared caches still add some noise. Arms alternate (ours, TRL) per round;
the ratios printed are ours/TRL of per-round medians (CPU samples/s = completions per step / CPU s per step).
This is not the benchmark's wall-clock result: report it as CPU time. Nothing is written to benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def arm(name: str, preset_name: str, model_dir: str, warmup: int, steps: int) -> dict:
    time.perf_counter = time.process_time  # every timer the arms use reads process CPU seconds
    sys.path.insert(0, str(HERE))
    import torch

    torch.set_num_threads(1)
    import vs_trl

    preset = vs_trl.PRESETS[preset_name]
    run = vs_trl.run_ours if name == "ours" else (
        lambda p, d, w, s: vs_trl.run_trl(p, d, w, s, None))
    res = run(preset, model_dir, warmup, steps)
    return {"arm": name, "step_cpu_s": res["median_step_s"], "generate_cpu_s": res["median_generate_s"],
            "completions_per_step": preset.completions_per_step}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu-medium", choices=["cpu-tiny", "cpu-medium", "cpu-long-prompt"])
    p.add_argument("--trl-python", required=False, default=sys.executable)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.arm:
        print("RESULT " + json.dumps(arm(args.arm, args.preset, args.model_dir, args.warmup, args.steps)))
        return 0
    sys.path.insert(0, str(HERE))
    import vs_trl

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vs_trl_cpu_") as tmp:
        vs_trl.build_model(vs_trl.PRESETS[args.preset], tmp)
        print(f"preset {args.preset}: 1 torch thread, times in process CPU seconds; load {os.getloadavg()}")
        for rnd in range(1, args.rounds + 1):
            for name, python in (("ours", sys.executable), ("trl", args.trl_python)):
                cmd = [python, str(Path(__file__).resolve()), "--arm", name, "--preset", args.preset,
                       "--model-dir", tmp, "--warmup", str(args.warmup), "--steps", str(args.steps)]
                out = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if out.returncode != 0 or line is None:
                    tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
                    raise SystemExit(f"{name} round {rnd} failed (exit {out.returncode}):\n  " + "\n  ".join(tail))
                row = {**json.loads(line[len("RESULT "):]), "round": rnd}
                rows.append(row)
                print(f"  round {rnd} {name:4s}: step {row['step_cpu_s']:.3f} CPU s, generate "
                      f"{row['generate_cpu_s']:.3f} CPU s")
    per_round = []
    for rnd in range(1, args.rounds + 1):
        o, t = (next(r for r in rows if r["round"] == rnd and r["arm"] == a) for a in ("ours", "trl"))
        per_round.append((t["step_cpu_s"] / o["step_cpu_s"], o["generate_cpu_s"] / t["generate_cpu_s"]))
    print(f"CPU samples/s ratio (ours/TRL), per round: {[round(a, 3) for a, _ in per_round]}, median "
          f"{statistics.median(a for a, _ in per_round):.3f}")
    print(f"generation CPU time ratio (ours/TRL), per round: {[round(b, 3) for _, b in per_round]}, median "
          f"{statistics.median(b for _, b in per_round):.3f}; load at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
