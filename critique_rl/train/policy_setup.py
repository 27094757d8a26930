"""The policy: loading it (a checkpoint, a given model, the tiny model or a model directory, in ``weights_dtype``),
the LoRA adapter, gradient checkpointing and the fused LM head before the optimizer is built, and the ``final/``
model after training. Functions of the trainer (``t``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from critique_rl.errors import ConfigError, UserError
from critique_rl.models import load_policy
from critique_rl.train import checkpoint as ckpt
from critique_rl.train import prompt_setup
from critique_rl.train.batching import fused_head_supported
from critique_rl.train.run_setup import LORA_BASE_DIR

if TYPE_CHECKING:
    from critique_rl.train.trainer import CritiqueGRPOTrainer


def weights_dtype(cfg: Any) -> torch.dtype:
    return torch.bfloat16 if cfg.weights_dtype == "bfloat16" else torch.float32


def load_model(t: CritiqueGRPOTrainer, resume_from: Path | None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: from the checkpoint (LoRA: the saved base with the adapter), the given model object,
    the tiny model (built by the rollout source), or a model directory / hub id."""
    cfg = t.cfg
    dev, dtype = str(t.accelerator.device.type), weights_dtype(cfg)
    if resume_from is not None:
        if cfg.lora.enabled:
            from critique_rl.lora import load_adapter

            base, tok = load_policy(t.out / LORA_BASE_DIR, device=dev, dtype=dtype)
            return load_adapter(base, resume_from / "model", trainable=True), tok
        return load_policy(resume_from / "model", device=dev, dtype=dtype)
    if not isinstance(t._model_arg, str):
        if t._tokenizer_arg is None:
            raise UserError("pass tokenizer= together with a loaded model object")
        return t._model_arg.to(t.accelerator.device), t._tokenizer_arg
    if t._model_arg == "tiny":
        model, tok = (t.episodes or prompt_setup).build_tiny(t)
        return model.to(dtype).to(t.accelerator.device), tok
    return load_policy(t._model_arg, device=dev, dtype=dtype)


def fused_head_wanted(t: CritiqueGRPOTrainer) -> bool:
    """``fused_lm_head``: ``auto`` = on a GPU, when the model's logits are a plain projection."""
    mode, supported = t.cfg.fused_lm_head, fused_head_supported(t.model)
    if mode == "on" and not supported:
        raise ConfigError("fused_lm_head", "on", f"{type(t._policy_module()).__name__} scales or soft-caps "
                          "its logits; use auto or off")
    return mode == "on" or (mode == "auto" and supported and t.accelerator.device.type == "cuda")


def prepare_policy(t: CritiqueGRPOTrainer) -> None:
    """``lora.enabled``: freeze the (warmed-up) base, saved once under ``LORA_BASE_DIR``, and train an adapter on
    it; ``gradient_checkpointing``: recompute activations in the backward pass."""
    cfg = t.cfg
    if cfg.lora.enabled:
        from critique_rl.lora import apply_lora, is_lora, trainable_parameter_summary

        if not is_lora(t.model):  # a fresh run: freeze the (warmed-up) base, train an adapter on it
            if t.is_main:
                t.model.save_pretrained(t.out / LORA_BASE_DIR)
                t.tokenizer.save_pretrained(t.out / LORA_BASE_DIR)
            t.model = apply_lora(t.model, cfg.lora)
        t.summary["lora_trainable_parameters"] = trainable_parameter_summary(t.model)["trainable"]
    if cfg.gradient_checkpointing:
        m = t._policy_module()
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.20 name
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:  # frozen embeddings: the checkpointed blocks still need an input with grad
            t._policy_module().enable_input_require_grads()


def save_final(t: CritiqueGRPOTrainer, final_dir: Path) -> None:
    """``final/``: the trained model (LoRA: merged into the base, or the adapter alone) + tokenizer."""
    policy = t._policy()
    bad = ckpt.nonfinite_parameters(policy)
    if bad:
        raise UserError(f"the policy weights hold NaN/inf after step {t.step} ({len(bad)} tensor(s), e.g. "
                        f"{bad[0]}); final/ was not written (the checkpoints hold the last finite weights)")
    if t.cfg.lora.enabled and t.cfg.lora.merge_final:
        from critique_rl.lora import merged_copy

        policy = merged_copy(policy)
    policy.save_pretrained(final_dir)
    t.tokenizer.save_pretrained(final_dir)
