"""Per-phase data on episodes: a phase of the schedule (``phases:``) may set the env's task-generator arguments
(``task_kwargs``) and constructor arguments (``env_kwargs``), merged over the run's ``agent.task_kwargs`` /
``agent.env_kwargs``, e.g. harder games in a second rl phase::

    agent: {env: guess_number, task_kwargs: {lo: 1, hi: 8}}
    phases:
      - {kind: sft, steps: 200}
      - {kind: rl, steps: 30}
      - {kind: rl, steps: 30, task_kwargs: {hi: 16}, env_kwargs: {max_guesses: 5}}

A phase with its own tasks draws from its own pool (``sft_examples`` tasks from the env's generator, seeded like
the run's) through its own :class:`~critique_rl.train.sampler.PromptSampler`, which travels with checkpoints (it
is returned by :meth:`EpisodePhases.samplers` under ``agent:phases[i]`` and checkpointed with the trainer's); an sft phase imitates scripted
episodes of its tasks. Evaluation always uses the run's held-out tasks and env, so before/after numbers compare
the same games. A phase that sets neither uses the run's pool (and its sampler).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from critique_rl.agents.registry import EnvSpec
from critique_rl.errors import ConfigError
from critique_rl.train.sampler import PromptSampler


@dataclass
class EpisodePool:
    """The tasks a phase draws from, its sampler and the env arguments its episodes run with. ``key`` names the
    sampler in checkpoints (None: the run's own sampler, checkpointed by the trainer as ``sampler``)."""

    tasks: list[dict[str, Any]]
    env_kwargs: dict[str, Any]
    task_kwargs: dict[str, Any]
    key: str | None = None
    sampler: PromptSampler | None = None


def phase_key(index: int) -> str:
    """Checkpoint key of phase ``index``'s own sampler."""
    return f"agent:phases[{index}]"


class EpisodePhases:
    """The pool of every phase (the run's, or the phase's own when it sets ``task_kwargs`` / ``env_kwargs``).

    Args:
        spec: the environment.
        phases: the run's schedule (``cfg.schedule()``).
        run_tasks: the run's training tasks; ``env_kwargs`` / ``task_kwargs``: the run's ``agent:`` arguments.
        num_tasks / seed: how many tasks a phase's own pool holds and the seed they are drawn with.
    """

    def __init__(self, spec: EnvSpec, phases: list[Any], run_tasks: list[dict[str, Any]], env_kwargs: dict[str, Any],
                 task_kwargs: dict[str, Any], num_tasks: int, seed: int) -> None:
        self.schedule = phases
        self.run = EpisodePool(run_tasks, dict(env_kwargs), dict(task_kwargs))
        self.pools: dict[int, EpisodePool] = {}
        for i, ph in enumerate(phases):
            t_kw, e_kw = getattr(ph, "task_kwargs", None), getattr(ph, "env_kwargs", None)
            if t_kw is None and e_kw is None:
                continue
            tasks_kw = {**task_kwargs, **(t_kw or {})}
            env_kw = {**env_kwargs, **(e_kw or {})}
            try:
                spec.make_env(**env_kw)
            except TypeError as exc:
                raise ConfigError(f"phases[{i}].env_kwargs", e_kw, f"the env '{spec.name}' does not take these "
                                  f"arguments ({exc}); name only arguments of its constructor") from None
            try:
                tasks = spec.make_tasks("train", num_tasks, seed, **tasks_kw) if t_kw is not None else run_tasks
            except TypeError as exc:
                raise ConfigError(f"phases[{i}].task_kwargs", t_kw, f"the env '{spec.name}' task generator does not "
                                  f"take these arguments ({exc})") from None
            if not tasks:
                raise ConfigError(f"phases[{i}].task_kwargs", t_kw, "the env's generator made no tasks for the phase")
            own = t_kw is not None
            self.pools[i] = EpisodePool(tasks, env_kw, tasks_kw, key=phase_key(i) if own else None,
                                        sampler=PromptSampler(tasks, seed) if own else None)

    def pool(self, index: int) -> EpisodePool:
        """The pool of phase ``index`` (the run's when the phase sets nothing or ``index`` is past the schedule)."""
        return self.pools.get(index, self.run)

    def samplers(self) -> dict[str, PromptSampler]:
        """The phases' own samplers by checkpoint key."""
        return {p.key: p.sampler for p in self.pools.values() if p.key is not None and p.sampler is not None}

    def distinct(self) -> list[EpisodePool]:
        """The phases' pools that differ from the run's (their scripted episodes also teach the tiny tokenizer)."""
        return list(self.pools.values())

    def start_step(self, index: int) -> int:
        """The run's RL step count when phase ``index`` starts (the rl steps of the phases before it)."""
        return sum((ph.steps or 0) for ph in self.schedule[:index] if ph.kind == "rl")
