"""Two-digit addition with a verbalised confidence (RLCR, arXiv:2507.16806).

Same problems, splits and verifier as ``addition``; the completion is the answer followed by
``<confidence>q</confidence>`` with ``q`` in [0, 1], e.g. ``"85 <confidence>0.7</confidence>"``. The verifier
ignores the tag (``final_answer_span`` strips it); the ``brier`` reward scores it.
"""

from __future__ import annotations

from critique_rl.tasks.arithmetic import drop_carry, extract_number, make_addition, verify_number
from critique_rl.tasks.base import Example, Task

CONFIDENCE_FORMAT = r"\s*-?\d+\s*<confidence>\s*(?:0(?:\.\d+)?|1(?:\.0+)?|\.\d+)\s*</confidence>\s*"
"""Regex (``re.fullmatch``) of a well-formed ``addition_conf`` completion; the ``format`` reward's default."""

# SFT confidence by number of carries (a difficulty proxy): the targets teach the format and a plausible,
# non-constant calibration prior; RL with the brier reward then calibrates it to the model's accuracy.
_CONF_BY_CARRIES = {0: "0.9", 1: "0.7", 2: "0.6"}


def carries(a: int, b: int) -> int:
    """Number of carries in the column addition of two two-digit numbers (0, 1 or 2)."""
    units = (a % 10 + b % 10) >= 10
    tens = (a // 10 + b // 10 + int(units)) >= 10
    return int(units) + int(tens)


def sft_confidence(ex: Example) -> str:
    """The SFT target's confidence string: 0.9 without a carry, 0.7 with one, 0.6 with two."""
    return _CONF_BY_CARRIES[carries(int(ex["a"]), int(ex["b"]))]


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
