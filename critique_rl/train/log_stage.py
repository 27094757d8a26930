"""The log stage of a single-turn step and the run's records: per-step metrics (this process's, then the
statistics over every process's samples), the memory bank's update, the rollouts.jsonl rows, the critic failure
watch and the run totals. Functions of a :class:`StepContext` (or of plain values); none changes its inputs.
Writing is the caller's, on the main process."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from critique_rl.errors import UserError
from critique_rl.train import distributed as dist
from critique_rl.train import task_mix
from critique_rl.train.metrics import read_jsonl
from critique_rl.train.rollout_batch import AdvantagePlan, CritiqueResult, RolloutBatch
from critique_rl.train.run_setup import CRITIC_MIN_REQUESTS, console
from critique_rl.train.step_context import StepContext


def local_metrics(ctx: StepContext, batch: RolloutBatch, crit: CritiqueResult | None,
                  plan: AdvantagePlan) -> dict[str, Any]:
    """This process's per-step metrics (merged over processes by :func:`dist.merge_metrics`)."""
    metrics: dict[str, Any] = {"step": ctx.step + 1}
    for gname, rate in batch.gate_rates.items():
        metrics[f"gate/{gname}/pass_rate"] = rate
    metrics["completions/mean_length"] = float(np.mean([len(c.token_ids) for c in batch.completions]))
    metrics["completions/finished"] = float(np.mean([c.finished for c in batch.completions]))
    if crit is not None:
        all_wrong = batch.grouped_correct().sum(-1) == 0
        rescued = {g for g, _, j in plan.kept if crit.ref_correct[j] and bool(all_wrong[g])}
        metrics["critique/critiqued"] = len(crit.idx)
        metrics["critique/refinements"] = len(crit.ref_src)
        metrics["critique/refine_success_rate"] = float(np.mean(crit.ref_correct)) if crit.ref_src else None
        metrics["critique/kept"] = len(plan.kept)
        metrics["critique/groups_rescued"] = len(rescued)
        metrics["critique/all_wrong_groups"] = int(all_wrong.sum())
        metrics["critique/fallbacks"] = sum(c.fallback for c in crit.critiques)
    if ctx.critic is not None:
        metrics.update({k: v for k, v in ctx.critic.metrics().items() if isinstance(v, (int, float))})
    return metrics


def global_metrics(ctx: StepContext, batch: RolloutBatch, plan: AdvantagePlan) -> dict[str, Any]:
    """Reward and accuracy statistics over the samples of every process (gathered, not averaged)."""
    R = dist.gather_tensor(batch.rewards)
    grouped = dist.gather_tensor(batch.grouped_correct())
    diag = plan.diagnostics
    n = batch.group_size
    weights = ctx.scorer.weights
    out: dict[str, Any] = {}
    for k, name in enumerate(ctx.scorer.names):
        valid = R[:, k][~torch.isnan(R[:, k])]
        out[f"reward/{name}/mean"] = valid.mean().item() if len(valid) else None
        out[f"reward/{name}/std"] = valid.std(unbiased=False).item() if len(valid) else None
        out[f"reward/{name}/weight"] = float(diag["effective_weight"][k])
    out["gate/groups_kept"] = diag["groups_kept"]
    if "low_variance_dropped" in diag:
        out["selection/low_variance_dropped"] = diag["low_variance_dropped"]
    out["reward/mean"] = (torch.nan_to_num(R, nan=0.0) * weights).sum(-1).mean().item()
    out["train/accuracy"] = grouped.mean().item()
    out["train/all_wrong_groups"] = (grouped.sum(-1) == 0).float().mean().item()
    out["train/all_right_groups"] = (grouped.sum(-1) == n).float().mean().item()
    if any("task" in r for r in batch.rows):  # several tasks: accuracy, reward and share of each
        names = [t for part in dist.gather_objects([r.get("task") for r in batch.rows]) for t in part]
        weighted = (torch.nan_to_num(R, nan=0.0) * weights).sum(-1)
        out.update(task_mix.per_task_metrics(names, grouped.reshape(-1).tolist(), weighted.tolist()))
    return out


def memory_update(ctx: StepContext, batch: RolloutBatch, crit: CritiqueResult | None) -> dict[str, Any]:
    """Record and credit on the main process, from the samples of every process (in rank order)."""
    if not ctx.memory_on:
        return {}
    crit_text = crit.critique_text_per_row(len(batch.rows)) if crit is not None else [None] * len(batch.rows)
    parts = dist.gather_objects((batch.rows, batch.texts, batch.correct, crit_text))
    metrics = {}
    if ctx.is_main:
        rows, texts, correct, crits = ([x for p in parts for x in p[i]] for i in range(4))
        metrics = ctx.memory_hook.update(rows, texts, correct, crits, ctx.step + 1, batch.group_size)
    return dist.broadcast_object(metrics)


