"""SFT warm-up data for episode training: scripted episodes rendered turn by turn.

Each scripted episode yields one ``(context so far, action)`` pair per turn, rendered exactly as the runner
renders contexts (:class:`~critique_rl.agents.trajectory.TurnRenderer`), so the warm-up trains the format the
policy will see. A share ``context_fraction`` of episodes carries a context (an episode critique of a
demonstrator episode, or the same critique as a memory lesson) and is played by the env's *expert*: that is
how a policy trained from scratch learns to read critiques and lessons at all.
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


def sft_pairs(spec: EnvSpec, renderer: TurnRenderer, tasks: list[dict[str, Any]], env_kwargs: dict[str, Any],
              max_turns: int, context_fraction: float, seed: int,
              template_dir: str | None = None) -> list[tuple[str, str]]:
    """``(rendered context, action text)`` for every turn of one scripted episode per task."""
    if spec.demonstrator is None:
        from critique_rl.errors import UserError

        raise UserError(f"env '{spec.name}' has no scripted demonstrator for the SFT warm-up; set sft_steps: 0")
    rng = random.Random(seed + 11)
    critic = spec.critic() if spec.critic is not None else None
    pairs: list[tuple[str, str]] = []
    for task in tasks:
        context, policy = None, spec.demonstrator
        if critic is not None and spec.expert is not None and rng.random() < context_fraction:
            first = play_scripted(spec, env_kwargs, task, spec.demonstrator, rng, max_turns)
            crit = critic.critique_episodes([first])[0].text
            context = crit if rng.random() < 0.5 else lesson_context(spec.name, first, crit, template_dir) or crit
            policy = spec.expert
        traj = play_scripted(spec, env_kwargs, task, policy, rng, max_turns)
        text = renderer.first_text(traj.turns[0].observation, context)
        for i, t in enumerate(traj.turns):
            if i:
                text += renderer.observation_text(t.observation, True)
            pairs.append((text, t.action_text))
            text += t.action_text + renderer.eos_text
    return pairs
