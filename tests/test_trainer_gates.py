"""Rubric gates inside the trainer (DRO, arXiv:2506.13351): pass rates logged, gated-out rollouts get no
gradient, a group with none passing is dropped -- for initial samples and for refinements alike."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from critique_rl.train.metrics import read_jsonl
from critique_rl.train.trainer import CritiqueGRPOTrainer

GATES_PY = """
def length(prompts, completions, **_):
    # a reward with spread in every group, so an ungated step always has a gradient
    return [float(len(c)) for c in completions]

def reject_all(prompts, completions, **_):
    return [False for _ in completions]

def even_prompt(prompts, completions, **_):
    # passes every sample of a prompt whose character codes sum to an even number: whole groups kept or dropped
    return [sum(map(ord, p)) % 2 == 0 for p in prompts]
"""


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _train_rows(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if "loss/total" in r]


@pytest.fixture
def gates_file(tmp_path):
    path = tmp_path / "gates.py"
    path.write_text(GATES_PY)
    return path


def test_gate_rejecting_everything_leaves_the_policy_unchanged(fast_config, tmp_path, gates_file):
    sft = fast_config(output_dir=str(tmp_path / "sft"), max_steps=0)
    CritiqueGRPOTrainer(args=sft).train()
    # critiques on for every wrong sample: refinements are gated like initial samples
    cfg = fast_config(output_dir=str(tmp_path / "gated"), max_steps=2, gates=[f"{gates_file}:reject_all"],
                      reward_funcs=["correctness", f"{gates_file}:length"], critique_on="wrong", kl_beta=0.0,
                      entropy_coef=0.0)
    CritiqueGRPOTrainer(args=cfg).train()
    rows = _train_rows(tmp_path / "gated")
    assert len(rows) == 2
    for row in rows:
        assert row["gate/reject_all/pass_rate"] == 0.0
        assert row["gate/groups_kept"] == 0.0
    assert sum(r["critique/refinements"] for r in rows) > 0  # refinements existed and were gated out too
    before, after = _weights(tmp_path / "sft"), _weights(tmp_path / "gated")
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)


def test_ungated_run_does_change_the_policy(fast_config, tmp_path, gates_file):
    """The control for the test above: same start and rewards, no gate -> the weights move."""
    CritiqueGRPOTrainer(args=fast_config(output_dir=str(tmp_path / "sft"), max_steps=0)).train()
    CritiqueGRPOTrainer(args=fast_config(output_dir=str(tmp_path / "free"), max_steps=2, critique_on="wrong",
                                         reward_funcs=["correctness", f"{gates_file}:length"])).train()
    before, after = _weights(tmp_path / "sft"), _weights(tmp_path / "free")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_partial_gate_logs_pass_rate_and_drops_failing_groups(fast_config, tmp_path, gates_file):
    cfg = fast_config(output_dir=str(tmp_path / "half"), max_steps=3, gates=[f"{gates_file}:even_prompt", "has_answer"])
    CritiqueGRPOTrainer(args=cfg).train()
    rows = _train_rows(tmp_path / "half")
    rates = [r["gate/even_prompt/pass_rate"] for r in rows]
    assert all(0.0 <= x <= 1.0 for x in rates) and 0.0 < sum(rates) / len(rates) < 1.0
    assert all("gate/has_answer/pass_rate" in r for r in rows)
    # a group is kept iff its prompt passes both gates; even_prompt passes or fails whole groups, so the
    # kept share can be no larger than even_prompt's pass rate
    for r in rows:
        assert r["gate/groups_kept"] <= r["gate/even_prompt/pass_rate"] + 1e-9
    # dropped groups carry no advantage in the logged rollouts
    logged = read_jsonl(tmp_path / "half" / "rollouts.jsonl")
    odd = [r for r in logged if sum(map(ord, r["prompt"])) % 2 == 1]
    assert odd and all(r["advantage"] == 0.0 for r in odd)
