"""Failures become lessons.

Two ways, picked by ``memory.abstraction``:

- ``critic``: :class:`CriticAbstractor` asks any :class:`~critique_rl.critics.base.Critic`. Each request
  carries the failed episode as usual (question, response, reference, verdict) and the rendered
  ``prompts/lesson.j2`` in ``CritiqueRequest.metadata["prompt"]``, with ``metadata["purpose"] =
  "lesson_abstraction"`` and ``metadata["response_format"] = "json"``. A critic backend that sees this
  purpose sends the prompt verbatim (no critique template). The reply text must hold one JSON object with
  the string keys ``situation``, ``mistake``, ``instead``, ``applies_when`` (optional ``tags``: list of str).
  Invalid replies are asked again up to ``retries`` times, then dropped and counted.
- ``rule``: :func:`rule_abstraction` with no model: a per-task function from :data:`ABSTRACTIONS` (register
  yours with :func:`register_abstraction`), e.g. the addition one detects a missing carry, a spurious carry,
  off-by-one, swapped digits...; a generic fallback builds the lesson from the critique text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from critique_rl.critics.base import Critic, CritiqueRequest
from critique_rl.registry import Registry
from critique_rl.templates import render

LESSON_KEYS = ("situation", "mistake", "instead", "applies_when")
MAX_FIELD_CHARS = 300
MAX_LESSON_WORDS = 120


@dataclass
class Failure:
    """A failed episode, as the abstraction sees it."""

    question: str
    response: str
    verdict: bool | None = False
    critique: str | None = None
    reference: str | None = None
    task: str | None = None
    """Task name (selects the registered rule abstraction)."""


@dataclass
class LessonDraft:
    """The four statement fields of a lesson, before it is stored."""

    situation: str
    mistake: str
    instead: str
    applies_when: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


class InvalidLesson(ValueError):
    """The critic's reply is not a valid lesson (the message says why)."""


_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_lesson(text: str) -> LessonDraft:
    """Parse and validate a critic reply: one JSON object (code fences and prose around it are tolerated)
    with non-empty string fields situation, mistake, instead, applies_when (each <= 300 chars, <= 120 words
    in all). Raises :class:`InvalidLesson`."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidLesson("empty reply")
    match = _JSON_OBJECT.search(text)
    if not match:
        raise InvalidLesson("no JSON object in the reply")
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError as exc:
        raise InvalidLesson(f"not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise InvalidLesson("the JSON value is not an object")
    values: dict[str, str] = {}
    for key in LESSON_KEYS:
        value = data.get(key)
        if not isinstance(value, str) or not value.strip():
            raise InvalidLesson(f"key '{key}' missing or not a non-empty string")
        value = " ".join(value.split())
        if len(value) > MAX_FIELD_CHARS:
            raise InvalidLesson(f"key '{key}' longer than {MAX_FIELD_CHARS} characters")
        values[key] = value
    if sum(len(v.split()) for v in values.values()) > MAX_LESSON_WORDS:
        raise InvalidLesson(f"lesson longer than {MAX_LESSON_WORDS} words")
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidLesson("key 'tags' must be a list of strings")
    return LessonDraft(tags=tuple(t.strip() for t in tags if t.strip())[:8], **values)


@dataclass
class AbstractionStats:
    """Counts for metrics: requests sent, invalid replies retried, failures dropped after all retries."""

    requested: int = 0
    invalid: int = 0
    dropped: int = 0
    last_errors: list[str] = field(default_factory=list)


class CriticAbstractor:
    """Failure -> lesson through any critic, batched; invalid JSON is retried ``retries`` times, then dropped."""

    def __init__(self, critic: Critic, retries: int = 2, template_dir: str | None = None) -> None:
        self.critic = critic
        self.retries = retries
        self.template_dir = template_dir
        self.stats = AbstractionStats()

    def request_for(self, failure: Failure, attempt: int = 0, error: str | None = None) -> CritiqueRequest:
        """The critic request for ``failure`` (lesson prompt in metadata['prompt'])."""
        prompt = render("lesson.j2", self.template_dir, question=failure.question, response=failure.response,
                        reference=failure.reference, critique=failure.critique, task=failure.task,
                        previous_error=error)
        return CritiqueRequest(
            question=failure.question, response=failure.response, reference=failure.reference,
            verdict=failure.verdict,
            metadata={"purpose": "lesson_abstraction", "prompt": prompt, "response_format": "json",
                      "attempt": attempt},
        )

    def abstract(self, failures: Sequence[Failure]) -> list[LessonDraft | None]:
        """One draft per failure, None where every try gave invalid output (counted in ``stats.dropped``)."""
        out: list[LessonDraft | None] = [None] * len(failures)
        todo = list(range(len(failures)))
        errors: dict[int, str | None] = {i: None for i in todo}
        for attempt in range(self.retries + 1):
            if not todo:
                break
            requests = [self.request_for(failures[i], attempt, errors[i]) for i in todo]
            self.stats.requested += len(requests)
            replies = self.critic.critique(requests)
            still: list[int] = []
            for i, reply in zip(todo, replies, strict=True):
                try:
                    if getattr(reply, "error", None) and not getattr(reply, "text", ""):
                        raise InvalidLesson(f"critic error: {reply.error}")
                    out[i] = parse_lesson(reply.text)
                except InvalidLesson as exc:
                    self.stats.invalid += 1
                    errors[i] = str(exc)
                    self.stats.last_errors = (self.stats.last_errors + [str(exc)])[-10:]
                    still.append(i)
            todo = still
        self.stats.dropped += len(todo)
        return out


# ---------------------------------------------------------------------------------------------------------
# rule-based abstraction
# ---------------------------------------------------------------------------------------------------------

RuleAbstraction = Callable[[Failure], "LessonDraft | None"]
ABSTRACTIONS: Registry[RuleAbstraction] = Registry("memory abstraction", "task")


def register_abstraction(task: str) -> Callable[[RuleAbstraction], RuleAbstraction]:
    """Decorator: use ``fn(failure) -> LessonDraft | None`` for failures of task ``task``. Returning None
    falls back to the generic, critique-based abstraction."""
    return ABSTRACTIONS.decorator(task)


def rule_abstraction(failure: Failure) -> LessonDraft | None:
    """Lesson for ``failure`` without a model: the task's registered function, else :func:`generic_lesson`."""
    fn = ABSTRACTIONS.get(failure.task or "")
    if fn is not None:
        draft = fn(failure)
        if draft is not None:
            return draft
    return generic_lesson(failure)


