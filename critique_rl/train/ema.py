"""A slowly moving copy of the policy, used as a stabilised self-teacher for directive distillation.

Self-distillation with the current policy as its own teacher chases a moving target: every update changes the
teacher too. SDPO (arXiv:2601.20802) stabilises the critique-conditioned teacher; here with an exponential moving
average of the policy weights (as in mean-teacher / BYOL-style targets):

    theta_teacher <- decay * theta_teacher + (1 - decay) * theta_policy      (after every optimizer step)
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class EmaTeacher:
    """An EMA copy of ``model`` (same device and dtype), frozen and in eval mode."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One EMA step towards ``model``'s current weights (parameters and buffers, matched by name)."""
        src = dict(model.named_parameters())
        for name, p in self.model.named_parameters():
            p.lerp_(src[name].detach().to(p.dtype), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
