"""The constraints task: many valid answers, the verifier's feedback as a rule critique, no reference answer."""

import random

import pytest

from critique_rl.critics.base import CritiqueRequest, render_rule
from critique_rl.tasks import get_task
from critique_rl.tasks.constraints import (
    TEMPLATE_DIR,
    TRAP_TAGS,
    feedback,
    make_constraints,
    make_constraints_plateau,
    questions,
    verify_constraints,
    violations,
    wrong_parity,
)

SPEC = "sum=17 first=3 end=odd tag=kir"


def test_violations_name_each_broken_constraint() -> None:
    assert violations("3581", SPEC) == []
    assert violations("3527", SPEC) == []  # another valid answer: many are right
    assert violations("3518", SPEC) == ["its last digit 8 is even; kir answers end in an odd digit"]
    assert violations("4337", SPEC) == ["it starts with 4, not 3", "the digit 3 repeats"]
    assert violations("359", SPEC) == ["it has 3 digits, not 4"]
    assert violations("3591", SPEC) == ["its digits sum to 18, not 17"]
    assert violations("no idea", SPEC) == ["it has no digits"]
    assert feedback("3518", SPEC) == ("Your answer 3518 is incorrect: its last digit 8 is even; kir answers end in "
                                      "an odd digit.")


def test_template_writes_the_verifiers_feedback_and_indicative_stays_verdict_only() -> None:
    rows = make_constraints("train", 150, 3)
    rng = random.Random(0)
    for row in rows:
        responses = [row["example"], wrong_parity(row) or "12", "x",
                     "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 6)))]
        for resp in responses:
            ok = verify_constraints(resp, row["answer"])
            req = CritiqueRequest(question=row["prompt"], response=resp, reference=row["answer"], verdict=ok,
                                  metadata={"answer": get_task("constraints").extract(resp) or resp})
            assert render_rule("ground_truth", req, TEMPLATE_DIR) == feedback(resp, row["answer"])
            indicative = render_rule("indicative", req, TEMPLATE_DIR)
            assert "sum" not in indicative and "digit" not in indicative  # verdict only, the packaged template


def test_examples_valid_mistakes_wrong_only_in_parity_and_splits_disjoint() -> None:
    for row in make_constraints("train", 300, 1):
        assert verify_constraints(row["example"], row["answer"])
        wrong = wrong_parity(row)
        if row["tag"] in TRAP_TAGS:
            assert wrong is not None
            broken = violations(wrong, row["answer"])
            assert len(broken) == 1 and broken[0].startswith("its last digit")
        else:
            assert wrong is None
    tags = sorted(TRAP_TAGS)
    assert not set(questions("train", tags)) & set(questions("eval", tags))
    held = make_constraints_plateau("eval", 1000)
    assert len(held) == len({r["prompt"] for r in held}) == len(questions("eval", tags))
    assert all(r["tag"] in TRAP_TAGS for r in held)
    mid = make_constraints("eval", 300)
    assert sum(r["trap"] for r in mid) == 150 and len({r["prompt"] for r in mid}) == 300


@pytest.mark.parametrize("name", ["constraints", "constraints_plateau"])
def test_registered(name: str) -> None:
    assert get_task(name).name == name


def test_template_folder_passes_the_trainers_template_check() -> None:
    from critique_rl.templates import check_templates

    check_templates(TEMPLATE_DIR)  # the trainer renders every template with sample variables at setup
