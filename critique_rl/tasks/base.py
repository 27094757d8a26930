"""Verifiable tasks: a seeded generator with disjoint train/eval splits, a verifier, the reference answer."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from critique_rl.errors import UserError
from critique_rl.primitives import final_answer_span, parse_number  # noqa: F401 (re-exported)

Example = dict[str, Any]
"""A dataset row: at least ``prompt`` (str) and ``answer`` (str, the reference); tasks may add columns."""

@dataclass
class Task:
    """A verifiable task. ``make_examples(split, n, seed)`` returns rows; ``verify(completion, answer)``."""

    name: str
    make_examples: Callable[[str, int, int], list[Example]]
    verify: Callable[[str, str], bool]
    extract: Callable[[str], str | None]
    """The parsed final answer of a completion (for critiques and logs), None when unparsable."""
    description: str = ""
    sft_completion: Callable[[Example], str] = field(default=lambda ex: ex["answer"])
    """The completion the SFT warm-up imitates for an example."""
    max_new_tokens: int = 8
    mistake: Callable[[Example], str | None] | None = None
    """The task's typical mistake: a wrong completion for an example (None where it does not apply). The SFT
    warm-up imitates a demonstrator that makes it at rate ``sft_mistake_rate``, the systematic error RL,
    critiques and memory lessons are there to fix."""

    wrong_reference: Callable[[str, str | None, random.Random], str | None] | None = None
    """A reference that names a wrong fix for a response: ``(reference, the response's answer, rng)`` -> a
    plausible wrong reference (None: none to give). The noisy critic's ``error_kind: hint`` renders its
    critique with it (a right verdict, a misleading fix); without it a number answer is moved by a small amount."""

    parts: dict[str, Task] = field(default_factory=dict)
    """A mixture's tasks by name (:func:`critique_rl.tasks.mixture.mix_tasks`); its rows carry a ``task``
    column naming the part that generated them. Empty for a single task."""

    def texts_for_tokenizer(self, n: int = 2000, seed: int = 0) -> list[str]:
        rows = self.make_examples("train", n, seed)
        return [r["prompt"] + self.sft_completion(r) for r in rows]

    def for_row(self, row: dict[str, Any]) -> Task:
        """The task that judges ``row``: this task, or (a mixture) the part named by the row's ``task`` column."""
        return self.part(row.get("task")) if self.parts else self

    def for_rows(self, n: int, names: list[Any] | None) -> list[Task]:
        """:meth:`for_row` for ``n`` rows given their ``task`` column (None when the rows have none)."""
        if not self.parts:
            return [self] * n
        return [self.part(name) for name in (names if names is not None else [None] * n)]

    def part(self, name: Any) -> Task:
        if name not in self.parts:
            raise UserError(f"a row of the task mixture {self.name!r} has task column {name!r}; every row needs "
                            f"'task' set to one of {sorted(self.parts)}")
        return self.parts[name]
