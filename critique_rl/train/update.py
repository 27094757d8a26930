"""The optimizer update over a mixed Critique-GRPO batch (on-policy + refinement rows), with accelerate.

:func:`policy_update` is the loop: ``num_iterations`` optimizer steps, each accumulating gradients over
micro-batches whose loss is :func:`critique_rl.train.micro_loss.micro_batch_loss` (the per-token terms and their
aggregation live there). Losses are aggregated with global counts (:class:`Normalisation`) so gradient
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

from critique_rl.algos import mismatch_stats, topk_logprobs
from critique_rl.config import TrainConfig
from critique_rl.errors import UserError
from critique_rl.train.batching import TokenBatch, completion_logprobs
from critique_rl.train.micro_loss import STAT_KEYS, LossInputs, MicroLoss, accumulate_stats, micro_batch_loss

__all__ = ["LossInputs", "MicroLoss", "NonFiniteGuard", "Normalisation", "UpdateBatch", "loss_inputs",
           "micro_batch_loss", "micro_slices", "policy_update", "score_tokens"]


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


def loss_inputs(model: torch.nn.Module, accelerator: Any, ub: UpdateBatch, cfg: TrainConfig, norm: Normalisation,
                norm_constant: float, importance_weights: bool = False) -> LossInputs:
    """``ub`` on the training device as :class:`LossInputs` for :func:`micro_batch_loss`, with pi_old scored
    (no grad) when there is more than one iteration (with one, pi_old is the detached current log-prob)."""
    dev = accelerator.device
    tokens = ub.tokens.to(dev)
    return LossInputs(
        tokens=tokens, adv=ub.advantages.to(dev), off=ub.offpolicy.to(dev),
        old_logp=score_tokens(model, tokens, cfg.temperature, cfg.mini_batch_size, accelerator.autocast,
                              norm.micro_batches)[0] if cfg.num_iterations > 1 else None,
        ref_logp=ub.ref_logp.to(dev) if ub.ref_logp is not None else None,
        samp_logp=ub.sampling_logp.to(dev) if ub.sampling_logp is not None else None,
        agg=dict(mode=cfg.loss_aggregation, num_seqs=norm.num_seqs, num_tokens=norm.num_tokens,
                 norm_constant=norm_constant),
        importance_weights=importance_weights, teacher_topk_logp=ub.teacher_topk_logp,
        teacher_topk_idx=ub.teacher_topk_idx, distill_rows=ub.distill_rows,
        use_topk=ub.teacher_topk_logp is not None and cfg.distill_weight > 0)


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
    mb_size = cfg.mini_batch_size
    norm = norm or local_normalisation(ub, mb_size)
    x = loss_inputs(model, accelerator, ub, cfg, norm, norm_constant, importance_weights)
    slices = micro_slices(x.tokens.input_ids.shape[0], mb_size, norm.micro_batches)
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
                accumulate_stats(stats, offdiag, m, x, sl, cfg, norm.num_tokens, it)
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
