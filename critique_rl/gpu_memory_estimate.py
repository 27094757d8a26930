"""Peak accelerator memory of one training step of a run config, by part, without a GPU or the weights.

    peak = max(update, generation)
    update     = traced peak of the trainer's optimizer update (weights, autocast weight copies, gradients,
                 optimizer state, activations, log-prob chunks, backward/optimizer temporaries)
                 + reference / EMA-teacher copies + the vLLM share when it stays resident (no sleep)
    generation = weights + optimizer state + autocast weight copies + KV cache + decode buffers + copies
                 (hf rollouts), or weights + optimizer state + copies + the vLLM share (vllm colocate)

The update is traced on fake tensors (:mod:`critique_rl.gpu_memory_step`); generation is computed from shapes:

    KV cache       = 2 x layers x kv_heads x head_dim x B x (P + T') x bytes(activation dtype), T' = T when
                     T <= 256, else T rounded up to a multiple of 256 (the block cache of rollout/kv_cache.py
                     grows 256 positions at a time)
    decode buffers = B x V x 4 bytes x (4 + 3 if top_p < 1)   (float32 logits, the sampled-log-prob recorder's
                     log-softmax, softmax probabilities, the processor's copy; top-p's sort values + indices)
    prefill        = B x P x (3 x intermediate + 4 x hidden) x bytes(activation dtype)   (one layer at a time)

with ``B`` the rows generated at once (``generation_batch_size``), ``P`` the prompt and ``T`` the completion
length. When the step does not fit ``gpu_gb``, the update is traced again with one setting changed at a time
(gradient checkpointing, a smaller ``mini_batch_size``, ``weights_dtype: bfloat16``, LoRA) and the first change
that fits is named.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from critique_rl.config import TrainConfig
from critique_rl.errors import UserError
from critique_rl.gpu_memory_step import StepShape, Target, step_shape, target_for, trace_step

GB = 1e9


@dataclass
class MemoryEstimate:
    """The estimate of :func:`estimate_memory` (bytes)."""

    parts: dict[str, int]
    """The peak phase's parts."""
    peak_phase: str
    update_bytes: int
    generation_bytes: int
    update_parts: dict[str, int]
    generation_parts: dict[str, int]
    gpu_bytes: int
    shape: StepShape
    target: Target
    advice: list[dict[str, Any]] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(self.update_bytes, self.generation_bytes)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu_bytes

    def to_json(self) -> dict[str, Any]:
        return {"peak_gb": self.peak_bytes / GB, "peak_phase": self.peak_phase, "fits": self.fits,
                "gpu_gb": self.gpu_bytes / GB, "update_gb": self.update_bytes / GB,
                "generation_gb": self.generation_bytes / GB,
                "update_parts_gb": {k: v / GB for k, v in self.update_parts.items()},
                "generation_parts_gb": {k: v / GB for k, v in self.generation_parts.items()},
                "shape": dataclasses.asdict(self.shape),
                "target": {"device": self.target.device, "autocast": str(self.target.autocast_dtype),
                           "fused_head": self.target.fused_head, "foreach_adamw": self.target.foreach_optimizer},
                "advice": self.advice}


def model_config_of(cfg: TrainConfig) -> Any:
    """The transformers config of ``cfg.model``: its local ``config.json`` (never downloaded), or the tiny
    model's shape for ``model: tiny``."""
    from transformers import AutoConfig, LlamaConfig

    if cfg.model == "tiny":
        return LlamaConfig(vocab_size=cfg.tiny_vocab_size, hidden_size=cfg.tiny_hidden_size,
                           intermediate_size=cfg.tiny_hidden_size * 2, num_hidden_layers=cfg.tiny_layers,
                           num_attention_heads=cfg.tiny_heads, num_key_value_heads=cfg.tiny_heads,
                           max_position_embeddings=256, tie_word_embeddings=True)
    path = Path(str(cfg.model)).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"model: '{cfg.model}' is not a local directory with a config.json; estimate-memory reads "
                        "the model's shape from it (nothing is downloaded): pass a folder saved with "
                        "save_pretrained, or just its config.json in a folder")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def _text(model_config: Any) -> Any:
    return model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config


