"""Tagged addition with a systematic trap: ``"vor:47+38="``.

Every question carries a tag. For most tags the answer is the sum (``85``), but some tags follow a
different rule: the answer is the sum written backwards (``58``). Nothing in the question shows which rule a
tag follows, so reading ``+`` literally is the trap. A lesson ("When a question is tagged vor, write the
digits of the sum backwards") carries exactly the missing information and transfers to every later question
with that tag, which is what memory is for.

Tags come in three groups:

- known (``KNOWN_TAGS``): the SFT demonstrator knows their rule (sum or reversed);
- trap (``TRAP_TAGS``): the demonstrator does not know them and gives the plain sum, which is wrong for the
  reversed ones. ``mistake(row)`` returns that plain sum, so ``sft_mistake_rate`` sets how often the warm-up
  data falls into the trap;
- fresh tags (:func:`reading_rows`): random tags used only to teach a small model to read a lesson in its
  prompt (see ``benchmarks/memory_on_off.py``).

Train and eval use the same tags with disjoint operand pairs (the addition task's split), so what is learnt
about a tag on training questions can be checked on held-out ones.
"""

from __future__ import annotations

import random
import re
import string

from critique_rl.memory.abstraction import Failure, LessonDraft, register_abstraction
from critique_rl.primitives import final_answer_span
from critique_rl.tasks.arithmetic import _split_pairs
from critique_rl.tasks.base import Example, Task
from critique_rl.templates import render

KNOWN_TAGS: dict[str, str] = {"bam": "sum", "dek": "sum", "fip": "sum", "gor": "rev", "hux": "rev", "jel": "rev"}
"""Tags whose rule the SFT demonstrator knows."""
TRAP_TAGS: dict[str, str] = {"kav": "rev", "lom": "rev", "nib": "sum", "pud": "sum"}
"""Tags the demonstrator does not know (it gives the plain sum): the reversed ones are the trap."""
RULES: dict[str, str] = {**KNOWN_TAGS, **TRAP_TAGS}

_Q = re.compile(r"([a-z]+):(\d+)\+(\d+)=")
_DIGITS = re.compile(r"\d+")


def apply_rule(rule: str, a: int, b: int) -> str:
    """The answer under ``rule``: ``sum`` -> the sum; ``rev`` -> the digits of the sum backwards."""
    s = str(a + b)
    return s[::-1] if rule == "rev" else s


def _row(tag: str, rule: str, a: int, b: int) -> Example:
    return {"prompt": f"{tag}:{a}+{b}=", "answer": apply_rule(rule, a, b), "tag": tag, "rule": rule,
            "trap": tag in TRAP_TAGS, "a": a, "b": b}


def _tagged_rows(split: str, n: int, rng: random.Random, train_tags: list[str], eval_tags: list[str]) -> list[Example]:
    """Eval: ``n`` distinct operand pairs, tags in turn; train: tag and pair drawn uniformly (with replacement)."""
    pool = _split_pairs(split)
    if split == "eval":
        pairs = rng.sample(pool, min(n, len(pool)))
        return [_row(eval_tags[i % len(eval_tags)], RULES[eval_tags[i % len(eval_tags)]], a, b)
                for i, (a, b) in enumerate(pairs)]
    out = []
    for _ in range(n):
        tag = rng.choice(train_tags)
        a, b = rng.choice(pool)
        out.append(_row(tag, RULES[tag], a, b))
    return out


def make_trap(split: str, n: int, seed: int = 0) -> list[Example]:
    """``n`` questions over all fixed tags (uniform), operands from the addition task's ``split``."""
    tags = sorted(RULES)
    return _tagged_rows(split, n, random.Random(seed * 31 + 7), tags, tags)


PLATEAU_TAGS: tuple[str, ...] = tuple(t for t, r in TRAP_TAGS.items() if r == "rev")
"""The trap tags whose rule is ``rev``: the demonstrator's plain sum is wrong on them (except palindromes)."""


def make_trap_plateau(split: str, n: int, seed: int = 0) -> list[Example]:
    """The plateau variant: training questions over the known tags (where the warm-up shows both rules, so the
    model can write a total backwards) and the reversed trap tags; held-out questions on the reversed trap tags
    only. With ``sft_mistake_rate: 1`` the warm-up answers every trap question with the plain sum, so the start
    is near 0% (palindromic totals aside) and sampled groups on trap questions are all wrong."""
    return _tagged_rows(split, n, random.Random(seed * 31 + 11), sorted(KNOWN_TAGS) + list(PLATEAU_TAGS),
                        list(PLATEAU_TAGS))


def make_trap_plateau_only(split: str, n: int, seed: int = 0) -> list[Example]:
    """The hardest plateau: training and held-out questions only on the reversed trap tags. With
    ``sft_mistake_rate: 1`` every sampled group of every step is all wrong (palindromic totals aside), so plain
    GRPO gets no gradient at all: the regime Critique-GRPO (arXiv:2506.03106) says critiques break."""
    return _tagged_rows(split, n, random.Random(seed * 31 + 13), list(PLATEAU_TAGS), list(PLATEAU_TAGS))


HALF_TAGS: tuple[str, ...] = tuple(sorted(KNOWN_TAGS)) + PLATEAU_TAGS * 3
"""The known tags once and the reversed trap tags three times: half the questions are on the trap."""


def make_trap_half(split: str, n: int, seed: int = 0) -> list[Example]:
    """A mid-range start with a plateau inside it: half the training and held-out questions are on the known
    tags (the warm-up answers them right), half on the reversed trap tags (the warm-up's plain sum is wrong but
    on palindromic totals), so a ``trap_plateau`` warm-up starts near 55% and about half the sampled groups are
    all wrong: plain GRPO can sharpen the known half and gets no gradient on the other."""
    return _tagged_rows(split, n, random.Random(seed * 31 + 17), list(HALF_TAGS), list(HALF_TAGS))


