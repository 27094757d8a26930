"""Named environments (``agent.env``) and episode-level critics.

An :class:`EnvSpec` bundles what the episode trainer needs from an environment: a constructor, a task
generator with disjoint train/eval splits, and optionally a scripted demonstrator (SFT warm-up), an expert
that follows critiques and lessons (the warm-up part that teaches the policy to read them) and an episode
critic. ``agent.env`` names a registered spec or a ``package.module:function`` that returns one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from critique_rl.agents.env import Env
from critique_rl.agents.trajectory import Trajectory
from critique_rl.critics.base import Critic, Critique, CritiqueRequest
from critique_rl.errors import ConfigError, UserError
from critique_rl.registry import Registry

ScriptedPolicy = Callable[[str, random.Random], str]
"""``(observation, rng) -> action text``: a scripted player for SFT demonstrations."""


@runtime_checkable
class EpisodeCritic(Protocol):
    """Sees whole trajectories, writes one critique per episode."""

    def critique_episodes(self, trajectories: list[Trajectory]) -> list[Critique]: ...

    def metrics(self) -> dict[str, float]: ...


class TranscriptCritic:
    """Any :class:`~critique_rl.critics.base.Critic` (rule, hf, openai) as an episode critic: the request's
    ``response`` is the episode transcript (observations and ``> action`` lines), ``reference`` the task's
    ``answer`` column, ``verdict`` the env's success, ``metadata["answer"]`` the last action."""

    def __init__(self, critic: Critic) -> None:
        self.critic = critic

    def critique_episodes(self, trajectories: list[Trajectory]) -> list[Critique]:
        reqs = [CritiqueRequest(question=str(t.task.get("prompt", "")), response=t.transcript(),
                                reference=None if t.task.get("answer") is None else str(t.task["answer"]),
                                verdict=t.success,
                                metadata={"answer": t.turns[-1].action_text.strip() if t.turns else "",
                                          "purpose": "episode"})
                for t in trajectories]
        return self.critic.critique(reqs) if reqs else []

    def metrics(self) -> dict[str, float]:
        return self.critic.metrics()


@dataclass
class EnvSpec:
    """What the episode trainer needs from an environment (see the module docstring)."""

    name: str
    make_env: Callable[..., Env]
    """``make_env(**agent.env_kwargs)`` -> a fresh env."""
    make_tasks: Callable[..., list[dict[str, Any]]]
    """``make_tasks(split, n, seed, **agent.task_kwargs)`` -> task rows (``prompt`` + env columns)."""
    demonstrator: ScriptedPolicy | None = None
    """The imperfect player the SFT warm-up imitates (None: no warm-up possible; set sft_steps: 0)."""
    expert: ScriptedPolicy | None = None
    """The player the warm-up imitates when a critique or lesson is in context (teaches reading them)."""
    critic: Callable[[], EpisodeCritic] | None = None
    """The env's own episode critic (``agent.critique_source: env``)."""


ENVS: Registry[EnvSpec] = Registry("environment", "agent.env")


def register_env(spec: EnvSpec) -> EnvSpec:
    """Make ``spec`` available as ``agent.env: <spec.name>``; a name held by another spec raises."""
    return ENVS.register(spec.name, spec)


def get_env_spec(name: str) -> EnvSpec:
    """The spec for ``agent.env``: a registered name or ``package.module:function`` returning an EnvSpec."""
    if name in ENVS:
        return ENVS[name]
    if ":" in name:
        from critique_rl.tasks import load_callable

        spec = load_callable(name, "agent.env")()
        if not isinstance(spec, EnvSpec):
            raise UserError(f"config field 'agent.env' = {name!r}: the function returned {type(spec).__name__}, "
                            "not an EnvSpec")
        return spec
    raise ConfigError("agent.env", name, f"unknown env; choose one of {sorted(ENVS)} or 'package.module:function' "
                      "returning an EnvSpec")


def _guess_spec() -> EnvSpec:
    from critique_rl.agents import guess

    return EnvSpec(name="guess_number", make_env=guess.GuessNumberEnv, make_tasks=guess.make_tasks,
                   demonstrator=guess.demonstrator, expert=guess.expert, critic=guess.GuessCritic)


register_env(_guess_spec())


def _price_lookup_spec() -> EnvSpec:
    from critique_rl.agents import lookup_env

    return EnvSpec(name="price_lookup", make_env=lookup_env.PriceLookupEnv, make_tasks=lookup_env.make_tasks,
                   demonstrator=lookup_env.ScriptedPlayer(p_skip=lookup_env.DEMONSTRATOR_P_SKIP),
                   expert=lookup_env.ScriptedPlayer(p_skip=0.0), critic=lookup_env.PriceCritic)


register_env(_price_lookup_spec())
