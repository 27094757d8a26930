"""Word reversal: ``"rev:abcd="`` -> ``"dcba"``: a string answer instead of a number."""

from __future__ import annotations

import random
import re
import string

from critique_rl.primitives import final_answer_span
from critique_rl.tasks.base import Example, Task

_WORD = re.compile(r"[a-z]+")


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase[:12]) for _ in range(rng.randint(3, 5)))


def make_reverse(split: str, n: int, seed: int = 0) -> list[Example]:
    """Words over a 12-letter alphabet; a word is eval iff its hash bucket says so (disjoint splits)."""
    rng = random.Random(seed * 7919 + (1 if split == "eval" else 0))
    rows: list[Example] = []
    seen: set[str] = set()
    while len(rows) < n:
        w = _word(rng)
        is_eval = sum(ord(c) * (i + 1) for i, c in enumerate(w)) % 5 == 0
        if is_eval != (split == "eval"):
            continue
        if split == "eval":
            if w in seen:
                continue
            seen.add(w)
        rows.append({"prompt": f"rev:{w}=", "answer": w[::-1], "word": w})
    return rows


def extract_word(completion: str) -> str | None:
    words = _WORD.findall(final_answer_span(completion).lower())
    return words[-1] if words else None


def verify_word(completion: str, answer: str) -> bool:
    return extract_word(completion) == answer.strip().lower()


def swap_ends(ex: Example) -> str | None:
    """The typical mistake: swap the first and last letters only (abcd -> dbca); same as reversing for 3 letters."""
    w = ex["word"]
    return None if len(w) <= 3 else w[-1] + w[1:-1] + w[0]


REVERSE = Task(
    name="reverse",
    make_examples=make_reverse,
    verify=verify_word,
    extract=extract_word,
    description="reverse a 3-5 letter word",
    max_new_tokens=8,
    mistake=swap_ends,
)