def extract_digits(completion: str) -> str | None:
    """The last run of digits in the final-answer span (leading zeros kept: '001' is a reversed 100)."""
    found = _DIGITS.findall(final_answer_span(completion))
    return found[-1] if found else None


def verify_trap(completion: str, answer: str) -> bool:
    return extract_digits(completion) == str(answer).strip()


def plain_sum(ex: Example) -> str | None:
    """The demonstrator's mistake on trap tags: the plain sum (wrong where the tag's rule is ``rev``)."""
    if not ex.get("trap"):
        return None
    wrong = str(int(ex["a"]) + int(ex["b"]))
    return wrong if wrong != ex["answer"] else None


def _trap_task(name: str, make_examples, description: str) -> Task:
    """A tagged-addition task: digits verified, the reference answer as the demonstration, plain sum as the
    demonstrator's mistake on trap tags."""
    return Task(name=name, make_examples=make_examples, verify=verify_trap, extract=extract_digits,
                description=description, sft_completion=lambda ex: ex["answer"], max_new_tokens=6, mistake=plain_sum)


TRAP = _trap_task("trap", make_trap, "tagged two-digit addition; some tags want the sum written backwards")
TRAP_PLATEAU = _trap_task(
    "trap_plateau", make_trap_plateau,
    "tagged addition, evaluated on the tags whose total is written backwards and which the demonstrator gets "
    "wrong: the plateau task (most sampled groups all wrong)")
TRAP_PLATEAU_ONLY = _trap_task(
    "trap_plateau_only", make_trap_plateau_only,
    "tagged addition, trained and evaluated only on the tags whose total is written backwards and which the "
    "demonstrator gets wrong: every sampled group all wrong")

TRAP_HALF = _trap_task(
    "trap_half", make_trap_half,
    "tagged addition, half the questions on tags whose total is written backwards and which the demonstrator "
    "gets wrong: a mid-range start with a plateau inside it")


# ---- lessons ---------------------------------------------------------------------------------------------

def lesson_draft(tag: str, rule: str) -> LessonDraft:
    """The lesson for ``tag``: what the rule abstraction writes after a failure on it. Its words avoid the
    query words of a question ('plus', 'add', numbers), so lexical retrieval matches on the tag alone."""
    if rule == "rev":
        return LessonDraft(f"When a question is tagged {tag}", "gave the digits in the usual order",
                           "write the digits of the total backwards", f"questions tagged {tag}", ("trap",))
    return LessonDraft(f"When a question is tagged {tag}", "gave wrong digits",
                       "write the digits of the total in the usual order", f"questions tagged {tag}", ("trap",))


@register_abstraction("trap")
def trap_lesson(failure: Failure) -> LessonDraft | None:
    """Rule abstraction for the trap task: the tag's rule from the reference answer (None without one)."""
    m = _Q.search(failure.question)
    if not m or failure.reference is None:
        return None
    tag, a, b = m.group(1), int(m.group(2)), int(m.group(3))
    ref = str(failure.reference).strip()
    rev, plain = apply_rule("rev", a, b), apply_rule("sum", a, b)
    if ref == rev == plain:  # a palindromic total says nothing about the tag's rule
        return LessonDraft(f"When a question is tagged {tag}", "gave a wrong total",
                           "work the total out digit by digit", f"questions tagged {tag}", ("trap",))
    return lesson_draft(tag, "rev" if ref == rev else "sum")


def render_lessons(drafts: list[LessonDraft], template_dir: str | None = None) -> str:
    """Lessons rendered exactly as retrieval renders them (``prompts/memory_context.j2``)."""
    from critique_rl.memory.records import Lesson

    lessons = [Lesson(d.situation, d.mistake, d.instead, d.applies_when, d.tags) for d in drafts]
    return render("memory_context.j2", template_dir, demos=[], lessons=[x.render() for x in lessons])


def fresh_tag(rng: random.Random) -> str:
    """A random three-letter tag that is none of the fixed ones."""
    while True:
        tag = "".join(rng.choice(string.ascii_lowercase) for _ in range(3))
        if tag not in RULES:
            return tag


def reading_rows(n: int, seed: int = 0, with_lesson: float = 0.5) -> list[Example]:
    """Rows with fresh random tags for the SFT warm-up: a ``with_lesson`` fraction have a random rule and
    carry its lesson in column ``context``; the rest have no lesson and the plain sum (a tag nobody has
    warned about is read literally). They teach a small model to follow a lesson in its prompt."""
    rng = random.Random(seed * 1009 + 17)
    pool = _split_pairs("train")
    rows = []
    for _ in range(n):
        tag = fresh_tag(rng)
        a, b = rng.choice(pool)
        if rng.random() < with_lesson:
            rule = rng.choice(["sum", "rev"])
            row = _row(tag, rule, a, b)
            row["context"] = render_lessons([lesson_draft(tag, rule)])
        else:
            row = _row(tag, "sum", a, b)
            row["context"] = ""
        row["trap"] = False
        rows.append(row)
    return rows


__all__ = ["HALF_TAGS", "KNOWN_TAGS", "PLATEAU_TAGS", "RULES", "TRAP", "TRAP_HALF", "TRAP_PLATEAU", "TRAP_PLATEAU_ONLY", "TRAP_TAGS", "apply_rule", "lesson_draft", "make_trap", "reading_rows",
           "render_lessons", "trap_lesson", "verify_trap"]
