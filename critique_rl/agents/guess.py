"""Built-in env: guess the number, with higher/lower replies (several policy turns, feedback between them).

The env hides a number in ``[lo, hi]``; the policy writes one number per turn; the env answers ``Higher.`` or
``Lower.`` with the range that is still possible, until the guess is right (success, reward 1) or
``max_guesses`` are used up (reward 0, the number is revealed). Always guessing the middle of the range
(binary search) wins 15 of 16 games on ``[1, 16]`` in 4 guesses; guessing a quarter into the range wins 10.

It comes with what a tiny model needs to learn it on CPU: a scripted **demonstrator** for the SFT warm-up
(an imperfect player: a bad opening guess a quarter into the range, then mostly the middle), the
**expert** (the middle) used for the critique-/lesson-following part of the warm-up, and an episode-level
**rule critic** that names the turns whose guess was not the middle of the range.
"""

from __future__ import annotations

import random
import re
from typing import Any

from critique_rl.agents.env import EpisodeRuleCritic, StepResult
from critique_rl.agents.trajectory import Trajectory

_INT = re.compile(r"-?\d+")
DIRECTIVE = "Instead, guess the middle of the range every turn."


def task_prompt(lo: int, hi: int) -> str:
    return f"Guess my number from {lo} to {hi}."


def make_tasks(split: str, n: int, seed: int, lo: int = 1, hi: int = 16) -> list[dict[str, Any]]:
    """``n`` games: the hidden ``target`` drawn per game (train and eval use different seeds)."""
    rng = random.Random(f"guess:{split}:{seed}")
    return [{"prompt": task_prompt(lo, hi), "answer": str(t), "target": t, "lo": lo, "hi": hi}
            for t in (rng.randint(lo, hi) for _ in range(n))]


class GuessNumberEnv:
    """``reset(task)`` reads ``target``, ``lo``, ``hi`` from the task row; ``step(text)`` reads the first integer
    of the text. ``info["success"]`` is set on the last step."""

    def __init__(self, max_guesses: int = 4) -> None:
        self.max_guesses = max_guesses
        self.target = self.lo = self.hi = 0
        self.guesses = 0

    def reset(self, task: dict[str, Any]) -> str:
        self.target, self.lo, self.hi = int(task["target"]), int(task.get("lo", 1)), int(task.get("hi", 16))
        if not self.lo <= self.target <= self.hi:
            raise ValueError(f"target {self.target} is outside [{self.lo}, {self.hi}]")
        self.guesses = 0
        return task_prompt(self.lo, self.hi)

    def step(self, action: str) -> StepResult:
        self.guesses += 1
        m = _INT.search(action)
        guess = int(m.group(0)) if m else None
        if guess == self.target:
            return StepResult("Correct!", 1.0, True, {"success": True, "guess": guess})
        if self.guesses >= self.max_guesses:
            return StepResult(f"Out of guesses. It was {self.target}.", 0.0, True, {"success": False, "guess": guess})
        if guess is None:
            return StepResult(f"Say one number from {self.lo} to {self.hi}.", 0.0, False, {"guess": None})
        if guess < self.target:
            self.lo = max(self.lo, guess + 1)
            return StepResult(f"Higher. It is from {self.lo} to {self.hi}.", 0.0, False, {"guess": guess})
        self.hi = min(self.hi, guess - 1)
        return StepResult(f"Lower. It is from {self.lo} to {self.hi}.", 0.0, False, {"guess": guess})


_RANGE = re.compile(r"from (-?\d+) to (-?\d+)")


def current_range(observation: str) -> tuple[int, int] | None:
    """The ``(lo, hi)`` an observation states, or None."""
    m = _RANGE.search(observation)
    return (int(m.group(1)), int(m.group(2))) if m else None


def middle(lo: int, hi: int) -> int:
    return (lo + hi) // 2


def expert(observation: str, rng: random.Random) -> str:
    """Binary search: the middle of the stated range."""
    r = current_range(observation)
    return str(middle(*r)) if r else "1"


def demonstrator(observation: str, rng: random.Random, p_bad_opening: float = 0.7, p_random: float = 0.1) -> str:
    """An imperfect player with a bad opening: the first guess is a quarter into the range with probability
    ``p_bad_opening`` (else the middle); later guesses are the middle, or anywhere in the range with
    ``p_random``. Imitated greedily, it wins 5 of 8 games on [1, 8] with 3 guesses (binary search: 7)."""
    r = current_range(observation)
    if r is None:
        return "1"
    lo, hi = r
    if observation.startswith("Guess my number"):
        return str(lo + (hi - lo) // 4) if rng.random() < p_bad_opening else str(middle(lo, hi))
    return str(rng.randint(lo, hi)) if rng.random() < p_random else str(middle(lo, hi))


def critique_text(traj: Trajectory) -> str:
    """Turns whose guess was not the middle of the range, then the directive (or praise when all were)."""
    notes = []
    for i, t in enumerate(traj.turns):
        r = current_range(t.observation)
        m = _INT.search(t.action_text)
        if r is None:
            continue
        mid = middle(*r)
        if m is None:
            notes.append(f"Turn {i + 1}: no number; the middle of {r[0]} to {r[1]} is {mid}.")
        elif int(m.group(0)) != mid:
            notes.append(f"Turn {i + 1}: {m.group(0)} is not the middle of {r[0]} to {r[1]}, which is {mid}.")
    if not notes:
        return f"Every guess was the middle of the range. {DIRECTIVE}"
    return " ".join(notes[:2]) + f" {DIRECTIVE}"


class GuessCritic(EpisodeRuleCritic):
    """Episode-level rule critic for guess-the-number: sees the whole trajectory, writes one critique."""

    critique_text = staticmethod(critique_text)
