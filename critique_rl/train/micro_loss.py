"""The loss of one micro-batch of a mixed Critique-GRPO batch (on-policy + refinement rows), and its statistics.

Per token:  on-policy rows  -> the registered policy loss (``policy_loss``, PPO-clip by default) on the ratio to
                               pi_old, times the truncated importance weight when a separate engine sampled
            refinement rows -> shaped off-policy term, -A * p/(p+gamma), no ratio (optionally reweighted)
            + kl_beta * k3 KL to the reference   - entropy_coef * entropy
            + distill_weight * top-K divergence to the critique-conditioned teacher (topk_logits mode)
then aggregated (token_sum_norm / token_mean / seq_mean_token_mean) with the *global* counts in
:attr:`LossInputs.agg`, so summing the micro-batch losses gives the full-batch loss. The optimizer loop around it
is :func:`critique_rl.train.update.policy_update`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from critique_rl.algos import (
    POLICY_LOSSES,
    aggregate_loss,
    kl_k3,
    offpolicy_coefficient,
    offpolicy_token_weights,
    shaped_offpolicy_loss,
    tis_weights,
    topk_divergence,
)
from critique_rl.config import TrainConfig
from critique_rl.train.batching import TokenBatch, completion_logprobs

STAT_KEYS = ("loss/total", "loss/policy", "loss/offpolicy", "loss/distill", "loss/kl", "loss/entropy",
             "clip_frac", "entropy", "kl", "grad_norm")


@dataclass(frozen=True)
class LossInputs:
    """What every micro-batch's loss reads: the whole update batch's tensors (``tokens``, ``adv``, ``off`` and the
    log-probs on the training device; the teacher's top-K tensors where the update batch keeps them), the
    aggregation keywords with the global counts (``agg``: ``mode``, ``num_seqs``, ``num_tokens``,
    ``norm_constant``) and whether truncated importance weights apply (a separate engine sampled)."""

    tokens: TokenBatch
    adv: torch.Tensor
    off: torch.Tensor
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    samp_logp: torch.Tensor | None
    agg: dict[str, Any]
    importance_weights: bool = False
    teacher_topk_logp: torch.Tensor | None = None
    teacher_topk_idx: torch.Tensor | None = None
    distill_rows: torch.Tensor | None = None
    use_topk: bool = False


@dataclass
class MicroLoss:
    """One micro-batch's loss and the per-token parts its statistics read."""

    loss: torch.Tensor
    """The aggregated scalar that is back-propagated."""
    logp: torch.Tensor
    old: torch.Tensor
    entropy: torch.Tensor
    on_loss: torch.Tensor
    off_loss: torch.Tensor
    clipped: torch.Tensor
    kl: torch.Tensor | None
    dist: torch.Tensor | None
    rows: torch.Tensor | None

def micro_batch_loss(model: torch.nn.Module, x: LossInputs, sl: slice, cfg: TrainConfig) -> MicroLoss:
    """The loss of rows ``sl``: the registered on-policy loss (``cfg.policy_loss``, PPO-clip by default) with
    truncated importance weights when a separate engine sampled, the shaped off-policy term on refinement rows,
    the k3 KL to the reference, the entropy bonus and the top-K distillation term, aggregated with the global
    counts in ``x.agg``. Must run under the caller's autocast / no_sync contexts."""
    dev = x.tokens.input_ids.device
    mb = x.tokens.select(sl)
    mask = mb.completion_mask.float()
    is_off = x.off[sl].unsqueeze(-1)
    ent_mode = "grad" if cfg.entropy_coef > 0 else "detached"
    scores = completion_logprobs(model, mb, cfg.temperature, entropy=ent_mode, keep_logits=x.use_topk)
    logp, ent = scores.logp, scores.entropy
    old = x.old_logp[sl] if x.old_logp is not None else logp.detach()
    on_loss, clipped = POLICY_LOSSES.get_or_raise(getattr(cfg, "policy_loss", "ppo_clip"))(logp, old, x.adv[sl], cfg)
    # TIS, w = min(pi_old / pi_engine, C), when a separate engine sampled (with hf the sampler is the
    # trained module itself: the ratio is 1 up to float noise, logged as mismatch/* but not applied)
    if x.samp_logp is not None and cfg.tis_cap is not None and x.importance_weights:
        on_loss = on_loss * tis_weights(old, x.samp_logp[sl], cfg.tis_cap)
    off_loss = shaped_offpolicy_loss(logp, x.adv[sl], cfg.offpolicy_gamma)
    weighting = getattr(cfg, "offpolicy_weighting", "none")
    if weighting != "none":  # refinement rows carry their critique-conditioned sampling log-probs
        behaviour = x.samp_logp[sl] if x.samp_logp is not None else torch.zeros_like(logp)
        off_loss = off_loss * offpolicy_token_weights(logp, behaviour, weighting, cfg.offpolicy_weight_cap)
    per_token = torch.where(is_off, off_loss, on_loss)
    kl = kl_k3(logp, x.ref_logp[sl]) if x.ref_logp is not None else None
    dist = rows = None
    if kl is not None:
        per_token = per_token + cfg.kl_beta * kl
    if cfg.entropy_coef > 0:
        per_token = per_token - cfg.entropy_coef * ent
    if x.use_topk:
        rows = x.distill_rows[sl].to(dev).unsqueeze(-1).float()
        dist = topk_divergence(scores.logits, x.teacher_topk_logp[sl].to(dev), x.teacher_topk_idx[sl].to(dev),
                               cfg.distill_divergence, beta=cfg.distill_jsd_beta)
        per_token = per_token + cfg.distill_weight * dist * rows
    loss = aggregate_loss(per_token, mask, **x.agg)
    return MicroLoss(loss, logp, old, ent, on_loss, off_loss, clipped, kl, dist, rows)


def accumulate_stats(stats: dict[str, float], offdiag: dict[str, Any], m: MicroLoss, x: LossInputs, sl: slice,
                     cfg: TrainConfig, num_tokens: float, it: int) -> None:
    """Add one real micro-batch's loss parts to the update's statistics (no grad)."""
    agg = x.agg
    mask = x.tokens.select(sl).completion_mask.float()
    on_mask = mask * (~x.off[sl].unsqueeze(-1)).float()
    stats["loss/total"] += m.loss.item()
    stats["loss/policy"] += aggregate_loss(m.on_loss * on_mask, mask, **agg).item()
    stats["loss/offpolicy"] += aggregate_loss(m.off_loss * (mask - on_mask), mask, **agg).item()
    stats["clip_frac"] += ((m.clipped * on_mask).sum() / num_tokens).item()
    stats["entropy"] += ((m.entropy.detach() * mask).sum() / num_tokens).item()
    if m.kl is not None:
        stats["kl"] += ((m.kl * mask).sum() / num_tokens).item()
        stats["loss/kl"] += cfg.kl_beta * aggregate_loss(m.kl, mask, **agg).item()
    if cfg.entropy_coef > 0:
        stats["loss/entropy"] -= cfg.entropy_coef * aggregate_loss(m.entropy, mask, **agg).item()
    if m.dist is not None:
        stats["loss/distill"] += cfg.distill_weight * aggregate_loss(m.dist * m.rows, mask, **agg).item()
    if it == 0:  # how much the refinement tokens drive this update (first iteration: ratio 1)
        off_mask = mask - on_mask  # all zero in micro-batches without refinements
        abs_adv = x.adv[sl].abs().expand_as(m.logp)
        coef = offpolicy_coefficient(m.logp, cfg.offpolicy_gamma)
        for key, value in (("tokens", off_mask.sum()), ("logp", (m.logp.detach() * off_mask).sum()),
                           ("coef_off", (abs_adv * coef * off_mask).sum()),
                           ("coef_on", (abs_adv * on_mask).sum())):
            offdiag[key] = offdiag[key] + value  # device tensors: read once, after the loop
