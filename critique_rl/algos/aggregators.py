"""Multi-objective reward aggregation (pure tensor functions, string registry ``AGGREGATORS``).

Contract (every aggregator)::

    advantages, diagnostics = AGGREGATORS[name](rewards, weights, mask, **kwargs)

- ``rewards``: ``[G, n, K]`` float (G groups of n samples of one prompt, K objectives). ``NaN`` means
  "objective not applicable to this sample": it contributes nothing to that sample and is left out of the
  group statistics of that objective.
- ``weights``: ``[K]`` (``b_k``); ``None`` = all ones.
- ``mask``: ``[G, n]`` bool (False = not part of the group: gated out, padding); ``None`` = all True.
- returns **advantages** ``[G, n]`` (one scalar per sample, 0 where masked) -- the caller feeds them
  straight to the policy loss -- and a dict of diagnostics, each a tensor:

  - ``reward_mean`` / ``reward_std`` ``[K]``: per-objective mean / population std over valid, non-NaN
    samples of the whole batch (what to log per step);
  - ``effective_weight`` ``[K]``: the share of each objective in the advantage signal, averaged over the
    groups where any objective has spread (definitions per aggregator below; sums to 1, or all 0 when no
    group has any spread).

``weighted_sum`` is the only aggregator that applies a scalar base estimator (``dr_grpo``, ``grpo``,
``w_reinforce``, ... from :mod:`critique_rl.algos.advantages`) to the combined reward; ``gdpo`` and ``dvao``
are complete estimators themselves. Imports only torch (and the sibling pure-torch advantage module).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from critique_rl.algos.advantages import compute_advantages
from critique_rl.registry import Registry

Diagnostics = dict[str, torch.Tensor]
AggregatorFn = Callable[..., tuple[torch.Tensor, Diagnostics]]
AGGREGATORS: Registry[AggregatorFn] = Registry("reward aggregator", "reward_aggregator")


def register_aggregator(name: str) -> Callable[[AggregatorFn], AggregatorFn]:
    return AGGREGATORS.decorator(name)


def _prepare(
    rewards: torch.Tensor, weights: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes; return ``(rewards float, weights [K], mask [G, n] bool, valid [G, n, K] bool)``."""
    if rewards.dim() != 3:
        raise ValueError(f"rewards must be [G, n, K] (groups, samples, objectives); got shape {tuple(rewards.shape)}")
    g, n, k = rewards.shape
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    if weights is None:
        weights = torch.ones(k, dtype=rewards.dtype, device=rewards.device)
    weights = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    if weights.shape != (k,):
        raise ValueError(f"weights must have one entry per objective ({k}); got shape {tuple(weights.shape)}")
    if mask is None:
        mask = torch.ones(g, n, dtype=torch.bool, device=rewards.device)
    mask = mask.bool()
    if mask.shape != (g, n):
        raise ValueError(f"mask must be [G, n] = {(g, n)}; got shape {tuple(mask.shape)}")
    valid = mask.unsqueeze(-1) & ~torch.isnan(rewards)
    return rewards, weights, mask, valid


