"""Rubric gates as hard accept/reject (DRO, arXiv:2506.13351) -- pure tensor function."""

from __future__ import annotations

import torch


def apply_gates(mask: torch.Tensor, passed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine a group mask ``[G, n]`` with gate results ``passed`` ``[G, n]`` (both bool).

    ``mask'_i = mask_i AND passed_i``: a gated-out rollout is removed from its group, so it gets no
    gradient and does not enter the group baseline (compute advantages with ``mask'``).
    ``group_kept_g = any_i mask'_gi``: a group with no passing rollout is dropped (all of ``mask'_g`` is
    already False; the caller may also skip it when counting prompts / logging).

    Returns ``(mask' [G, n] bool, group_kept [G] bool)``.
    """
    if mask.shape != passed.shape:
        raise ValueError(f"mask {tuple(mask.shape)} and passed {tuple(passed.shape)} must have the same [G, n] shape")
    new_mask = mask.bool() & passed.bool()
    return new_mask, new_mask.any(-1)
