"""The experience task as a multi-turn environment (issue #28 item 1): ``agent.env:
critique_rl.tasks.experience_multiturn:spec``.

Each episode is one question of :mod:`critique_rl.tasks.experience` (``"qix:47="`` -> the entity's secret
three-digit code then the number, ``"58347"``). The policy answers; a wrong first answer gets the env's
feedback, which reveals the fact (``"Wrong. qix has code 583. qix:47="``), and one more try. So within an
episode the feedback teaches the fact, and across episodes only memory carries it: a policy that read the
lesson of an earlier episode answers right at once.

- ``success`` (``info["success"]``): right at the first try (what memory can change);
- reward: 1 at the first try, :data:`SECOND_TRY_REWARD` after the reveal, 0 otherwise;
- splits: :func:`make_tasks` draws training and held-out questions exactly like the single-turn task
  (held-out numbers never trained on, about the same entities; ``split="novel"``: the control entities);
- :class:`VaultCritic` (episode rule critic) states the fact and the right answer; the rule abstraction
  registered for this env turns a failed episode into the same lesson as the single-turn task's
  (``"When a question names qix, its code is 583. Avoid: guessed the code."``), quoting the question.
- scripted players for the SFT warm-up: :func:`demonstrator` guesses a code it knows for another entity,
  then copies the revealed code; :func:`reader` (for warm-ups with memory in the prompt) answers from a lesson
  or demonstration in its context when one names the entity (see :func:`reader_episode`).
"""

from __future__ import annotations

import random
import re
from typing import Any

from critique_rl.agents.env import EpisodeRuleCritic, StepResult
from critique_rl.agents.registry import EnvSpec
from critique_rl.agents.trajectory import Trajectory, Turn
from critique_rl.memory.abstraction import Failure, LessonDraft, register_abstraction
from critique_rl.tasks.experience import (
    CODES,
    KNOWN,
    answer_for,
    experience_lesson,
    extract_answer,
    make_experience,
    make_novel_eval,
)

NAME = "experience_multiturn"
SECOND_TRY_REWARD = 0.5
"""Reward for the right answer after the env revealed the code (the first try earns 1)."""
_REVEAL = re.compile(r"([a-z]+) has code (\d{3})\.")
_Q = re.compile(r"([a-z]+):(\d+)=")


