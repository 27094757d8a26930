"""Several tasks in one run: a mixture task whose rows carry a ``task`` column naming their part.

``mix_tasks([addition, reverse])`` is a :class:`Task` named ``"addition+reverse"``. Its rows are each part's
rows with ``task`` added; everything that reads one row (``sft_completion``, ``mistake``) goes to that row's
part, and so do the verifier and answer extraction through :meth:`Task.for_row` (``verify`` itself is a
TRL-style batch function that reads the ``task`` column, so :class:`critique_rl.rewards.Verifier` dispatches
it). ``get_task("addition+reverse")`` builds the same mixture, so ``critique-rl eval --task a+b`` works too.

How often each task is drawn during RL, and in which order, is the trainer's business
(:class:`critique_rl.train.sampler.MixtureSampler`, config ``tasks`` and ``task_order``).
"""

from __future__ import annotations

from typing import Any

from critique_rl.errors import UserError
from critique_rl.tasks.base import Example, Task

SEPARATOR = "+"


def split_counts(n: int, parts: int) -> list[int]:
    """``n`` items over ``parts`` as evenly as possible, the first ones one larger: 5 over 2 -> [3, 2]."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def mix_tasks(tasks: list[Task]) -> Task:
    """One task made of ``tasks`` (at least two, distinct names, none a mixture itself).

    ``make_examples("train", n, seed)`` returns ``n`` rows of *each* task (each task's full pool; how often a
    task is drawn is set by the trainer's sampling weights); ``"eval"`` splits ``n`` evenly over the tasks, so
    ``eval_n`` keeps meaning the size of the held-out set. Rows are tagged ``task: <name>``.
    """
    names = [t.name for t in tasks]
    if len(tasks) < 2:
        raise UserError(f"a task mixture needs at least two tasks, got {names}")
    if len(set(names)) != len(names):
        raise UserError(f"a task mixture names a task twice: {names}")
    nested = [t.name for t in tasks if t.parts]
    if nested:
        raise UserError(f"a task mixture cannot contain another mixture ({nested}); list the tasks themselves")
    parts = {t.name: t for t in tasks}

    def make_examples(split: str, n: int, seed: int) -> list[Example]:
        counts = [n] * len(tasks) if split == "train" else split_counts(n, len(tasks))
        rows: list[Example] = []
        for t, k in zip(tasks, counts, strict=True):
            for row in t.make_examples(split, k, seed) if k else []:
                if "task" in row and row["task"] != t.name:
                    raise UserError(f"task {t.name!r} generates rows with its own 'task' column ({row['task']!r}); "
                                    "a mixture needs that column for the task name")
                rows.append({**row, "task": t.name})
        return rows

    def verify(completions: list[Any], answer: list[str], task: list[str] | None = None, **_: Any) -> list[bool]:
        from critique_rl.primitives import completion_text

        judges = mixture.for_rows(len(completions), task)
        return [bool(j.verify(completion_text(c), a)) for j, c, a in zip(judges, completions, answer, strict=True)]

    def extract(completion: str) -> str | None:
        raise UserError(f"the task mixture {mixture.name!r} cannot parse an answer without knowing the row's task; "
                        "call task.for_row(row).extract(...)")

    def sft_completion(row: Example) -> str:
        return mixture.for_row(row).sft_completion(row)

    def mistake(row: Example) -> str | None:
        part = mixture.for_row(row)
        return part.mistake(row) if part.mistake is not None else None

    mixture = Task(
        name=SEPARATOR.join(names), make_examples=make_examples, verify=verify, extract=extract,
        description="mixture of " + ", ".join(names), sft_completion=sft_completion,
        max_new_tokens=max(t.max_new_tokens for t in tasks),
        mistake=mistake if any(t.mistake is not None for t in tasks) else None, parts=parts,
    )
    return mixture