def rollout_rows(ctx: StepContext, batch: RolloutBatch, plan: AdvantagePlan,
                 crit: CritiqueResult | None) -> list[dict[str, Any]]:
    """The rollouts.jsonl rows of every process (rank order): the first ``log_rollouts`` rows, plus critiqued
    ones so refinements are visible."""
    n = batch.group_size
    adv = plan.advantages[:, :n].reshape(-1)
    crit_at: dict[int, int] = {i: j for j, i in enumerate(crit.idx)} if crit else {}
    ref_at: dict[int, int] = {i: j for j, i in enumerate(crit.ref_src)} if crit else {}
    chosen = list(range(min(ctx.cfg.log_rollouts, len(batch.completions))))
    chosen += [i for i in list(crit_at)[: ctx.cfg.log_rollouts] if i not in chosen]
    names = ctx.scorer.names
    out = []
    for i in chosen:
        row = {
            "step": ctx.step + 1,
            "prompt": batch.rows[i]["prompt"],
            "answer": batch.rows[i]["answer"],
            "completion": batch.completions[i].text,
            "rewards": dict(zip(names, [None if math.isnan(v) else v for v in batch.rewards[i].tolist()],
                                strict=True)),
            "advantage": adv[i].item(),
        }
        if ctx.world > 1:
            row["rank"] = ctx.rank
        if i in crit_at:
            row["critique"] = crit.critiques[crit_at[i]].text  # type: ignore[union-attr]
        if i in ref_at:
            j = ref_at[i]
            row["refinement"] = crit.ref_completions[j].text  # type: ignore[union-attr]
            row["refinement_rewards"] = dict(zip(
                names, [None if math.isnan(v) else v for v in crit.ref_rewards[j].tolist()],  # type: ignore[union-attr]
                strict=True))
        out.append(row)
    return [row for part in dist.gather_objects(out) for row in part]


@dataclass(frozen=True)
class CriticWatch:
    """Failed critic requests seen so far (the count the last warning reported)."""

    errors_seen: float = 0.0


def check_critic(watch: CriticWatch, metrics: dict[str, Any], critic: Any, cfg: Any, step: int,
                 is_main: bool) -> CriticWatch:
    """Warn about failed critic requests (they fell back to rule critiques) and stop the run once more than
    ``critic.max_failure_share`` of them failed. ``critic/*`` counters are summed over processes, so every
    rank takes the same decision. Returns the new watch."""
    requests, errors = metrics.get("critic/requests") or 0.0, metrics.get("critic/errors") or 0.0
    where = getattr(critic, "url", None) or cfg.critic.model or cfg.critic.backend
    last = getattr(critic, "last_error", None)
    detail = f"; last error: {last}" if last else ""
    seen = watch.errors_seen
    # warn at the first failures, then (while more fail) every 10 steps and at the last step
    if errors > seen and (seen == 0 or step % 10 == 0 or step >= cfg.max_steps):
        if is_main:
            console.print(f"[bold red]warning: critic at {where}: {errors:.0f} of {requests:.0f} requests failed "
                          f"so far (step {step}{detail}); they fell back to rule critiques[/]", soft_wrap=True)
        watch = CriticWatch(errors)
    share = cfg.critic.max_failure_share
    if share < 1.0 and requests >= CRITIC_MIN_REQUESTS and errors > share * requests:
        raise UserError(f"critic at {where} failed {errors:.0f} of {requests:.0f} requests by step {step} "
                        f"(more than critic.max_failure_share = {share:g}){detail}; check critic.base_url, "
                        "critic.model and the key in $" + cfg.critic.api_key_env + ", or raise "
                        "critic.max_failure_share")
    return watch


def run_totals(metrics_path: Path, memory: Any) -> dict[str, Any]:
    """Critique and memory totals over the whole run (from metrics.jsonl, so resumed runs count too)."""
    rows = [r for r in read_jsonl(metrics_path) if "loss/total" in r]
    out: dict[str, Any] = {}
    if any("critique/refinements" in r for r in rows):
        ref = sum(r.get("critique/refinements", 0) for r in rows)
        ok = sum((r.get("critique/refine_success_rate") or 0) * r.get("critique/refinements", 0) for r in rows)
        out["critique_refinements"] = ref
        out["critique_refine_success_rate"] = ok / ref if ref else None
        out["critique_groups_rescued"] = sum(r.get("critique/groups_rescued", 0) for r in rows)
        out["critique_all_wrong_groups"] = sum(r.get("critique/all_wrong_groups", 0) for r in rows)
    if memory is not None:
        st = memory.stats()
        out["memory_bank"] = st["path"]
        out["memory_demonstrations"] = st["demonstrations"]["count"]
        out["memory_lessons"] = st["lessons"]["count"]
    return out
