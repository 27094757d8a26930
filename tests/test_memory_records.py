"""Records, lesson parsing, rule-based and critic-based abstraction."""

from __future__ import annotations

import json

import pytest

from critique_rl.critics.base import Critique, CritiqueRequest
from critique_rl.errors import UserError
from critique_rl.memory import (
    CriticAbstractor,
    Demonstration,
    Failure,
    Lesson,
    parse_lesson,
    register_abstraction,
    rule_abstraction,
)
from critique_rl.memory.abstraction import ABSTRACTIONS, InvalidLesson, LessonDraft
from critique_rl.memory.records import record_from_dict

GOOD = {"situation": "When adding numbers whose ones digits sum to 10 or more", "mistake": "dropped the carry",
        "instead": "carry 1 into the tens", "applies_when": "multi-digit addition"}


class ScriptedCritic:
    """A critic that replies with scripted texts, recording every request it saw."""

    kind = "cot"

    def __init__(self, replies: list[str]) -> None:
        self.replies = list(replies)
        self.requests: list[CritiqueRequest] = []

    def critique(self, requests: list[CritiqueRequest]) -> list[Critique]:
        self.requests.extend(requests)
        return [Critique(text=self.replies.pop(0), verdict=False, kind=self.kind) for _ in requests]

    async def acritique(self, requests: list[CritiqueRequest]) -> list[Critique]:
        return self.critique(requests)

    def metrics(self) -> dict[str, float]:
        return {}


def test_records_roundtrip_and_render() -> None:
    d = Demonstration(question="12+13=", trajectory="25", reward=1.0, tags=("addition",))
    assert d.id.startswith("D-") and d.kind == "demonstration"
    assert d.render() == "Q: 12+13=\nA: 25"
    lesson = Lesson(situation="When adding numbers.", mistake="dropped the carry.", instead="carry 1.")
    assert lesson.render() == "When adding numbers, carry 1. Avoid: dropped the carry."
    for rec in (d, lesson):
        back = record_from_dict(json.loads(json.dumps(rec.to_dict())))
        assert back == rec


def test_lesson_dedup_hash_masks_numbers() -> None:
    a = Lesson(situation="When adding 47 and 38", mistake="wrote 75", instead="carry")
    b = Lesson(situation="When adding 56 and 27", mistake="wrote 73", instead="carry")
    c = Lesson(situation="When adding 56 and 27", mistake="wrote 73", instead="do not carry")
    assert a.dedup_hash == b.dedup_hash != c.dedup_hash


@pytest.mark.parametrize("bad", [
    {"kind": "thing"},
    {"kind": "lesson", "situation": "", "mistake": "m", "instead": "i"},
    {"kind": "demonstration", "question": "q", "trajectory": "t", "retrieved": -1},
    {"kind": "demonstration", "question": "q", "trajectory": "t", "id": "../../etc/passwd"},
    {"kind": "lesson", "situation": "s", "mistake": "m", "instead": "i", "bogus": 1},
])
def test_record_from_dict_rejects(bad: dict) -> None:
    if "bogus" in bad:  # unknown keys are ignored, not an error
        assert record_from_dict(bad).situation == "s"
        return
    with pytest.raises(UserError):
        record_from_dict(bad, where="f.jsonl:3")


def test_parse_lesson_accepts_fenced_json() -> None:
    draft = parse_lesson("Sure!\n```json\n" + json.dumps({**GOOD, "tags": ["addition"]}) + "\n```")
    assert draft.instead == "carry 1 into the tens" and draft.tags == ("addition",)


@pytest.mark.parametrize("text", [
    "", "no json here", "{not json}", "[1, 2]",
    json.dumps({k: v for k, v in GOOD.items() if k != "instead"}),
    json.dumps({**GOOD, "mistake": 3}),
    json.dumps({**GOOD, "mistake": "x" * 400}),
    json.dumps({**GOOD, "mistake": " ".join(["word"] * 130)}),
    json.dumps({**GOOD, "tags": "addition"}),
])
def test_parse_lesson_rejects(text: str) -> None:
    with pytest.raises(InvalidLesson):
        parse_lesson(text)


@pytest.mark.parametrize("question,response,expect", [
    ("47+38=", "75", "carry 1 into the tens"),          # missing carry
    ("12+13=", "35", "carry only when"),                # spurious carry
    ("68+57=", "25", "carry 1 into the hundreds"),      # missing carry into hundreds
    ("12+13=", "26", "recheck the last step"),          # off by one
    ("12+13=", "52", "highest place"),                  # digits reversed
    ("12+13=", "12", "add both numbers"),               # copied an operand
    ("20+13=", "7", "+ sign means sum"),                # subtracted
    ("12+13=", "28", "ones digit"),                     # wrong ones digit
    ("12+13=", "hmm", "plain whole number"),            # no number
])
def test_addition_rule_abstraction(question: str, response: str, expect: str) -> None:
    draft = rule_abstraction(Failure(question, response, task="addition"))
    assert draft is not None
    assert expect in draft.instead
    assert "addition" in draft.tags


def test_missing_carry_lesson_reads_as_general_advice() -> None:
    draft = rule_abstraction(Failure("47+38=", "The answer is 75", task="addition"))
    lesson = Lesson(situation=draft.situation, mistake=draft.mistake, instead=draft.instead)
    assert lesson.render().startswith("When adding numbers whose ones digits sum to 10 or more, carry 1 into the tens")
    assert "47" not in lesson.render() and "75" not in lesson.render()


def test_generic_fallback_uses_critique_text() -> None:
    draft = rule_abstraction(Failure("Name the capital of France.", "Lyon", task="geo",
                                     critique="The answer names the wrong city. You should check which city "
                                              "is the seat of government."))
    assert draft is not None
    assert draft.mistake == "The answer names the wrong city."
    assert draft.instead.startswith("You should check")
    assert draft.tags == ("geo",)
    assert rule_abstraction(Failure("q", "r")) is None  # nothing to learn from


def test_register_custom_abstraction() -> None:
    @register_abstraction("unit-test-task")
    def mine(f: Failure) -> LessonDraft:
        return LessonDraft("When testing", "forgot", "remember", "tests")

    try:
        assert rule_abstraction(Failure("q", "r", task="unit-test-task")).mistake == "forgot"
    finally:
        ABSTRACTIONS.pop("unit-test-task")


def test_critic_abstractor_retries_then_drops() -> None:
    # failure 0: invalid once, then valid; failure 1: invalid three times -> dropped.
    # Replies are consumed in batch order: [f0, f1], then the retries [f0, f1], then [f1].
    critic = ScriptedCritic(["not json", "nope", json.dumps(GOOD), "still nope", "{}"])
    ab = CriticAbstractor(critic, retries=2)
    out = ab.abstract([Failure("47+38=", "75", reference="85", task="addition"), Failure("1+1=", "3")])
    assert out[0] is not None and out[0].instead == "carry 1 into the tens"
    assert out[1] is None
    assert (ab.stats.requested, ab.stats.invalid, ab.stats.dropped) == (5, 4, 1)
    req = critic.requests[0]
    assert req.metadata["purpose"] == "lesson_abstraction" and req.metadata["response_format"] == "json"
    assert "47+38=" in req.metadata["prompt"] and "Reference answer: 85" in req.metadata["prompt"]
    assert req.question == "47+38=" and req.response == "75" and req.verdict is False
    assert "rejected" in critic.requests[2].metadata["prompt"]  # the retry says why