def _group_stats(
    rewards: torch.Tensor, valid: torch.Tensor, unbiased: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group and objective: mean and std over valid entries, shapes ``[G, 1, K]``.

    Population std (divide by count) unless ``unbiased``; groups with <2 valid entries get std 0.
    """
    v = valid.to(rewards.dtype)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    cnt = v.sum(1, keepdim=True)
    mu = r.sum(1, keepdim=True) / cnt.clamp_min(1.0)
    sq = (((r - mu) * v) ** 2).sum(1, keepdim=True)
    denom = (cnt - 1.0) if unbiased else cnt
    std = (sq / denom.clamp_min(1.0)).sqrt()
    std = torch.where(cnt >= 2, std, torch.zeros_like(std))
    return mu, std


def _batch_stats(rewards: torch.Tensor, valid: torch.Tensor) -> Diagnostics:
    flat_r = rewards.reshape(-1, rewards.shape[-1])
    flat_v = valid.reshape(-1, rewards.shape[-1])
    mu, std = _group_stats(flat_r.unsqueeze(0), flat_v.unsqueeze(0))
    return {"reward_mean": mu.reshape(-1), "reward_std": std.reshape(-1)}


def _effective_weights(share: torch.Tensor) -> torch.Tensor:
    """Average ``share`` ``[G, K]`` (unnormalised, >= 0) over groups with a positive total, normalised."""
    total = share.sum(-1, keepdim=True)
    live = total.squeeze(-1) > 1e-12
    if not bool(live.any()):
        return torch.zeros(share.shape[-1], dtype=share.dtype, device=share.device)
    return (share[live] / total[live]).mean(0)


@register_aggregator("weighted_sum")
def weighted_sum(
    rewards: torch.Tensor,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    estimator: str = "dr_grpo",
    **estimator_kwargs: object,
) -> tuple[torch.Tensor, Diagnostics]:
    """Weighted sum then a scalar estimator (the usual TRL/verl baseline).

    ``R_i = sum_k b_k r_ik`` (NaN objectives contribute 0, like TRL's ``nansum``; a sample whose objectives
    are all NaN gets ``R_i = 0``), then ``A = estimator(R, mask)`` with ``estimator`` any name from
    ``ADVANTAGE_ESTIMATORS`` (default ``dr_grpo``, arXiv:2503.20783; ``grpo``, arXiv:2402.03300;
    ``w_reinforce``, arXiv:2506.01347; ...). ``estimator_kwargs`` are passed through.

    Effective weight of objective k (its share of the combined signal in a group):
    ``|b_k| sigma_gk / sum_j |b_j| sigma_gj`` (population std per group), averaged over groups -- an
    objective with a large scale dominates, which is what ``dvao`` and ``gdpo`` correct.
    Extra diagnostic: ``combined_reward`` ``[G, n]``.
    """
    rewards, weights, mask, valid = _prepare(rewards, weights, mask)
    contrib = torch.where(valid, rewards * weights, torch.zeros_like(rewards))
    combined = contrib.sum(-1)
    adv = compute_advantages(estimator, combined, mask=mask, **estimator_kwargs)
    _, sigma = _group_stats(rewards, valid)
    diag = _batch_stats(rewards, valid)
    diag["effective_weight"] = _effective_weights(weights.abs() * sigma.squeeze(1))
    diag["combined_reward"] = combined * mask
    return adv * mask, diag


@register_aggregator("gdpo")
def gdpo(
    rewards: torch.Tensor,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    **_: object,
) -> tuple[torch.Tensor, Diagnostics]:
    """GDPO, group reward-decoupled normalisation (arXiv:2601.05242).

    1. per objective, z-score within the group: ``z_ik = (r_ik - mu_gk) / (sigma_gk + eps)``
       (unbiased std over the group's valid, non-NaN samples, as GRPO; NaN -> ``z = 0``);
    2. ``S_i = sum_k b_k z_ik``;
    3. batch whitening over all valid samples of all groups: ``A_i = (S_i - mean(S)) / (std(S) + eps)``.

    Normalising each reward before summing keeps distinct reward combinations distinct (summing first
    collapses e.g. ``(0,0) vs (1,1)`` and ``(0,0) vs (1,0)`` to the same group advantages).
    Effective weight of k in a group: ``|b_k| 1[sigma_gk > 0] / sum_j |b_j| 1[sigma_gj > 0]``.
    """
    rewards, weights, mask, valid = _prepare(rewards, weights, mask)
    mu, sigma = _group_stats(rewards, valid, unbiased=True)
    z = torch.where(valid, (rewards - mu) / (sigma + eps), torch.zeros_like(rewards))
    s = (z * weights).sum(-1)
    m = mask.to(s.dtype)
    cnt = m.sum().clamp_min(1.0)
    mean = (s * m).sum() / cnt
    var = (((s - mean) * m) ** 2).sum() / (cnt - 1.0).clamp_min(1.0)
    adv = (s - mean) / (var.sqrt() + eps) * m
    diag = _batch_stats(rewards, valid)
    diag["effective_weight"] = _effective_weights(weights.abs() * (sigma.squeeze(1) > eps).to(s.dtype))
    return adv, diag


@register_aggregator("dvao")
def dvao(
    rewards: torch.Tensor,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    **_: object,
) -> tuple[torch.Tensor, Diagnostics]:
    """DVAO, dispersion-weighted multi-objective advantages (arXiv:2605.25604).

    ``A_i = sum_k b_k (r_ik - mu_gk) / sum_k |b_k| sigma_gk`` with ``mu_gk``, ``sigma_gk`` the population
    mean / std of objective k over the group's valid, non-NaN samples (NaN entries contribute 0).
    ``A_i = 0`` for the whole group when the denominator is ``<= eps`` (no objective has spread).

    Equivalently ``A_i = sum_k w_gk z_ik`` with ``z_ik = (r_ik - mu_gk) / sigma_gk`` and effective weight
    ``w_gk = |b_k| sigma_gk / sum_j |b_j| sigma_gj``: weights follow the signal, an objective with no spread
    in a group gets no say, and (convex combination of unit-RMS z-scores) the group RMS of ``A`` is <= 1.
    For ``b_k >= 0`` this is the paper's formula; ``|b_k|`` in the denominator lets a negative weight flip an
    objective's direction without breaking the bound.
    """
    rewards, weights, mask, valid = _prepare(rewards, weights, mask)
    mu, sigma = _group_stats(rewards, valid, unbiased=False)
    dev = torch.where(valid, rewards - mu, torch.zeros_like(rewards))
    num = (dev * weights).sum(-1)  # [G, n]
    den = (weights.abs() * sigma).sum(-1)  # [G, 1]
    ok = den > eps
    adv = torch.where(ok, num / den.clamp_min(eps), torch.zeros_like(num)) * mask
    diag = _batch_stats(rewards, valid)
    diag["effective_weight"] = _effective_weights(weights.abs() * sigma.squeeze(1))
    return adv, diag


def aggregate_rewards(
    name: str,
    rewards: torch.Tensor,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, Diagnostics]:
    """Look up aggregator ``name`` and apply it: ``[G, n, K]`` rewards -> ``([G, n] advantages, diagnostics)``."""
    if name not in AGGREGATORS:
        raise KeyError(f"unknown reward aggregator '{name}'; known: {sorted(AGGREGATORS)}")
    return AGGREGATORS[name](rewards, weights, mask, **kwargs)