_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_ADVICE = re.compile(r"\b(should|instead|remember|make sure|check|must|need to|correct)\b", re.IGNORECASE)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(" ".join(text.split())) if s.strip()]


def _clip_words(text: str, n: int) -> str:
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def generic_lesson(failure: Failure) -> LessonDraft | None:
    """Fallback for any task: the mistake from the critique's first sentence, the advice from a sentence that
    gives one (should/instead/check...), else a generic re-check. None when there is nothing to learn from
    (no critique and no task name)."""
    task = failure.task or "this kind of"
    sentences = _sentences(failure.critique or "")
    if not sentences and not failure.task:
        return None
    mistake = _clip_words(sentences[0], 30) if sentences else "gave an answer the verifier rejected"
    advice = next((s for s in sentences[1:] if _ADVICE.search(s)), None)
    if advice is None and sentences and _ADVICE.search(sentences[0]) and len(sentences) == 1:
        advice = sentences[0]
    instead = _clip_words(advice, 30) if advice else "work step by step and check the final answer before giving it"
    return LessonDraft(
        situation=f"When solving a {task} task",
        mistake=mistake,
        instead=instead,
        applies_when=f"{task} tasks",
        tags=(failure.task,) if failure.task else (),
    )


# ---- addition ---------------------------------------------------------------------------------------------

_ADD = re.compile(r"(-?\d+)\s*\+\s*(-?\d+)")


def _parse_answer(response: str) -> int | None:
    from critique_rl.primitives import parse_number

    got = parse_number(response)
    if got is None or got != int(got):
        return None
    return int(got)


