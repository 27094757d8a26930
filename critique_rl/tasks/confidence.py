"""Two-digit addition with a verbalised confidence (RLCR, arXiv:2507.16806).

Same problems, splits and verifier as ``addition``; the completion is the answer followed by
``<confidence>q</confidence>`` with ``q`` in [0, 1], e.g. ``"85 <confidence>0.7</confidence>"``. The verifier
ignores the tag (``final_answer_span`` strips it); the ``brier`` reward scores it.
"""

from __future__ import annotations

import random

from critique_rl.tasks.arithmetic import drop_carry, extract_number, make_addition, verify_number
from critique_rl.tasks.base import Example, Task

CONFIDENCE_FORMAT = r"\s*-?\d+\s*<confidence>\s*(?:0(?:\.\d+)?|1(?:\.0+)?|\.\d+)\s*</confidence>\s*"
"""Regex (``re.fullmatch``) of a well-formed ``addition_conf`` completion; the ``format`` reward's default."""

_CONF_CHOICES = ("0.5", "0.6", "0.7", "0.8", "0.9", "1.0")


def carries(a: int, b: int) -> int:
    """Number of carries in the column addition of two two-digit numbers (0, 1 or 2)."""
    units = (a % 10 + b % 10) >= 10
    tens = (a // 10 + b // 10 + int(units)) >= 10
    return int(units) + int(tens)


def sft_confidence(ex: Example) -> str:
    """The SFT target's confidence: a seeded draw from 0.5..1.0, fixed per problem.

    The warm-up teaches the *format* and a diffuse prior over confidence values, not a calibration: RL with the
    brier reward (RLCR, arXiv:2507.16806) then has values to choose between and moves them towards the
    policy's accuracy. (A prior with one value per difficulty class left brier nothing to explore: ECE did
    not move in benchmarks/multi_objective.py.)
    """
    return random.Random(f"conf:{ex['a']}+{ex['b']}").choice(_CONF_CHOICES)


def sft_completion_conf(ex: Example) -> str:
    """``"<answer> <confidence>q</confidence>"`` with ``q`` from :func:`sft_confidence`."""
    return f"{ex['answer']} <confidence>{sft_confidence(ex)}</confidence>"


def mistake_conf(ex: Example) -> str | None:
    """The dropped-carry mistake, stated with the same confidence as a correct demonstration."""
    wrong = drop_carry(ex)
    return None if wrong is None else f"{wrong} <confidence>{sft_confidence(ex)}</confidence>"


ADDITION_CONF = Task(
    name="addition_conf",
    make_examples=make_addition,
    verify=verify_number,
    extract=extract_number,
    description="two-digit addition, answer then <confidence>q</confidence> (brier reward, RLCR)",
    sft_completion=sft_completion_conf,
    mistake=mistake_conf,
    max_new_tokens=16,  # longest SFT target is 12 tokens + EOS; slack for 2-decimal q
)
