"""A task where experience matters: per-entity facts revealed only by earlier episodes.

Every question names an entity and a two-digit number: ``"qix:47="``. The answer is the entity's secret
three-digit code followed by the number: ``"58347"``. Nothing in the question tells the code, so a policy
that has never met ``qix`` can only guess (about 1 in 900). What reveals it is experience:

- a failed episode: the verifier's feedback (the reference answer) holds the code, and the rule abstraction
  registered here turns it into the lesson "When a question names qix, its code is 583. Avoid: guessed the
  code." (:func:`experience_lesson`);
- a successful episode: the demonstration ``Q: qix:31= / A: 58331`` holds it too.

Splits. Entities come in fixed groups:

- ``EXPERIENCED``: the task's entities. Train and eval questions both name them, with disjoint numbers
  (``TRAIN_NUMBERS`` / ``EVAL_NUMBERS``), so a held-out question is new while the fact it needs can have been
  seen in an earlier (training) episode: what memory at inference time is for.
- ``NOVEL``: entities that no training question names (:func:`make_novel_eval`); memory cannot know their
  code, so they are the control where memory must not help.
- ``KNOWN``: entities whose codes the warm-up demonstrator knows (taught into the weights), used only in the
  reading warm-up, with irrelevant records in the prompt, so the policy learns to ignore noise.
- fresh random entities (:func:`reading_rows`): used only in the reading warm-up, with the record that holds
  their code among irrelevant ones, so the policy learns to read its memory.

The task's own entities never appear in the reading warm-up; a policy warmed up on ``reading_rows`` alone
answers the task's questions from memory or not at all.
"""

from __future__ import annotations

import random
import re
import string
from typing import Any

from critique_rl.memory.abstraction import Failure, LessonDraft, register_abstraction
from critique_rl.memory.retrieval import STOPWORDS
from critique_rl.primitives import final_answer_span
from critique_rl.tasks.base import Example, Task
from critique_rl.templates import render

NAME = "experience"
_CONSONANTS = "bcdghjklmnpqrtvwz"  # no f, s or x: fewer accidental English words among the names
_VOWELS = "aeiou"


def _entity_table(seed: int, n: int, taken: set[str]) -> dict[str, int]:
    rng = random.Random(seed)
    out: dict[str, int] = {}
    while len(out) < n:
        name = rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + rng.choice(_CONSONANTS)
        if name not in taken and name not in out and name not in STOPWORDS:  # lexical retrieval drops stopwords
            out[name] = rng.randrange(100, 1000)
    return out


EXPERIENCED: dict[str, int] = _entity_table(2801, 24, set())
"""The task's entities and their codes (train and held-out questions name them)."""
NOVEL: dict[str, int] = _entity_table(2802, 8, set(EXPERIENCED))
"""Entities no training question names (the control: memory cannot hold their code)."""
KNOWN: dict[str, int] = _entity_table(2803, 12, set(EXPERIENCED) | set(NOVEL))
"""Entities whose codes the warm-up demonstrator knows (reading warm-up only)."""
CODES: dict[str, int] = {**EXPERIENCED, **NOVEL, **KNOWN}

_numbers = list(range(10, 100))
random.Random(2804).shuffle(_numbers)
EVAL_NUMBERS: tuple[int, ...] = tuple(sorted(_numbers[:30]))
TRAIN_NUMBERS: tuple[int, ...] = tuple(sorted(_numbers[30:]))
"""Numbers of training questions; held-out questions use ``EVAL_NUMBERS`` (disjoint)."""

_Q = re.compile(r"([a-z]+):(\d+)=")
_DIGITS = re.compile(r"\d+")


def answer_for(code: int, number: int) -> str:
    """The answer: the three-digit code, then the number."""
    return f"{code}{number}"


def _row(entity: str, code: int, number: int, novel: bool = False) -> Example:
    return {"prompt": f"{entity}:{number}=", "answer": answer_for(code, number), "entity": entity, "code": code,
            "a": number, "memory_key": f"entity:{entity}", "novel": novel}


def make_experience(split: str, n: int, seed: int = 0) -> list[Example]:
    """Train: ``n`` questions, entity and number drawn uniformly (with replacement) from ``EXPERIENCED`` x
    ``TRAIN_NUMBERS``. Eval: ``n`` distinct questions from ``EXPERIENCED`` x ``EVAL_NUMBERS`` (at most 720)."""
    rng = random.Random(seed * 37 + 5)
    entities = sorted(EXPERIENCED)
    if split == "eval":
        pool = [(e, a) for e in entities for a in EVAL_NUMBERS]
        chosen = rng.sample(pool, min(n, len(pool)))
        return [_row(e, EXPERIENCED[e], a) for e, a in chosen]
    return [_row(e, EXPERIENCED[e], a) for e, a in
            ((rng.choice(entities), rng.choice(TRAIN_NUMBERS)) for _ in range(n))]


def make_novel_eval(n: int, seed: int = 0) -> list[Example]:
    """Held-out questions about ``NOVEL`` entities (never named by a training question): the control arm."""
    rng = random.Random(seed * 41 + 9)
    pool = [(e, a) for e in sorted(NOVEL) for a in EVAL_NUMBERS]
    return [_row(e, NOVEL[e], a, novel=True) for e, a in rng.sample(pool, min(n, len(pool)))]


def extract_answer(completion: str) -> str | None:
    """The first run of digits in the final-answer span."""
    found = _DIGITS.findall(final_answer_span(completion))
    return found[0] if found else None


def verify_experience(completion: str, answer: str) -> bool:
    return extract_answer(completion) == str(answer).strip()


