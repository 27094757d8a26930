"""Deterministic, resumable prompt order: a seeded permutation per epoch and a cursor."""

from __future__ import annotations

import random
from typing import Any


class PromptSampler:
    """Draws batches of rows in a seeded order. ``state_dict``/``load_state_dict`` make resume exact."""

    def __init__(self, rows: list[dict[str, Any]], seed: int) -> None:
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