def _param_count(model_config: Any) -> int:
    """Parameters of the model (from a meta build: exact, no memory)."""
    from critique_rl.gpu_memory import meta_causal_lm

    m = meta_causal_lm(model_config)
    return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


def _kv_positions(completion_tokens: int, block: int = 256) -> int:
    """Completion positions the block KV cache holds (first ``min(block, T)``, then whole blocks)."""
    if completion_tokens <= block:
        return completion_tokens
    return -(-completion_tokens // block) * block


def generation_parts(model_config: Any, cfg: TrainConfig, shape: StepShape, target: Target,
                     weight_bytes: int) -> dict[str, int]:
    """KV cache, decode buffers, prefill activations and autocast weight copies of HF generation (bytes)."""
    t = _text(model_config)
    layers, hidden = int(t.num_hidden_layers), int(t.hidden_size)
    heads = int(t.num_attention_heads)
    kv_heads = int(getattr(t, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(t, "head_dim", None) or hidden // heads)
    inter = int(getattr(t, "intermediate_size", 4 * hidden))
    vocab = int(t.vocab_size)
    weights_fp32 = cfg.weights_dtype == "float32"
    act = 2 if target.autocast_dtype is not None or not weights_fp32 else 4
    B, P, T = cfg.generation_batch_size, shape.prompt_tokens, shape.completion_tokens
    buffers = 4 + (3 if cfg.top_p < 1.0 else 0)
    parts = {
        "KV cache": 2 * layers * kv_heads * head_dim * B * (P + _kv_positions(T)) * act,
        "decode buffers": B * vocab * 4 * buffers,
        "prefill activations": B * P * (3 * inter + 4 * hidden) * act,
    }
    if target.autocast_dtype is not None and weights_fp32:
        parts["autocast weight copies"] = weight_bytes // 2
    return parts


def _copies(cfg: TrainConfig, weight_bytes: int) -> dict[str, int]:
    out: dict[str, int] = {}
    if cfg.kl_beta > 0 and not cfg.lora.enabled:
        out["reference copy"] = weight_bytes
    if cfg.distill_weight > 0 and cfg.distill_teacher == "ema":
        out["EMA teacher copy"] = weight_bytes
    return out


def _vllm_share(cfg: TrainConfig, gpu_bytes: int, weight_bytes: int) -> int:
    v = cfg.vllm
    if cfg.rollout_backend != "vllm" or v.mode != "colocate":
        return 0
    if v.kv_cache_gb is not None:
        return int(v.kv_cache_gb * GB) + weight_bytes // 2
    return int(v.gpu_memory_utilization * gpu_bytes)


def estimate_memory(cfg: TrainConfig, gpu_gb: float = 80.0, prompt_tokens: int = 256,
                    completion_tokens: int | None = None, device: str = "cuda", suggest: bool = True,
                    progress: Any = None) -> MemoryEstimate:
    """Estimate the peak memory of one step of ``cfg`` on one ``device`` with ``gpu_gb`` of memory."""
    model_config = model_config_of(cfg)
    shape = step_shape(cfg, prompt_tokens, completion_tokens)
    target = target_for(cfg, device)
    gpu_bytes = int(gpu_gb * GB)
    est = _estimate_once(model_config, cfg, shape, target, gpu_bytes)
    if suggest and not est.fits:
        est.advice = suggestions(model_config, cfg, shape, device, gpu_bytes, progress)
    return est


def _estimate_once(model_config: Any, cfg: TrainConfig, shape: StepShape, target: Target,
                   gpu_bytes: int) -> MemoryEstimate:
    rep = trace_step(model_config, cfg, shape, target, fake=True)
    upd = dict(rep["peak_parts"])
    weight_bytes = _param_count(model_config) * (2 if cfg.weights_dtype == "bfloat16" else 4)
    copies = _copies(cfg, weight_bytes)
    vllm = _vllm_share(cfg, gpu_bytes, weight_bytes)
    upd.update(copies)
    if vllm and not cfg.vllm.sleep:
        upd["vLLM share"] = vllm
    resident = {k: upd.get(k, 0) for k in ("weights", "optimizer state")}
    gen = {**resident, **copies}
    if cfg.rollout_backend == "vllm":
        gen["vLLM share"] = vllm
    else:
        gen.update(generation_parts(model_config, cfg, shape, target, weight_bytes))
    u, g = sum(upd.values()), sum(gen.values())
    phase = "update" if u >= g else "generation"
    return MemoryEstimate(parts=upd if u >= g else gen, peak_phase=phase, update_bytes=u, generation_bytes=g,
                          update_parts=upd, generation_parts=gen, gpu_bytes=gpu_bytes, shape=shape, target=target)


def _alternatives(cfg: TrainConfig) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if not cfg.gradient_checkpointing:
        out.append(("gradient_checkpointing: true", {"gradient_checkpointing": True}))
    mb = cfg.mini_batch_size
    while mb > 1 and len([o for o in out if "mini_batch_size" in o[0]]) < 3:
        mb //= 2
        if cfg.generation_batch_size % mb == 0:
            out.append((f"mini_batch_size: {mb}", {"mini_batch_size": mb}))
    if cfg.weights_dtype == "float32":
        out.append(("weights_dtype: bfloat16", {"weights_dtype": "bfloat16"}))
    if not cfg.lora.enabled:
        out.append(("lora.enabled: true", {"lora": dataclasses.replace(cfg.lora, enabled=True)}))
    if not cfg.gradient_checkpointing and mb < cfg.mini_batch_size:
        out.append((f"gradient_checkpointing: true and mini_batch_size: {cfg.mini_batch_size // 2}",
                    {"gradient_checkpointing": True, "mini_batch_size": cfg.mini_batch_size // 2}))
    return out


def suggestions(model_config: Any, cfg: TrainConfig, shape: StepShape, device: str, gpu_bytes: int,
                progress: Any = None) -> list[dict[str, Any]]:
    """Re-estimate with one setting changed at a time (in the order of :func:`_alternatives`), stopping at the
    first that fits; every tried change is listed with its estimated peak."""
    out: list[dict[str, Any]] = []
    alts = _alternatives(cfg)
    for i, (label, change) in enumerate(alts):
        if progress is not None:
            progress(f"trying {label} ({i + 1}/{len(alts)})")
        try:
            alt_cfg = dataclasses.replace(cfg, **change)
        except Exception as exc:  # noqa: BLE001 - a change the config refuses is reported, not fatal
            out.append({"change": label, "error": str(exc)})
            continue
        if cfg.lora.enabled != alt_cfg.lora.enabled:
            try:
                import peft  # noqa: F401
            except ImportError:
                out.append({"change": label, "error": "peft is not installed (pip install peft)"})
                continue
        e = _estimate_once(model_config, alt_cfg, shape, target_for(alt_cfg, device), gpu_bytes)
        out.append({"change": label, "peak_gb": e.peak_bytes / GB, "fits": e.fits, "peak_phase": e.peak_phase})
        if e.fits:
            break
    return out


def format_estimate(est: MemoryEstimate) -> str:
    """A plain-text report: both phases by part, the verdict and the advice."""
    lines = [f"shape: {est.shape.rows} rows ({est.shape.refinement_rows} refinement) x ({est.shape.prompt_tokens} "
             f"prompt + {est.shape.completion_tokens} completion tokens); target {est.target.device}, autocast "
             f"{est.target.autocast_dtype}, fused LM head {est.target.fused_head}"]
    for name, total, parts in (("update step", est.update_bytes, est.update_parts),
                               ("generation", est.generation_bytes, est.generation_parts)):
        lines.append(f"{name}: {total / GB:.2f} GB")
        for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {k:<24s} {v / GB:8.2f} GB")
    verdict = "fits" if est.fits else "does NOT fit"
    lines.append(f"peak: {est.peak_bytes / GB:.2f} GB ({est.peak_phase}); {verdict} in {est.gpu_bytes / GB:.0f} GB")
    for a in est.advice:
        if "error" in a:
            lines.append(f"  with {a['change']}: not estimated ({a['error']})")
        else:
            lines.append(f"  with {a['change']}: {a['peak_gb']:.2f} GB ({'fits' if a['fits'] else 'does not fit'})")
    fitting = [a for a in est.advice if a.get("fits")]
    if not est.fits:
        lines.append(f"change: {fitting[0]['change']}" if fitting else
                     "no single change tried fits; combine them, or use a GPU with more memory")
    return "\n".join(lines)
