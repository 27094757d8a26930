"""Hand-computed checks of critique_rl.algos.tis (truncated importance sampling, mismatch metrics)."""

import math

import pytest
import torch

from critique_rl.algos import mismatch_stats, tis_weights


def close(a: torch.Tensor, b) -> None:
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=1e-6, rtol=0)


def test_tis_weight_is_capped_ratio():
    # trainer probs 0.5, 0.2, 0.9 ; engine probs 0.5, 0.4, 0.3 -> ratios 1.0, 0.5, 3.0 -> capped at 2
    train = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    engine = torch.log(torch.tensor([[0.5, 0.4, 0.3]]))
    close(tis_weights(train, engine, cap=2.0), [[1.0, 0.5, 2.0]])
    close(tis_weights(train, engine, cap=5.0), [[1.0, 0.5, 3.0]])


def test_tis_weight_has_no_gradient():
    train = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    w = tis_weights(train, torch.tensor([[-1.5, -1.0]]), cap=2.0)
    assert not w.requires_grad
    close(w, [[math.exp(0.5), math.exp(-1.0)]])


def test_tis_rejects_non_positive_cap():
    with pytest.raises(ValueError):
        tis_weights(torch.zeros(1, 1), torch.zeros(1, 1), cap=0.0)


def test_mismatch_stats_by_hand():
    # log r = train - engine = [0.5, -1.0, 0.0 (masked out)]
    train = torch.tensor([[-1.0, -2.0, -3.0]])
    engine = torch.tensor([[-1.5, -1.0, -7.0]])
    mask = torch.tensor([[1, 1, 0]])
    s = mismatch_stats(train, engine, mask, cap=1.5)
    close(s["abs_log_ratio"], (0.5 + 1.0) / 2)
    k3 = ((math.exp(0.5) - 1 - 0.5) + (math.exp(-1.0) - 1 + 1.0)) / 2
    close(s["kl"], k3)
    close(s["kl_k1"], (-0.5 + 1.0) / 2)
    close(s["tis_weight"], (min(math.exp(0.5), 1.5) + math.exp(-1.0)) / 2)  # e^0.5 = 1.6487 -> 1.5
    close(s["tis_clip_frac"], 0.5)


def test_identical_engine_means_no_mismatch():
    lp = torch.log(torch.tensor([[0.3, 0.6], [0.9, 0.1]]))
    s = mismatch_stats(lp, lp.clone(), torch.ones(2, 2), cap=2.0)
    for key in ("abs_log_ratio", "kl", "kl_k1", "tis_clip_frac"):
        close(s[key], 0.0)
    close(s["tis_weight"], 1.0)
    close(tis_weights(lp, lp, 2.0), torch.ones(2, 2))


@pytest.mark.parametrize("backend,cap,applied", [("hf", 2.0, False), ("vllm", 2.0, True), ("vllm", None, False)])
def test_policy_update_applies_tis_only_with_a_separate_engine(backend, cap, applied):
    """Through ``policy_update``: engine log-probs 0.5 below the trainer's on the on-policy rows give
    w = e^0.5 (under the cap 2): the on-policy loss is scaled by it with ``rollout_backend: vllm`` and left alone
    with ``hf`` or ``tis_cap: null``; the ``mismatch/*`` metrics are logged in every case, refinement rows
    (whose engine log-probs are far off here) never enter them."""
    from accelerate import Accelerator

    from critique_rl.config import TrainConfig
    from critique_rl.models import build_tiny_model, build_tiny_tokenizer
    from critique_rl.train.batching import pack
    from critique_rl.train.update import UpdateBatch, policy_update, score_tokens

    tok = build_tiny_tokenizer(["12+34=46", "7+8=15", "100+1=101"] * 20, vocab_size=300)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tok), (4,), generator=g).tolist() for _ in range(8)]
    comps = [torch.randint(3, len(tok), (int(n),), generator=g).tolist() for n in torch.randint(2, 7, (8,), generator=g)]
    tokens = pack(prompts, comps, pad_id=0)
    off = torch.zeros(8, dtype=torch.bool)
    off[::4] = True  # refinement rows
    from critique_rl.rollout import HFGenerator, engine_is_separate
    from critique_rl.rollout.vllm import VLLMGenerator

    engine = object.__new__(HFGenerator if backend == "hf" else VLLMGenerator)  # the trainer asks the engine
    cfg = TrainConfig(rollout_backend=backend, tis_cap=cap, loss_aggregation="token_mean", mini_batch_size=8,
                      generation_batch_size=8, num_generations=4, max_grad_norm=1e9)

    def run(sampling_logp):
        model = build_tiny_model(tok, hidden_size=64, layers=1, heads=2, seed=0)
        acc = Accelerator(cpu=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        model, opt, sched = acc.prepare(model, opt, sched)
        train_logp = score_tokens(model, tokens, cfg.temperature, 8)[0]
        adv = torch.linspace(-1.0, 2.0, 8).unsqueeze(-1).expand(-1, tokens.completion_len).clone()
        ub = UpdateBatch(tokens=tokens, advantages=adv, offpolicy=off,
                         sampling_logp=sampling_logp(train_logp) if sampling_logp else None)
        return policy_update(model, opt, sched, acc, ub, cfg, norm_constant=8.0,
                             importance_weights=engine_is_separate(engine))

    shift = torch.where(off.unsqueeze(-1), torch.tensor(3.0), torch.tensor(0.5))  # ratio e^3 would be capped
    with_engine = run(lambda lp: lp - shift)
    plain = run(None)
    assert not any(k.startswith("mismatch/") for k in plain)
    w = math.exp(0.5)
    expected = plain["loss/policy"] * (w if applied else 1.0)
    assert with_engine["loss/policy"] == pytest.approx(expected, rel=1e-5)
    assert with_engine["loss/offpolicy"] == pytest.approx(plain["loss/offpolicy"], rel=1e-6)
    assert with_engine["mismatch/abs_log_ratio"] == pytest.approx(0.5, abs=1e-5)
    assert with_engine["mismatch/kl_k1"] == pytest.approx(-0.5, abs=1e-5)
    assert with_engine["mismatch/kl"] == pytest.approx(w - 1.0 - 0.5, abs=1e-5)
    if cap is not None:
        assert with_engine["mismatch/tis_weight"] == pytest.approx(w, abs=1e-5)
        assert with_engine["mismatch/tis_clip_frac"] == 0.0
