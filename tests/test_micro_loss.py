"""The per-micro-batch loss (critique_rl.train.micro_loss) on a hand-computed case, its sum over micro-batches
against one full-batch loss and the optimizer loop's statistics, and the policy-loss registry: a duplicate name is
refused, a registered loss is the one a trainer run uses."""

from __future__ import annotations

import json
import math

import pytest
import torch

from critique_rl.algos import POLICY_LOSSES, register_policy_loss
from critique_rl.config import TrainConfig
from critique_rl.registry import DuplicateNameError
from critique_rl.train.batching import pack
from critique_rl.train.micro_loss import micro_batch_loss
from critique_rl.train.update import Normalisation, UpdateBatch, loss_inputs, policy_update


def _uniform_model():
    """A tiny model whose logits are all zero: every token has log-prob -log V (V = vocabulary size)."""
    from critique_rl.models import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer(["12+34=46", "7+8=15"] * 10, vocab_size=300)
    model = build_tiny_model(tok, hidden_size=64, layers=1, heads=2, seed=0)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    return model, model.get_output_embeddings().weight.shape[0]


def _batch() -> UpdateBatch:
    """Rows 0, 1 on-policy (2 and 1 completion tokens, A = 1 and -0.5); row 2 a refinement (3 tokens, A = 2)."""
    tokens = pack([[5, 6, 7], [5, 6], [5, 6, 7]], [[8, 9], [10], [11, 12, 13]], pad_id=0)
    adv = torch.tensor([1.0, -0.5, 2.0]).unsqueeze(-1).expand(-1, tokens.completion_len).clone()
    return UpdateBatch(tokens=tokens, advantages=adv, offpolicy=torch.tensor([False, False, True]))


def _cfg(**kw) -> TrainConfig:
    base = dict(policy_loss="ppo_clip", offpolicy_gamma=0.1, loss_aggregation="token_mean", kl_beta=0.0,
                entropy_coef=0.0, distill_weight=0.0, num_iterations=1, mini_batch_size=2, generation_batch_size=4,
                num_generations=4, temperature=1.0)
    base.update(kw)
    return TrainConfig(**base)


def test_micro_batch_loss_matches_the_hand_computed_value_and_sums_to_the_full_batch():
    from accelerate import Accelerator

    model, V = _uniform_model()
    ub, cfg, acc = _batch(), _cfg(), Accelerator(cpu=True)
    norm = Normalisation(num_seqs=3.0, num_tokens=6.0, micro_batches=2)
    x = loss_inputs(model, acc, ub, cfg, norm, norm_constant=4.0)
    # first iteration: ratio 1, so PPO-clip gives -A per on-policy token; the refinement row's shaped term is
    # -A p / (p + gamma) with p = 1/V; token_mean divides by the 6 loss tokens of the whole batch
    p = 1.0 / V
    hand = ((-1.0) * 2 + 0.5 * 1 + (-2.0 * p / (p + 0.1)) * 3) / 6.0
    full = micro_batch_loss(model, x, slice(0, 3), cfg)
    assert full.loss.item() == pytest.approx(hand, rel=1e-5)
    on_tokens = ub.tokens.completion_mask.bool()
    assert int(on_tokens.sum()) == 6
    assert torch.allclose(full.logp[on_tokens], torch.full((6,), -math.log(V)), atol=1e-5)
    assert full.clipped.sum().item() == 0.0

    # two micro-batches (rows 0-1, row 2) sum to the full-batch loss, and so do their gradients
    model.zero_grad(set_to_none=True)
    full.loss.backward()
    g_full = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    model.zero_grad(set_to_none=True)
    parts = [micro_batch_loss(model, x, sl, cfg) for sl in (slice(0, 2), slice(2, 3))]
    sum(m.loss for m in parts).backward()
    assert sum(m.loss.item() for m in parts) == pytest.approx(hand, rel=1e-5)
    for n, g in g_full.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-7)

    # the optimizer loop over the same batch reports the same loss (lr 0: weights unchanged)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = policy_update(model, opt, sched, acc, ub, cfg, norm_constant=4.0, norm=norm)
    assert stats["loss/total"] == pytest.approx(hand, rel=1e-5)
    assert stats["loss/policy"] == pytest.approx((-2.0 + 0.5) / 6.0, rel=1e-5)
    assert stats["loss/offpolicy"] == pytest.approx(-6.0 * p / (p + 0.1) / 6.0, rel=1e-5)


def test_a_policy_loss_name_is_registered_once():
    original = POLICY_LOSSES["ppo_clip"]
    with pytest.raises(DuplicateNameError, match="ppo_clip"):
        @register_policy_loss("ppo_clip")
        def other(logp, old_logp, advantages, cfg):  # pragma: no cover - never registered
            return logp * 0.0, torch.zeros_like(logp)
    assert POLICY_LOSSES["ppo_clip"] is original
    assert register_policy_loss("ppo_clip")(original) is original  # the same entry again: a no-op


def test_a_registered_policy_loss_is_the_one_the_trainer_trains_with(fast_config):
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    calls: list[tuple[int, ...]] = []

    @register_policy_loss("half_reinforce_for_test")
    def half_reinforce(logp, old_logp, advantages, cfg):
        """0.5 * -A * ratio, no clip (a loss no built-in computes)."""
        calls.append(tuple(logp.shape))
        return -0.5 * torch.exp(logp - old_logp) * advantages, torch.zeros_like(logp)

    try:
        cfg = fast_config(max_steps=2, policy_loss="half_reinforce_for_test", critique_on="none", kl_beta=0.0,
                          entropy_coef=0.0, loss_aggregation="token_mean", sft_steps=5, eval_n=8)
        trainer = CritiqueGRPOTrainer(args=cfg)
        trainer.train()
    finally:
        POLICY_LOSSES.unregister("half_reinforce_for_test")
    rows = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    assert len(steps) == 2 and len(calls) >= 2
    for r in steps:
        # no refinements: the total is the registered loss alone, which never clips
        assert r["loss/total"] == pytest.approx(r["loss/policy"], abs=1e-7) and r["clip_frac"] == 0.0
    assert POLICY_LOSSES.get("half_reinforce_for_test") is None
