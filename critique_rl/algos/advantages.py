"""Group-relative advantage estimators (pure functions, string registry).

Every estimator takes ``rewards`` of shape ``[G, n]`` (G groups of n samples of the same prompt; a mixed
Critique-GRPO group is just a wider row) and an optional boolean ``mask`` of the same shape (False = the
sample is not part of the group, e.g. gated out or padding) and returns advantages ``[G, n]``, zero where
masked.

Estimators: ``dr_grpo`` (default), ``grpo``, and the sign-based negative-sample-weighting family of
arXiv:2506.01347 (``w_reinforce``, ``psr``, ``nsr``), which classify a sample as correct when its reward is
``> reward_threshold`` (default 0.5). Extra keyword arguments an estimator does not use are ignored, so a
caller may pass ``w_lambda=..., reward_threshold=...`` to any of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from critique_rl.registry import Registry

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator", "advantage_estimator")


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    return ADVANTAGE_ESTIMATORS.decorator(name)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)


def _masked_std(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    m = mask.to(x.dtype)
    cnt = m.sum(-1, keepdim=True)
    mean = _masked_mean(x, mask)
    var = (((x - mean) * m) ** 2).sum(-1, keepdim=True) / (cnt - (1.0 if unbiased else 0.0)).clamp_min(1.0)
    return var.sqrt()


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
    """Dr.GRPO (arXiv:2503.20783): ``A_i = R_i - mean_j R_j`` over the group; no std normalisation.

    Dropping the std removes the question-difficulty bias of GRPO (groups with tiny spread get huge
    advantages). Length normalisation is removed separately by the ``token_sum_norm`` loss aggregation.
    """
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask
    return (rewards - _masked_mean(rewards, mask)) * mask


@register_advantage("grpo")
def grpo_advantages(
    rewards: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-6, **_: object
) -> torch.Tensor:
    """GRPO (DeepSeekMath, arXiv:2402.03300): ``A_i = (R_i - mean_j R_j) / (std_j R_j + eps)``.

    ``std`` is the unbiased sample standard deviation of the group (as in TRL / verl).
    """
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask
    return (rewards - _masked_mean(rewards, mask)) / (_masked_std(rewards, mask) + eps) * mask


def _correct(rewards: torch.Tensor, mask: torch.Tensor | None, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(correct, valid)`` boolean ``[G, n]``: valid = in the mask and the reward is not NaN."""
    valid = ~torch.isnan(rewards)
    if mask is not None:
        valid = valid & mask.bool()
    return (rewards > threshold) & valid, valid


@register_advantage("w_reinforce")
def w_reinforce_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    w_lambda: float = 0.1,
    reward_threshold: float = 0.5,
    **_: object,
) -> torch.Tensor:
    """Weighted REINFORCE (Zhu et al., "The Surprising Effectiveness of Negative Reinforcement in LLM
    Reasoning", arXiv:2506.01347): ``A_i = +lambda`` if ``R_i > threshold`` (correct), ``-1`` otherwise.

    The objective is ``lambda * L_PSR + L_NSR``: positive samples are down-weighted (``lambda = 0.1`` in the
    paper), which keeps probability mass on alternative answers and preserves pass@k. No group baseline:
    the advantage depends only on the sample's own reward. Zero where masked or the reward is NaN.
    """
    correct, valid = _correct(rewards, mask, reward_threshold)
    pos = torch.full_like(rewards, float(w_lambda))
    neg = torch.full_like(rewards, -1.0)
    return torch.where(correct, pos, neg) * valid


@register_advantage("psr")
def psr_advantages(
    rewards: torch.Tensor, mask: torch.Tensor | None = None, reward_threshold: float = 0.5, **_: object
) -> torch.Tensor:
    """Positive Sample Reinforcement (arXiv:2506.01347): ``A_i = 1[R_i > threshold]`` (+1 correct, 0 wrong).

    Only correct samples are reinforced; the paper finds this sharpens pass@1 but hurts pass@k.
    """
    correct, _valid = _correct(rewards, mask, reward_threshold)
    return correct.to(rewards.dtype)


@register_advantage("nsr")
def nsr_advantages(
    rewards: torch.Tensor, mask: torch.Tensor | None = None, reward_threshold: float = 0.5, **_: object
) -> torch.Tensor:
    """Negative Sample Reinforcement (arXiv:2506.01347): ``A_i = -1[R_i <= threshold]`` (-1 wrong, 0 correct).

    Only wrong samples are pushed down, redistributing their mass over the model's other candidates.
    """
    correct, valid = _correct(rewards, mask, reward_threshold)
    return -(valid & ~correct).to(rewards.dtype)


def compute_advantages(
    name: str, rewards: torch.Tensor, mask: torch.Tensor | None = None, **kwargs: object
) -> torch.Tensor:
    """Look up estimator ``name`` in the registry and apply it to ``rewards`` ``[G, n]``."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise KeyError(f"unknown advantage estimator '{name}'; known: {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name](rewards, mask=mask, **kwargs)
