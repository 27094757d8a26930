"""Deterministic, resumable prompt order: a seeded permutation per epoch and a cursor; for several tasks, a
seeded weighted choice of the task of every slot (:class:`MixtureSampler`)."""

from __future__ import annotations

import random
from typing import Any


class PromptSampler:
    """Draws batches of rows in a seeded order. ``state_dict``/``load_state_dict`` make resume exact."""

    def __init__(self, rows: list[Any], seed: int) -> None:
        if not rows:
            raise ValueError("PromptSampler needs at least one row")
        self.rows = rows
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)
        self.excluded: set[int] = set()
        """Row indices left out of the draws (the pass-rate filter); the permutation itself is unchanged."""

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, size: int) -> list[dict[str, Any]]:
        if len(self.excluded) >= len(self.rows):
            raise ValueError("PromptSampler: every row is excluded")
        out = []
        while len(out) < size:
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation(self.epoch)
            i = self._order[self.cursor]
            self.cursor += 1
            if i not in self.excluded:
                out.append(self.rows[i])
        return out

    def can_exclude(self, indices: set[int], batch: int) -> bool:
        """Whether excluding ``indices`` leaves at least ``batch`` rows."""
        return len(self.rows) - len(set(indices)) >= batch

    def exclude(self, indices: set[int]) -> None:
        """Leave these row indices out of later draws (replacing the previous exclusion set)."""
        if len(set(indices)) >= len(self.rows):
            raise ValueError("PromptSampler: cannot exclude every row")
        self.excluded = set(indices)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "cursor": self.cursor, "num_rows": len(self.rows)}
        if self.excluded:
            state["excluded"] = sorted(self.excluded)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_rows"] != len(self.rows):
            raise ValueError(f"checkpoint was taken on {state['num_rows']} rows, dataset has {len(self.rows)}")
        self.epoch = state["epoch"]
        self.cursor = state["cursor"]
        self._order = self._permutation(self.epoch)
        self.excluded = set(state.get("excluded", []))


class MixtureSampler:
    """Batches from the rows of several tasks (rows carry a ``task`` column): the task of every slot is a
    seeded weighted draw (one RNG per batch, so resume is exact); rows within a task come in their own
    :class:`PromptSampler` order. ``next_batch(size, only=name)`` draws one task (sequential task orders).
    Row indices (``excluded``, :meth:`exclude`) are indices into ``rows``, as for :class:`PromptSampler`."""

    def __init__(self, rows: list[dict[str, Any]], weights: dict[str, float], seed: int) -> None:
        self.rows = rows
        self.seed = seed
        self.names = list(weights)
        total = float(sum(weights.values()))
        self.weights = [weights[n] / total for n in self.names]
        self.index: dict[str, list[int]] = {n: [] for n in self.names}
        for i, r in enumerate(rows):
            name = r.get("task")
            if name not in self.index:
                raise ValueError(f"row {i + 1} has task {name!r}, which is not one of the mixture's tasks "
                                 f"{self.names}")
            self.index[name].append(i)
        empty = [n for n, idx in self.index.items() if not idx]
        if empty:
            raise ValueError(f"the training rows hold no row of task(s) {empty}")
        self.subs = {n: PromptSampler(idx, seed + 7919 * k) for k, (n, idx) in enumerate(self.index.items())}
        self.batches = 0

    @property
    def excluded(self) -> set[int]:
        return {self.index[n][j] for n, sub in self.subs.items() for j in sub.excluded}

    def next_batch(self, size: int, only: str | None = None,
                   weights: dict[str, float] | None = None) -> list[dict[str, Any]]:
        """``size`` rows: tasks drawn by the sampler's weights, or by ``weights`` (a phase's; tasks left out are
        not drawn), or all of task ``only``."""
        if only is not None:
            picks = [only] * size
        else:
            w = self.weights if weights is None else [float(weights.get(n, 0.0)) for n in self.names]
            picks = random.Random(self.seed * 1_000_003 + 7 * self.batches + 1).choices(self.names, w, k=size)
        self.batches += 1
        drawn = {n: iter(self.subs[n].next_batch(picks.count(n))) for n in set(picks)}
        return [self.rows[next(drawn[n])] for n in picks]

    def can_exclude(self, indices: set[int], batch: int) -> bool:
        """Whether excluding ``indices`` leaves every task a row and at least ``batch`` rows in all."""
        left = {n: len(idx) - len(set(idx) & indices) for n, idx in self.index.items()}
        return min(left.values()) > 0 and sum(left.values()) >= batch

    def exclude(self, indices: set[int]) -> None:
        for n, idx in self.index.items():
            local = {j for j, i in enumerate(idx) if i in indices}
            if len(local) >= len(idx):
                raise ValueError(f"MixtureSampler: cannot exclude every row of task {n!r}")
            self.subs[n].exclude(local)

    def state_dict(self) -> dict[str, Any]:
        return {"num_rows": len(self.rows), "batches": self.batches,
                "tasks": {n: sub.state_dict() for n, sub in self.subs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_rows"] != len(self.rows) or set(state.get("tasks", {})) != set(self.subs):
            raise ValueError(f"checkpoint was taken on {state['num_rows']} rows of tasks {sorted(state.get('tasks', {}))}, "
                             f"this run has {len(self.rows)} rows of {sorted(self.subs)}")
        self.batches = state["batches"]
        for n, sub in self.subs.items():
            sub.load_state_dict(state["tasks"][n])
