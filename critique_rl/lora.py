"""LoRA (arXiv:2106.09685) through ``peft``: wrap a policy, train only the adapter, use the base as the KL
reference, save / load / merge the adapter.

``peft`` is optional (extra ``lora``): this module imports without it, and every function that needs it
raises a one-line :class:`~critique_rl.errors.UserError` naming ``pip install peft`` when it is missing.

The functions accept a :class:`peft.PeftModel` or anything wrapping one (``DistributedDataParallel`` /
``DataParallel`` via ``.module``, ``torch.compile`` via ``._orig_mod``): they look through the wrappers.

Typical use::

    model = apply_lora(model, cfg.lora)             # base frozen, adapter trainable
    with adapter_disabled(model):                   # KL reference = the base weights, no second copy
        ref_logits = model(input_ids).logits
    save_adapter(model, ckpt / "model")             # adapter only (a few MB)
    model = load_adapter(base, ckpt / "model")      # resume
    merged_copy(model).save_pretrained(final)       # a plain transformers model; ``model`` is untouched
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from critique_rl.config import LoraConfig
from critique_rl.errors import UserError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""What :func:`save_adapter` writes (``adapter_model.bin`` instead of the safetensors file in old peft)."""

_DISABLED_DEPTH = "_critique_rl_adapter_disabled_depth"
# peft's PeftModel.__init__ asks transformers for is_gradient_checkpointing, deprecated in transformers 5
_NOISE = r".*is_gradient_checkpointing"


def _peft() -> Any:
    """The ``peft`` module, or a UserError telling how to install it."""
    try:
        import peft
    except ImportError as e:
        raise UserError(f"lora.enabled = true needs peft ({e}): pip install peft "
                        "(or pip install 'critique-rl[lora]'), or set lora.enabled: false") from None
    return peft


def unwrap(model: nn.Module) -> nn.Module:
    """``model`` without DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
    return model


def is_lora(model: nn.Module) -> bool:
    """True when ``model`` is (or wraps) a :class:`peft.PeftModel`. False, without error, when peft is absent."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(unwrap(model), PeftModel)


def _peft_model(model: nn.Module, what: str) -> PeftModel:
    inner = unwrap(model)
    if not is_lora(inner):
        raise TypeError(f"{what} needs a LoRA (peft) model, got {type(inner).__name__}; wrap it with apply_lora")
    return inner  # type: ignore[return-value]


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted distinct short names (last path component) of the ``nn.Linear`` layers of ``model``, i.e. what
    ``lora.target_modules`` can name (e.g. ``['down_proj', 'gate_proj', ..., 'v_proj']``)."""
    return sorted({name.rsplit(".", 1)[-1] for name, mod in unwrap(model).named_modules()
                   if isinstance(mod, nn.Linear) and name})


def apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters per ``cfg`` (``task_type='CAUSAL_LM'``).

    The base weights are frozen (``requires_grad=False``) and used in place: ``model`` itself becomes the
    wrapped base, so keep using the returned model only. Adapters start as a no-op (B = 0), so the returned
    model computes exactly what ``model`` did. ``target_modules='all-linear'`` targets every linear layer
    but the output head (with tied embeddings, as in the tiny Llama, the head is the embedding matrix and
    stays frozen either way).

    Raises UserError when peft is missing or when no module matches ``cfg.target_modules``."""
    peft = _peft()
    if is_lora(model):
        raise UserError("apply_lora: the model already has LoRA adapters (resume with load_adapter instead)")
    target: list[str] | str = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    peft_cfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target,
                               task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NOISE, category=FutureWarning)
            return peft.get_peft_model(model, peft_cfg)
    except ValueError as e:  # peft.utils.error.NoMatchingPeftModuleError is a ValueError
        msg = str(e)
        if "target" not in msg.lower():
            raise
        names = linear_module_names(model)
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        first = (msg.strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        raise UserError(f"config field 'lora.target_modules' = {cfg.target_modules!r}: {first}. "
                        f"Linear modules of this model: [{shown}] (or use all-linear)") from None


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block ``model`` computes with its base weights only (LoRA adapters bypassed); a null
    context for a model without adapters. Re-entrant: a nested block does not re-enable the adapter early.

    This is how the trainer gets KL-reference log-probs without a second copy of the model."""
    inner = unwrap(model)
    if not is_lora(inner):
        yield
        return
    depth = getattr(inner, _DISABLED_DEPTH, 0)
    if depth:  # already disabled by an enclosing block
        setattr(inner, _DISABLED_DEPTH, depth + 1)
        try:
            yield
        finally:
            setattr(inner, _DISABLED_DEPTH, depth)
        return
    setattr(inner, _DISABLED_DEPTH, 1)
    try:
        with inner.disable_adapter():  # type: ignore[operator]
            yield
    finally:
        setattr(inner, _DISABLED_DEPTH, 0)


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write only the adapter of ``model`` to the folder ``path`` (``adapter_config.json`` +
    ``adapter_model.safetensors``, peft ``save_pretrained``); the base weights are not written. Returns the
    folder. Call it on the main process only."""
    inner = _peft_model(model, "save_adapter")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    inner.save_pretrained(str(out), safe_serialization=True)
    return out


def load_adapter(base_model: PreTrainedModel, path: str | Path, trainable: bool = True) -> PeftModel:
    """Attach the adapter saved by :func:`save_adapter` in ``path`` to ``base_model`` (which must hold the
    same base weights it was trained on) and return the :class:`peft.PeftModel`. ``trainable``: the adapter
    parameters require grad (resume training); False gives an inference-only model. ``base_model`` is
    modified in place (it becomes the wrapped base)."""
    peft = _peft()
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"LoRA adapter folder '{folder}' has no adapter_config.json; point at a folder written "
                        "by save_adapter (a LoRA checkpoint's model/)")
    if is_lora(base_model):
        raise UserError("load_adapter: the base model already has LoRA adapters; pass the plain base model")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOISE, category=FutureWarning)
        return peft.PeftModel.from_pretrained(base_model, str(folder), is_trainable=trainable)


def merged_copy(model: nn.Module) -> PreTrainedModel:
    """A plain transformers model whose weights are the base with the adapter merged in
    (``W + alpha/r * B A``), loadable without peft (``save_pretrained`` / ``from_pretrained``).

    The live model is not touched: the merge happens on a deep copy (gradients are not copied along), so the
    base weights stay bit-identical and training can go on. Costs one extra copy of the model on the same
    device while it exists. A model without adapters is returned as is (nothing to merge)."""
    inner = unwrap(model)
    if not is_lora(inner):
        return inner  # type: ignore[return-value]
    grads = {p: p.grad for p in inner.parameters() if p.grad is not None}
    for p in grads:
        p.grad = None
    try:
        clone = copy.deepcopy(inner)
    finally:
        for p, g in grads.items():
            p.grad = g
    merged = clone.merge_and_unload(progressbar=False)  # type: ignore[operator]
    merged.train(inner.training)
    return merged


def trainable_parameter_summary(model: nn.Module) -> dict[str, int | float]:
    """``{'trainable': n, 'total': n, 'fraction': trainable/total}`` over the distinct parameters of
    ``model`` (tied weights counted once; adapter parameters included in the total)."""
    params: dict[int, torch.nn.Parameter] = {id(p): p for p in unwrap(model).parameters()}
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    return {"trainable": trainable, "total": total, "fraction": trainable / total if total else 0.0}
