"""The difficulty filters on episodes: the pure decisions of :mod:`critique_rl.train.selection`, fed with episodes.

- **Dynamic sampling** (``dynamic_sampling``, DAPO): groups of ``n`` episodes whose returns are all equal are
  dropped and further tasks drawn (:func:`fill_episodes`, over :func:`selection.dynamic_fill`).
- **Pass-rate filter** (``pass_rate_filter``): each task of the pool (or a seeded sample of ``max_prompts``)
  plays ``samples`` episodes; tasks whose success rate is ``<= too_hard_at_most`` or ``>= too_easy_at_least``
  leave the pool (:func:`measure_pass_rates`). Measured before RL on the pool RL starts with, every
  ``refresh_every`` steps, and when an rl phase with its own tasks (``phases[i].task_kwargs``) starts.
- **Low-variance filter** (``low_variance_filter``, DRO): groups whose return std is below ``min_std``, and the
  ``drop_fraction`` of the step's groups with the lowest std, get no gradient (:func:`low_variance_groups`).

Every decision is taken on statistics gathered over the processes, so all ranks agree; what the pass-rate filter
measured is written (main process) to ``selection/pass_rates_stepNNNNNN.jsonl`` as on single-turn prompts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from critique_rl.train import distributed as dist
from critique_rl.train import selection
from critique_rl.train.rollout_batch import RolloutBatch
from critique_rl.train.run_setup import cfg_bs, console

if TYPE_CHECKING:
    from critique_rl.agents.episode_phases import EpisodePool
    from critique_rl.agents.source import EpisodeSource
    from critique_rl.train.sampler import PromptSampler
    from critique_rl.train.selection import SelectionState


def attach_episodes(batch: RolloutBatch, parts: Sequence[RolloutBatch]) -> RolloutBatch:
    """``batch`` (groups picked from ``parts`` by :func:`selection.select_groups` / :func:`selection.concat_batches`,
    which carry the single-turn fields) with each row's episode and action mask, found through its
    :class:`~critique_rl.rollout.base.Completion` object (one per episode, kept by identity through the selection)."""
    by_id: dict[int, tuple[Any, list[bool]]] = {}
    for p in parts:
        for c, x, m in zip(p.completions, p.episodes or [], p.action_masks or [], strict=True):
            by_id[id(c)] = (x, m)
    rows = [by_id[id(c)] for c in batch.completions]
    return replace(batch, episodes=[r[0] for r in rows], action_masks=[r[1] for r in rows])


def fill_episodes(first: RolloutBatch, draw: Callable[[], RolloutBatch], max_refill_batches: int,
                  enabled: bool) -> selection.FillResult:
    """DAPO dynamic sampling over this process's groups of episodes (:func:`selection.dynamic_fill`): groups with
    equal returns are dropped and refilled from further draws; the batch keeps its episodes."""
    parts = [first]

    def drawn() -> RolloutBatch:
        part = draw()
        parts.append(part)
        return part

    fill = selection.dynamic_fill(first, drawn, max_refill_batches, dist.all_reduce_sum, enabled=enabled)
    return replace(fill, batch=attach_episodes(fill.batch, parts) if fill.batch is not first else first)


def fill_metrics(fill: selection.FillResult, samples_total: int, dynamic: bool,
                 pool_size: int | None) -> dict[str, Any]:
    """The step's selection metrics, under the single-turn path's names."""
    out: dict[str, Any] = {"train/zero_spread_groups": fill.first_zero_spread, "selection/samples": fill.samples,
                           "selection/samples_total": samples_total}
    if dynamic:
        out.update({"selection/refills": fill.refills, "selection/zero_spread_dropped": fill.dropped,
                    "selection/zero_spread_padded": fill.padded})
    if pool_size is not None:
        out["selection/pool_size"] = pool_size
    return out


def low_variance_groups(returns: torch.Tensor, group_size: int, min_std: float, drop_fraction: float,
                        rank: int) -> tuple[torch.Tensor, int]:
    """DRO's filter on this process's groups: ``(drop [G] bool, groups dropped over all processes)``. The return
    std of every group is gathered, so ``drop_fraction`` counts the step's groups of all processes."""
    std = selection.group_reward_std(returns, torch.ones(returns.shape[-1]), group_size)
    drop_all = selection.low_variance_drop(dist.gather_tensor(std), min_std, drop_fraction)
    G = std.numel()
    return drop_all[rank * G:(rank + 1) * G], int(drop_all.sum())


