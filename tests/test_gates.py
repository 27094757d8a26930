"""Rubric gates (DRO, arXiv:2506.13351): algos.apply_gates and rewards.gates."""

import pytest
import torch

from critique_rl.algos import apply_gates, compute_advantages
from critique_rl.errors import UserError
from critique_rl.rewards import GATES, build_gates, evaluate_gates
from critique_rl.tasks import get_task

T, F = True, False
ADD = get_task("addition")


def test_apply_gates_masks_and_drops_groups():
    mask = torch.tensor([[T, T, T, F], [T, T, F, F], [T, T, T, T]])
    passed = torch.tensor([[T, F, T, T], [F, F, T, T], [T, T, T, T]])
    new_mask, kept = apply_gates(mask, passed)
    assert new_mask.tolist() == [[T, F, T, F], [F, F, F, F], [T, T, T, T]]
    assert kept.tolist() == [T, F, T]
    with pytest.raises(ValueError, match="same"):
        apply_gates(mask, passed[:, :2])


def test_gated_rollout_gets_no_advantage_and_leaves_the_baseline():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 5.0]])
    new_mask, _ = apply_gates(torch.ones(1, 4, dtype=torch.bool), torch.tensor([[T, T, T, F]]))
    adv = compute_advantages("dr_grpo", rewards, new_mask)
    torch.testing.assert_close(adv, torch.tensor([[1 / 3, -2 / 3, 1 / 3, 0.0]]))


def test_builtin_gates():
    assert {"has_answer", "max_length", "format"} <= set(GATES)
    has_answer, max_len, fmt = build_gates(["has_answer", "max_length", "format"], ADD, {"max_length": {"max_length": 3}})
    comps = ["85", "no", "1 2 3 4", "the answer is 7"]
    assert has_answer([""] * 4, comps) == [T, F, T, T]
    assert max_len([""] * 4, comps) == [T, T, F, F]  # whitespace tokens: 1, 1, 4, 4
    assert max_len([""] * 4, comps, completion_lengths=[3, 4, 1, 2]) == [T, F, T, T]
    assert max_len([""] * 2, ["a", "b"], completion_lengths=[1, 1], truncated=[F, T]) == [T, F]
    assert fmt([""] * 4, comps) == [T, F, F, F]
    (default_len,) = build_gates(["max_length"], ADD)  # default: task.max_new_tokens = 6
    assert default_len([""] * 2, ["a", "b"], completion_lengths=[6, 7]) == [T, F]


def test_evaluate_gates_and_pass_rates():
    gates = build_gates(["has_answer", "max_length"], ADD, {"max_length": {"max_length": 2}})
    comps = ["85", "no", "1 2 3", "4"]
    passed, rates = evaluate_gates(gates, [""] * 4, comps)
    assert passed.dtype == torch.bool and passed.tolist() == [T, F, F, T]
    assert rates == {"has_answer": 0.75, "max_length": 0.75}
    passed, rates = evaluate_gates([], ["p"], ["c"])
    assert passed.tolist() == [T] and rates == {}


def test_user_and_async_gates(tmp_path):
    path = tmp_path / "my_gates.py"
    path.write_text(
        "async def short(prompts, completions, limit=3, **_):\n"
        "    return [len(c) <= limit for c in completions]\n"
        "def bad(prompts, completions, **_):\n"
        "    return [0.5 for _ in completions]\n"
    )
    (short,) = build_gates([f"{path}:short"], ADD, {f"{path}:short": {"limit": 2}})
    passed, rates = evaluate_gates([short], ["p"] * 2, ["ab", "abc"])
    assert passed.tolist() == [T, F] and rates == {"short": 0.5}
    (bad,) = build_gates([f"{path}:bad"], ADD)
    with pytest.raises(UserError, match="gate function 'bad' returned 0.5"):
        evaluate_gates([bad], ["p"], ["a"])


def test_gate_errors():
    with pytest.raises(UserError, match="unknown gate"):
        build_gates(["nope"], ADD)
    with pytest.raises(UserError, match="unknown argument"):
        build_gates(["has_answer"], ADD, {"has_answer": {"x": 1}})

    def wrong_len(prompts, completions, **_):
        return [True]

    with pytest.raises(UserError, match="'wrong_len' returned 1 values for 2"):
        evaluate_gates([wrong_len], ["p", "p"], ["a", "b"])
