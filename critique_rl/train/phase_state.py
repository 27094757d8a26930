"""The training schedule's state: the phases (``phases``, or sft + rl), each phase's own data (a sampler per
``train_file``) and objectives, and what entering an rl phase makes current. Functions of the config and the
run's objectives; they return what they build and the trainer keeps it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from critique_rl.data import DataOptions, load_rows
from critique_rl.rewards import build_reward_funcs, func_name
from critique_rl.train.prompt_setup import kwargs_for
from critique_rl.train.sampler import PromptSampler


def setup_phases(cfg: Any) -> tuple[list[Any], dict[str, list[dict[str, Any]]], dict[str, PromptSampler]]:
    """The schedule (``phases``, or sft + rl) and each phase's own data: the rows of every ``train_file`` and a
    sampler over them (seeded like the run's; checkpointed under the file's name)."""
    phases = cfg.schedule()
    rows: dict[str, list[dict[str, Any]]] = {}
    samplers: dict[str, PromptSampler] = {}
    for i, ph in enumerate(phases):
        if ph.train_file and ph.train_file not in rows:
            rows[ph.train_file] = load_rows(ph.train_file, field=f"phases[{i}].train_file",
                                            options=DataOptions.from_config(cfg))
            samplers[ph.train_file] = PromptSampler(rows[ph.train_file], cfg.seed)
    return phases, rows, samplers


@dataclass(frozen=True)
class PhaseInputs:
    """What an rl phase makes current: its own prompt sampler (None: the run's), its mix of the run's tasks (None:
    the run's weights) and its objectives ``(reward functions, names, weights)``."""

    sampler: PromptSampler | None
    task_weights: dict[str, float] | None
    rewards: tuple[list[Any], list[str], torch.Tensor]


def enter_phase(cfg: Any, ph: Any, samplers: dict[str, PromptSampler], task: Any,
                run_rewards: tuple[list[Any], list[str], torch.Tensor]) -> PhaseInputs:
    """The inputs of rl phase ``ph``: its ``train_file``'s sampler, its ``tasks`` weights, and its reward functions
    and weights (built for ``task``), else the run's (``run_rewards``)."""
    sampler = samplers.get(ph.train_file) if ph.train_file else None
    if ph.reward_funcs is None and ph.reward_weights is None:
        return PhaseInputs(sampler, ph.tasks, run_rewards)
    funcs = (run_rewards[0] if ph.reward_funcs is None else
             build_reward_funcs(list(ph.reward_funcs), task, kwargs_for(list(ph.reward_funcs), cfg.reward_kwargs)))
    weights = ph.reward_weights or (cfg.reward_weights if ph.reward_funcs is None else None) or [1.0] * len(funcs)
    return PhaseInputs(sampler, ph.tasks, (funcs, [func_name(f) for f in funcs],
                                           torch.tensor(weights, dtype=torch.float32)))


def phase_name(phases: list[Any], index: int) -> str:
    """A phase's ``name``, or its kind and index (``sft0``, ``rl1``)."""
    ph = phases[index]
    return ph.name or f"{ph.kind}{index}"