def make_tasks(split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``train``/``eval`` rows of :func:`critique_rl.tasks.experience.make_experience`; ``novel``: the control
    entities no training episode names (:func:`make_novel_eval`)."""
    if split == "novel":
        return make_novel_eval(n, seed)
    if split not in ("train", "eval"):
        raise ValueError(f"split = {split!r}: use 'train', 'eval' or 'novel'")
    return make_experience(split, n, seed)


class ExperienceVaultEnv:
    """``reset(task)`` reads ``prompt`` and ``answer`` (and ``entity``, ``code``) from a :func:`make_tasks` row;
    ``step(text)`` reads the first number of the text's final-answer span. At most ``max_tries`` answers."""

    def __init__(self, max_tries: int = 2) -> None:
        if max_tries < 1:
            raise ValueError(f"max_tries = {max_tries!r}; use 1 or more")
        self.max_tries = max_tries
        self.task: dict[str, Any] = {}
        self.tries = 0

    def reset(self, task: dict[str, Any]) -> str:
        for col in ("prompt", "answer", "entity", "code"):
            if col not in task:
                raise ValueError(f"experience_multiturn task row has no '{col}' column; build rows with make_tasks")
        self.task, self.tries = task, 0
        return str(task["prompt"])

    def step(self, action: str) -> StepResult:
        self.tries += 1
        got = extract_answer(action)
        right = got == str(self.task["answer"])
        if right:
            reward = 1.0 if self.tries == 1 else SECOND_TRY_REWARD
            return StepResult("Correct!", reward, True, {"success": self.tries == 1, "tries": self.tries})
        if self.tries >= self.max_tries:
            return StepResult(f"Wrong. The answer was {self.task['answer']}.", 0.0, True,
                              {"success": False, "tries": self.tries})
        return StepResult(f"Wrong. {self.task['entity']} has code {int(self.task['code'])}. {self.task['prompt']}",
                          0.0, False, {"tries": self.tries})


def critique_text(traj: Trajectory) -> str:
    """States the fact the episode needed and the right answer (or praises a first-try answer)."""
    task = traj.task
    if traj.success:
        return f"Right at the first try: {task['entity']} has code {int(task['code'])}."
    return (f"The question names {task['entity']}, whose code is {int(task['code'])}: the answer to {task['prompt']} "
            f"is {task['answer']}. Remember the code of {task['entity']} for the next question about it.")


class VaultCritic(EpisodeRuleCritic):
    """Episode-level rule critic of the multi-turn experience env."""

    critique_text = staticmethod(critique_text)


@register_abstraction(NAME)
def vault_lesson(failure: Failure) -> LessonDraft | None:
    """The single-turn task's lesson (entity and code from the question and the reference answer), tagged with
    this env's name."""
    draft = experience_lesson(failure)
    if draft is None:
        return None
    return LessonDraft(draft.situation, draft.mistake, draft.instead, draft.applies_when,
                       (NAME, *[t for t in draft.tags if t.startswith("entity:")]))


def _known_guess(entity: str, number: int) -> str:
    others = sorted(KNOWN)
    return answer_for(KNOWN[others[sum(map(ord, entity)) % len(others)]], number)


def demonstrator(observation: str, rng: random.Random) -> str:
    """Copies a revealed code (``"qix has code 583."``); else answers a ``KNOWN`` entity's code from memory of
    the warm-up, and for any other entity guesses the code of a known one (wrong)."""
    q = _Q.search(observation)
    if q is None:
        return "0"
    entity, number = q.group(1), int(q.group(2))
    shown = _REVEAL.search(observation)
    if shown and shown.group(1) == entity:
        return answer_for(int(shown.group(2)), number)
    if entity in KNOWN:
        return answer_for(KNOWN[entity], number)
    return _known_guess(entity, number)


def reader(observation: str, context: str | None) -> str:
    """The player a memory warm-up imitates: the code from a record in ``context`` that names the entity (a
    lesson ``"... names qix, its code is 583"`` or a demonstration ``"Q: qix:31= / A: 58331"``), else
    :func:`demonstrator`."""
    q = _Q.search(observation)
    if q is not None and context and not _REVEAL.search(observation):
        entity, number = q.group(1), int(q.group(2))
        m = re.search(rf"names {entity}, its code is (\d{{3}})", context)
        if m is None:
            m = re.search(rf"Q: {entity}:(\d+)=\s*A: (\d{{3}})\1\b", context)
            code = m.group(2) if m else None
        else:
            code = m.group(1)
        if code is not None:
            return answer_for(int(code), number)
    return demonstrator(observation, random.Random(0))


def reader_episode(task: dict[str, Any], context: str | None, max_tries: int = 2) -> Trajectory:
    """One scripted episode of :func:`reader` under ``context`` (text only: no token ids), for warm-up data."""
    env = ExperienceVaultEnv(max_tries)
    obs = env.reset(task)
    traj = Trajectory(task=task, context=context)
    for _ in range(max_tries):
        action = reader(obs, context)
        step = env.step(action)
        traj.turns.append(Turn(observation=obs, obs_ids=[], action_ids=[], action_logprobs=[], action_text=action,
                               finished=True, reward=step.reward, info=step.info))
        obs = step.observation
        if step.done:
            traj.done, traj.success = True, bool(step.info.get("success"))
            break
    traj.final_observation = obs
    return traj


def spec() -> EnvSpec:
    """The env spec (``agent.env: critique_rl.tasks.experience_multiturn:spec``). Its ``expert`` is the
    demonstrator: the generic warm-up cannot show a policy the memory context, so a run whose policy must read
    memory warms up on :func:`reader_episode` data instead (``benchmarks/memory_agent.py``)."""
    return EnvSpec(name=NAME, make_env=ExperienceVaultEnv, make_tasks=make_tasks, demonstrator=demonstrator,
                   expert=demonstrator, critic=VaultCritic)


__all__ = ["CODES", "NAME", "SECOND_TRY_REWARD", "ExperienceVaultEnv", "VaultCritic", "critique_text", "demonstrator",
           "make_tasks", "reader", "reader_episode", "spec", "vault_lesson"]
