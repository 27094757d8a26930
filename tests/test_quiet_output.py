"""Quiet, honest output: library progress bars stay silent inside a training run, and
``deterministic: true`` switches torch to deterministic kernels for the run (and back afterwards)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from critique_rl.train.run_setup import deterministic_mode, quiet_library_progress
from critique_rl.train.trainer import CritiqueGRPOTrainer

FAST_YAML = """\
tiny_hidden_size: 64
tiny_heads: 2
tiny_layers: 1
sft_steps: 5
sft_batch_size: 16
sft_examples: 64
max_steps: 2
num_generations: 4
generation_batch_size: 8
mini_batch_size: 8
eval_n: 4
eval_batch_size: 4
checkpoint_every: 1
"""
LIBRARY_BARS = ("Writing model shards", "Loading weights", "it/s]")


def _train(args, env):
    return subprocess.run([sys.executable, "-m", "critique_rl.cli", "train", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_train_stderr_has_no_library_progress_bars(tmp_path):
    """A real `critique-rl train` run that saves 3 checkpoints and a final model, then resumes (which loads
    weights with from_pretrained): no transformers bars in its output."""
    cfg = tmp_path / "fast.yaml"
    cfg.write_text(FAST_YAML)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    out = tmp_path / "run"
    first = _train([cfg, "--output-dir", out, "--no-progress"], env)
    assert first.returncode == 0, first.stderr[-2000:]
    second = _train([cfg, "--output-dir", out, "--no-progress", "--resume", "--max-steps", "3"], env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stderr  # the resume path (from_pretrained) ran
    for proc in (first, second):
        text = proc.stdout + proc.stderr
        for bar in LIBRARY_BARS:
            assert bar not in text, f"{bar!r} in output:\n{text[-1500:]}"


def test_quiet_library_progress_restores_the_setting():
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    with quiet_library_progress():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()


def test_deterministic_mode_sets_and_restores(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_mode(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_mode(False):
        assert not torch.are_deterministic_algorithms_enabled()


SEEN: list[bool] = []


def spy_reward(completions, **kwargs):
    SEEN.append(torch.are_deterministic_algorithms_enabled())
    return [float(len(c)) for c in completions]


def test_deterministic_run_repeats_bit_for_bit(fast_config, tmp_path):
    weights = []
    for name in ("a", "b"):
        SEEN.clear()
        cfg = fast_config(output_dir=str(tmp_path / name), max_steps=2, deterministic=True, sft_steps=10)
        CritiqueGRPOTrainer(args=cfg, reward_funcs=["correctness", spy_reward]).train()
        assert SEEN and all(SEEN)  # rewards were scored while deterministic kernels were on
        weights.append(load_file(str(tmp_path / name / "final" / "model.safetensors")))
    assert not torch.are_deterministic_algorithms_enabled()  # switched back after the run
    a, b = weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
