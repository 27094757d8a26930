"""Shared-prefix forward (Prefix Grouper, arXiv:2506.05433): a group's prompt is encoded once.

The ``n`` samples of a GRPO group (plus its refinement rows) share one prompt: a memory context, a refinement
prompt, an episode's context before its first action. The plain forward encodes that prompt once per row.
Here the rows of a :class:`~critique_rl.train.batching.TokenBatch` whose prompts are token-for-token equal
become one packed sequence ``[prefix, c_1, ..., c_m]`` (right-padded to the longest group), run with a block
attention mask::

    allowed(q, k) = k <= q  and  seg(k) in {0, seg(q)}          seg: 0 = prefix, j = completion c_j

and position ids that continue every completion from the prefix length (``c_j``'s token ``t`` sits at
position ``|prefix| + t``, as in the row's own unpadded sequence). Each completion token then sees exactly
the keys and positions it sees in its own row, so the hidden states, log-probs and every gradient are those
of the unshared forward up to float summation order (tests: ``tests/test_prefix_sharing.py``, <= 1e-5).
The hidden state predicting ``c_j``'s first token is the prefix's last one (shared by the group); the rest
are read back with one gather into the ``[B, T]`` layout of the batch.

When it is used (``prefix_sharing`` mode on the model, :func:`set_prefix_sharing`): ``off`` never, ``on``
whenever the model supports it (raises when not), ``auto`` (the default) when the model supports it and the
estimated cost of the packed forward is below the plain one's (:func:`forward_costs`: linear FLOPs per token
plus attention FLOPs per query-key pair; a short prompt with long completions can make the packed sequence's
dense attention dearer than what sharing saves). Supported: a causal LM whose logits are a plain projection
of the last hidden state (:func:`~critique_rl.train.batching.fused_head_supported`) with ``sdpa`` or
``eager`` attention (flash-attention kernels take no custom mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

PrefixSharingMode = Literal["auto", "on", "off"]
MODES = ("auto", "on", "off")
_MODE_ATTR = "_critique_rl_prefix_sharing"
MASKABLE_ATTENTION = ("sdpa", "eager")


def innermost_module(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model below DDP/FSDP, torch.compile and peft wrappers."""
    from critique_rl.train.batching import _innermost

    return _innermost(model)


_innermost = innermost_module