def measure_pass_rates(src: EpisodeSource, pool: EpisodePool,
                       sampler: PromptSampler) -> tuple[dict[str, Any], SelectionState]:
    """``pass_rate_filter`` on ``pool``: ``samples`` episodes per measured task (processes measure disjoint shares,
    the rates are gathered), then too hard / too easy tasks leave ``sampler``'s pool, unless fewer than one batch
    of tasks would remain (then a warning and the pool as it was). ``src`` is the source's view for the step
    (:meth:`EpisodeSource.for_step`). Returns ``selection/pass_rate_*`` metrics and the step's selection state with
    them (a new frozen state; the caller keeps it)."""
    cfg, pf, ctx, run = src.cfg, src.cfg.pass_rate_filter, src.ctx, src.run_info
    t0 = time.perf_counter()
    tasks = pool.tasks
    measured = selection.measured_indices(len(tasks), pf.max_prompts, cfg.seed)
    mine = measured[run.rank::run.world]
    rates: dict[int, float] = {}
    chunk = max(1, cfg_bs(cfg) // pf.samples)
    for s in range(0, len(mine), chunk):
        idx = mine[s:s + chunk]
        trajs = src.run_groups(ctx.engine, [tasks[i] for i in idx], pf.samples, keys=idx, purpose="pass_rate",
                               step=ctx.step, env_kwargs=pool.env_kwargs)
        for j, i in enumerate(idx):
            rates[i] = sum(x.success for x in trajs[j * pf.samples:(j + 1) * pf.samples]) / pf.samples
    rates = {i: r for part in dist.gather_objects(rates) for i, r in part.items()}
    hard, easy = selection.pass_rate_exclusions(rates, pf.too_hard_at_most, pf.too_easy_at_least)
    total = len(tasks)
    applied = sampler.can_exclude(hard | easy, cfg.prompts_per_step)
    if applied:
        sampler.exclude(hard | easy)
    elif run.is_main:
        console.print(f"[bold yellow]warning: pass_rate_filter would leave {total - len(hard | easy)} of {total} "
                      f"tasks ({len(hard)} too hard, {len(easy)} too easy), fewer than one batch "
                      f"({cfg.prompts_per_step}); the pool is left as it was[/]", soft_wrap=True)
    if run.is_main:  # what the filter removed, task by task (rewritten if a resumed run measures again)
        folder = run.out / "selection"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"pass_rates_step{ctx.step:06d}.jsonl", "w") as fh:
            for i in sorted(rates):
                reason = "too_hard" if i in hard else "too_easy" if i in easy else None
                fh.write(json.dumps({"index": i, "prompt": tasks[i].get("prompt"), "pool": pool.key or "run",
                                     "pass_rate": rates[i], "dropped": reason if applied else None}) + "\n")
    info = {"selection/pass_rate_measured": len(rates),
            "selection/pass_rate_mean": sum(rates.values()) / max(1, len(rates)),
            "selection/pass_rate_too_hard": len(hard), "selection/pass_rate_too_easy": len(easy),
            "selection/pass_rate_applied": int(applied), "selection/pool_size": total - len(sampler.excluded),
            "selection/pass_rate_samples": len(measured) * pf.samples, "time/pass_rate": time.perf_counter() - t0}
    return info, replace(ctx.selection, samples_total=ctx.selection.samples_total + len(measured) * pf.samples,
                         pass_rate=info)
