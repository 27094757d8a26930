"""Typed values that travel between the stages of one RL step.

``sample`` -> :class:`RolloutBatch` -> ``critique_and_refine`` -> :class:`CritiqueResult` -> ``advantages``
-> :class:`AdvantagePlan` -> ``update`` (an :class:`~critique_rl.train.update.UpdateBatch`). Stages return new
values; none mutates another's. Rows are flat (``N = G * n``) with the ``n`` samples of a prompt contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from critique_rl.critics.base import Critique
from critique_rl.rollout.base import Completion


@dataclass(frozen=True)
class RolloutBatch:
    """``n`` sampled completions per prompt, scored.

    ``rows``/``prompts``/``completions``/``correct`` have length ``N = G * n``; ``prompts`` are the exact texts
    the policy was conditioned on (memory context and chat template included); ``rewards`` is ``[N, K]``
    (NaN = objective not applicable) and ``passed`` the rubric-gate mask ``[N]``.
    """

    rows: list[dict[str, Any]]
    prompts: list[str]
    completions: list[Completion]
    group_size: int
    rewards: torch.Tensor
    passed: torch.Tensor
    correct: list[bool]
    gate_rates: dict[str, float] = field(default_factory=dict)
    action_masks: list[list[bool]] | None = None
    """Multi-turn episodes (critique_rl.agents): per row, True on the policy's action tokens of
    ``completions[i].token_ids`` and False on observation tokens (masked out of every loss). None: single-turn."""
    episodes: list[Any] | None = None
    """Multi-turn episodes: the :class:`~critique_rl.agents.trajectory.Trajectory` of each row. None: single-turn."""

    @property
    def num_groups(self) -> int:
        return len(self.rows) // self.group_size

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]

    def grouped_correct(self) -> torch.Tensor:
        """``[G, n]`` float: 1.0 where the sample is correct."""
        return torch.tensor(self.correct, dtype=torch.float32).view(self.num_groups, self.group_size)


@dataclass(frozen=True)
class CritiqueResult:
    """Critiques of the selected responses and the refinements sampled from them (Critique-GRPO).

    ``idx`` indexes the critiqued rows of the :class:`RolloutBatch`; ``teacher_prompts[j]`` is the formatted
    refinement prompt of ``idx[j]`` (also the directive-distillation teacher context). ``ref_src`` lists the
    rows that were refined, ``ref_completions``/``ref_rewards``/``ref_passed``/``ref_correct`` are aligned
    with it.
    """

    idx: list[int]
    critiques: list[Critique]
    teacher_prompts: list[str]
    ref_src: list[int]
    ref_completions: list[Completion]
    ref_rewards: torch.Tensor
    ref_passed: torch.Tensor
    ref_correct: list[bool]

    def critique_text_per_row(self, num_rows: int) -> list[str | None]:
        out: list[str | None] = [None] * num_rows
        for i, c in zip(self.idx, self.critiques, strict=True):
            out[i] = c.text
        return out


@dataclass(frozen=True)
class AdvantagePlan:
    """Advantages over the mixed groups (``n`` initial samples + ``k`` refinement slots).

    ``advantages``/``mask`` are ``[G, n + k]`` (mask False: gated out, empty slot, dropped group); ``kept``
    lists ``(group, slot, j)`` for each refinement placed in slot ``slot`` of group ``group``, ``j`` indexing
    :attr:`CritiqueResult.ref_src`. ``diagnostics`` come from the aggregator.
    """

    advantages: torch.Tensor
    mask: torch.Tensor
    kept: list[tuple[int, int, int]]
    diagnostics: dict[str, Any]
