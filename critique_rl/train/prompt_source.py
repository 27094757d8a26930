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

:class:`PromptSource` is a thin adapter: each call is a stage function over the step's frozen
:class:`~critique_rl.train.step_context.StepContext` (:mod:`~critique_rl.train.sample_stage`,
:mod:`~critique_rl.train.critique_stage`, :mod:`~critique_rl.train.log_stage`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

from critique_rl.train import critique_stage, log_stage, sample_stage, selection_stage
from critique_rl.train import distributed as dist
from critique_rl.train.rollout_batch import AdvantagePlan, CritiqueResult, RolloutBatch
from critique_rl.train.selection import SelectionState
from critique_rl.train.step_context import StepContext
from critique_rl.train.update import UpdateBatch


class RolloutSource(Protocol):
    """What the trainer asks of a source of rollouts (single-turn prompts or multi-turn episodes)."""

    kind: str

    def measure_pass_rates(self) -> tuple[dict[str, Any], SelectionState]:
        """``pass_rate_filter`` on the current pool (before RL and every ``refresh_every`` steps): the
        ``selection/pass_rate_*`` metrics and the new selection state (the trainer keeps it)."""
        ...

    def weight_update(self) -> AbstractContextManager[None]:
        """Held around every change of the policy's weights (each optimizer update, each SFT phase, the warm-up
        included): e.g. a policy server's engine lock, then a new policy version. Prompts and in-process
        episodes: nothing (``nullcontext()``)."""
        ...

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
    """Single-turn prompts over one step's context: the prompt draw, reward functions, gates, critic and memory
    hook it holds. ``selection`` is the run's data-selection state before the step (read, never changed: the
    trainer folds ``selection/samples`` into a new state); ``rollout_log`` is written on the main process;
    ``train_rows`` (the pool the pass-rate filter measures) and ``out`` (the run directory) serve
    :meth:`measure_pass_rates`."""

    kind = "prompts"

    def __init__(self, ctx: StepContext, selection: SelectionState, rollout_log: Any = None,
                 train_rows: list[dict[str, Any]] | None = None, out: Path | None = None) -> None:
        self.ctx = ctx
        self.selection = selection
        self.rollout_log = rollout_log
        self.train_rows = train_rows
        self.out = out

    def measure_pass_rates(self) -> tuple[dict[str, Any], SelectionState]:
        if self.train_rows is None or self.out is None:
            raise ValueError("PromptSource.measure_pass_rates needs train_rows and out (the trainer passes both)")
        return selection_stage.measure_pass_rates(self.ctx, self.train_rows, self.selection, self.out)

    def weight_update(self) -> AbstractContextManager[None]:
        return nullcontext()

    def collect(self, timer: Any) -> tuple[RolloutBatch, dict[str, Any]]:
        return sample_stage.collect(self.ctx, self.selection, timer)

    def critique_and_refine(self, batch: RolloutBatch) -> CritiqueResult | None:
        return critique_stage.critique_and_refine(self.ctx, batch)

    def advantages(self, batch: RolloutBatch, crit: CritiqueResult | None) -> AdvantagePlan:
        return critique_stage.advantages(self.ctx, batch, crit)

    def update_batch(self, batch: RolloutBatch, crit: CritiqueResult | None,
                     plan: AdvantagePlan) -> tuple[UpdateBatch | None, dict[str, Any]]:
        return critique_stage.update_batch(self.ctx, batch, crit, plan)

    def norm_constant(self) -> float:
        return float(self.ctx.fmt.max_new_tokens)

    def step_metrics(self, batch: RolloutBatch, crit: CritiqueResult | None, plan: AdvantagePlan,
                     local: dict[str, Any], selection: dict[str, Any]) -> dict[str, Any]:
        ctx = self.ctx
        metrics = log_stage.local_metrics(ctx, batch, crit, plan)
        metrics.update(local)
        metrics = dist.merge_metrics(dist.gather_objects(metrics))
        metrics.update(log_stage.global_metrics(ctx, batch, plan))
        metrics.update(selection)
        metrics.update(log_stage.memory_update(ctx, batch, crit))
        return metrics

    def log_rollouts(self, batch: RolloutBatch, plan: AdvantagePlan, crit: CritiqueResult | None) -> None:
        rows = log_stage.rollout_rows(self.ctx, batch, plan, crit)
        if self.ctx.is_main:
            for row in rows:
                self.rollout_log.write(row)
