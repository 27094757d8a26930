"""Single-turn prompts as a rollout source of the one trainer: ``n`` completions per prompt, critiques and
refinements from the refine template (Critique-GRPO), the mixed groups' advantages and the update batch under the
plain prompt.

:class:`PromptSource` and :class:`~critique_rl.agents.source.EpisodeSource` answer the same calls
(:class:`RolloutSource`), so :meth:`CritiqueGRPOTrainer._step` runs either::

    batch, selection = source.collect(timer)      # RolloutBatch (this process's shard) + data-selection metrics
    crit = source.critique_and_refine(batch)      # critiques and refinements, or None
    plan = source.advantages(batch, crit)         # AdvantagePlan over the mixed groups
    ub, extra = source.update_batch(batch, crit, plan)   # UpdateBatch (None: nothing to learn from)
    (the trainer's policy update, weight sync, EMA teacher)
    metrics = source.step_metrics(batch, crit, plan, local, selection)   # merged over processes
    source.log_rollouts(batch, plan, crit)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from critique_rl.train import distributed as dist
from critique_rl.train.rollout_batch import AdvantagePlan, CritiqueResult, RolloutBatch
from critique_rl.train.update import UpdateBatch

if TYPE_CHECKING:
    from critique_rl.train.trainer import CritiqueGRPOTrainer


class RolloutSource(Protocol):
    """What the trainer asks of a source of rollouts (single-turn prompts or multi-turn episodes)."""

    kind: str

    def collect(self, timer: Any) -> tuple[RolloutBatch, dict[str, Any]]: ...

    def critique_and_refine(self, batch: RolloutBatch) -> Any: ...

    def advantages(self, batch: RolloutBatch, crit: Any) -> AdvantagePlan: ...

    def update_batch(self, batch: RolloutBatch, crit: Any,
                     plan: AdvantagePlan) -> tuple[UpdateBatch | None, dict[str, Any]]: ...

    def norm_constant(self) -> float: ...

    def step_metrics(self, batch: RolloutBatch, crit: Any, plan: AdvantagePlan, local: dict[str, Any],
                     selection: dict[str, Any]) -> dict[str, Any]: ...

    def log_rollouts(self, batch: RolloutBatch, plan: AdvantagePlan, crit: Any) -> None: ...


class PromptSource:
    """Single-turn prompts: the trainer's prompt sampler, reward functions, gates, critic and memory hook."""

    kind = "prompts"

    def __init__(self, trainer: CritiqueGRPOTrainer) -> None:
        self.t = trainer

    def collect(self, timer: Any) -> tuple[RolloutBatch, dict[str, Any]]:
        return self.t._collect_batch(timer)

    def critique_and_refine(self, batch: RolloutBatch) -> CritiqueResult | None:
        return self.t._critique_and_refine(batch) if self.t._refines else None

    def advantages(self, batch: RolloutBatch, crit: CritiqueResult | None) -> AdvantagePlan:
        return self.t._advantages(batch, crit)

    def update_batch(self, batch: RolloutBatch, crit: CritiqueResult | None,
                     plan: AdvantagePlan) -> tuple[UpdateBatch | None, dict[str, Any]]:
        return self.t._update_batch(batch, crit, plan)

    def norm_constant(self) -> float:
        return float(self.t.max_new_tokens)

    def step_metrics(self, batch: RolloutBatch, crit: CritiqueResult | None, plan: AdvantagePlan,
                     local: dict[str, Any], selection: dict[str, Any]) -> dict[str, Any]:
        t = self.t
        metrics = t._metrics(batch, crit, plan)
        metrics.update(local)
        metrics = dist.merge_metrics(dist.gather_objects(metrics))
        metrics.update(t._global_metrics(batch, plan))
        metrics.update(selection)
        metrics.update(t._memory_update(batch, crit))
        return metrics

    def log_rollouts(self, batch: RolloutBatch, plan: AdvantagePlan, crit: CritiqueResult | None) -> None:
        self.t._log_rollouts(batch, plan, crit)
