"""Many valid answers, a verifier that says what is wrong, no reference to inject: ``constraints``.

``"kir 17 3:"`` asks for a 4-digit string that starts with 3, whose digits sum to 17, with no digit repeated and
a last digit whose parity is the tag's rule. The rule is not in the question: tags ``abe``/``eft`` want an even
last digit, ``cid``/``gam`` an odd one (the SFT demonstrator knows these, ``KNOWN_TAGS``), and the trap tags
``kir``/``lun``/``mov`` want an odd one that the demonstrator does not know: it ends their answers in an even digit
(``mistake``), so with ``sft_mistake_rate: 1`` the warm-up is systematically wrong on them. Every question has
several valid answers (``3527``, ``3581``, ``3941``...): no single answer exists to quote, so a ground-truth
critique cannot give one. What the verifier can give is what is wrong (:func:`violations`): "its digits sum to 18,
not 17", "the digit 5 repeats", "its last digit 8 is even; kir answers end in an odd digit".

The ``answer`` column holds the constraints (``"sum=17 first=3 end=odd tag=kir"``), not a solution. The verifier's
feedback reaches the policy as a critique through the rule critic's ground-truth template: ``TEMPLATE_DIR`` holds a
``critique_ground_truth.j2`` that writes the violated constraints from (answer, reference) and quotes no answer
(``critic: {backend: rule, kind: ground_truth, template_dir: <TEMPLATE_DIR>}``); ``kind: indicative`` with the
same folder is the verdict-only control, and the SFT warm-up's refinement demos are rendered with the same
template, so every arm starts from one checkpoint. :func:`feedback` is the same text from Python (the test checks
that template and verifier agree).

Variants (the tags trained and held out):

- ``constraints``: train and held-out questions over all tags, trap tags on half the held-out questions (a
  mid-range start with a plateau inside it);
- ``constraints_plateau``: train and held-out questions on the trap tags only (with the ``constraints`` warm-up:
  every sampled group all wrong at the start).

Train and held-out questions are disjoint: a (sum, first digit) pair is held out by a fixed hash, for every tag.
"""

from __future__ import annotations

import itertools
import random
import re
from functools import lru_cache
from pathlib import Path

from critique_rl.tasks.base import Example, Task

KNOWN_TAGS: dict[str, str] = {"abe": "even", "cid": "odd", "eft": "even", "gam": "odd"}
"""Tags whose last-digit rule the SFT demonstrator knows."""
TRAP_TAGS: dict[str, str] = {"kir": "odd", "lun": "odd", "mov": "odd"}
"""Tags the demonstrator gets wrong: they want an odd last digit, it writes an even one."""
RULES: dict[str, str] = {**KNOWN_TAGS, **TRAP_TAGS}
LENGTH = 4
SUMS = range(10, 29)
TEMPLATE_DIR = str(Path(__file__).with_name("constraints_prompts"))
"""``critic.template_dir`` whose ``critique_ground_truth.j2`` writes the verifier's feedback."""

_SPEC = re.compile(r"sum=(\d+)\s+first=(\d)\s+end=(even|odd)\s+tag=([a-z]+)")
_DIGITS = re.compile(r"\d+")


@lru_cache(maxsize=1)
def _candidates() -> dict[tuple[int, int, str], list[str]]:
    """Every valid answer by (sum, first digit, last-digit parity): 4 distinct digits, first one non-zero."""
    out: dict[tuple[int, int, str], list[str]] = {}
    for digits in itertools.permutations(range(10), LENGTH):
        if digits[0] == 0:
            continue
        key = (sum(digits), digits[0], "even" if digits[-1] % 2 == 0 else "odd")
        out.setdefault(key, []).append("".join(map(str, digits)))
    return out


def _held_out(total: int, first: int) -> bool:
    return (total * 7 + first * 5) % 3 == 0


def questions(split: str, tags: list[str]) -> list[tuple[str, int, int]]:
    """The (tag, sum, first digit) questions of ``split`` with at least 3 valid answers and at least one answer
    of the wrong parity (the demonstrator's mistake exists)."""
    cands = _candidates()
    out = []
    for tag in tags:
        for total in SUMS:
            for first in range(1, 10):
                if _held_out(total, first) != (split == "eval"):
                    continue
                wrong = "even" if RULES[tag] == "odd" else "odd"
                if len(cands.get((total, first, RULES[tag]), [])) >= 3 and cands.get((total, first, wrong)):
                    out.append((tag, total, first))
    return out


def _row(tag: str, total: int, first: int, rng: random.Random) -> Example:
    end = RULES[tag]
    return {"prompt": f"{tag} {total} {first}:", "answer": f"sum={total} first={first} end={end} tag={tag}",
            "tag": tag, "trap": tag in TRAP_TAGS, "example": rng.choice(_candidates()[(total, first, end)])}


def _rows(split: str, n: int, seed: int, train_tags: list[str], eval_tags: list[str], salt: int) -> list[Example]:
    """Eval: the split's questions over ``eval_tags`` in a fixed shuffled order (at most ``n``, no repeats); train:
    ``n`` questions drawn uniformly with replacement over ``train_tags``."""
    rng = random.Random(seed * 7919 + salt)
    if split == "eval":
        qs = questions("eval", eval_tags)
        random.Random(salt).shuffle(qs)
        return [_row(*q, rng) for q in qs[:n]]
    qs = questions("train", train_tags)
    return [_row(*rng.choice(qs), rng) for _ in range(n)]


