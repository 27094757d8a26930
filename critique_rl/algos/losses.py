"""Policy-gradient token losses and their aggregation (pure functions).

Shapes: per-token tensors are ``[B, T]`` (B sequences, T completion tokens), ``mask`` is 1 on real
completion tokens. Advantages may be per sequence ``[B]`` / ``[B, 1]`` or per token ``[B, T]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from critique_rl.algos.logprobs import chunked_entropy
from critique_rl.registry import Registry


def _per_token(adv: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    return adv.expand_as(like)


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate per token (PPO arXiv:1707.06347; asymmetric clip from DAPO arXiv:2503.14476).

    ``r_t = exp(logp_t - old_logp_t)``;
    ``loss_t = -min(r_t * A_t, clip(r_t, 1 - eps_low, 1 + eps_high) * A_t)``.

    Returns ``(loss [B, T], clipped [B, T])`` where ``clipped`` is 1.0 where the clipped branch was taken
    (the gradient is zero there).
    """
    adv = _per_token(advantages, logp)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped_obj = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped_obj)
    was_clipped = (clipped_obj < unclipped).to(logp.dtype)
    return loss, was_clipped


PolicyLossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""``fn(logp, old_logp, advantages, cfg) -> (loss [B, T], clipped [B, T])``: the on-policy per-token loss (before
masking and aggregation) and where its clip was active (0.0 everywhere for a loss without a clip)."""

POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss", "policy_loss")


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register an on-policy per-token loss under ``name`` (``policy_loss: <name>`` in a config), verl's
    ``register_policy_loss``: ``@register_policy_loss("mine") def mine(logp, old_logp, advantages, cfg): ...``."""
    return POLICY_LOSSES.decorator(name)


@register_policy_loss("ppo_clip")
def ppo_clip_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                         cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ppo_clip_loss` with ``cfg.clip_eps_low`` / ``cfg.clip_eps_high`` (GRPO, DAPO's clip-higher)."""
    return ppo_clip_loss(logp, old_logp, advantages, cfg.clip_eps_low, cfg.clip_eps_high)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token (Schulman 2020; used by GRPO arXiv:2402.03300):

    ``kl_t = exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1`` (>= 0, unbiased for samples from pi).
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def entropy_from_logits(logits: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Per-token entropy ``H_t = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v`` (float32) of the softmax
    over the last dimension, computed in row chunks without a full float32 copy of ``logits`` (see
    :func:`critique_rl.algos.logprobs.chunked_entropy`, after verl ``entropy_from_logits_with_chunking``).
    Differentiable (for an entropy bonus); detach the input or use ``chunked_entropy(grad=False)`` for stats."""
    return chunked_entropy(logits, chunk_rows, grad=True)


def _token_mean(loss, mask, num_seqs, num_tokens, norm_constant):
    return (loss * mask).sum() / num_tokens


def _seq_mean_token_mean(loss, mask, num_seqs, num_tokens, norm_constant):
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
    return per_seq.sum() / num_seqs


def _token_sum_norm(loss, mask, num_seqs, num_tokens, norm_constant):
    return (loss * mask).sum() / (num_seqs * norm_constant)


LOSS_AGGREGATIONS: Registry[Callable[..., torch.Tensor]] = Registry("loss aggregation", "loss_aggregation", {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "token_sum_norm": _token_sum_norm,
})


def aggregate_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token_sum_norm",
    num_seqs: float | None = None,
    num_tokens: float | None = None,
    norm_constant: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar.

    - ``token_mean`` (DAPO, arXiv:2503.14476): ``sum_{i,t} m_it l_it / sum_{i,t} m_it``.
    - ``seq_mean_token_mean`` (GRPO, arXiv:2402.03300): ``1/B sum_i (sum_t m_it l_it / sum_t m_it)``.
    - ``token_sum_norm`` (Dr.GRPO, arXiv:2503.20783): ``sum_{i,t} m_it l_it / (B * C)`` with a constant C
      (default: T, the padded generation length), so no length bias.

    ``num_seqs``/``num_tokens`` default to this batch's counts; pass the full batch's counts when summing
    over gradient-accumulation micro-batches so the total equals the full-batch loss.
    """
    if mode not in LOSS_AGGREGATIONS:
        raise KeyError(f"unknown loss aggregation '{mode}'; known: {sorted(LOSS_AGGREGATIONS)}")
    mask = mask.to(loss.dtype)
    num_seqs = float(loss.shape[0]) if num_seqs is None else float(num_seqs)
    num_tokens = float(mask.sum().clamp_min(1.0)) if num_tokens is None else float(num_tokens)
    norm_constant = float(loss.shape[-1]) if norm_constant is None else float(norm_constant)
    return LOSS_AGGREGATIONS[mode](loss, mask, num_seqs, num_tokens, norm_constant)
