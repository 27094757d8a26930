"""The policy around the optimizer: the LoRA adapter and gradient checkpointing before it is built, and the
``final/`` model after training. Functions of the trainer (``t``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from critique_rl.errors import UserError
from critique_rl.train import checkpoint as ckpt
from critique_rl.train.run_setup import LORA_BASE_DIR

if TYPE_CHECKING:
    from critique_rl.train.trainer import CritiqueGRPOTrainer


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
