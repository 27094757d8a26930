"""One optimizer update over a mixed Critique-GRPO batch (on-policy + refinement rows), with accelerate.

Per token:  on-policy rows  -> PPO-clip(ratio to pi_old, A_t)
            refinement rows -> shaped off-policy term, -A * p/(p+gamma), no ratio
            + kl_beta * k3 KL to the reference   - entropy_coef * entropy
            + distill_weight * top-K reverse KL to the critique-conditioned teacher (topk_logits mode)
then aggregated (token_sum_norm / token_mean / seq_mean_token_mean) with global counts so gradient
accumulation over micro-batches equals one full-batch step.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from critique_rl.algos import (
    aggregate_loss,
    entropy_from_logits,
    kl_k3,
    ppo_clip_loss,
    shaped_offpolicy_loss,
    topk_reverse_kl,
)
from critique_rl.config import TrainConfig
from critique_rl.train.batching import TokenBatch, completion_logprobs

STAT_KEYS = ("loss/total", "loss/policy", "loss/offpolicy", "loss/distill", "loss/kl", "loss/entropy",
             "clip_frac", "entropy", "kl", "grad_norm")


@dataclass
class UpdateBatch:
    """Everything one update needs. ``advantages`` are per token ``[N, T]`` (already w_eval/w_dir mixed)."""

    tokens: TokenBatch
    advantages: torch.Tensor
    offpolicy: torch.Tensor
    """Bool ``[N]``: refinement rows (trained with the shaped off-policy term)."""
    teacher_topk_logp: torch.Tensor | None = None
    """``[N, T, K]`` teacher log-probs of its top-K tokens (topk_logits distillation), zero rows elsewhere."""
    teacher_topk_idx: torch.Tensor | None = None
    distill_rows: torch.Tensor | None = None
    """Bool ``[N]``: rows that get the top-K distillation term."""


def policy_update(model: torch.nn.Module, ref_model: torch.nn.Module | None, optimizer: Any, scheduler: Any,
                  accelerator: Any, ub: UpdateBatch, cfg: TrainConfig, norm_constant: float) -> dict[str, float]:
    """``cfg.num_iterations`` optimizer steps over ``ub``, each accumulating gradients over mini-batches."""
    dev = accelerator.device
    tokens = ub.tokens.to(dev)
    adv = ub.advantages.to(dev)
    off = ub.offpolicy.to(dev)
    N = tokens.input_ids.shape[0]
    mb_size = cfg.mini_batch_size
    num_tokens = float(tokens.completion_mask.sum().clamp_min(1))
    agg = dict(mode=cfg.loss_aggregation, num_seqs=N, num_tokens=num_tokens, norm_constant=norm_constant)
    old_logp = teacher_scores(model, tokens, cfg.temperature, mb_size)[0] if cfg.num_iterations > 1 else None
    ref_logp = teacher_scores(ref_model, tokens, cfg.temperature, mb_size)[0] if ref_model is not None else None
    use_topk = ub.teacher_topk_logp is not None and cfg.distill_weight > 0
    stats = dict.fromkeys(STAT_KEYS, 0.0)
    model.train()
    model.zero_grad(set_to_none=True)  # gradients come from this batch only (never from earlier code)
    starts = list(range(0, N, mb_size))
    for _ in range(cfg.num_iterations):
        for j, s in enumerate(starts):
            sl = slice(s, s + mb_size)
            mb = tokens.select(sl)
            mask = mb.completion_mask.float()
            is_off = off[sl].unsqueeze(-1)
            sync = accelerator.no_sync(model) if j < len(starts) - 1 else nullcontext()
            with sync, accelerator.autocast():
                logp, logits = completion_logprobs(model, mb, cfg.temperature, with_logits=True)
                old = old_logp[sl] if old_logp is not None else logp.detach()
                on_loss, clipped = ppo_clip_loss(logp, old, adv[sl], cfg.clip_eps_low, cfg.clip_eps_high)
                off_loss = shaped_offpolicy_loss(logp, adv[sl], cfg.offpolicy_gamma)
                pg = torch.where(is_off, off_loss, on_loss)
                per_token = pg
                ent = entropy_from_logits(logits) if cfg.entropy_coef > 0 else None
                kl = kl_k3(logp, ref_logp[sl]) if ref_logp is not None else None
                dist = None
                if kl is not None:
                    per_token = per_token + cfg.kl_beta * kl
                if ent is not None:
                    per_token = per_token - cfg.entropy_coef * ent
                if use_topk:
                    rows = ub.distill_rows[sl].to(dev).unsqueeze(-1).float()
                    dist = topk_reverse_kl(logits, ub.teacher_topk_logp[sl].to(dev), ub.teacher_topk_idx[sl].to(dev))
                    per_token = per_token + cfg.distill_weight * dist * rows
                loss = aggregate_loss(per_token, mask, **agg)
            accelerator.backward(loss)
            with torch.no_grad():
                on_mask = mask * (~is_off).float()
                stats["loss/total"] += loss.item()
                stats["loss/policy"] += aggregate_loss(on_loss * on_mask, mask, **agg).item()
                stats["loss/offpolicy"] += aggregate_loss(off_loss * (mask - on_mask), mask, **agg).item()
                stats["clip_frac"] += ((clipped * on_mask).sum() / num_tokens).item()
                ent_d = ent if ent is not None else entropy_from_logits(logits.detach())
                stats["entropy"] += ((ent_d * mask).sum() / num_tokens).item()
                if kl is not None:
                    stats["kl"] += ((kl * mask).sum() / num_tokens).item()
                    stats["loss/kl"] += cfg.kl_beta * aggregate_loss(kl, mask, **agg).item()
                if ent is not None:
                    stats["loss/entropy"] -= cfg.entropy_coef * aggregate_loss(ent, mask, **agg).item()
                if dist is not None:
                    stats["loss/distill"] += cfg.distill_weight * aggregate_loss(dist * rows, mask, **agg).item()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats["grad_norm"] += float(grad_norm)
    scheduler.step()
    for k in STAT_KEYS:
        stats[k] /= cfg.num_iterations
    stats["lr"] = scheduler.get_last_lr()[0]
    return stats


@torch.no_grad()
def teacher_scores(model: torch.nn.Module, tokens: TokenBatch, temperature: float, mb_size: int,
                   topk: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs ``[N, T]`` of the given completion tokens under ``model`` (no grad, in mini-batches) and,
    with ``topk``, its top-K log-probs and token ids ``[N, T, K]`` at each position. Used for pi_old, the
    reference policy and the critique-conditioned teacher alike."""
    lps, tk_lp, tk_idx = [], [], []
    for s in range(0, tokens.input_ids.shape[0], mb_size):
        mb = tokens.select(slice(s, s + mb_size))
        lp, logits = completion_logprobs(model, mb, temperature, with_logits=topk is not None)
        lps.append(lp)
        if topk is not None:
            v, i = torch.log_softmax(logits, -1).topk(min(topk, logits.shape[-1]), dim=-1)
            tk_lp.append(v)
            tk_idx.append(i)
    if topk is None:
        return torch.cat(lps), None, None
    return torch.cat(lps), torch.cat(tk_lp), torch.cat(tk_idx)
