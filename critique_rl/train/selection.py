"""Data selection for RL: which groups and prompts a step trains on.

Three filters, each a pure function here with a thin hook in the trainer:

- **Dynamic sampling** (DAPO, arXiv:2503.14476): a group whose rewards have zero spread (every sample scored the
  same on every objective) has all-zero advantages under any group-relative estimator and teaches nothing. Such
  groups are dropped and the batch is refilled by sampling further prompts, up to ``max_refill_batches`` extra
  batches; if the batch is still short, it is padded with the dropped groups (they carry no gradient, so padding
  only keeps every process's batch the same shape). :func:`dynamic_fill`.
- **Pass-rate filter** (difficulty filtering before RL, refreshed every N steps): each prompt of the pool is
  sampled ``samples`` times; prompts whose pass rate is at most ``too_hard_at_most`` (e.g. 0: never solved) or at
  least ``too_easy_at_least`` (e.g. 1: always solved) leave the pool. Group normalisation would turn a lucky
  success on a near-impossible prompt into a large advantage. :func:`pass_rate_exclusions`.
- **Low-variance query filter** (DRO, arXiv:2506.13351): groups whose scalar reward spread is small carry
  little signal for comparative learning; groups with reward std below ``min_std``, and the ``drop_fraction``
  of the batch with the lowest std, get no gradient. :func:`low_variance_drop`.

Multi-process: every decision is taken on gathered statistics (the same on every rank) or on the global prompt
batch that every rank draws from its identical sampler, so ranks agree on how many refills happen and what
leaves the pool.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from critique_rl.train.rollout_batch import RolloutBatch

SPREAD_EPS = 1e-9
"""Rewards closer than this count as equal (zero spread)."""


# ---------------------------------------------------------------------------------------------------------
# pure statistics
# ---------------------------------------------------------------------------------------------------------
def zero_spread_groups(rewards: torch.Tensor, group_size: int, eps: float = SPREAD_EPS) -> torch.Tensor:
    """``[G]`` bool: True where a group's rewards have zero spread on every objective.

    ``rewards`` is the flat ``[G * n, K]`` reward matrix (NaN = objective not applicable, ignored). A group is
    zero-spread when, for each objective, ``max - min <= eps`` over its applicable samples (an objective with
    fewer than two applicable samples has no spread). Such a group gets all-zero advantages from every
    group-relative estimator (``R - mean``, ``(R - mean) / std``), whatever the aggregation of objectives.
    """
    G = rewards.shape[0] // group_size
    R = rewards.reshape(G, group_size, -1).to(torch.float64)
    nan = torch.isnan(R)
    hi = torch.where(nan, torch.full_like(R, -math.inf), R).amax(dim=1)
    lo = torch.where(nan, torch.full_like(R, math.inf), R).amin(dim=1)
    spread = (hi - lo).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)  # an objective never applicable: no spread
    spread = torch.where(torch.isfinite(hi) & torch.isfinite(lo), spread, torch.zeros_like(spread))
    return (spread <= eps).all(dim=-1)


def group_reward_std(rewards: torch.Tensor, weights: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[G]`` population std, inside each group, of the scalar reward ``sum_k w_k r_k`` (NaN counted as 0)."""
    G = rewards.shape[0] // group_size
    scalar = (torch.nan_to_num(rewards.to(torch.float64), nan=0.0) * weights.to(torch.float64)).sum(-1)
    return scalar.reshape(G, group_size).std(dim=1, unbiased=False)


def low_variance_drop(std: torch.Tensor, min_std: float, drop_fraction: float) -> torch.Tensor:
    """``[G]`` bool, True = drop the group (DRO's low-variance query filter, arXiv:2506.13351).

    A group is dropped when its reward std is below ``min_std``, or when it is among the
    ``floor(drop_fraction * G)`` groups with the lowest std (ties: the earlier group is dropped first).
    """
    drop = std < min_std
    k = int(math.floor(drop_fraction * std.numel() + 1e-9))
    if k > 0:
        order = sorted(range(std.numel()), key=lambda g: (float(std[g]), g))
        drop[torch.tensor(order[:k], dtype=torch.long)] = True
    return drop


def pass_rate_exclusions(rates: dict[int, float], too_hard_at_most: float | None,
                         too_easy_at_least: float | None) -> tuple[set[int], set[int]]:
    """``(too_hard, too_easy)``: pool indices whose measured pass rate is ``<= too_hard_at_most`` resp.
    ``>= too_easy_at_least`` (None = that side off). A prompt meeting both thresholds counts as too hard."""
    hard = {i for i, r in rates.items() if too_hard_at_most is not None and r <= too_hard_at_most}
    easy = {i for i, r in rates.items()
            if too_easy_at_least is not None and r >= too_easy_at_least and i not in hard}
    return hard, easy


def measured_indices(num_rows: int, max_prompts: int | None, seed: int) -> list[int]:
    """The pool indices the pass-rate filter measures: all rows, or a seeded sample of ``max_prompts``."""
    import random

    if max_prompts is None or max_prompts >= num_rows:
        return list(range(num_rows))
    return sorted(random.Random(seed * 7_777 + 13).sample(range(num_rows), max_prompts))


