"""The group baseline of a mixed Critique-GRPO group taken over its on-policy samples only (pure function).

Critique-GRPO (arXiv:2506.03106) and LUFFY (arXiv:2504.14945) compute the group-relative advantage over the mixed
group: n on-policy samples plus k off-policy ones (refinements, injected demonstrations). With Dr.GRPO's
``A_i = R_i - mean_j R_j`` (arXiv:2503.20783) the off-policy samples then move the baseline of the on-policy ones:
in a group whose n samples are all wrong and whose one refinement is right, every wrong sample gets
``A = -1/(n+1)`` (plain GRPO: 0) and the refinement ``1 - 1/(n+1)``, so half of the group's |A| mass pushes down
the policy's one systematic wrong answer and only half pulls the right one up.

``onpolicy`` baseline::

    A'_i = A_i - mean_{j on-policy, unmasked} A_j          (every unmasked sample i of the group)

For ``dr_grpo`` this is exactly ``A'_i = R_i - mean_{j on-policy} R_j``: the on-policy advantages are plain GRPO's
(0 in an all-wrong group) and an off-policy sample's is its reward minus the on-policy mean (1 for a right
refinement in an all-wrong group), the baseline of a policy-gradient estimator built from the samples the policy
drew. For a std-normalised estimator (``grpo``) it is the same recentring, scaled by the mixed group's std.
"""

from __future__ import annotations

import torch

OFFPOLICY_BASELINES: tuple[str, ...] = ("mixed", "onpolicy")


def onpolicy_baseline(advantages: torch.Tensor, n_onpolicy: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Recentre mixed-group advantages ``[G, n + k]`` (the first ``n_onpolicy`` columns on-policy) on the mean of
    the unmasked on-policy ones; masked entries stay 0. A group with no unmasked on-policy sample is unchanged."""
    if advantages.dim() != 2:
        raise ValueError(f"advantages must be [G, n + k]; got shape {tuple(advantages.shape)}")
    if not 0 < n_onpolicy <= advantages.shape[1]:
        raise ValueError(f"n_onpolicy must be in 1..{advantages.shape[1]} (the group width); got {n_onpolicy}")
    mask = torch.ones_like(advantages, dtype=torch.bool) if mask is None else mask.bool()
    on = mask[:, :n_onpolicy].to(advantages.dtype)
    count = on.sum(-1, keepdim=True)
    mean_on = (advantages[:, :n_onpolicy] * on).sum(-1, keepdim=True) / count.clamp_min(1.0)
    return (advantages - mean_on) * mask.to(advantages.dtype)


__all__ = ["OFFPOLICY_BASELINES", "onpolicy_baseline"]
