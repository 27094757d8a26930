"""The sample and score stages of a single-turn step: this process's shard of the global prompt batch (with its
memory contexts), ``n`` completions per prompt from the rollout engine, their rewards, gates and correctness as a
:class:`RolloutBatch`, and dynamic sampling's refills. Functions of a :class:`StepContext`; none changes its
inputs (the selection state comes back as metrics the trainer folds into a new state)."""

from __future__ import annotations

from typing import Any

from critique_rl.rollout.base import Completion, SamplingParams
from critique_rl.train import distributed as dist
from critique_rl.train import selection
from critique_rl.train.rollout_batch import RolloutBatch
from critique_rl.train.run_setup import _Timer
from critique_rl.train.selection import SelectionState
from critique_rl.train.step_context import StepContext


def next_prompts(ctx: StepContext) -> tuple[list[dict[str, Any]], list[str] | None]:
    """This process's shard of the global prompt batch, and the memory context of each (or None)."""
    rows = ctx.draw.next_rows(ctx.cfg.prompts_per_step)
    contexts = None
    if ctx.memory_on:
        contexts = dist.broadcast_object(ctx.memory_hook.contexts(rows) if ctx.is_main else None)
        contexts = dist.shard(contexts, ctx.rank, ctx.world)
    return dist.shard(rows, ctx.rank, ctx.world), contexts


def sample_groups(ctx: StepContext, rows: list[dict[str, Any]],
                  contexts: list[str] | None) -> tuple[list[dict[str, Any]], list[str], list[Completion]]:
    """Sample n completions per prompt. Returns flat ``(rows, prompts, completions)`` of length B*n."""
    cfg = ctx.cfg
    prompts = [ctx.fmt.text(r, contexts[i] if contexts else None) for i, r in enumerate(rows)]
    params = SamplingParams(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=ctx.fmt.max_new_tokens)
    groups = ctx.engine.generate(prompts, params)
    n = cfg.num_generations
    return ([r for r in rows for _ in range(n)], [p for p in prompts for _ in range(n)],
            [c for g in groups for c in g])


def score_batch(ctx: StepContext, rows: list[dict[str, Any]], prompts: list[str],
                completions: list[Completion]) -> RolloutBatch:
    """The sampled completions with their rewards, gate mask, gate rates and correctness."""
    R, passed, rates = ctx.scorer.score(rows, completions, ctx.step)
    correct = ctx.scorer.correct(rows, completions, ctx.step)
    return RolloutBatch(rows=rows, prompts=prompts, completions=completions, group_size=ctx.cfg.num_generations,
                        rewards=R, passed=passed, correct=correct, gate_rates=rates)


def draw_batch(ctx: StepContext, timer: _Timer) -> RolloutBatch:
    """Draw this process's prompts (global batch, sharded), sample n completions each and score them."""
    with timer("generate"):
        rows, contexts = next_prompts(ctx)
        sampled = sample_groups(ctx, rows, contexts)
    with timer("score"):
        return score_batch(ctx, *sampled)


def collect(ctx: StepContext, state: SelectionState, timer: _Timer) -> tuple[RolloutBatch, dict[str, Any]]:
    """The step's batch: one draw, or (``dynamic_sampling``) zero-spread groups dropped and refilled
    (:func:`selection.dynamic_fill`), and the data-selection metrics (``selection/samples``: completions sampled
    by all processes for this step, refills included; ``selection/samples_total``: with ``state``'s count). Logs
    the zero-spread share of the first draw either way."""
    ds = ctx.cfg.dynamic_sampling
    fill = selection.dynamic_fill(draw_batch(ctx, timer), lambda: draw_batch(ctx, timer),
                                  ds.max_refill_batches, dist.all_reduce_sum, enabled=ds.enabled)
    out: dict[str, Any] = {"train/zero_spread_groups": fill.first_zero_spread,
                           "selection/samples": fill.samples,
                           "selection/samples_total": state.samples_total + fill.samples}
    if ds.enabled:
        out.update({"selection/refills": fill.refills, "selection/zero_spread_dropped": fill.dropped,
                    "selection/zero_spread_padded": fill.padded})
    if ctx.cfg.pass_rate_filter.enabled:
        out["selection/pool_size"] = len(ctx.draw.pool.rows) - len(ctx.draw.pool.excluded)
    return fill.batch, out