def make_constraints(split: str, n: int, seed: int = 0) -> list[Example]:
    """All tags; held-out questions half on the trap tags (each trap question once, the known ones as many)."""
    if split == "eval":
        trap = _rows("eval", n // 2, seed, [], sorted(TRAP_TAGS), 101)
        known = _rows("eval", n - len(trap), seed, [], sorted(KNOWN_TAGS), 103)
        mixed = trap + known
        random.Random(107).shuffle(mixed)
        return mixed
    return _rows(split, n, seed, sorted(RULES), [], 109)


def make_constraints_plateau(split: str, n: int, seed: int = 0) -> list[Example]:
    """Trap tags only, for training and held out."""
    return _rows(split, n, seed, sorted(TRAP_TAGS), sorted(TRAP_TAGS), 113)


def parse_spec(answer: str) -> tuple[int, int, str, str]:
    m = _SPEC.search(answer or "")
    if not m:
        raise ValueError(f"constraints answer column {answer!r} is not 'sum=S first=D end=even|odd tag=T'")
    return int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)


def extract_digits(completion: str) -> str | None:
    """The first run of digits of the completion (None when it has none)."""
    found = _DIGITS.findall(completion or "")
    return found[0] if found else None


def violations(completion: str, answer: str) -> list[str]:
    """The constraints ``completion`` breaks, in the order the feedback names them (empty = valid)."""
    total, first, end, tag = parse_spec(answer)
    got = extract_digits(completion)
    if got is None:
        return ["it has no digits"]
    out = []
    if len(got) != LENGTH:
        out.append(f"it has {len(got)} digits, not {LENGTH}")
    if got[0] != str(first):
        out.append(f"it starts with {got[0]}, not {first}")
    digit_sum = sum(map(int, got))
    if digit_sum != total:
        out.append(f"its digits sum to {digit_sum}, not {total}")
    repeated = sorted({c for c in got if got.count(c) > 1})
    if repeated:
        out.append(f"the digit {repeated[0]} repeats")
    parity = "even" if int(got[-1]) % 2 == 0 else "odd"
    if parity != end:
        out.append(f"its last digit {got[-1]} is {parity}; {tag} answers end in an {end} digit")
    return out


def verify_constraints(completion: str, answer: str) -> bool:
    return not violations(completion, answer)


def feedback(completion: str, answer: str) -> str:
    """The verifier's critique of ``completion`` (what the template renders for a wrong answer)."""
    got = extract_digits(completion)
    quoted = f"Your answer {got}" if got else "Your answer"
    found = violations(completion, answer)
    if not found:
        return f"{quoted} is correct."
    return f"{quoted} is incorrect: " + "; ".join(found) + "."


def wrong_parity(ex: Example) -> str | None:
    """The demonstrator's mistake on trap tags: a valid-looking answer ending in the other parity."""
    if not ex.get("trap"):
        return None
    total, first, end, _ = parse_spec(ex["answer"])
    wrong = _candidates().get((total, first, "even" if end == "odd" else "odd"))
    return random.Random(ex["prompt"]).choice(wrong) if wrong else None


def misleading_spec(reference: str, answer: str | None, rng: random.Random) -> str:
    """A wrong specification for a critique that names a wrong fix (``critic.error_kind: hint``): the digit sum
    moved by 1-3 (never to the response's own sum, so its sum is called wrong) and the last-digit rule flipped (a
    response with the wrong parity hears nothing about it; one with the right parity is told to change it)."""
    total, first, end, tag = parse_spec(reference)
    digits = extract_digits(answer or "")
    own = sum(map(int, digits)) if digits else None
    deltas = [-3, -2, -1, 1, 2, 3]
    rng.shuffle(deltas)
    moved = next(total + d for d in deltas if total + d != own and total + d > 0)
    return f"sum={moved} first={first} end={'even' if end == 'odd' else 'odd'} tag={tag}"


def _task(name: str, make, description: str) -> Task:
    return Task(name=name, make_examples=make, verify=verify_constraints, extract=extract_digits,
                description=description, sft_completion=lambda ex: ex["example"], max_new_tokens=6,
                mistake=wrong_parity, wrong_reference=misleading_spec)


CONSTRAINTS = _task(
    "constraints", make_constraints,
    "many valid answers: 4 distinct digits with a given first digit and digit sum, last-digit parity by the tag's "
    "hidden rule; the verifier names the violated constraints, no reference answer exists")
CONSTRAINTS_PLATEAU = _task(
    "constraints_plateau", make_constraints_plateau,
    "constraints, trained and held out on the tags the demonstrator gets wrong (a plateau)")

__all__ = ["CONSTRAINTS", "CONSTRAINTS_PLATEAU", "KNOWN_TAGS", "RULES", "TEMPLATE_DIR", "TRAP_TAGS", "feedback",
           "make_constraints", "make_constraints_plateau", "misleading_spec", "parse_spec", "questions", "verify_constraints",
           "violations", "wrong_parity"]
