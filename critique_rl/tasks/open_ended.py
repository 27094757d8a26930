"""An open-ended task with many valid answers and no reference answer: ``digit_sum``.

``"digits 3 sum 13:"`` asks for any string of exactly 3 digits whose digits sum to 13 (``"544"``, ``"139"``,
``"706"``... are all right). No single answer exists to inject or quote: the ``answer`` column holds the
constraints (``"len=3 sum=13"``, what the question states), not a solution, and the judge is a rule
(:func:`violations`: which constraints a response breaks). It stands in for a model judge in learning tests of
the critic-as-judge reward (``reward_funcs: [critic]``): a loopback critic can implement the same rule from
the question alone, and the task's verifier checks what it said.

Train and held-out questions are disjoint: a (length, sum, first digit) triple is held out by a fixed hash.
"""

from __future__ import annotations

import itertools
import random
import re

from critique_rl.tasks.base import Example, Task

_SPEC = re.compile(r"len=(\d+)\s+sum=(\d+)(?:\s+first=(\d))?")
_DIGITS = re.compile(r"\d+")


def _spec(answer: str) -> tuple[int, int, int | None]:
    m = _SPEC.search(answer or "")
    if not m:
        raise ValueError(f"digit_sum answer column {answer!r} is not 'len=L sum=S [first=D]'")
    return int(m.group(1)), int(m.group(2)), int(m.group(3)) if m.group(3) else None


def _valid(length: int, total: int, first: int, rng: random.Random) -> str | None:
    """A uniformly drawn string of ``length`` digits starting with ``first`` whose digits sum to ``total``, or
    None when there is none."""
    free = total - first
    choices = [c for c in itertools.product(range(10), repeat=length - 1) if sum(c) == free]
    return str(first) + "".join(map(str, rng.choice(choices))) if choices else None


def _held_out(length: int, total: int, first: int) -> bool:
    return (length * 31 + total * 7 + first) % 5 == 0


def make_digit_sum(split: str, n: int, seed: int = 0) -> list[Example]:
    """Rows ``{"prompt": "digits L sum S first D:", "answer": "len=L sum=S first=D"}`` (L in 3..4)."""
    rng = random.Random(seed * 7919 + (1 if split == "eval" else 0))
    rows: list[Example] = []
    while len(rows) < n:
        length = rng.randint(3, 4)
        first = rng.randint(1, 9)
        total = rng.randint(first + 1, first + 9 * (length - 1) - 1)
        if _held_out(length, total, first) != (split == "eval"):
            continue
        rows.append({"prompt": f"digits {length} sum {total} first {first}:",
                     "answer": f"len={length} sum={total} first={first}",
                     "example": _valid(length, total, first, random.Random(f"{length}-{total}-{first}-{len(rows)}-{seed}"))})
    return rows


def violations(completion: str, answer: str) -> list[str]:
    """The constraints ``completion`` breaks (empty = valid): its first run of digits must have the length,
    the digit sum and the first digit the spec asks for."""
    length, total, first = _spec(answer)
    found = _DIGITS.findall(completion or "")
    if not found:
        return ["no digits in the answer"]
    got = found[0]
    out = []
    if len(got) != length:
        out.append(f"it has {len(got)} digits, not {length}")
    if sum(map(int, got)) != total:
        out.append(f"its digits sum to {sum(map(int, got))}, not {total}")
    if first is not None and got[0] != str(first):
        out.append(f"it starts with {got[0]}, not {first}")
    return out


def verify_digit_sum(completion: str, answer: str) -> bool:
    """The rule judge: no violated constraint."""
    return not violations(completion, answer)


def extract_digits(completion: str) -> str | None:
    found = _DIGITS.findall(completion or "")
    return found[0] if found else None


def off_by_one(ex: Example) -> str | None:
    """The typical mistake: a valid-looking answer whose digits sum to one more than asked."""
    length, total, first = _spec(ex["answer"])
    return _valid(length, total + 1, first, random.Random(ex["prompt"]))


DIGIT_SUM = Task(
    name="digit_sum",
    make_examples=make_digit_sum,
    verify=verify_digit_sum,
    extract=extract_digits,
    description="open-ended: any digit string of the asked length, digit sum and first digit (many valid answers, "
                "no reference answer; the rule judge names the violated constraints)",
    sft_completion=lambda ex: ex["example"],
    max_new_tokens=6,
    mistake=off_by_one,
)
