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

    cfg = fast_config(max_steps=2, critique_on="all", refinement_source="reference", sft_steps=5, eval_n=8)
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
        cfg = fast_config(max_steps=1, critique_on="all", refinement_source="reference", offpolicy_gamma=gamma, sft_steps=5, eval_n=8,
                          output_dir=str(fast_config().output_dir) + name)
        trainer = CritiqueGRPOTrainer(args=cfg)
        trainer.train()
        [row] = [r for r in _rows(trainer.out / "metrics.jsonl") if "loss/total" in r]
        shares[name] = row["offpolicy/grad_weight_share"]
    assert shares["unshaped"] > shares["shaped"] > 0


def test_offpolicy_token_weights_by_hand():
    from critique_rl.algos import offpolicy_token_weights

    logp = torch.tensor([[-3.0, -0.1, -2.0]])  # under the plain prompt
    beh = torch.tensor([[-0.5, -0.1, -2.5]])  # under the critique it was sampled with
    assert offpolicy_token_weights(logp, beh, "none").tolist() == [[1.0, 1.0, 1.0]]
    # is: min(exp(logp - beh), 2) = [e^-2.5, 1, min(e^0.5, 2)]
    torch.testing.assert_close(offpolicy_token_weights(logp, beh, "is", cap=2.0),
                               torch.tensor([[torch.e ** -2.5, 1.0, min(torch.e ** 0.5, 2.0)]]))
    # gap: 1 + clamp(beh - logp, 0, cap) = [1 + min(2.5, 2), 1, 1]
    torch.testing.assert_close(offpolicy_token_weights(logp, beh, "gap", cap=2.0), torch.tensor([[3.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="offpolicy_weighting"):
        offpolicy_token_weights(logp, beh, "bogus")


def test_offpolicy_weighting_changes_only_the_refinement_loss(fast_config, tmp_path):
    """Same start and batch: `is` and `gap` reweigh the off-policy term; the on-policy term is untouched. (The
    injected reference has behaviour log-prob 0, so is = min(p, cap) and gap = 1 + min(-log p, cap) here.)"""
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    rows = {}
    for mode in ("none", "is", "gap"):
        cfg = fast_config(max_steps=1, critique_on="all", refinement_source="reference", offpolicy_weighting=mode,
                          offpolicy_weight_cap=5.0, output_dir=str(tmp_path / mode), sft_steps=5, eval_n=8)
        trainer = CritiqueGRPOTrainer(args=cfg)
        trainer.train()
        [rows[mode]] = [r for r in _rows(trainer.out / "metrics.jsonl") if "loss/total" in r]
    assert rows["none"]["loss/offpolicy"] != 0.0
    for mode in ("is", "gap"):
        assert rows[mode]["loss/policy"] == pytest.approx(rows["none"]["loss/policy"], abs=1e-6)
        assert rows[mode]["loss/offpolicy"] != pytest.approx(rows["none"]["loss/offpolicy"], abs=1e-7)
    # is shrinks (p < 1), gap grows (-log p > 0) the refinement term
    assert abs(rows["is"]["loss/offpolicy"]) < abs(rows["none"]["loss/offpolicy"]) < abs(rows["gap"]["loss/offpolicy"])


def test_refinement_rows_carry_their_critique_conditioned_sampling_logprobs(fast_config, monkeypatch):
    import critique_rl.train.critique_stage as stage
    import critique_rl.train.trainer as tr

    seen = {}
    real_update, real_refine = tr.policy_update, stage.critique_and_refine

    def record_update(model, optimizer, scheduler, accelerator, ub, cfg, **kw):
        seen["ub"] = ub
        return real_update(model, optimizer, scheduler, accelerator, ub, cfg, **kw)

    def record_refine(ctx, batch):
        seen["crit"], seen["batch"] = real_refine(ctx, batch), batch
        return seen["crit"]

    monkeypatch.setattr(tr, "policy_update", record_update)
    monkeypatch.setattr(stage, "critique_and_refine", record_refine)
    trainer = tr.CritiqueGRPOTrainer(args=fast_config(max_steps=1, critique_on="all", offpolicy_weighting="gap",
                                                      sft_steps=5, eval_n=8))
    trainer.train()
    ub, crit, n_init = seen["ub"], seen["crit"], len(seen["batch"].completions)
    off_rows = ub.offpolicy.nonzero().flatten().tolist()
    assert off_rows and off_rows[0] == n_init
    kept = {c.text: c.logprobs for c in crit.ref_completions}
    for row in off_rows:
        lp = ub.sampling_logp[row]
        assert (lp[lp != 0] < 0).all()  # real log-probs were filled in
        assert any(torch.allclose(lp[: len(v)], torch.tensor(v)) for v in kept.values())
