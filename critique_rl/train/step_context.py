"""What the stages of one RL step read: a frozen :class:`StepContext` (config, rollout engine, critic, scorer,
prompt format, model handles, process rank/count, RNG, the step's prompt draw), built by the trainer at the start
of every step. The stages (:mod:`~critique_rl.train.sample_stage`, :mod:`~critique_rl.train.critique_stage`,
:mod:`~critique_rl.train.log_stage`, :mod:`~critique_rl.train.selection_stage`) are functions of it: they return
new values and change none of their inputs. The handles they hold (engine, models, sampler, RNG, memory hook) are
the run's live objects; a stage uses them (sampling advances the sampler and the RNG) but never rebinds them.

The episode source (:class:`~critique_rl.agents.source.EpisodeSource`) reads the same way: an :class:`EpisodeRun`
(fixed for the run, given at setup) and an :class:`EpisodeStep` per step; it never holds the trainer.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from critique_rl.config import TrainConfig
from critique_rl.models import format_prompt
from critique_rl.rewards import TrainerState, evaluate_gates, reward_inputs, score_rewards
from critique_rl.rollout.base import Completion, Generator
from critique_rl.train.sampler import PromptSampler
from critique_rl.train.selection import SelectionState


@dataclass(frozen=True)
class PromptFormat:
    """How a row becomes the text and token ids the policy is conditioned on."""

    tokenizer: Any
    use_chat: bool
    max_new_tokens: int

    def text(self, row: dict[str, Any], context: str | None = None) -> str:
        """The formatted prompt of ``row`` (a memory ``context`` first, when given)."""
        prompt = row["prompt"]
        text = prompt if not context else (prompt.with_context(context) if hasattr(prompt, "with_context")
                                           else f"{context}\n{prompt}")
        return format_prompt(self.tokenizer, text, self.use_chat)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Scorer:
    """The current phase's objectives: reward functions (with names and weights), rubric gates and the verifier
    that decides correctness."""

    funcs: list[Any]
    names: list[str]
    weights: torch.Tensor
    gates: list[Any]
    verify: Any
    use_chat: bool
    max_steps: int

    def inputs(self, rows: list[dict[str, Any]], completions: list[Completion], step: int) -> tuple[list, list, dict]:
        """``(prompts, completions, columns)`` as TRL passes them to reward functions, gates and verifiers:
        messages when a chat template is in use, else strings; every dataset column, ``completion_ids``,
        ``trainer_state``, plus ``completion_lengths`` and ``truncated``."""
        return reward_inputs(
            rows, [c.text for c in completions], [c.token_ids for c in completions], conversational=self.use_chat,
            trainer_state=TrainerState(global_step=step, max_steps=self.max_steps),
            extra={"completion_lengths": [len(c.token_ids) for c in completions],
                   "truncated": [not c.finished for c in completions]})

    def score(self, rows: list[dict[str, Any]], completions: list[Completion],
              step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Reward matrix ``[N, K]`` (NaN = not applicable), gate pass mask ``[N]`` and gate pass rates."""
        prompts, comps, columns = self.inputs(rows, completions, step)
        R = score_rewards(self.funcs, prompts, comps, columns)
        if not self.gates:
            return R, torch.ones(len(rows), dtype=torch.bool), {}
        passed, rates = evaluate_gates(self.gates, prompts, comps, columns)
        return R, passed, rates

    def correct(self, rows: list[dict[str, Any]], completions: list[Completion], step: int) -> list[bool]:
        return self.verify.check(*self.inputs(rows, completions, step)) if completions else []


@dataclass(frozen=True)
class Models:
    """The model handles of a step: the prepared policy (what the optimizer updates), the unwrapped policy module,
    the frozen reference (None: none, or LoRA with the adapter disabled as the reference), the EMA teacher's
    module (None: the policy teaches itself) and the accelerator (device, autocast)."""

    model: torch.nn.Module
    policy: torch.nn.Module
    ref_model: torch.nn.Module | None
    teacher: torch.nn.Module | None
    accelerator: Any


@dataclass(frozen=True)
class PromptDraw:
    """Where this step's prompts come from: ``sampler`` (the run's, or an rl phase's own), and either one task
    (``only``, under ``task_order``) or a phase's task weights (``weights``), or neither. ``pool`` is the run's
    sampler (the pool the pass-rate filter shrinks)."""

    sampler: Any
    pool: Any
    only: str | None = None
    weights: dict[str, float] | None = None

    def next_rows(self, count: int) -> list[dict[str, Any]]:
        if self.only is not None:
            return self.sampler.next_batch(count, only=self.only)
        if self.weights:
            return self.sampler.next_batch(count, weights=self.weights)
        return self.sampler.next_batch(count)


@dataclass(frozen=True)
class StepContext:
    """Everything a single-turn step reads (see the module docstring). ``step`` counts the steps done before this
    one; ``refines``: groups get refinement slots (a critic, or the reference-answer control arm)."""

    cfg: TrainConfig
    engine: Generator
    critic: Any
    scorer: Scorer
    fmt: PromptFormat
    models: Models
    rank: int
    world: int
    is_main: bool
    rng: random.Random
    step: int
    task: Any
    draw: PromptDraw
    refines: bool
    sft_completion: Callable[[dict[str, Any]], str]
    memory_hook: Any = None
    memory_on: bool = False


@dataclass(frozen=True)
class EpisodeRun:
    """What an episode source reads of the run once the policy exists (given to its ``setup_model``): the policy
    and tokenizer, the run directory, this process's rank, the process count, whether it is the main process,
    and the barrier every process passes (before a shared file is opened)."""

    model: torch.nn.Module
    tokenizer: Any
    out: Path
    rank: int
    world: int
    is_main: bool
    wait_for_everyone: Callable[[], None]


@dataclass(frozen=True)
class EpisodeStep:
    """What the stages of one step on episodes read (given to ``EpisodeSource.for_step``): the steps done before
    this one, the schedule phase running (its index), the rollout engine, the model handles, the refinement RNG,
    the run's task sampler (a phase with its own tasks has its own), the selection state before the step and the
    rollout log (main process). As in :class:`StepContext` the handles are the run's live objects: sampling
    advances the sampler and the RNG, nothing rebinds them."""

    step: int
    phase: int
    engine: Generator
    models: Models
    rng: random.Random
    sampler: PromptSampler
    selection: SelectionState
    rollout_log: Any = None
