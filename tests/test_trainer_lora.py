"""LoRA through the trainer: only adapter weights train, the KL reference is the base with the adapter off,
checkpoints hold the adapter, resume continues exactly, ``final/`` is a merged plain model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from critique_rl.config import LoraConfig
from critique_rl.lora import is_lora
from critique_rl.train.metrics import read_jsonl
from critique_rl.train.run_setup import LORA_BASE_DIR
from critique_rl.train.trainer import CritiqueGRPOTrainer

pytest.importorskip("peft", reason="LoRA needs the `lora` extra (peft); CI installs it")


def _rl(out: str | Path) -> list[dict]:
    return [r for r in read_jsonl(Path(out) / "metrics.jsonl") if "loss/total" in r]


def test_lora_trains_only_the_adapter_and_saves_it(fast_config):
    # the entropy bonus gives every step a gradient even when the tiny model gets no reward yet
    cfg = fast_config(max_steps=3, checkpoint_every=2, kl_beta=0.1, learning_rate=5e-3, entropy_coef=0.05,
                      critique_on="none", lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    trainer = CritiqueGRPOTrainer(args=cfg)
    summary = trainer.train()
    out = Path(cfg.output_dir)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert is_lora(policy)
    # the base the adapter sits on is exactly the warmed-up base saved at RL start
    base = load_file(str(out / LORA_BASE_DIR / "model.safetensors"))
    live = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in policy.state_dict().items() if "lora_" not in k}
    assert set(base) <= set(live)
    for k, v in base.items():
        assert torch.equal(live[k], v), f"base weight {k} changed"
    lora_b = [v for k, v in policy.state_dict().items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # the adapter moved off its zero init
    assert 0 < summary["lora_trainable_parameters"] < sum(v.numel() for v in base.values()) / 5
    rows = _rl(out)
    assert rows[-1]["kl"] > 0  # reference = adapter disabled, so KL grows once the adapter trains

    ck = sorted((out / "checkpoints").glob("checkpoint-*"))[-1] / "model"
    assert (ck / "adapter_config.json").is_file() and (ck / "adapter_model.safetensors").is_file()
    assert not (ck / "model.safetensors").exists()  # the adapter alone, not a copy of the model

    merged = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, policy(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_resume_equals_straight_run(fast_config, tmp_path):
    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0)
    kw = dict(checkpoint_every=2, lora=lora, learning_rate=5e-3, entropy_coef=0.05, critique_on="none")
    straight = fast_config(max_steps=4, output_dir=str(tmp_path / "a"), **kw)
    CritiqueGRPOTrainer(args=straight).train()
    half = fast_config(max_steps=2, output_dir=str(tmp_path / "b"), **kw)
    CritiqueGRPOTrainer(args=half).train()
    rest = fast_config(max_steps=4, output_dir=str(tmp_path / "b"), **kw)
    CritiqueGRPOTrainer(args=rest).train(resume=True)
    a, b = _rl(tmp_path / "a"), _rl(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a[-1]["grad_norm"] > 0
    for x, y in zip(a, b, strict=True):
        for key in ("loss/total", "train/accuracy", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (x["step"], key)
