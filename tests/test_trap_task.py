"""The tagged-addition trap task: data, verifier, the demonstrator's mistake, lessons and their retrieval."""

from __future__ import annotations

from critique_rl.config import MemoryConfig
from critique_rl.memory import Failure, MemoryBank, rule_abstraction
from critique_rl.tasks import get_task, register_task
from critique_rl.tasks.trap import (
    KNOWN_TAGS,
    RULES,
    TRAP,
    TRAP_TAGS,
    apply_rule,
    lesson_draft,
    make_trap,
    reading_rows,
    render_lessons,
)
from critique_rl.train.memory_hook import MemoryHook


def test_rows_follow_the_tag_rules_and_splits_are_disjoint():
    train, evals = make_trap("train", 2000, 0), make_trap("eval", 400, 0)
    for r in train + evals:
        assert r["prompt"] == f"{r['tag']}:{r['a']}+{r['b']}="
        assert r["answer"] == apply_rule(RULES[r["tag"]], r["a"], r["b"])
        assert r["trap"] == (r["tag"] in TRAP_TAGS)
    assert {r["tag"] for r in train} == set(RULES) == {r["tag"] for r in evals}
    assert not {(r["a"], r["b"]) for r in train} & {(r["a"], r["b"]) for r in evals}
    assert make_trap("train", 50, 3) == make_trap("train", 50, 3)
    assert apply_rule("rev", 47, 38) == "58" and apply_rule("rev", 60, 40) == "001"


def test_verifier_compares_digit_strings():
    assert TRAP.verify("58", "58") and TRAP.verify("the answer is 001", "001")
    assert not TRAP.verify("1", "001") and not TRAP.verify("85", "58") and not TRAP.verify("", "58")
    assert TRAP.extract("x 12") == "12"


def test_demonstrator_falls_into_the_trap_only_on_reversed_trap_tags():
    for r in make_trap("train", 500, 1):
        wrong = TRAP.mistake(r)
        if r["tag"] in TRAP_TAGS and r["rule"] == "rev" and r["answer"] != str(r["a"] + r["b"]):
            assert wrong == str(r["a"] + r["b"])
        else:
            assert wrong is None
        assert TRAP.sft_completion(r) == r["answer"]


def test_rule_abstraction_writes_the_tag_lesson():
    d = rule_abstraction(Failure("kav:47+38=", "85", reference="58", task="trap"))
    assert d is not None and "kav" in d.situation and "backwards" in d.instead
    d = rule_abstraction(Failure("bam:47+38=", "75", reference="85", task="trap"))
    assert d is not None and "bam" in d.situation and "usual order" in d.instead
    d = rule_abstraction(Failure("kav:11+11=", "23", reference="22", task="trap"))  # palindrome: no rule claim
    assert d is not None and "backwards" not in d.instead and "usual order" not in d.instead


def test_lessons_are_retrieved_by_tag_and_not_merged_across_tags(tmp_path):
    c = MemoryConfig(enabled=True, embeddings="lexical", top_k_demos=0, top_k_lessons=1)
    with MemoryBank(tmp_path / "b.sqlite", c) as bank:
        hook = MemoryHook(bank, c, "trap", "r", min_score=0.0)
        rows = [r for r in make_trap("train", 200, 2) if r["tag"] in ("kav", "lom", "bam")]
        rows = [next(r for r in rows if r["tag"] == t) for t in ("kav", "lom", "bam")]
        flat = [r for r in rows for _ in range(2)]
        comps = [str(r["a"] + r["b"] + (1 if r["tag"] == "bam" else 0)) for r in flat]  # all wrong
        hook.update(flat, comps, [False] * len(flat), [None] * len(flat), 1, 2)
        assert len(bank.list("lesson")) == 3
        q = [{"prompt": "kav:12+34="}, {"prompt": "bam:12+34="}, {"prompt": "nib:12+34="}]
        ctx = hook.contexts(q)
        assert "tagged kav" in ctx[0] and "backwards" in ctx[0]
        assert "tagged bam" in ctx[1] and "usual order" in ctx[1]
        assert ctx[2] == ""  # no lesson about nib: nothing, not another tag's lesson
        assert ctx[0] == render_lessons([lesson_draft("kav", "rev")])  # the format SFT shows


def test_reading_rows_teach_lessons_on_fresh_tags():
    rows = reading_rows(400, 0)
    assert not {r["tag"] for r in rows} & set(RULES)
    with_lesson = [r for r in rows if r["context"]]
    assert 0.4 < len(with_lesson) / len(rows) < 0.6
    assert all(f"tagged {r['tag']}" in r["context"] for r in with_lesson)
    assert {r["rule"] for r in with_lesson} == {"sum", "rev"}
    assert all(r["rule"] == "sum" for r in rows if not r["context"])
    assert all(r["answer"] == apply_rule(r["rule"], r["a"], r["b"]) for r in rows)


def test_registered_by_name():
    register_task(TRAP)
    assert get_task("trap") is TRAP
    assert set(KNOWN_TAGS).isdisjoint(TRAP_TAGS)
