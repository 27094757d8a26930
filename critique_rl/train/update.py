"""One optimizer update over a mixed Critique-GRPO batch (on-policy + refinement rows), with accelerate.

Per token:  on-policy rows  -> PPO-clip(ratio to pi_old, A_t)
            refinement rows -> shaped off-policy term, -A * p/(p+gamma), no ratio
            + kl_beta * k3 KL to the reference   - entropy_coef * entropy
            + distill_weight * top-K divergence to the critique-conditioned teacher (topk_logits mode)
then aggregated (token_sum_norm / token_mean / seq_mean_token_mean) with global counts so gradient
accumulation over micro-batches, and gradient averaging over processes, equal one full-batch step.

Memory: log-probs come from a selective log-softmax over the completion positions only; full-vocabulary
logits are kept (in the model's dtype) only for the top-K distillation term; entropy is computed in row
chunks and carries a graph only when the entropy bonus is in the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from critique_rl.algos import (
    POLICY_LOSSES,
    aggregate_loss,
    kl_k3,
    mismatch_stats,
    offpolicy_coefficient,
    offpolicy_token_weights,
    shaped_offpolicy_loss,
    tis_weights,
    topk_divergence,
    topk_logprobs,
)
from critique_rl.config import TrainConfig
from critique_rl.errors import UserError
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
    ref_logp: torch.Tensor | None = None
    """``[N, T]`` reference-policy log-probs (KL term), or None when ``kl_beta`` is 0."""
    sampling_logp: torch.Tensor | None = None
    """``[N, T]`` log-probs the rollout engine recorded while sampling the on-policy rows (``Completion.logprobs``),
    or None. Used for truncated importance sampling (``tis_cap``) and the ``mismatch/*`` metrics; refinement rows
    (sampled under another prompt) are never reweighted."""


@dataclass(frozen=True)
class Normalisation:
    """Loss-aggregation counts of the *global* batch, divided by the number of processes.

    DDP averages gradients over processes, so each process divides its token sums by the global counts over
    the process count; the average is then exactly the full-batch loss of :func:`aggregate_loss`.
    ``micro_batches`` is the most micro-batches any process has (processes with fewer run padding steps of
    zero loss, so sharded engines see the same number of forward passes everywhere).
    """

    num_seqs: float
    num_tokens: float
    micro_batches: int


class NonFiniteGuard:
    """Counts optimizer updates skipped because the loss or the gradient norm was NaN/inf; after ``limit`` in a
    row it raises a :class:`UserError` (training stops, and no NaN weights ever reach a checkpoint)."""

    def __init__(self, limit: int = 3) -> None:
        self.limit = max(1, int(limit))
        self.in_a_row = 0
        self.total = 0

    def record(self, skipped: bool, loss: float = 0.0, grad_norm: float = 0.0) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise UserError(
                f"the loss or gradient norm was NaN/inf in {self.in_a_row} updates in a row (last: loss={loss}, "
                f"grad_norm={grad_norm}); those updates were skipped and the weights stay finite. Check "
                "reward_weights and the reward functions for inf/NaN rewards, lower learning_rate, or raise "
                "max_nonfinite_steps")


def _any_process(accelerator: Any, flag: bool) -> bool:
    """``flag`` or-reduced over processes (every rank takes the same skip decision)."""
    if getattr(accelerator, "num_processes", 1) <= 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def local_normalisation(ub: UpdateBatch, mb_size: int) -> Normalisation:
    n = ub.tokens.input_ids.shape[0]
    return Normalisation(float(n), float(ub.tokens.completion_mask.sum().clamp_min(1)), -(-n // mb_size))


def micro_slices(n: int, mb_size: int, count: int) -> list[tuple[slice, bool]]:
    """``count`` micro-batch slices over ``n`` rows: ``(slice, real)``; padding slices repeat row 0 and are
    flagged ``real=False`` (their loss is multiplied by zero)."""
    out = [(slice(s, s + mb_size), True) for s in range(0, n, mb_size)]
    out += [(slice(0, 1), False)] * (count - len(out))
    return out


@dataclass
class MicroLoss:
    """One micro-batch's loss and the per-token parts its statistics read."""

    loss: torch.Tensor
    """The aggregated scalar that is back-propagated (times zero on a padding micro-batch)."""
    logp: torch.Tensor
    old: torch.Tensor
    entropy: torch.Tensor
    on_loss: torch.Tensor
    off_loss: torch.Tensor
    clipped: torch.Tensor
    kl: torch.Tensor | None
    dist: torch.Tensor | None
    rows: torch.Tensor | None


@dataclass
class _UpdateInputs:
    """``ub`` on the device, and what every micro-batch's loss reads."""

    tokens: TokenBatch
    adv: torch.Tensor
    off: torch.Tensor
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    samp_logp: torch.Tensor | None
    ub: UpdateBatch
    agg: dict[str, Any]
    use_topk: bool
    importance_weights: bool


def micro_batch_loss(model: torch.nn.Module, x: _UpdateInputs, sl: slice, cfg: TrainConfig) -> MicroLoss:
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
    on_loss, clipped = POLICY_LOSSES[getattr(cfg, "policy_loss", "ppo_clip")](logp, old, x.adv[sl], cfg)
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
        ub = x.ub
        rows = ub.distill_rows[sl].to(dev).unsqueeze(-1).float()
        dist = topk_divergence(scores.logits, ub.teacher_topk_logp[sl].to(dev), ub.teacher_topk_idx[sl].to(dev),
                               cfg.distill_divergence, beta=cfg.distill_jsd_beta)
        per_token = per_token + cfg.distill_weight * dist * rows
    loss = aggregate_loss(per_token, mask, **x.agg)
    return MicroLoss(loss, logp, old, ent, on_loss, off_loss, clipped, kl, dist, rows)


def policy_update(model: torch.nn.Module, optimizer: Any, scheduler: Any, accelerator: Any, ub: UpdateBatch,
                  cfg: TrainConfig, norm_constant: float, norm: Normalisation | None = None,
                  guard: NonFiniteGuard | None = None, importance_weights: bool = False) -> dict[str, float]:
    """``cfg.num_iterations`` optimizer steps over ``ub``, each accumulating gradients over mini-batches
    (:func:`micro_batch_loss` per micro-batch).

    An iteration whose loss (on any process) or gradient norm (already reduced over processes) is NaN/inf is
    skipped: gradients dropped, no optimizer step; ``guard`` (default: a fresh one with
    ``cfg.max_nonfinite_steps``) counts skips in a row and stops training after too many.
    ``importance_weights``: the rows were sampled by a separate engine (``engine_is_separate``), so truncated
    importance sampling (``cfg.tis_cap``) reweights the on-policy loss."""
    guard = guard if guard is not None else NonFiniteGuard(getattr(cfg, "max_nonfinite_steps", 3))
    dev = accelerator.device
    tokens = ub.tokens.to(dev)
    N = tokens.input_ids.shape[0]
    mb_size = cfg.mini_batch_size
    norm = norm or local_normalisation(ub, mb_size)
    slices = micro_slices(N, mb_size, norm.micro_batches)
    x = _UpdateInputs(
        tokens=tokens, adv=ub.advantages.to(dev), off=ub.offpolicy.to(dev),
        old_logp=score_tokens(model, tokens, cfg.temperature, mb_size, accelerator.autocast,
                              norm.micro_batches)[0] if cfg.num_iterations > 1 else None,
        ref_logp=ub.ref_logp.to(dev) if ub.ref_logp is not None else None,
        samp_logp=ub.sampling_logp.to(dev) if ub.sampling_logp is not None else None, ub=ub,
        agg=dict(mode=cfg.loss_aggregation, num_seqs=norm.num_seqs, num_tokens=norm.num_tokens,
                 norm_constant=norm_constant),
        use_topk=ub.teacher_topk_logp is not None and cfg.distill_weight > 0, importance_weights=importance_weights)
    stats = dict.fromkeys(STAT_KEYS, 0.0)
    mismatch: dict[str, float] = {}
    mismatch_tokens = 0.0
    offdiag = dict.fromkeys(("tokens", "logp", "coef_off", "coef_on"), 0.0)  # refinement-channel diagnostics
    skipped = 0
    model.train()
    model.zero_grad(set_to_none=True)  # gradients come from this batch only (never from earlier code)
    for it in range(cfg.num_iterations):
        iter_loss = 0.0
        for j, (sl, real) in enumerate(slices):
            sync = accelerator.no_sync(model) if j < len(slices) - 1 else nullcontext()
            with sync, accelerator.autocast():
                m = micro_batch_loss(model, x, sl, cfg)
                loss = m.loss if real else m.loss * 0.0
            accelerator.backward(loss)
            if not real:
                continue
            with torch.no_grad():
                iter_loss += loss.item()
                _accumulate(stats, offdiag, m, x, sl, cfg, norm, it)
                if x.samp_logp is not None and it == 0:  # pi_old is the same in every iteration
                    on_mask = x.tokens.select(sl).completion_mask.float() * (~x.off[sl].unsqueeze(-1)).float()
                    count = float(on_mask.sum())
                    for k, v in mismatch_stats(m.old, x.samp_logp[sl], on_mask, cfg.tis_cap).items():
                        mismatch[k] = mismatch.get(k, 0.0) + v.item() * count
                    mismatch_tokens += count
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
        if _any_process(accelerator, not (math.isfinite(iter_loss) and math.isfinite(grad_norm))):
            optimizer.zero_grad(set_to_none=True)  # a NaN/inf update never reaches the weights
            skipped += 1
            guard.record(True, iter_loss, grad_norm)
            stats["grad_norm"] += grad_norm
            continue
        guard.record(False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats["grad_norm"] += grad_norm
    if skipped < cfg.num_iterations:  # no optimizer step at all: the schedule waits too
        scheduler.step()
    for k in STAT_KEYS:
        stats[k] /= cfg.num_iterations
    stats["lr"] = scheduler.get_last_lr()[0]
    stats["nonfinite_skipped"] = float(skipped)
    offdiag = {k: float(v) for k, v in offdiag.items()}
    if offdiag["tokens"]:  # mean log-prob of refinement tokens under the plain prompt; their share of the update
        stats["offpolicy/logp_mean"] = offdiag["logp"] / offdiag["tokens"]
        total = offdiag["coef_off"] + offdiag["coef_on"]
        stats["offpolicy/grad_weight_share"] = offdiag["coef_off"] / total if total else 0.0
    for k, v in mismatch.items():  # engine vs trainer, token means over the on-policy tokens
        stats[f"mismatch/{k}"] = v / max(mismatch_tokens, 1.0)
    return stats


def _accumulate(stats: dict[str, float], offdiag: dict[str, Any], m: MicroLoss, x: _UpdateInputs, sl: slice,
                cfg: TrainConfig, norm: Normalisation, it: int) -> None:
    """Add one real micro-batch's loss parts to the update's statistics (no grad)."""
    agg = x.agg
    mask = x.tokens.select(sl).completion_mask.float()
    on_mask = mask * (~x.off[sl].unsqueeze(-1)).float()
    stats["loss/total"] += m.loss.item()
    stats["loss/policy"] += aggregate_loss(m.on_loss * on_mask, mask, **agg).item()
    stats["loss/offpolicy"] += aggregate_loss(m.off_loss * (mask - on_mask), mask, **agg).item()
    stats["clip_frac"] += ((m.clipped * on_mask).sum() / norm.num_tokens).item()
    stats["entropy"] += ((m.entropy.detach() * mask).sum() / norm.num_tokens).item()
    if m.kl is not None:
        stats["kl"] += ((m.kl * mask).sum() / norm.num_tokens).item()
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


@torch.no_grad()
def score_tokens(model: torch.nn.Module, tokens: TokenBatch, temperature: float, mb_size: int,
                 autocast: Callable[[], AbstractContextManager[Any]] | None = None, micro_batches: int | None = None,
                 topk: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs ``[N, T]`` of the given completion tokens under ``model`` (no grad, in mini-batches) and,
    with ``topk``, its top-K log-probs and token ids ``[N, T, K]`` at each position. Used for pi_old, the
    reference policy and the critique-conditioned teacher alike. ``micro_batches`` pads the number of forward
    passes (see :class:`Normalisation`)."""
    n = tokens.input_ids.shape[0]
    lps, tk_lp, tk_idx = [], [], []
    count = micro_batches if micro_batches is not None else -(-n // mb_size)
    for sl, real in micro_slices(n, mb_size, count):
        with autocast() if autocast is not None else nullcontext():
            scores = completion_logprobs(model, tokens.select(sl), temperature, keep_logits=topk is not None)
        if not real:
            continue
        lps.append(scores.logp)
        if topk is not None:
            v, i = topk_logprobs(scores.logits, min(topk, scores.logits.shape[-1]))
            tk_lp.append(v)
            tk_idx.append(i)
    if topk is None:
        return torch.cat(lps), None, None
    return torch.cat(lps), torch.cat(tk_lp), torch.cat(tk_idx)


teacher_scores = score_tokens  # the name earlier code and benchmarks use
