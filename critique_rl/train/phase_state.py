"""The training schedule's state: the phases (``phases``, or sft + rl), each phase's own data (a sampler per
``train_file``) and objectives, and entering an rl phase. Functions of the trainer (``t``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from critique_rl.data import DataOptions, load_rows
from critique_rl.rewards import build_reward_funcs, func_name
from critique_rl.train.prompt_setup import kwargs_for
from critique_rl.train.sampler import PromptSampler

if TYPE_CHECKING:
    from critique_rl.train.trainer import CritiqueGRPOTrainer


def setup_phases(t: CritiqueGRPOTrainer) -> None:
    """The schedule (``phases``, or sft + rl), each phase's own data (a sampler per ``train_file``, seeded
    like the run's) and objectives (reward functions and weights)."""
    cfg = t.cfg
    t.phases = cfg.schedule()
    t._phases_done = 0
    t._phase_sampler: PromptSampler | None = None
    t._phase_task_weights: dict[str, float] | None = None
    t._phase_rows: dict[str, list[dict[str, Any]]] = {}
    t._phase_samplers: dict[str, PromptSampler] = {}
    for i, ph in enumerate(t.phases):
        if ph.train_file and ph.train_file not in t._phase_rows:
            t._phase_rows[ph.train_file] = load_rows(ph.train_file, field=f"phases[{i}].train_file",
                                                     options=DataOptions.from_config(cfg))
            t._phase_samplers[ph.train_file] = PromptSampler(t._phase_rows[ph.train_file], cfg.seed)
    t._run_rewards = (t.reward_funcs, t.reward_names, t.reward_weights)


def enter_phase(t: CritiqueGRPOTrainer, index: int) -> None:
    """Make phase ``index``'s data and objectives current (rl phases)."""
    ph = t.phases[index]
    t._phase_sampler = t._phase_samplers.get(ph.train_file) if ph.train_file else None
    t._phase_task_weights = ph.tasks  # a phase's own mix of the run's tasks (None = the run's weights)
    if ph.reward_funcs is None and ph.reward_weights is None:
        t.reward_funcs, t.reward_names, t.reward_weights = t._run_rewards
        return
    funcs = (t._run_rewards[0] if ph.reward_funcs is None else
             build_reward_funcs(list(ph.reward_funcs), t.task, kwargs_for(list(ph.reward_funcs), t.cfg.reward_kwargs)))
    weights = ph.reward_weights or (t.cfg.reward_weights if ph.reward_funcs is None else None) \
        or [1.0] * len(funcs)
    t.reward_funcs, t.reward_names = funcs, [func_name(f) for f in funcs]
    t.reward_weights = torch.tensor(weights, dtype=torch.float32)


def phase_name(phases: list[Any], index: int) -> str:
    """A phase's ``name``, or its kind and index (``sft0``, ``rl1``)."""
    ph = phases[index]
    return ph.name or f"{ph.kind}{index}"
