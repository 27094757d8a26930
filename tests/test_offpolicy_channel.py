"""The off-policy (refinement) channel: its gradient coefficient, the reference-injection control arm and the
per-step diagnostics that say how much refinements drive an update."""

from __future__ import annotations

import json

import pytest
import torch

from critique_rl.algos import offpolicy_coefficient, shaped_offpolicy_loss
from critique_rl.errors import ConfigError
from critique_rl.tasks import get_task


def test_coefficient_by_hand_and_by_autograd():
    p = torch.tensor([0.01, 0.1, 0.5, 1.0], dtype=torch.float64)
    # gamma p / (p + gamma)^2 with gamma = 0.1: 0.001/0.0121, 0.01/0.04, 0.05/0.36, 0.1/1.21
    want = torch.tensor([0.001 / 0.0121, 0.25, 0.05 / 0.36, 0.1 / 1.21], dtype=torch.float64)
    torch.testing.assert_close(offpolicy_coefficient(p.log(), 0.1), want)
    assert offpolicy_coefficient(p.log(), None).tolist() == [1.0] * 4
    # it is d(loss)/d(log p) / (-A): the weight the shaped loss puts on grad log p
    for gamma in (0.1, 0.5, None):
        logp = p.log().unsqueeze(0).clone().requires_grad_(True)  # [B=1, T=4]
        adv = torch.tensor([[2.0, -1.0, 0.5, 3.0]], dtype=torch.float64)  # per-token advantages
        shaped_offpolicy_loss(logp, adv, gamma).sum().backward()
        torch.testing.assert_close(logp.grad, -adv * offpolicy_coefficient(p.log(), gamma))


def test_reference_control_needs_groups_and_no_distillation(fast_config):
    with pytest.raises(ConfigError, match="refinement_source.*set critique_on"):
        fast_config(refinement_source="reference", critique_on="none")
    with pytest.raises(ConfigError, match="distill_weight.*refinement_source: reference"):
        fast_config(refinement_source="reference", distill_weight=0.2)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reference_control_injects_the_reference_answer_without_a_critic(fast_config):
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    cfg = fast_config(max_steps=2, critique_on="all", refinement_source="reference")
    trainer = CritiqueGRPOTrainer(args=cfg)
    trainer.train()
    assert trainer.critic is None  # no critic was built or called
    steps = [r for r in _rows(trainer.out / "metrics.jsonl") if "loss/total" in r]
    assert all(r["critique/refinements"] == 16 and r["critique/critiqued"] == 0 for r in steps)
    assert all(r["critique/refine_success_rate"] == 1.0 for r in steps)  # the reference is always right
    assert all("critic/requests" not in r for r in steps)
    # refinement tokens are in the update: logged log-prob under the plain prompt and their coefficient share
    assert all(r["offpolicy/logp_mean"] < 0 and 0 < r["offpolicy/grad_weight_share"] < 1 for r in steps)
    task = get_task("addition")
    logged = [r for r in _rows(trainer.out / "rollouts.jsonl") if r.get("refinement") is not None]
    assert logged and all(r.get("critique") is None for r in logged)
    for r in logged:  # the injected text is the task's own demonstration of the right answer
        assert task.verify(r["refinement"], r["answer"])


def test_unshaped_channel_weighs_refinements_more_than_shaped(fast_config):
    """Same start, same batch: without shaping (gamma null) refinement tokens take a larger share of the update
    (coefficient 1 against gamma p/(p+gamma)^2 <= 1/4)."""
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    shares = {}
    for name, gamma in (("shaped", 0.1), ("unshaped", None)):
        cfg = fast_config(max_steps=1, critique_on="all", refinement_source="reference", offpolicy_gamma=gamma,
                          output_dir=str(fast_config().output_dir) + name)
        trainer = CritiqueGRPOTrainer(args=cfg)
        trainer.train()
        [row] = [r for r in _rows(trainer.out / "metrics.jsonl") if "loss/total" in r]
        shares[name] = row["offpolicy/grad_weight_share"]
    assert shares["unshaped"] > shares["shaped"] > 0
