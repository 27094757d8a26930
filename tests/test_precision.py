"""Precision: fp32 master weights with bf16 autocast by default on GPUs, pure bf16 weights only when asked."""

from __future__ import annotations

import pytest
import torch

from critique_rl.config import TrainConfig
from critique_rl.errors import ConfigError
from critique_rl.train.run_setup import resolve_mixed_precision
from critique_rl.train.trainer import CritiqueGRPOTrainer


def test_auto_precision_is_bf16_autocast_on_a_gpu_and_none_on_cpu():
    gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert resolve_mixed_precision("auto", "auto") == ("bf16" if gpu else "no")
    assert resolve_mixed_precision("auto", "cpu") == "no"
    assert resolve_mixed_precision("no", "auto") == "no"
    assert TrainConfig().mixed_precision == "auto" and TrainConfig().weights_dtype == "float32"


def test_fp16_needs_a_gpu():
    with pytest.raises(ConfigError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp16", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 autocast needs a CUDA GPU"):
            resolve_mixed_precision("fp16", "auto")


def _one_step(fast_config, **kw) -> CritiqueGRPOTrainer:
    cfg = fast_config(max_steps=1, sft_steps=5, critique_on="none", entropy_coef=0.05, **kw)
    trainer = CritiqueGRPOTrainer(args=cfg)
    trainer.train()
    return trainer


def test_bf16_autocast_keeps_fp32_master_weights(fast_config):
    trainer = _one_step(fast_config, mixed_precision="bf16", device="cpu")  # CPU autocast stands in for CUDA's
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert trainer.accelerator.mixed_precision == "bf16"
    state = trainer.optimizer.state_dict()["state"]
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())


def test_pure_bf16_weights_only_when_asked(fast_config):
    trainer = _one_step(fast_config, weights_dtype="bfloat16")
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}


def test_gradient_checkpointing_gives_the_same_update(fast_config, tmp_path):
    """Recomputing activations must not change the numbers: same losses and gradient norms, step by step."""
    from critique_rl.train.metrics import read_jsonl

    runs = []
    for gc in (False, True):
        cfg = fast_config(max_steps=2, sft_steps=5, critique_on="none", entropy_coef=0.05, gradient_checkpointing=gc,
                          output_dir=str(tmp_path / f"gc{int(gc)}"))
        trainer = CritiqueGRPOTrainer(args=cfg)
        trainer.train()
        policy = trainer.accelerator.unwrap_model(trainer.model)
        assert any(getattr(m, "gradient_checkpointing", False) for m in policy.modules()) is gc
        runs.append([r for r in read_jsonl(tmp_path / f"gc{int(gc)}" / "metrics.jsonl") if "loss/total" in r])
    for a, b in zip(*runs, strict=True):
        assert a["grad_norm"] > 0
        for key in ("loss/total", "grad_norm", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