def guessed_code(ex: Example) -> str | None:
    """The demonstrator's mistake: it does not know the task's entities and guesses the code of another
    entity (deterministic per entity), so ``sft_mistake_rate: 1`` keeps the codes out of the weights."""
    others = sorted(KNOWN)
    guess = KNOWN[others[sum(map(ord, str(ex["entity"]))) % len(others)]]
    return answer_for(guess, int(ex["a"])) if guess != ex.get("code") else None


EXPERIENCE = Task(
    name=NAME, make_examples=make_experience, verify=verify_experience, extract=extract_answer,
    description="entity:number= -> the entity's secret three-digit code then the number; the code is learnable "
                "only from earlier episodes (the verifier's reference on a failure, or a solved demonstration)",
    sft_completion=lambda ex: ex["answer"], max_new_tokens=7, mistake=guessed_code)


# ---- lessons ---------------------------------------------------------------------------------------------

def lesson_draft(entity: str, code: int) -> LessonDraft:
    """The lesson a failure on ``entity`` yields. It quotes the situation (the entity) and the fact; its other
    words are shared by every entity's lesson, so lessons about two entities stay below the merge threshold
    (token-set Jaccard 0.75) while two failures on the same entity merge (same text)."""
    return LessonDraft(f"When a question names {entity}", "guessed the code", f"its code is {code}", entity,
                       (NAME, f"entity:{entity}"))


@register_abstraction(NAME)
def experience_lesson(failure: Failure) -> LessonDraft | None:
    """Rule abstraction: the entity from the question, its code from the reference answer (None when the
    reference is missing or does not end with the question's number)."""
    m = _Q.search(failure.question)
    if not m or failure.reference is None:
        return None
    entity, number = m.group(1), m.group(2)
    ref = str(failure.reference).strip()
    if not ref.endswith(number) or not ref[: -len(number)].isdigit():
        return None
    return lesson_draft(entity, int(ref[: -len(number)]))


# ---- the reading warm-up -----------------------------------------------------------------------------------

def _lesson_text(entity: str, code: int) -> str:
    from critique_rl.memory.records import Lesson

    d = lesson_draft(entity, code)
    return Lesson(d.situation, d.mistake, d.instead, d.applies_when, d.tags).render()


def _demo_text(entity: str, code: int, number: int) -> str:
    from critique_rl.memory.records import Demonstration

    return Demonstration(f"{entity}:{number}=", answer_for(code, number)).render()


def render_context(demos: list[str], lessons: list[str], template_dir: str | None = None) -> str:
    """Rendered records exactly as retrieval renders them (``prompts/memory_context.j2``)."""
    if not demos and not lessons:
        return ""
    return render("memory_context.j2", template_dir, demos=demos, lessons=lessons)


def fresh_entity(rng: random.Random) -> str:
    """A random three- or four-letter name that is none of the fixed entities."""
    while True:
        name = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.choice((3, 4))))
        if name not in CODES and name not in STOPWORDS:
            return name


def _distractors(rng: random.Random, k: int, avoid: str) -> list[tuple[str, int]]:
    out = []
    while len(out) < k:
        e = fresh_entity(rng)
        if e != avoid:
            out.append((e, rng.randrange(100, 1000)))
    return out


def reading_rows(n: int, seed: int = 0, max_distractors: int = 2) -> list[Example]:
    """Warm-up rows (column ``context`` holds the rendered records) that teach a policy to read its memory:

    - 70%: a fresh entity whose code only the context tells: its lesson (40%), a solved demonstration of it
      with another number (30%), or both (30%), shuffled among up to ``max_distractors`` records about other
      fresh entities;
    - 30%: a ``KNOWN`` entity (the demonstrator knows its code) with no context (half) or only irrelevant
      records (half): the answer must ignore them.
    """
    rng = random.Random(seed * 1013 + 29)
    rows: list[Example] = []
    for _ in range(n):
        number = rng.randrange(10, 100)
        k = rng.randint(0, max_distractors)
        if rng.random() < 0.7:
            entity, code = fresh_entity(rng), rng.randrange(100, 1000)
            mode = rng.random()
            lessons, demos = [], []
            if mode < 0.4 or mode >= 0.7:
                lessons.append(_lesson_text(entity, code))
            if mode >= 0.4:
                demos.append(_demo_text(entity, code, rng.choice([x for x in range(10, 100) if x != number])))
            for e, c in _distractors(rng, k, entity):
                if demos and (not lessons or rng.random() < 0.5):
                    demos.append(_demo_text(e, c, rng.randrange(10, 100)))
                else:
                    lessons.append(_lesson_text(e, c))
            rng.shuffle(lessons)
            rng.shuffle(demos)
            row = _row(entity, code, number)
            row["context"] = render_context(demos, lessons)
        else:
            entity = rng.choice(sorted(KNOWN))
            row = _row(entity, KNOWN[entity], number)
            noise = _distractors(rng, max(1, k), entity) if rng.random() < 0.5 else []
            row["context"] = render_context([], [_lesson_text(e, c) for e, c in noise])
        rows.append(row)
    return rows


def memory_hit(row: dict[str, Any], records: list[Any]) -> bool | None:
    """Whether one of ``records`` (retrieved for ``row``) holds the fact the row needs: a record tagged with
    the row's ``memory_key``. None when the row has no ``memory_key``."""
    key = row.get("memory_key")
    if not key:
        return None
    return any(key in getattr(r, "tags", ()) for r in records)


__all__ = ["CODES", "EVAL_NUMBERS", "EXPERIENCE", "EXPERIENCED", "KNOWN", "NOVEL", "TRAIN_NUMBERS", "answer_for",
           "experience_lesson", "lesson_draft", "make_experience", "make_novel_eval", "memory_hit",
           "reading_rows", "render_context", "verify_experience"]
