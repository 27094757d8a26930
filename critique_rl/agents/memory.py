"""Memory inside the agent loop (SkillRL-style), on top of :class:`~critique_rl.memory.MemoryBank`.

- **At reset**: :meth:`EpisodeMemory.context_fn` retrieves lessons and demonstrations for *task + first
  observation* and renders them into the first prompt's system message (the runner calls it once per batch).
- **After the episode**: :meth:`EpisodeMemory.record` stores successes as demonstrations (the full
  trajectory, as chat messages) and failures as lessons (abstracted from the episode critique), and credits
  every retrieved record per episode that saw it: ``retrieved += 1``, ``helped += 1`` when it succeeded.

The same bank works in anyone's loop without this class::

    context = bank.context_for(task)              # before: lessons + demonstrations within the token budget
    ... run the agent ...
    bank.record(task=task, trajectory=messages, reward=reward, success=ok, critique=critique_text)

Memory text is data: it is rendered as a template variable, never evaluated or used as a path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from critique_rl.agents.trajectory import Trajectory
from critique_rl.memory import Episode, MemoryBank, Retrieved


def retrieval_query(task: dict[str, Any], first_observation: str) -> str:
    """What retrieval reads: the task statement and the first observation (once when they are equal)."""
    prompt = str(task.get("prompt", ""))
    return prompt if first_observation.strip() in ("", prompt.strip()) else f"{prompt}\n{first_observation}"


class EpisodeMemory:
    """Retrieval at reset, recording and ``helped`` credit after episodes.

    Args:
        bank: the open bank.
        task_name: tags what is recorded; with ``filter_by_task`` retrieval only returns records with this tag.
        run_name: stored as ``source_run``.
        max_lessons_per_step / max_demos_per_step: bounds per :meth:`record` call (one of each per group).
        count: whether retrieval at reset counts ``retrieved`` itself (False: :meth:`record` credits per
            episode instead, the trainer's way; True suits a loop that never calls :meth:`record`).
        min_score: drop retrieved records whose retrieval score is <= this (``memory.min_score``; 0.0 drops the
            bank's lexical top-up of records that match no word of the task). None keeps all.
    """

    def __init__(self, bank: MemoryBank, task_name: str, run_name: str | None = None, *,
                 max_lessons_per_step: int = 8, max_demos_per_step: int = 8, filter_by_task: bool = True,
                 count: bool = False, min_score: float | None = None) -> None:
        self.bank = bank
        self.task_name = task_name
        self.run_name = run_name
        self.max_lessons_per_step = max_lessons_per_step
        self.max_demos_per_step = max_demos_per_step
        self.filter_by_task = filter_by_task
        self.count = count
        self.min_score = min_score

    def retrieve(self, tasks: Sequence[dict[str, Any]], first_observations: Sequence[str]) -> list[Retrieved]:
        queries = [retrieval_query(t, o) for t, o in zip(tasks, first_observations, strict=True)]
        uniq = list(dict.fromkeys(queries))  # the n episodes of a task share one retrieval
        got = self.bank.retrieve_many(uniq, tags=[self.task_name] if self.filter_by_task else None, count=self.count)
        if self.min_score is not None:
            got = [self.bank.above(r, self.min_score) for r in got]
        by_query = dict(zip(uniq, got, strict=True))
        return [by_query[q] for q in queries]

    def context_fn(self, tasks: list[dict[str, Any]], first_observations: list[str]) -> list[tuple[str, list[str]]]:
        """The runner's ``context_fn``: ``(rendered context, record ids)`` per episode."""
        return [(r.text, r.ids) for r in self.retrieve(tasks, first_observations)]

    def record(self, trajectories: Sequence[Trajectory], critiques: Sequence[str | None] | None = None,
               step: int | None = None, group_size: int = 1) -> dict[str, float | None]:
        """Credit retrieved records, then store one demonstration per group with a success and one lesson per
        group with a failure (all-failed groups first, at most ``max_lessons_per_step``). Returns
        ``memory/*`` metrics."""
        n = len(trajectories)
        critiques = list(critiques) if critiques is not None else [None] * n
        if len(critiques) != n or (n and n % group_size):
            raise ValueError(f"EpisodeMemory.record: {n} trajectories, {len(critiques)} critiques, group_size "
                             f"{group_size}")
        # credit per episode that saw the record; lift against the step's mean success (as the trainer's MemoryHook)
        baseline = sum(int(t.success) for t in trajectories) / n if n else 0.0
        counts: dict[str, list[float]] = {}
        hit = [0, 0]
        miss = [0, 0]
        for t in trajectories:
            side = hit if t.retrieved_ids else miss
            side[0] += 1
            side[1] += int(t.success)
            for rid in dict.fromkeys(t.retrieved_ids):
                c = counts.setdefault(rid, [0, 0, 0.0])
                c[0] += 1
                c[1] += int(t.success)
                c[2] += int(t.success) - baseline
        if counts:
            self.bank.store.add_credit({rid: (int(r), int(h), lf) for rid, (r, h, lf) in counts.items()})
        groups = [list(range(g, g + group_size)) for g in range(0, n, group_size)]
        episodes: list[Episode] = []
        for members in groups:
            if len([e for e in episodes if e.success]) >= self.max_demos_per_step:
                break
            i = next((i for i in members if trajectories[i].success), None)
            if i is not None:
                episodes.append(self._episode(trajectories[i], True, None, step))
        failing = [m for m in groups if not all(trajectories[i].success for i in m)]
        failing.sort(key=lambda m: any(trajectories[i].success for i in m))
        for members in failing[: self.max_lessons_per_step]:
            i = next(i for i in members if not trajectories[i].success)
            episodes.append(self._episode(trajectories[i], False, critiques[i], step))
        results = self.bank.record_many(episodes) if episodes else []
        stats = self.bank.stats()
        return {
            "memory/lessons": float(stats["lessons"]["count"]),
            "memory/demonstrations": float(stats["demonstrations"]["count"]),
            "memory/new": float(sum(r.action == "new" for r in results)),
            "memory/merged": float(sum(r.action == "merged" for r in results)),
            "memory/context_rate": hit[0] / n if n else 0.0,
            "memory/hit_success_rate": hit[1] / hit[0] if hit[0] else None,
            "memory/miss_success_rate": miss[1] / miss[0] if miss[0] else None,
            "memory/credit_baseline": baseline,
        }

    def _episode(self, t: Trajectory, success: bool, critique: str | None, step: int | None) -> Episode:
        answer = t.task.get("answer")
        return Episode(task=str(t.task.get("prompt", "")), trajectory=t.messages(include_context=False),
                       reward=t.total_reward, critique=critique, success=success,
                       reference=None if answer is None else str(answer), source_run=self.run_name, step=step,
                       task_name=self.task_name)
