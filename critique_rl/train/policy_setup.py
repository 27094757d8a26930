"""The policy: loading it (a checkpoint, a given model, the tiny model or a model directory, in ``weights_dtype``),
the LoRA adapter, gradient checkpointing, the frozen reference and the EMA teacher, the fused LM head before the
optimizer is built, and the ``final/`` model after training. Functions of explicit inputs: each returns what it
builds and the trainer keeps it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from critique_rl.errors import ConfigError, UserError
from critique_rl.models import load_policy
from critique_rl.train import checkpoint as ckpt
from critique_rl.train.batching import fused_head_supported
from critique_rl.train.ema import EmaTeacher
from critique_rl.train.run_setup import LORA_BASE_DIR


def weights_dtype(cfg: Any) -> torch.dtype:
    return torch.bfloat16 if cfg.weights_dtype == "bfloat16" else torch.float32


def policy_module(model: Any) -> Any:
    """The transformers model itself (below a peft wrapper, if any)."""
    from critique_rl.lora import is_lora

    return model.get_base_model() if is_lora(model) else model


def load_model(cfg: Any, resume_from: Path | None, *, device: torch.device, out: Path, model: Any, tokenizer: Any,
               build_tiny: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
    """``(model, tokenizer)``: from the checkpoint (LoRA: the saved base under ``out`` with the adapter), the given
    model object (``model`` with ``tokenizer``), the tiny model (``model == "tiny"``: ``build_tiny``, the rollout
    source's), or a model directory / hub id."""
    dev, dtype = str(device.type), weights_dtype(cfg)
    if resume_from is not None:
        if cfg.lora.enabled:
            from critique_rl.lora import load_adapter

            base, tok = load_policy(out / LORA_BASE_DIR, device=dev, dtype=dtype)
            return load_adapter(base, resume_from / "model", trainable=True), tok
        return load_policy(resume_from / "model", device=dev, dtype=dtype)
    if not isinstance(model, str):
        if tokenizer is None:
            raise UserError("pass tokenizer= together with a loaded model object")
        return model.to(device), tokenizer
    if model == "tiny":
        tiny, tok = build_tiny()
        return tiny.to(dtype).to(device), tok
    return load_policy(model, device=dev, dtype=dtype)


def fused_head_wanted(cfg: Any, model: Any, device: torch.device) -> bool:
    """``fused_lm_head``: ``auto`` = on a GPU, when the model's logits are a plain projection."""
    mode, supported = cfg.fused_lm_head, fused_head_supported(model)
    if mode == "on" and not supported:
        raise ConfigError("fused_lm_head", "on", f"{type(policy_module(model)).__name__} scales or soft-caps "
                          "its logits; use auto or off")
    return mode == "on" or (mode == "auto" and supported and device.type == "cuda")


def prepare_policy(cfg: Any, model: Any, tokenizer: Any, out: Path, is_main: bool) -> tuple[Any, dict[str, Any]]:
    """``lora.enabled``: freeze the (warmed-up) base, saved once under ``LORA_BASE_DIR`` (main process), and train
    an adapter on it; ``gradient_checkpointing``: recompute activations in the backward pass. Returns the model to
    train and the summary entries (``lora_trainable_parameters``)."""
    summary: dict[str, Any] = {}
    if cfg.lora.enabled:
        from critique_rl.lora import apply_lora, is_lora, trainable_parameter_summary

        if not is_lora(model):  # a fresh run: freeze the (warmed-up) base, train an adapter on it
            if is_main:
                model.save_pretrained(out / LORA_BASE_DIR)
                tokenizer.save_pretrained(out / LORA_BASE_DIR)
            model = apply_lora(model, cfg.lora)
        summary["lora_trainable_parameters"] = trainable_parameter_summary(model)["trainable"]
    if cfg.gradient_checkpointing:
        m = policy_module(model)
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.20 name
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:  # frozen embeddings: the checkpointed blocks still need an input with grad
            policy_module(model).enable_input_require_grads()
    return model, summary


def reference_and_teacher(cfg: Any, policy: torch.nn.Module,
                          accelerator: Any) -> tuple[torch.nn.Module | None, EmaTeacher | None]:
    """The frozen reference for the KL term (``kl_beta > 0``; with LoRA none: the base with the adapter disabled
    is the reference) and the EMA teacher (``distill_teacher: ema``, the stabilised self-teacher of SDPO), both
    copies of ``policy`` as it is now."""
    ref_model = None
    if cfg.kl_beta > 0 and not cfg.lora.enabled:
        ref_model = copy.deepcopy(policy).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    teacher = None
    if cfg.distill_weight > 0 and cfg.distill_teacher == "ema":
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise UserError("distill_teacher: ema keeps a full copy of the policy and needs unsharded weights; "
                            "use it on one process or with DDP, or distill_teacher: current under FSDP/ZeRO")
        teacher = EmaTeacher(policy, cfg.distill_teacher_ema)
    return ref_model, teacher


def save_final(cfg: Any, policy: torch.nn.Module, tokenizer: Any, step: int, final_dir: Path) -> None:
    """``final/``: the trained model (LoRA: merged into the base, or the adapter alone) + tokenizer."""
    bad = ckpt.nonfinite_parameters(policy)
    if bad:
        raise UserError(f"the policy weights hold NaN/inf after step {step} ({len(bad)} tensor(s), e.g. "
                        f"{bad[0]}); final/ was not written (the checkpoints hold the last finite weights)")
    if cfg.lora.enabled and cfg.lora.merge_final:
        from critique_rl.lora import merged_copy

        policy = merged_copy(policy)
    policy.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
