import pytest

from critique_rl.errors import UserError
from critique_rl.tasks import Task, get_task, parse_number, register_task
from critique_rl.tasks.arithmetic import drop_carry


@pytest.mark.parametrize("name", ["addition", "reverse", "addition_conf"])
def test_splits_are_disjoint_and_seeded(name):
    t = get_task(name)
    train = t.make_examples("train", 3000, seed=0)
    evals = t.make_examples("eval", 300, seed=0)
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in evals})
    assert t.make_examples("train", 50, seed=3) == t.make_examples("train", 50, seed=3)
    assert t.make_examples("train", 50, seed=3) != t.make_examples("train", 50, seed=4)
    assert len({r["prompt"] for r in evals}) == 300  # eval problems are distinct
    for r in train[:50]:
        assert t.verify(t.sft_completion(r), r["answer"])


@pytest.mark.parametrize(
    "completion, answer, ok",
    [
        ("85", "85", True),
        (" 85 ", "85", True),
        ("The answer is 85.", "85", True),
        ("47+38 = 85", "85", True),
        ("\\boxed{85}", "85", True),
        ("I think 84. Final answer: 85", "85", True),
        ("#### 1,085", "1085", True),
        ("84", "85", False),
        ("", "85", False),
        ("eighty-five", "85", False),
        ("85 <confidence>0.9</confidence>", "85", True),
    ],
)
def test_addition_verifier(completion, answer, ok):
    assert get_task("addition").verify(completion, answer) is ok


def test_reverse_verifier_and_shape():
    t = get_task("reverse")
    assert t.verify("dcba", "dcba") and t.verify("Answer: DCBA", "dcba")
    assert not t.verify("abcd", "dcba") and not t.verify("", "dcba")
    assert t.extract("the answer is xyz") == "xyz"


def test_parse_number_edge_cases():
    assert parse_number("no digits") is None
    assert parse_number("-12") == -12.0
    assert parse_number("3.5 then 7") == 7.0


def test_typical_mistake_drops_the_carry():
    assert drop_carry({"a": 47, "b": 38}) == "75"
    assert drop_carry({"a": 41, "b": 38}) is None


def test_user_task_registration_and_unknown_task():
    t = Task(name="echo_test", make_examples=lambda s, n, seed: [{"prompt": "x", "answer": "x"}] * n,
             verify=lambda c, a: c.strip() == a, extract=lambda c: c)
    register_task(t)
    assert get_task("echo_test") is t
    with pytest.raises(UserError, match="unknown task"):
        get_task("no_such_task")


def test_trap_plateau_starts_low_and_keeps_the_reverse_skill_in_training():
    from critique_rl.tasks import get_task
    from critique_rl.tasks.trap import KNOWN_TAGS, PLATEAU_TAGS

    task = get_task("trap_plateau")
    ev = task.make_examples("eval", 300, 0)
    assert {r["tag"] for r in ev} == set(PLATEAU_TAGS) and all(r["rule"] == "rev" for r in ev)
    # the demonstrator (plain sum on trap tags) is right only where the total is a palindrome
    demo_acc = sum(task.verify(task.mistake(r) or r["answer"], r["answer"]) for r in ev) / len(ev)
    assert 0.0 < demo_acc < 0.15
    train = task.make_examples("train", 2000, 0)
    tags = {r["tag"] for r in train}
    assert tags == set(KNOWN_TAGS) | set(PLATEAU_TAGS)  # the warm-up still shows totals written backwards
    assert {(r["a"], r["b"]) for r in ev}.isdisjoint({(r["a"], r["b"]) for r in train})


def test_trap_plateau_only_trains_and_evaluates_on_the_reversed_trap_tags_only():
    from critique_rl.tasks import get_task
    from critique_rl.tasks.trap import PLATEAU_TAGS

    task = get_task("trap_plateau_only")
    train, ev = task.make_examples("train", 2000, 0), task.make_examples("eval", 300, 0)
    assert {r["tag"] for r in train} == {r["tag"] for r in ev} == set(PLATEAU_TAGS)
    assert all(r["rule"] == "rev" and r["trap"] for r in train + ev)
    # the demonstrator's plain sum is wrong on every training question but the palindromic totals
    wrong = sum(task.mistake(r) is not None for r in train) / len(train)
    assert 0.85 < wrong < 1.0
    assert {(r["a"], r["b"]) for r in ev}.isdisjoint({(r["a"], r["b"]) for r in train})


def test_trap_half_puts_half_the_questions_on_the_reversed_trap_tags():
    from critique_rl.tasks import get_task
    from critique_rl.tasks.trap import KNOWN_TAGS, PLATEAU_TAGS

    task = get_task("trap_half")
    train, ev = task.make_examples("train", 4000, 0), task.make_examples("eval", 300, 0)
    assert {r["tag"] for r in train} == {r["tag"] for r in ev} == set(KNOWN_TAGS) | set(PLATEAU_TAGS)
    assert sum(r["tag"] in PLATEAU_TAGS for r in ev) == 150  # eval: tags in turn, exactly half on the trap
    assert 0.46 < sum(r["tag"] in PLATEAU_TAGS for r in train) / len(train) < 0.54
    # the demonstrator (right on known tags, plain sum on trap tags) starts mid-range
    demo_acc = sum(task.verify(task.mistake(r) or r["answer"], r["answer"]) for r in ev) / len(ev)
    assert 0.5 < demo_acc < 0.6
    assert {(r["a"], r["b"]) for r in ev}.isdisjoint({(r["a"], r["b"]) for r in train})
