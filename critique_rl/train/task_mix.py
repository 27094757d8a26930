"""Several tasks in one run: the order they are trained in, and metrics per task.

Order (config ``task_order``): ``joint`` samples every batch from all tasks by weight; ``entropy`` trains the
tasks one after another, lowest output entropy first. Omni-Thinker (arXiv:2507.14783) observes that RL on
structured tasks lowers output entropy while open-ended tasks need it, and that training structured tasks
before open-ended ones beats joint training; the entropy measured here is the structuredness proxy:

    H(task) = - (1 / T) * sum over sampled tokens t of log pi(y_t | x, y_<t)

the mean negative log-probability of the tokens the policy samples on the task's prompts (T tokens in all),
an unbiased estimate of the per-token entropy of the sampling distribution that needs no vocabulary-sized
tensor. Each task then trains for its weight's share of the RL steps (:func:`task_blocks`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def token_entropy(nll_sum: float, tokens: int) -> float:
    """``nll_sum / tokens``: the per-token entropy estimate from summed negative log-probabilities."""
    if tokens <= 0:
        raise ValueError("no sampled tokens to estimate an entropy from")
    return nll_sum / tokens


def entropy_order(entropies: dict[str, float]) -> list[str]:
    """Task names by ascending entropy (most structured first); ties keep the given order."""
    names = list(entropies)
    return sorted(names, key=lambda n: (entropies[n], names.index(n)))


def task_blocks(order: Sequence[str], weights: dict[str, float], total_steps: int) -> list[tuple[str, int, int]]:
    """``[(task, first step, end step)]``: consecutive blocks over ``total_steps`` RL steps in ``order``, each as
    long as its weight's share (boundaries rounded from the cumulative share, so the lengths add up exactly).

    >>> task_blocks(["a", "b"], {"a": 1.0, "b": 4.0}, 10)
    [('a', 0, 2), ('b', 2, 10)]
    """
    total_w = sum(weights[n] for n in order)
    blocks, cum, start = [], 0.0, 0
    for name in order:
        cum += weights[name]
        end = total_steps if name == order[-1] else int(math.floor(total_steps * cum / total_w + 0.5))
        blocks.append((name, start, end))
        start = end
    return blocks


def task_at(step: int, blocks: Sequence[tuple[str, int, int]]) -> str:
    """The task trained at RL step ``step`` (0-based); past the end, the last block's."""
    for name, start, end in blocks:
        if start <= step < end:
            return name
    return blocks[-1][0]


def per_task_metrics(tasks: Sequence[Any], correct: Sequence[float], rewards: Sequence[float]) -> dict[str, float]:
    """``task/<name>/accuracy``, ``/reward`` (mean weighted reward) and ``/share`` (of the samples) for every
    task present among the samples (rows without a task column are left out)."""
    out: dict[str, float] = {}
    n = len(tasks)
    for name in dict.fromkeys(t for t in tasks if t is not None):
        idx = [i for i, t in enumerate(tasks) if t == name]
        out[f"task/{name}/accuracy"] = sum(float(correct[i]) for i in idx) / len(idx)
        out[f"task/{name}/reward"] = sum(float(rewards[i]) for i in idx) / len(idx)
        out[f"task/{name}/share"] = len(idx) / n
    return out


def accuracy_by_task(rows: Sequence[dict[str, Any]], flags: Sequence[bool]) -> dict[str, float]:
    """Held-out accuracy per ``task`` column value ({} when no row has one)."""
    hits: dict[str, list[bool]] = {}
    for row, ok in zip(rows, flags, strict=True):
        if row.get("task") is not None:
            hits.setdefault(str(row["task"]), []).append(bool(ok))
    return {name: sum(v) / len(v) for name, v in hits.items()}
