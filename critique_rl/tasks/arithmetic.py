"""Two-digit addition: ``"47+38="`` -> ``"85"``. Train and eval pairs are disjoint by construction."""

from __future__ import annotations

import random

from critique_rl.primitives import parse_number
from critique_rl.tasks.base import Example, Task

_ALL_PAIRS = [(a, b) for a in range(10, 100) for b in range(10, 100)]
_EVAL_POOL = 1000


def _split_pairs(split: str) -> list[tuple[int, int]]:
    pairs = list(_ALL_PAIRS)
    random.Random(1234).shuffle(pairs)  # fixed split, independent of the run seed
    return pairs[:_EVAL_POOL] if split == "eval" else pairs[_EVAL_POOL:]


def make_addition(split: str, n: int, seed: int = 0, carry_only: bool = False) -> list[Example]:
    """``n`` problems from ``split`` ("train" samples with replacement, "eval" without); ``carry_only``: only
    pairs whose ones digits sum to 10 or more."""
    pool = [(a, b) for a, b in _split_pairs(split) if not carry_only or a % 10 + b % 10 >= 10]
    rng = random.Random(seed)
    if split == "eval":
        chosen = rng.sample(pool, min(n, len(pool)))
    else:
        chosen = [rng.choice(pool) for _ in range(n)]
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b), "a": a, "b": b} for a, b in chosen]


def verify_number(completion: str, answer: str) -> bool:
    got = parse_number(completion)
    return got is not None and abs(got - float(answer)) < 1e-9


def extract_number(completion: str) -> str | None:
    got = parse_number(completion)
    if got is None:
        return None
    return str(int(got)) if got == int(got) else str(got)


def needs_carry(ex: Example) -> bool:
    """Whether the ones digits sum to 10 or more."""
    return int(ex["a"]) % 10 + int(ex["b"]) % 10 >= 10


def drop_carry(ex: Example) -> str | None:
    """The classic mistake: forget to carry the 1 from the ones into the tens (47+38 -> 75)."""
    return str(int(ex["a"]) + int(ex["b"]) - 10) if needs_carry(ex) else None


ADDITION = Task(
    name="addition",
    make_examples=make_addition,
    verify=verify_number,
    extract=extract_number,
    description="two-digit addition, answer is the sum",
    max_new_tokens=6,
    mistake=drop_carry,
)


def make_carry_addition(split: str, n: int, seed: int = 0) -> list[Example]:
    """Two-digit additions that all need a carry (``47+38=``), from the same disjoint train/eval split."""
    return make_addition(split, n, seed, carry_only=True)


CARRY_ADDITION = Task(
    name="addition_carry",
    make_examples=make_carry_addition,
    verify=verify_number,
    extract=extract_number,
    description="two-digit additions that all need a carry (the plateau task: with sft_mistake_rate near 1 the "
                "warmed-up policy almost never carries, so most GRPO groups are all wrong)",
    max_new_tokens=6,
    mistake=drop_carry,
)