@register_abstraction("addition")
@register_abstraction("addition_conf")
def addition_lesson(failure: Failure) -> LessonDraft | None:
    """Addition mistakes: unparsable answer, missing/spurious carry into the tens or hundreds, off by one,
    swapped digits, a copied operand, the wrong operation; else the ones or tens column is wrong."""
    m = _ADD.search(failure.question)
    if not m:
        return None
    a, b = int(m.group(1)), int(m.group(2))
    truth = a + b
    tags = tuple(t for t in (failure.task, "addition") if t)
    tags = tuple(dict.fromkeys(tags))
    applies = "adding two whole numbers"
    got = _parse_answer(failure.response)

    def lesson(situation: str, mistake: str, instead: str, applies_when: str = applies) -> LessonDraft:
        return LessonDraft(situation, mistake, instead, applies_when, tags)

    if got is None:
        return lesson("When answering an addition question",
                      "the reply did not end in a number, so no sum could be read",
                      "answer with the sum as a plain whole number and nothing after it")
    if got == truth:
        return None
    if a < 0 or b < 0:
        return None  # the column rules below are for non-negative operands
    diff = got - truth
    ones_carry = (a % 10) + (b % 10) >= 10
    tens_carry = (a // 10 % 10) + (b // 10 % 10) + int(ones_carry) >= 10
    if diff == -10 and ones_carry:
        return lesson("When adding numbers whose ones digits sum to 10 or more",
                      "dropped the carry, so the sum came out 10 too small",
                      "carry 1 into the tens",
                      "addition where the ones digits sum to 10 or more")
    if diff == 10 and not ones_carry:
        return lesson("When adding numbers whose ones digits sum to less than 10",
                      "carried 1 into the tens although nothing carries, so the sum came out 10 too large",
                      "carry only when the ones digits sum to 10 or more",
                      "addition where the ones digits sum to less than 10")
    if diff == -100 and tens_carry:
        return lesson("When adding two-digit numbers whose tens digits (plus any carry) sum to 10 or more",
                      "dropped the carry into the hundreds, so the sum came out 100 too small",
                      "carry 1 into the hundreds and write the hundreds digit",
                      "addition with a carry out of the tens column")
    if abs(diff) == 1:
        return lesson("When adding numbers",
                      f"the sum was off by one ({'one too many' if diff > 0 else 'one too few'})",
                      "add the ones digits exactly and recheck the last step before answering")
    if str(got) == str(truth)[::-1] and got != truth:
        return lesson("When writing the digits of a sum",
                      "wrote the digits in reverse order",
                      "write the digits from the highest place (left) to the ones place (right)")
    if got in (a, b):
        return lesson("When answering an addition question",
                      "repeated one of the operands instead of adding",
                      "add both numbers column by column and give the sum")
    if got in (a - b, b - a, a * b):
        op = "multiplied" if got == a * b else "subtracted"
        return lesson("When the question uses the + sign",
                      f"{op} the numbers instead of adding them",
                      "add: the + sign means sum")
    if -9 <= diff <= 9 and got // 10 == truth // 10:
        return lesson("When adding the ones digits",
                      "the ones digit of the sum was wrong",
                      "add the two ones digits and keep only the ones digit of that sum")
    if diff % 10 == 0 and abs(diff) < 100:
        return lesson("When adding the tens digits",
                      "the tens digit of the sum was wrong",
                      "add the tens digits plus any carry from the ones")
    return lesson("When adding multi-digit numbers",
                  "the sum was far from the right one",
                  "add column by column from the ones to the tens, carrying when a column reaches 10")


# ---- reverse ----------------------------------------------------------------------------------------------

_REV = re.compile(r"rev:([a-z]+)=")


@register_abstraction("reverse")
def reverse_lesson(failure: Failure) -> LessonDraft | None:
    """Word reversal mistakes: echoed the word, dropped or added letters, partly reversed."""
    m = _REV.search(failure.question)
    words = re.findall(r"[a-z]+", failure.response.lower())
    if not m:
        return None
    word = m.group(1)
    tags = ("reverse",)
    got = words[-1] if words else ""
    applies = "reversing a word"
    if not got:
        return LessonDraft("When asked to reverse a word", "the reply held no word",
                           "answer with the reversed word only", applies, tags)
    if got == word:
        return LessonDraft("When asked to reverse a word", "copied the word unchanged",
                           "write its letters from last to first", applies, tags)
    if len(got) != len(word):
        return LessonDraft("When reversing a word", f"the answer had {'fewer' if len(got) < len(word) else 'more'} "
                           "letters than the word", "keep every letter exactly once, last to first", applies, tags)
    if sorted(got) == sorted(word):
        return LessonDraft("When reversing a word", "only part of the word was reversed",
                           "start from the last letter and go all the way to the first", applies, tags)
    return None