def set_prefix_sharing(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Set the shared-prefix mode (``auto`` / ``on`` / ``off``) of ``model``'s training, reference and
    teacher passes and of :class:`~critique_rl.rollout.hf.HFGenerator` sampling from it. ``on`` raises a
    ValueError naming the reason when the model cannot share prefixes exactly."""
    if mode not in MODES:
        raise ValueError(f"prefix_sharing must be one of {list(MODES)}, got {mode!r}")
    if mode == "on":
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"prefix_sharing 'on': {reason}; use auto or off")
    setattr(_innermost(model), _MODE_ATTR, mode)
    return model


def configure_prefix_sharing(models: Any, mode: str) -> None:
    """Set ``mode`` (config field ``prefix_sharing``) on every model the trainer scores with (policy, reference,
    EMA teacher; None entries skipped); a model that cannot share under ``on`` is a one-line config error."""
    from critique_rl.errors import ConfigError

    for model in models:
        if model is None:
            continue
        try:
            set_prefix_sharing(model, mode)
        except ValueError as e:
            raise ConfigError("prefix_sharing", mode, str(e)) from None


def prefix_sharing_mode(model: torch.nn.Module) -> str:
    """The mode set by :func:`set_prefix_sharing`, ``auto`` when none was set."""
    return getattr(_innermost(model), _MODE_ATTR, "auto")


def attention_implementation(model: torch.nn.Module) -> str | None:
    cfg = getattr(_innermost(model), "config", None)
    return getattr(cfg, "_attn_implementation", None) if cfg is not None else None


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``model``'s passes cannot share prefixes exactly, or None when they can."""
    from critique_rl.train.batching import fused_head_supported

    if not fused_head_supported(model):
        return f"{type(_innermost(model)).__name__}'s logits are not a plain projection of the last hidden state"
    impl = attention_implementation(model)
    if impl not in MASKABLE_ATTENTION:
        return (f"attention implementation {impl!r} takes no custom attention mask (load the model with "
                f"attn_implementation in {list(MASKABLE_ATTENTION)})")
    return None


# ---------------------------------------------------------------------------------------------------------
# the plan: which rows share, the packed layout, the gather index
# ---------------------------------------------------------------------------------------------------------

@dataclass
class PackedGroups:
    """A :class:`TokenBatch` re-laid out as one packed sequence per prompt group.

    ``input_ids``/``position_ids``/``segments``: ``[G, L]``; ``segments`` is -1 on padding, 0 on the prefix and
    ``j >= 1`` on the group's ``j``-th completion. ``gather``: ``[B, T]`` indices into the flattened ``[G * L]``
    positions: the position whose hidden state predicts completion token ``t`` of row ``b`` (padding tokens
    point at the row's last prefix token: finite values, masked like the plain path's padding)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    gather: torch.Tensor
    groups: int
    rows: int

    def to(self, device: torch.device) -> PackedGroups:
        return PackedGroups(self.input_ids.to(device), self.position_ids.to(device), self.segments.to(device),
                            self.gather.to(device), self.groups, self.rows)

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[G, 1, L, L]``: boolean (True = attend) when ``dtype`` is None (sdpa), else additive in ``dtype``
        (0 / dtype's minimum, for eager attention). Padding queries attend to themselves only (no empty rows:
        an all-masked softmax row would be NaN, and NaN * 0 poisons the backward)."""
        return block_attention_mask(self.segments, dtype)


def block_attention_mask(segments: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``allowed[g, q, k] = k <= q and seg[k] != -1 and seg[q] != -1 and seg[k] in (0, seg[q])``, or ``q == k``;
    shaped ``[G, 1, L, L]`` (see :meth:`PackedGroups.attention_mask`)."""
    L = segments.shape[1]
    ar = torch.arange(L, device=segments.device)
    causal = ar[None, :] <= ar[:, None]
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal & (k >= 0) & (q >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(L, dtype=torch.bool, device=segments.device)
    allowed = allowed.unsqueeze(1)
    if dtype is None:
        return allowed
    out = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)


def _row_layout(batch: Any) -> tuple[list[tuple[int, ...]], list[int]] | None:
    """Each row's prompt tokens and completion length, or None when a row is not the layout
    :func:`~critique_rl.train.batching.pack` builds (left-padded prompt, right-padded completion, no holes)
    or has an empty prompt."""
    T = batch.completion_ids.shape[1]
    P = batch.input_ids.shape[1] - T
    attn = batch.attention_mask.bool()
    p_len = attn[:, :P].sum(1)
    c_len = attn[:, P:].sum(1)
    ar_p = torch.arange(P, device=attn.device)
    ar_c = torch.arange(T, device=attn.device)
    want = torch.cat([ar_p[None, :] >= (P - p_len)[:, None], ar_c[None, :] < c_len[:, None]], dim=1)
    if not torch.equal(want, attn) or bool((p_len == 0).any()):
        return None
    ids = batch.input_ids[:, :P].tolist()
    prompts = [tuple(row[P - n :]) for row, n in zip(ids, p_len.tolist(), strict=True)]
    return prompts, c_len.tolist()


def plan_groups(batch: Any) -> PackedGroups | None:
    """Group the rows of ``batch`` by identical prompt tokens and lay each group out as one packed sequence
    (see the module docstring). None when the batch is not in :func:`pack`'s layout."""
    layout = _row_layout(batch)
    if layout is None:
        return None
    prompts, c_lens = layout
    B, T = batch.completion_ids.shape
    order: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        order.setdefault(p, []).append(i)
    groups = list(order.items())
    lengths = [len(p) + sum(c_lens[i] for i in rows) for p, rows in groups]
    G, L = len(groups), max(lengths)
    ids = torch.zeros((G, L), dtype=torch.long)
    pos = torch.zeros((G, L), dtype=torch.long)
    seg = torch.full((G, L), -1, dtype=torch.long)
    gather = torch.empty((B, T), dtype=torch.long)
    comp = batch.completion_ids.cpu()
    for g, (p, rows) in enumerate(groups):
        n = len(p)
        base = g * L
        ids[g, :n] = torch.tensor(p, dtype=torch.long)
        pos[g, :n] = torch.arange(n)
        seg[g, :n] = 0
        start = n
        for j, i in enumerate(rows, start=1):
            c = c_lens[i]
            ids[g, start : start + c] = comp[i, :c]
            pos[g, start : start + c] = torch.arange(n, n + c)
            seg[g, start : start + c] = j
            gather[i, :] = base + n - 1  # token 0 (and padding) read the prefix's last hidden state
            if c > 1:
                gather[i, 1:c] = torch.arange(base + start, base + start + c - 1)
            start += c
    dev = batch.input_ids.device
    return PackedGroups(ids, pos, seg, gather, G, B).to(dev)


# ---------------------------------------------------------------------------------------------------------
# when sharing pays: a FLOP estimate of both forwards
# ---------------------------------------------------------------------------------------------------------

def forward_costs(model: torch.nn.Module, batch: Any, packed: PackedGroups) -> tuple[float, float]:
    """Estimated FLOPs of one forward of the decoder stack, ``(plain, packed)``::

        cost = layers * (tokens * 2 W + pairs * 4 d_attn)

    ``W``: weights of one decoder layer (q, k, v, o projections and a gated MLP), ``d_attn = heads * head_dim``,
    ``tokens``: every position of the padded input (``B * (P + T)`` plain, ``G * L`` packed), ``pairs``: every
    query-key pair the masked attention computes (``B * (P + T)^2`` plain, ``G * L^2`` packed). The LM head
    scores the same ``B * T`` rows in both and is left out."""
    cfg = getattr(_innermost(model), "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    h = int(getattr(text, "hidden_size", 1))
    heads = int(getattr(text, "num_attention_heads", 1))
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    hd = int(getattr(text, "head_dim", None) or h // heads)
    inter = int(getattr(text, "intermediate_size", 4 * h))
    w = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * inter
    d_attn = heads * hd
    B, W_plain = batch.input_ids.shape
    G, L = packed.input_ids.shape
    plain = B * W_plain * 2 * w + B * W_plain**2 * 4 * d_attn
    shared = G * L * 2 * w + G * L**2 * 4 * d_attn
    return float(plain), float(shared)


def sliding_window(model: torch.nn.Module) -> int | None:
    """The attention window of ``model``'s sliding-window layers, or None when none of its layers slide
    (Mistral: ``sliding_window``; Qwen2: only with ``use_sliding_window`` / ``layer_types``)."""
    cfg = getattr(_innermost(model), "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    window = getattr(text, "sliding_window", None)
    if window is None or getattr(text, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def shared_plan(model: torch.nn.Module, batch: Any) -> PackedGroups | None:
    """The packed layout to score ``batch`` with, or None for the plain forward (mode ``off``; ``auto`` when
    unsupported, not in pack's layout, or not cheaper). Mode ``on`` raises when it cannot share."""
    mode = prefix_sharing_mode(model)
    if mode == "off":
        return None
    reason = unsupported_reason(model)
    if reason is not None:
        if mode == "on":
            raise ValueError(f"prefix_sharing 'on': {reason}; use auto or off")
        return None
    packed = plan_groups(batch)
    if packed is None:
        if mode == "on":
            raise ValueError("prefix_sharing 'on': the batch is not left-padded prompts followed by right-padded "
                             "completions with non-empty prompts (build it with critique_rl.train.batching.pack)")
        return None
    window = sliding_window(model)
    if window is not None:  # the block mask has no window: exact only while no row is longer than it
        longest = int(batch.attention_mask.sum(1).max())
        if longest > window:
            if mode == "on":
                raise ValueError(f"prefix_sharing 'on': a row of {longest} tokens is longer than the model's "
                                 f"sliding window ({window}); the packed mask does not apply the window")
            return None
    if mode == "auto":
        plain, shared = forward_costs(model, batch, packed)
        if shared >= plain:
            return None
    return packed


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def packed_mask(model: torch.nn.Module, packed: PackedGroups) -> torch.Tensor:
    """The 4D mask in the form ``model``'s attention implementation reads: boolean for sdpa, additive for eager."""
    if attention_implementation(model) == "eager":
        return packed.attention_mask(model_dtype(model))
    return packed.attention_mask()
