"""Reward-function protocol and registry.

A reward function is any callable ``(prompts, completions, **dataset_columns) -> list[float | None]``
(None = not applicable to that sample). The registry maps a name to a *factory* ``(task) -> RewardFunc`` so
built-ins can bind the task's verifier.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from critique_rl.errors import UserError
from critique_rl.tasks import Task, load_callable


class RewardFunc(Protocol):
    __name__: str

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]: ...


RewardFactory = Callable[[Task], RewardFunc]
REWARD_FUNCS: dict[str, RewardFactory] = {}


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    def deco(factory: RewardFactory) -> RewardFactory:
        REWARD_FUNCS[name] = factory
        return factory

    return deco


@register_reward("correctness")
def correctness_factory(task: Task) -> RewardFunc:
    """1.0 when the task verifier accepts the completion against the reference ``answer`` column, else 0.0."""

    def correctness(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float | None]:
        return [1.0 if task.verify(c, a) else 0.0 for c, a in zip(completions, answer, strict=True)]

    return correctness


def build_reward_funcs(names: list[str], task: Task) -> list[RewardFunc]:
    """Resolve names from the registry, or ``pkg.module:fn`` / ``file.py:fn`` user functions."""
    funcs: list[RewardFunc] = []
    for name in names:
        if name in REWARD_FUNCS:
            funcs.append(REWARD_FUNCS[name](task))
        elif ":" in name:
            funcs.append(load_callable(name, what="reward function"))
        else:
            raise UserError(
                f"config field 'reward_funcs' has unknown reward {name!r}; choose from {sorted(REWARD_FUNCS)} "
                "or give 'package.module:function'"
            )
    return funcs
