"""Trace the trainer's own optimizer update (``critique_rl.train.update.policy_update``) for its memory.

The update is run exactly as the trainer runs it (the same ``policy_update``, ``completion_logprobs``, losses
and ``torch.optim.AdamW``), with a minimal stand-in for accelerate's ``Accelerator`` on one process (autocast,
``backward``, ``clip_grad_norm_``) and a synthetic :class:`~critique_rl.train.update.UpdateBatch` of the
configured shape: ``prompts x num_generations`` on-policy rows (+ the refinement rows ``critique_on`` can add),
each group's rows sharing one prompt of ``prompt_tokens`` tokens, every completion ``max_new_tokens`` long
(the worst case). The optimizer state exists before the traced step (as in every step after the first), so
the trace is the steady state. ``fake=True`` traces fake tensors (:mod:`critique_rl.gpu_memory`); ``fake=False``
the same step on real tensors (what the estimate is checked against).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from critique_rl.config import TrainConfig
from critique_rl.gpu_memory import LiveTensorTracker, fake_mode, materialize_fake, meta_causal_lm


@dataclass(frozen=True)
class StepShape:
    """The update batch of one step."""

    rows: int
    """On-policy + refinement rows in the update."""
    group_size: int
    prompt_tokens: int
    completion_tokens: int
    refinement_rows: int = 0


@dataclass(frozen=True)
class Target:
    """What the traced step imitates: the device the run will use and what that implies."""

    device: str = "cuda"
    autocast_dtype: torch.dtype | None = torch.bfloat16
    fused_head: bool = True
    foreach_optimizer: bool = True
    """torch's AdamW default: foreach (multi-tensor) on CUDA, a per-tensor loop on CPU."""


def target_for(cfg: TrainConfig, device: str = "cuda") -> Target:
    """The :class:`Target` the trainer would use for ``cfg`` on ``device`` (mirrors its autocast and
    ``fused_lm_head: auto`` choices; the fused head also needs a supported model, checked when tracing)."""
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if device == "cuda" else "no"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    fused = cfg.fused_lm_head == "on" or (cfg.fused_lm_head == "auto" and device == "cuda")
    return Target(device, dtype, fused, device == "cuda")


def step_shape(cfg: TrainConfig, prompt_tokens: int, completion_tokens: int | None = None) -> StepShape:
    """The largest update batch ``cfg`` can build: every group refined when ``critique_on`` is not ``none``."""
    n = cfg.num_generations
    prompts = cfg.generation_batch_size // n
    refinements = 0 if cfg.critique_on == "none" else prompts * cfg.refinements_per_group
    T = completion_tokens if completion_tokens is not None else cfg.max_new_tokens
    if not T:
        raise ValueError("max_new_tokens is not set in the config; pass the completion length to estimate for")
    return StepShape(prompts * n + refinements, n, prompt_tokens, T, refinements)


def synthetic_batch(shape: StepShape, vocab: int, cfg: TrainConfig, seed: int = 0) -> Any:
    """An :class:`~critique_rl.train.update.UpdateBatch` of ``shape`` with random token ids (real CPU
    tensors): groups of ``group_size`` rows share a prompt; refinement rows (last) each have their own."""
    from critique_rl.train.batching import pack
    from critique_rl.train.update import UpdateBatch

    g = torch.Generator().manual_seed(seed)
    on_policy = shape.rows - shape.refinement_rows
    prompts, completions = [], []
    for i in range(shape.rows):
        if i < on_policy and i % shape.group_size:
            prompts.append(prompts[-1])
        else:
            prompts.append(torch.randint(1, vocab, (shape.prompt_tokens,), generator=g).tolist())
        completions.append(torch.randint(1, vocab, (shape.completion_tokens,), generator=g).tolist())
    tokens = pack(prompts, completions, pad_id=0)
    N, T = shape.rows, shape.completion_tokens
    off = torch.zeros(N, dtype=torch.bool)
    off[on_policy:] = True
    kw: dict[str, Any] = {}
    if cfg.kl_beta > 0:
        kw["ref_logp"] = -torch.rand(N, T, generator=g)
    if cfg.distill_weight > 0 and getattr(cfg, "distill_mode", "sampled_token") == "topk_logits":
        K = cfg.distill_topk
        kw["teacher_topk_logp"] = -torch.rand(N, T, K, generator=g)
        kw["teacher_topk_idx"] = torch.randint(0, vocab, (N, T, K), generator=g)
        kw["distill_rows"] = off.clone()
    return UpdateBatch(tokens=tokens, advantages=torch.randn(N, 1, generator=g).expand(N, T).contiguous(),
                       offpolicy=off, sampling_logp=-torch.rand(N, T, generator=g), **kw)


