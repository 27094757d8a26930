"""SFT warm-up data for episode training: scripted episodes, turn by turn, as the runner would build them.

Each scripted episode yields one ``(context so far, action)`` pair per turn. :func:`sft_id_pairs` gives them as
**token ids built exactly as the runner builds a context** (:mod:`critique_rl.agents.runner`): the first prompt
``renderer.first(observation, context)``, then per turn the action's ids (``encode(action) + [EOS]``, what an
engine returns for a finished action) and ``renderer.observation(next observation)``, concatenated, never
re-tokenised. So the warm-up trains on the very ids the policy will see in its own episodes; with a chat
template, re-tokenising the joined text (:func:`sft_pairs`) gives other ids for most contexts (merges across a
turn boundary). :func:`sft_pairs` keeps the text form (tokenizer training, text-only SFT).

A share ``context_fraction`` of episodes carries a context (an episode critique of a demonstrator episode, or
the same critique as a memory lesson) and is played by the env's *expert*: that is how a policy trained from
scratch learns to read critiques and lessons at all.
"""

from __future__ import annotations

import random
from typing import Any

from critique_rl.agents.env import as_step_result
from critique_rl.agents.registry import EnvSpec, ScriptedPolicy
from critique_rl.agents.trajectory import Trajectory, Turn, TurnRenderer
from critique_rl.memory.abstraction import Failure, rule_abstraction
from critique_rl.memory.records import Lesson
from critique_rl.templates import render


def play_scripted(spec: EnvSpec, env_kwargs: dict[str, Any], task: dict[str, Any], policy: ScriptedPolicy,
                  rng: random.Random, max_turns: int) -> Trajectory:
    """One episode of ``policy`` in a fresh env (text only: no token ids)."""
    env = spec.make_env(**env_kwargs)
    obs = env.reset(task)
    traj = Trajectory(task=task)
    for _ in range(max_turns):
        action = policy(obs, rng)
        step = as_step_result(env.step(action))
        traj.turns.append(Turn(observation=obs, obs_ids=[], action_ids=[], action_logprobs=[], action_text=action,
                               finished=True, reward=step.reward, info=step.info))
        obs = step.observation
        if step.done:
            traj.done, traj.stop_reason = True, "done"
            traj.success = bool(step.info.get("success", traj.total_reward > 0))
            break
    traj.final_observation = obs
    return traj


def lesson_context(task_name: str, traj: Trajectory, critique: str, template_dir: str | None = None) -> str:
    """The memory context a lesson abstracted from ``traj`` + ``critique`` renders to."""
    draft = rule_abstraction(Failure(question=str(traj.task.get("prompt", "")), response=traj.turns[-1].action_text,
                                     critique=critique, task=task_name))
    if draft is None:
        return ""
    lesson = Lesson(situation=draft.situation, mistake=draft.mistake, instead=draft.instead,
                    applies_when=draft.applies_when)
    return render("memory_context.j2", template_dir, demos=[], lessons=[lesson.render()])


def scripted_episodes(spec: EnvSpec, tasks: list[dict[str, Any]], env_kwargs: dict[str, Any], max_turns: int,
                      context_fraction: float, seed: int,
                      template_dir: str | None = None) -> list[tuple[str | None, Trajectory]]:
    """``(context, episode)`` per task: the demonstrator's episode, or (a ``context_fraction`` share) the
    expert's episode under a critique or lesson of a demonstrator episode. Seeded by ``seed``."""
    if spec.demonstrator is None:
        from critique_rl.errors import UserError

        raise UserError(f"env '{spec.name}' has no scripted demonstrator for the SFT warm-up; set sft_steps: 0")
    rng = random.Random(seed + 11)
    critic = spec.critic() if spec.critic is not None else None
    out: list[tuple[str | None, Trajectory]] = []
    for task in tasks:
        context, policy = None, spec.demonstrator
        if critic is not None and spec.expert is not None and rng.random() < context_fraction:
            first = play_scripted(spec, env_kwargs, task, spec.demonstrator, rng, max_turns)
            crit = critic.critique_episodes([first])[0].text
            context = crit if rng.random() < 0.5 else lesson_context(spec.name, first, crit, template_dir) or crit
            policy = spec.expert
        out.append((context, play_scripted(spec, env_kwargs, task, policy, rng, max_turns)))
    return out


def sft_pairs(spec: EnvSpec, renderer: TurnRenderer, tasks: list[dict[str, Any]], env_kwargs: dict[str, Any],
              max_turns: int, context_fraction: float, seed: int,
              template_dir: str | None = None) -> list[tuple[str, str]]:
    """``(rendered context, action text)`` for every turn of one scripted episode per task (text: tokenising
    the context as one string may differ from the runner's ids; train on :func:`sft_id_pairs`)."""
    pairs: list[tuple[str, str]] = []
    for context, traj in scripted_episodes(spec, tasks, env_kwargs, max_turns, context_fraction, seed, template_dir):
        text = renderer.first_text(traj.turns[0].observation, context)
        for i, t in enumerate(traj.turns):
            if i:
                text += renderer.observation_text(t.observation, True)
            pairs.append((text, t.action_text))
            text += t.action_text + renderer.eos_text
    return pairs


def action_ids(renderer: TurnRenderer, action: str) -> list[int]:
    """The ids of a finished action as an engine returns them: ``encode(action)`` then EOS."""
    if renderer.eos_id is None:
        from critique_rl.errors import UserError

        raise UserError("the tokenizer has no eos_token_id; episode warm-up targets end with EOS")
    return renderer.encode(action) + [int(renderer.eos_id)]


def episode_id_pairs(renderer: TurnRenderer, traj: Trajectory,
                     context: str | None = None) -> list[tuple[list[int], list[int]]]:
    """``(context ids, action ids)`` per turn of ``traj``, the context being the runner's concatenation
    ``first(obs_0, context) + act_0 + observation(obs_1) + act_1 + ...`` (action ids end with EOS)."""
    ids = renderer.first(traj.turns[0].observation, context) if traj.turns else []
    pairs: list[tuple[list[int], list[int]]] = []
    for i, t in enumerate(traj.turns):
        if i:
            ids = ids + renderer.observation(t.observation, True)
        act = action_ids(renderer, t.action_text)
        pairs.append((list(ids), act))
        ids = ids + act
    return pairs


def sft_id_pairs(spec: EnvSpec, renderer: TurnRenderer, tasks: list[dict[str, Any]], env_kwargs: dict[str, Any],
                 max_turns: int, context_fraction: float, seed: int,
                 template_dir: str | None = None) -> list[tuple[list[int], list[int]]]:
    """The warm-up as runner-style token ids: ``(context ids, action ids + [EOS])`` for every turn of the same
    scripted episodes as :func:`sft_pairs` (same seed, same draws). The completion already ends with EOS."""
    return [pair for context, traj in scripted_episodes(spec, tasks, env_kwargs, max_turns, context_fraction, seed,
                                                        template_dir)
            for pair in episode_id_pairs(renderer, traj, context)]
