"""benchmarks/learning_evidence.py: arms share one SFT start per seed, results are paired, re-runs resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["tiny_hidden_size=64", "tiny_heads=2", "tiny_layers=1", "sft_steps=20", "sft_batch_size=16",
        "sft_examples=200", "num_generations=4", "generation_batch_size=16", "mini_batch_size=8"]


def _run(out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "learning_evidence.py"), "--task", "addition", "--seeds", "0",
           "--arms", "grpo", "grpo+reference", "--max-steps", "2", "--eval-every", "1", "--eval-n", "16",
           "--jobs", "2", "--out", str(out), "--set", *TINY]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)


def test_runner_shares_the_start_pairs_results_and_resumes(tmp_path):
    out = tmp_path / "ev"
    first = _run(out)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["arm"] for r in results) == ["grpo", "grpo+reference"]
    # both arms started from the one SFT checkpoint: same held-out accuracy before RL, same starting weights
    assert results[0]["before"] == results[1]["before"]
    for arm in ("grpo", "grpo+reference"):
        cfg = (out / f"{arm}_s0" / "config.yaml").read_text()
        assert f"model: {out / 'sft_s0' / 'final'}" in cfg and "sft_steps: 0" in cfg
    ref = next(r for r in results if r["arm"] == "grpo+reference")
    assert ref["means"]["critique/refine_success_rate"] == 1.0  # the injected reference answers are right
    assert [s for s, _ in ref["curve"]] == [0, 1, 2]
    table = (out / "results.md").read_text()
    diff = 100 * (ref["after"] - next(r for r in results if r["arm"] == "grpo")["after"])
    assert "| grpo+reference |" in table and f"{diff:+.1f}" in table  # the paired difference per seed
    assert (out / "curves.png").stat().st_size > 1000
    weights = load_file(str(out / "grpo_s0" / "final" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())

    stamp = {p: p.stat().st_mtime for p in out.glob("*_s0/result.json")}
    again = _run(out)  # resume: every run is finished, nothing is retrained
    assert again.returncode == 0, again.stderr[-2000:]
    assert "done " not in again.stdout
    assert {p: p.stat().st_mtime for p in out.glob("*_s0/result.json")} == stamp


def test_every_arm_resolves_to_the_config_it_names(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import learning_evidence as le

    (tmp_path / "sft" / "final").mkdir(parents=True)  # the seed's SFT model folder (only its path is used here)
    spec = dict(task="addition", seed=1, out=str(tmp_path / "x"), max_steps=5, eval_every=1, eval_n=10,
                extra={"sft_mistake_rate": 0.9}, model_dir=str(tmp_path / "sft" / "final"))
    base = le.run_config(dict(spec, arm="critique"))
    assert base.sft_steps == 0 and base.model == spec["model_dir"] and base.sft_mistake_rate == 0.9
    mixed = dict(spec, task="addition+reverse", extra={"tasks": {"addition": 1, "reverse": 1}})
    for arm, over in le.ARMS.items():
        cfg = le.run_config(dict(mixed if arm.startswith("order_") else spec, arm=arm))
        for key, value in over.items():  # every override took effect, None (e.g. offpolicy_gamma: null) too
            got = getattr(cfg, key)
            if isinstance(got, dict):  # `tasks`: replaced, in the arm's order (the order trained)
                assert list(got.items()) == list(value.items()), (arm, key, got)
            elif isinstance(value, dict):
                assert all(getattr(got, k) == v for k, v in value.items()), (arm, key)
            else:
                assert got == value, (arm, key, got)
    # a caller's per-arm settings merge into the arm's (decide_vs_learn.py sets the utility this way)
    tuned = le.run_config(dict(spec, arm="decide_utility",
                               arm_extra={"decide_utility": {"reward_kwargs": {"selective_utility": {"penalty_wrong": 9.0}}}}))
    assert tuned.reward_kwargs["selective_utility"] == {"reward_right": 1.0, "penalty_wrong": 9.0, "abstain_value": 0.0}
    assert le.run_config(dict(spec, arm="decide_brier", arm_extra={"decide_utility": {"max_steps": 1}})).reward_kwargs == {}
    sft = le.run_config(dict(spec, arm="sft"))
    assert sft.max_steps == 0 and sft.sft_steps == base.__class__().sft_steps
    # a warm-up on another task (--sft-task): the SFT run uses it, the arms keep --task
    two = dict(spec, task="trap_plateau_only", sft_task="trap_plateau")
    assert le.run_config(dict(two, arm="sft")).task == "trap_plateau"
    assert le.run_config(dict(two, arm="critique")).task == "trap_plateau_only"