class _Accelerator:
    """The parts of ``accelerate.Accelerator`` that ``policy_update`` calls, on one process."""

    num_processes = 1

    def __init__(self, tracker: LiveTensorTracker, target: Target, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.tracker, self.target = tracker, target

    def autocast(self) -> AbstractContextManager[Any]:
        if self.target.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.target.autocast_dtype)

    def no_sync(self, model: Any) -> AbstractContextManager[Any]:
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        with self.tracker.phase("backward temporaries"):
            loss.backward()

    def clip_grad_norm_(self, params: Any, max_norm: float) -> torch.Tensor:
        with self.tracker.phase("optimizer temporaries"):
            return torch.nn.utils.clip_grad_norm_(list(params), max_norm)


class _Optimizer:
    """AdamW whose ``step`` is traced as optimizer temporaries and whose state is labelled afterwards."""

    def __init__(self, opt: torch.optim.Optimizer, tracker: LiveTensorTracker) -> None:
        self.opt, self.tracker = opt, tracker

    def label_state(self) -> None:
        for state in self.opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    self.tracker.recategorize(v, "optimizer state")

    def step(self) -> None:
        with self.tracker.phase("optimizer temporaries"):
            self.opt.step()
        self.label_state()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)


class _Scheduler:
    def step(self) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return [0.0]


def prepare_model(model: torch.nn.Module, cfg: TrainConfig, target: Target) -> torch.nn.Module:
    """LoRA, gradient checkpointing, the fused head and prefix sharing as the trainer sets them up."""
    from critique_rl.train.batching import enable_fused_head, fused_head_supported

    if cfg.lora.enabled:
        from critique_rl.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if cfg.gradient_checkpointing:
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            base.enable_input_require_grads()
    if target.fused_head and fused_head_supported(model):
        enable_fused_head(model)
    mode = getattr(cfg, "prefix_sharing", None)
    if mode is not None:
        from critique_rl.train.prefix_sharing import set_prefix_sharing

        set_prefix_sharing(model, mode)
    return model


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack below peft / DDP wrappers (``model.model`` of a transformers causal LM)."""
    m = model
    for _ in range(8):
        if hasattr(m, "get_base_model") and callable(m.get_base_model):
            m = m.get_base_model()
        elif isinstance(getattr(m, "module", None), torch.nn.Module):
            m = m.module
        else:
            break
    return getattr(m, m.base_model_prefix)


def _init_optimizer_state(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_update(model: torch.nn.Module, cfg: Any, batch: Any, tracker: LiveTensorTracker, target: Target,
               update: Any = None, device: str = "cpu") -> dict[str, Any]:
    """One traced ``policy_update`` of ``model`` on ``batch`` (optimizer state created before the trace).
    The tracker must be active (entered) already; returns its report of the update alone. ``update``:
    ``f(model, optimizer, scheduler, accelerator, batch, cfg)`` to trace another update function (default:
    the trainer's ``policy_update``)."""
    if update is None:
        from critique_rl.train.update import policy_update

        def update(m: Any, o: Any, s: Any, a: Any, b: Any, c: Any) -> Any:
            return policy_update(m, o, s, a, b, c, norm_constant=float(b.tokens.completion_len))

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                            foreach=target.foreach_optimizer)
    wrapped = _Optimizer(opt, tracker)
    tracker.register([p for p in model.parameters()] + list(model.buffers()), "weights")
    _init_optimizer_state(opt, params)
    wrapped.label_state()
    hooks = tracker.watch_gradients(params) + tracker.watch_module(_backbone(model), "activations")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tracker.reset_peak()
    try:
        with tracker.phase("log-prob chunks"):
            update(model, wrapped, _Scheduler(), _Accelerator(tracker, target, device), batch, cfg)
    finally:
        for h in hooks:
            h.remove()
    out = tracker.report()
    if cuda:
        torch.cuda.synchronize()
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def trace_step(model_config: Any, cfg: TrainConfig, shape: StepShape, target: Target,
               fake: bool = True, model: torch.nn.Module | None = None, seed: int = 0,
               device: str = "cpu") -> dict[str, Any]:
    """Peak of one update of ``shape``: on fake tensors from ``model_config`` (``fake=True``), or on the real
    ``model`` given (``fake=False``: trained in place for one step on ``device``, where it must already be,
    in ``weights_dtype``, so that nothing else holds memory there; on CUDA the report also has the allocator's
    ``cuda_max_allocated_bytes`` over the update)."""
    weights_dtype = torch.bfloat16 if cfg.weights_dtype == "bfloat16" else torch.float32
    vocab = int(model_config.get_text_config().vocab_size if hasattr(model_config, "get_text_config")
                else model_config.vocab_size)
    batch = synthetic_batch(shape, vocab, cfg, seed)
    tracker = LiveTensorTracker(fake=fake)
    if fake:
        meta = prepare_model(meta_causal_lm(model_config, weights_dtype), cfg, target)
        with fake_mode():
            m = materialize_fake(meta)
            m.train()
            with tracker:
                report = run_update(m, cfg, batch, tracker, target)
    else:
        if model is None:
            raise ValueError("trace_step(fake=False) needs the real model")
        m = prepare_model(model.to(weights_dtype).to(device), cfg, target)
        m.train()
        with tracker:
            report = run_update(m, cfg, batch, tracker, target, device=device)
    report["shape"] = shape.__dict__
    return report
