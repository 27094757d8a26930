"""Rollout-engine / trainer mismatch: truncated importance sampling and its diagnostics (pure functions).

A fast rollout engine (vLLM: other kernels, other precision, sometimes stale weights) samples from
``pi_engine``, which is not exactly the trainer's ``pi_old`` even at identical weights. Truncated
importance sampling (TIS; Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
Training", fengyao.notion.site/off-policy-rl) reweights each sampled token by the ratio of the trainer's
probability to the engine's, capped at ``C``::

    w_t = min( pi_old(a_t | s_t) / pi_engine(a_t | s_t), C ) = min( exp(old_logp_t - engine_logp_t), C )

and the on-policy token loss becomes ``w_t * loss_t`` with ``w_t`` a constant (no gradient through it). The cap
bounds the variance that rare tokens with a tiny engine probability would otherwise bring. Shapes are per token
``[B, T]``; ``mask`` is 1 on real completion tokens.
"""

from __future__ import annotations

import torch


def tis_weights(train_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """``w_t = min(exp(train_logp_t - engine_logp_t), cap)``, detached (float32, same shape).

    ``train_logp``: log pi_old of the sampled tokens under the trainer's model; ``engine_logp``: the log-probs the
    rollout engine recorded while sampling them (same temperature). ``cap`` > 0 is ``C`` (TIS uses C = 2)."""
    if cap <= 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    log_ratio = (train_logp.detach() - engine_logp.detach()).float()
    return torch.exp(log_ratio).clamp(max=cap)


def mismatch_stats(train_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                   cap: float | None = None) -> dict[str, torch.Tensor]:
    """Masked token means (0-dim float32 tensors) measuring how far the engine is from the trainer:

    - ``abs_log_ratio``: mean ``|log pi_old - log pi_engine|``;
    - ``kl``: ``KL(pi_engine || pi_old)`` by the k3 estimator on the engine's samples,
      ``r - 1 - log r`` with ``r = pi_old / pi_engine`` (>= 0, unbiased; Schulman 2020);
    - ``kl_k1``: the plain estimator ``mean(log pi_engine - log pi_old)``;
    - with ``cap``: ``tis_weight`` (mean of :func:`tis_weights`) and ``tis_clip_frac`` (share of tokens at the cap).
    """
    m = mask.detach().float()
    n = m.sum().clamp_min(1.0)
    log_r = (train_logp.detach() - engine_logp.detach()).float()
    out = {
        "abs_log_ratio": (log_r.abs() * m).sum() / n,
        "kl": ((torch.exp(log_r) - 1.0 - log_r) * m).sum() / n,
        "kl_k1": (-log_r * m).sum() / n,
    }
    if cap is not None:
        w = tis_weights(train_logp, engine_logp, cap)
        out["tis_weight"] = (w * m).sum() / n
        out["tis_clip_frac"] = ((torch.exp(log_r) > cap).float() * m).sum() / n
    return out
