"""Shared fixtures: a small, fast run config for trainer tests."""

from __future__ import annotations

import pytest

from critique_rl.config import TrainConfig

FAST = dict(
    tiny_hidden_size=64, tiny_heads=2, tiny_layers=1, sft_steps=40, sft_batch_size=32, sft_examples=300,
    sft_learning_rate=3e-3, max_steps=3, num_generations=4, generation_batch_size=16, mini_batch_size=8,
    eval_n=20, eval_batch_size=20, checkpoint_every=100, progress=False, log_rollouts=16,
)


@pytest.fixture
def fast_config(tmp_path):
    def make(**overrides) -> TrainConfig:
        kw = dict(FAST, output_dir=str(tmp_path / "run"))
        kw.update(overrides)
        return TrainConfig(**kw)

    return make