# ---------------------------------------------------------------------------------------------------------
# rollout batches
# ---------------------------------------------------------------------------------------------------------
def select_groups(batch: RolloutBatch, groups: Sequence[int]) -> RolloutBatch:
    """The groups ``groups`` of ``batch``, in that order."""
    n = batch.group_size
    rows = [g * n + j for g in groups for j in range(n)]
    idx = torch.tensor(rows, dtype=torch.long)
    return replace(batch, rows=[batch.rows[i] for i in rows], prompts=[batch.prompts[i] for i in rows],
                   completions=[batch.completions[i] for i in rows], rewards=batch.rewards[idx],
                   passed=batch.passed[idx], correct=[batch.correct[i] for i in rows])


def concat_batches(parts: Sequence[RolloutBatch]) -> RolloutBatch:
    """One batch holding the groups of ``parts`` in order (gate rates: sample-weighted means)."""
    if len(parts) == 1:
        return parts[0]
    total = sum(len(p.rows) for p in parts)
    gate_names = {k for p in parts for k in p.gate_rates}
    rates = {k: sum(p.gate_rates.get(k, 0.0) * len(p.rows) for p in parts) / max(1, total) for k in gate_names}
    return RolloutBatch(rows=[r for p in parts for r in p.rows], prompts=[x for p in parts for x in p.prompts],
                        completions=[c for p in parts for c in p.completions], group_size=parts[0].group_size,
                        rewards=torch.cat([p.rewards for p in parts]), passed=torch.cat([p.passed for p in parts]),
                        correct=[c for p in parts for c in p.correct], gate_rates=rates)


@dataclass
class FillResult:
    """What :func:`dynamic_fill` returns: the batch to train on and its counters (global over processes)."""

    batch: RolloutBatch
    first_zero_spread: float
    """Fraction of zero-spread groups in the first draw (all processes)."""
    refills: int
    """Extra batches drawn."""
    dropped: int
    """Zero-spread groups dropped (all processes), padding excluded."""
    padded: int
    """Zero-spread groups kept to fill a batch still short after the last refill (all processes)."""
    samples: int
    """Completions sampled for this step's batch, refills included (all processes)."""


def dynamic_fill(first: RolloutBatch, draw: Callable[[], RolloutBatch], max_refill_batches: int,
                 all_reduce_sum: Callable[[Sequence[float]], list[float]] = lambda v: list(v),
                 enabled: bool = True) -> FillResult:
    """DAPO dynamic sampling over this process's groups.

    Keeps the groups of ``first`` with reward spread; while any process holds fewer than its share (the number
    of groups in ``first``) and fewer than ``max_refill_batches`` refills were made, every process calls
    ``draw()`` once more (so the shared prompt sampler stays in step on every rank) and keeps that batch's
    groups with spread. Surplus groups are discarded (DAPO); a batch still short is padded with the dropped
    zero-spread groups in the order they were drawn. ``all_reduce_sum`` sums a list over processes (identity
    with one). With ``enabled`` False only the counters of ``first`` are computed and ``first`` is returned.
    """
    per = first.num_groups
    zero = zero_spread_groups(first.rewards, first.group_size)
    n_zero, n_groups = all_reduce_sum([float(zero.sum()), float(per)])
    frac = n_zero / max(1.0, n_groups)
    samples = len(first.rows)
    if not enabled:
        return FillResult(first, frac, 0, 0, 0, int(all_reduce_sum([float(samples)])[0]))
    kept: list[tuple[int, int]] = []  # (part, group)
    spare: list[tuple[int, int]] = []
    parts = [first]
    refills = 0
    while True:
        part = len(parts) - 1
        for g, z in enumerate(zero.tolist()):
            (spare if z else kept).append((part, g))
        short = max(0, per - len(kept))
        (any_short,) = all_reduce_sum([float(short > 0)])
        if any_short == 0 or refills >= max_refill_batches:
            break
        nxt = draw()
        refills += 1
        samples += len(nxt.rows)
        parts.append(nxt)
        zero = zero_spread_groups(nxt.rewards, nxt.group_size)
    chosen = kept[:per]
    pad = spare[: per - len(chosen)]
    order = sorted(chosen + pad)  # keep draw order: an all-spread first batch comes back unchanged
    if len(parts) == 1:  # nothing was refilled: the first batch, whole and in order
        batch = first
    else:
        batch = concat_batches([select_groups(parts[p], [g for q, g in order if q == p])
                                for p in range(len(parts)) if any(q == p for q, _ in order)])
    dropped, padded, total_samples = all_reduce_sum([float(len(spare) - len(pad)), float(len(pad)), float(samples)])
    return FillResult(batch, frac, refills, int(dropped), int(padded), int(total_samples))


@dataclass(frozen=True)
class SelectionState:
    """The data-selection state of a run (checkpointed as a dict): samples generated so far, the pass-rate
    filter's last measurement, the task order and the task entropies it came from. Frozen: the stages return a
    new state (:func:`dataclasses.replace`, :meth:`add_samples`)."""

    samples_total: int = 0
    pass_rate: dict[str, Any] | None = None
    task_order: list[str] | None = None
    task_entropy: dict[str, float] | None = None

    def add_samples(self, count: int) -> SelectionState:
        """This state with ``count`` more samples generated."""
        return replace(self, samples_total=self.samples_total + int(count))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == "pass_rate"}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SelectionState:
        """From a checkpoint's ``selection`` entry (older checkpoints: a dict with some of the keys)."""
        data = data or {}
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
