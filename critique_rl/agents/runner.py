"""Batched episode runner over the :class:`~critique_rl.rollout.base.Generator` protocol.

Every turn, the contexts of all episodes still running go to the engine in **one** batched call, then their
envs are stepped **concurrently** (``asyncio.gather``; async envs interleave, sync ones run in worker threads
with ``threaded=True``). Contexts are token ids: the engine's ``generate_ids`` is used when it has one
(:class:`~critique_rl.rollout.hf.HFGenerator` does); an engine with only ``generate(prompts)`` gets the
decoded context (the trajectory still keeps the exact ids it returned).

Limits: ``max_turns`` policy turns per episode, ``max_new_tokens`` per turn (an action cut there has
``finished=False``), ``max_episode_tokens`` for the whole context (the episode stops with
``stop_reason="max_tokens"`` before a turn that could overflow it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from critique_rl.agents.env import EnvFactory, StepResult, as_step_result, maybe_await
from critique_rl.agents.trajectory import Trajectory, Turn, TurnRenderer
from critique_rl.critics.base import run_sync, short_error
from critique_rl.rollout.base import Completion, Generator, SamplingParams

ContextFn = Callable[[list[dict[str, Any]], list[str]], list[tuple[str, list[str]]]]
"""``(tasks, first_observations) -> [(context_text, retrieved_record_ids)]``, one per episode."""


@dataclass
class EpisodeLimits:
    """``max_turns`` policy turns; ``max_new_tokens`` per action; ``max_episode_tokens`` in the whole context
    (None: no limit)."""

    max_turns: int = 5
    max_new_tokens: int = 16
    max_episode_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns = {self.max_turns}: use >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {self.max_new_tokens}: use >= 1")


def generate_from_ids(generator: Generator, tokenizer: Any, prompt_ids: list[list[int]],
                      params: SamplingParams) -> list[list[Completion]]:
    """``generator.generate_ids`` when the engine has it, else ``generate`` on the decoded contexts."""
    fn = getattr(generator, "generate_ids", None)
    if callable(fn):
        return fn(prompt_ids, params)
    texts = [tokenizer.decode(p, skip_special_tokens=False) for p in prompt_ids]
    return generator.generate(texts, params)


class _Live:
    """An episode in flight: its env, trajectory and current context ids."""

    def __init__(self, env: Any, traj: Trajectory) -> None:
        self.env = env
        self.traj = traj
        self.ids: list[int] = []
        self.obs = ""
        self.running = True


async def _call(fn: Any, arg: Any, threaded: bool) -> Any:
    if threaded:
        return await maybe_await(await asyncio.to_thread(fn, arg))
    return await maybe_await(fn(arg))


async def arun_episodes(
    generator: Generator,
    renderer: TurnRenderer,
    env_factory: EnvFactory,
    tasks: Sequence[dict[str, Any]],
    *,
    n: int = 1,
    contexts: Sequence[str | None] | None = None,
    limits: EpisodeLimits | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    threaded: bool = False,
    context_fn: ContextFn | None = None,
) -> list[Trajectory]:
    """Run ``n`` episodes per task (contiguous: episodes ``i*n .. i*n+n-1`` are task ``i``'s group).

    ``contexts[i]``: text rendered as the system message of task ``i``'s first prompt (e.g. a critique).
    ``context_fn(tasks, first_observations) -> [(text, record_ids)]``: called once after every env was reset
    (memory retrieval from task + first observation); its text comes first in the system message and is kept
    as :attr:`Trajectory.memory_context`, the ids as :attr:`Trajectory.retrieved_ids`."""
    limits = limits or EpisodeLimits()
    if contexts is not None and len(contexts) != len(tasks):
        raise ValueError(f"contexts has {len(contexts)} entries for {len(tasks)} tasks")
    live: list[_Live] = []
    for i, task in enumerate(tasks):
        ctx = contexts[i] if contexts is not None else None
        for _ in range(n):
            live.append(_Live(env_factory(), Trajectory(task=task, context=ctx or None)))
    firsts = await asyncio.gather(*(_call(e.env.reset, e.traj.task, threaded) for e in live),
                                  return_exceptions=True)
    for e, obs in zip(live, firsts, strict=True):
        if isinstance(obs, BaseException):
            _fail(e, f"reset failed: {obs}")
            continue
        e.obs = str(obs)
    ok = [e for e in live if e.running]
    if context_fn is not None and ok:
        got = context_fn([e.traj.task for e in ok], [e.obs for e in ok])
        if len(got) != len(ok):
            raise ValueError(f"context_fn returned {len(got)} contexts for {len(ok)} episodes")
        for e, (text, ids) in zip(ok, got, strict=True):
            e.traj.memory_context = text or None
            e.traj.retrieved_ids = list(ids)
            e.traj.context = "\n\n".join(x for x in (text, e.traj.context) if x) or None
    for e in ok:
        e.ids = renderer.first(e.obs, e.traj.context)
    params = SamplingParams(n=1, temperature=temperature, top_p=top_p, max_new_tokens=limits.max_new_tokens,
                            greedy=greedy)
    pending_obs_ids: dict[int, list[int]] = {id(e): list(e.ids) for e in live if e.running}
    for _turn in range(limits.max_turns):
        active = [e for e in live if e.running]
        for e in active:
            if limits.max_episode_tokens is not None and len(e.ids) + limits.max_new_tokens > limits.max_episode_tokens:
                e.running = False
                e.traj.stop_reason = "max_tokens"
                e.traj.final_observation = e.obs if e.traj.turns else None
        active = [e for e in active if e.running]
        if not active:
            break
        outs = generate_from_ids(generator, renderer.tokenizer, [e.ids for e in active], params)
        for e, group in zip(active, outs, strict=True):
            c = group[0]
            e.traj.turns.append(Turn(observation=e.obs, obs_ids=pending_obs_ids.pop(id(e)),
                                     action_ids=list(c.token_ids), action_logprobs=list(c.logprobs),
                                     action_text=c.text, finished=c.finished))
            e.ids = e.ids + list(c.token_ids)
        results = await asyncio.gather(*(_call(e.env.step, e.traj.turns[-1].action_text, threaded)
                                         for e in active), return_exceptions=True)
        for e, res in zip(active, results, strict=True):
            if isinstance(res, BaseException):
                _fail(e, f"step failed: {res}")
                continue
            try:
                step: StepResult = as_step_result(res)
            except TypeError as exc:
                _fail(e, str(exc))
                continue
            turn = e.traj.turns[-1]
            turn.reward, turn.info = step.reward, step.info
            e.obs = step.observation
            if step.done:
                e.running = False
                e.traj.done = True
                e.traj.stop_reason = "done"
                e.traj.final_observation = step.observation
                e.traj.success = (bool(step.info["success"]) if "success" in step.info
                                  else e.traj.total_reward > 0)
                continue
            delta = renderer.observation(step.observation, turn.finished)
            pending_obs_ids[id(e)] = delta
            e.ids = e.ids + delta
    for e in live:
        if e.running:  # ran out of turns: the last observation is the env's reply, not a context
            e.running = False
            e.traj.stop_reason = "max_turns"
            e.traj.final_observation = e.obs
    return [e.traj for e in live]


def _fail(e: _Live, message: str) -> None:
    e.running = False
    e.traj.stop_reason = "error"
    e.traj.error = short_error(message)
    e.traj.success = False


def run_episodes(generator: Generator, renderer: TurnRenderer, env_factory: EnvFactory,
                 tasks: Sequence[dict[str, Any]], **kwargs: Any) -> list[Trajectory]:
    """Synchronous :func:`arun_episodes` (works inside a running event loop too)."""
    return run_sync(lambda: arun_episodes(generator, renderer, env_factory, tasks, **kwargs))
