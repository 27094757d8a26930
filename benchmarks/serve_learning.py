"""Learning through ``critique-rl serve`` vs the in-process Env runner (issue #27 target).

Arms and seeds fixed before any run (written here first):

- ``serve``: ``critique-rl serve examples/serve_cpu.yaml`` (a subprocess) and the unchanged openai-client loop
  ``examples/agent_loop_openai.py --base-url URL --max-turns 3 --workers 16 --episodes 0`` (another subprocess:
  16 concurrent loops, each playing guess-the-number with its own env and reporting the reward with ``finish``).
- ``env``: ``critique-rl train`` on the same config (the built-in runner plays the same env in process).
- Both: examples/serve_cpu.yaml with ``memory.enabled: false`` (as examples/agent_cpu.yaml; the comparison is
  runner vs server), ``eval_every: 0``, ``checkpoint_every: 40``; 40 steps x 64 episodes; held-out greedy success
  on the same 200 tasks before and after RL (in process, the trainer's evaluation, identical in both arms).
- Seeds 0, 1, 2, run in that order, env arm then serve arm per seed, one run at a time, ``nice -n 10`` and one
  thread. Every finished run is reported.

Targets: serve after - before >= +10 points with >= 200 trained episodes in <= 15 min wall on 2 cores; serve
after within seed noise of env after (same seeds).

    python benchmarks/serve_learning.py --seeds 0 1 2 --out benchmarks/results/serve_learning.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "serve_cpu.yaml"
OVERRIDES = {"memory": {"enabled": False}, "eval_every": 0, "checkpoint_every": 40, "progress": False}
WORKERS = 16
TIME_LIMIT_S = 15 * 60


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _load() -> float:
    return os.getloadavg()[0]


def _config(work: Path, seed: int, arm: str) -> Path:
    cfg = yaml.safe_load(CONFIG.read_text())
    for k, v in OVERRIDES.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    cfg.update(seed=seed, output_dir=str(work / f"{arm}_seed{seed}"))
    path = work / f"{arm}_seed{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def run_env(work: Path, seed: int) -> dict[str, Any]:
    cfg = _config(work, seed, "env")
    load0, t0 = _load(), time.perf_counter()
    proc = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "critique_rl.cli", "train", str(cfg)],
                          env=_env(), capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"env seed {seed}: {proc.stderr[-2000:]}")
    s = _summary(work / f"env_seed{seed}")
    return {"arm": "env", "seed": seed, "before": s["eval_accuracy_before_rl"], "after": s["eval_accuracy_after_rl"],
            "steps": s["steps"], "episodes_trained": s["steps"] * 64, "wall_s": round(wall, 1),
            "load_start": round(load0, 2), "load_end": round(_load(), 2)}


def run_serve(work: Path, seed: int) -> dict[str, Any]:
    cfg = _config(work, seed, "serve")
    out = work / f"serve_seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").unlink(missing_ok=True)
    load0, t0 = _load(), time.perf_counter()
    server = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "critique_rl.cli", "serve", str(cfg),
                               "--port", "0", "--no-progress"], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    while not (out / "serve.json").is_file():
        if server.poll() is not None:
            raise RuntimeError(f"serve seed {seed}: {server.stdout.read()[-2000:]}")
        time.sleep(0.2)
    url = json.loads((out / "serve.json").read_text())["base_url"]
    loop_log = (out / "loop.log").open("w")  # a file, not a pipe: the loop prints a line per episode
    loop = subprocess.Popen(["nice", "-n", "10", sys.executable, str(ROOT / "examples" / "agent_loop_openai.py"),
                             "--base-url", url, "--max-turns", "3", "--workers", str(WORKERS), "--episodes", "0"],
                            env=_env(), stdout=loop_log, stderr=subprocess.STDOUT, text=True)
    try:
        server_out, _ = server.communicate(timeout=3600)
    finally:
        if server.poll() is None:
            server.kill()
    wall = time.perf_counter() - t0
    loop.wait(timeout=120)
    loop_log.close()
    loop_out = (out / "loop.log").read_text()
    if server.returncode:
        raise RuntimeError(f"serve seed {seed}: {server_out[-2000:]}")
    s = _summary(out)
    ledger = [json.loads(x) for x in (out / "served_episodes.jsonl").read_text().splitlines() if x.strip()]
    ids = [e for r in ledger for e in r["episodes"] + r["refinements"]]
    last = [json.loads(x) for x in loop_out.splitlines() if x.startswith('{"episodes"')]
    return {"arm": "serve", "seed": seed, "before": s["eval_accuracy_before_rl"], "after": s["eval_accuracy_after_rl"],
            "steps": s["steps"], "episodes_trained": len(ids), "unique_episode_ids": len(set(ids)) == len(ids),
            "client_episodes": last[-1]["episodes"] if last else None,
            "client_success_rate": last[-1]["success_rate"] if last else None,
            "wall_s": round(wall, 1), "load_start": round(load0, 2), "load_end": round(_load(), 2)}


def report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": rows}
    for arm in ("env", "serve"):
        got = [r for r in rows if r["arm"] == arm]
        if got:
            gains = [r["after"] - r["before"] for r in got]
            out[arm] = {"after_mean": statistics.mean(r["after"] for r in got),
                        "after_std": statistics.pstdev([r["after"] for r in got]),
                        "gain_mean": statistics.mean(gains), "seeds": [r["seed"] for r in got]}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=["env", "serve"], choices=["env", "serve"])
    p.add_argument("--work", default="runs/serve_learning")
    p.add_argument("--out", default="benchmarks/results/serve_learning.json")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    rows: list[dict[str, Any]] = json.loads(out.read_text())["rows"] if out.is_file() else []
    for seed in args.seeds:
        for arm in args.arms:
            if any(r["arm"] == arm and r["seed"] == seed for r in rows):
                continue
            row = (run_env if arm == "env" else run_serve)(work, seed)
            if arm == "serve":
                row["within_time_limit"] = row["wall_s"] <= TIME_LIMIT_S
            rows.append(row)
            print(json.dumps(row), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report(rows), indent=2) + "\n")
    print(json.dumps(report(rows), indent=2))


if __name__ == "__main__":
    main()
