"""Hand-computed checks of critique_rl.algos.losses."""

import math

import pytest
import torch

from critique_rl.algos.losses import aggregate_loss, entropy_from_logits, kl_k3, ppo_clip_loss


def close(a: torch.Tensor, b) -> None:
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=1e-5, rtol=0)


def _logps(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.full((1, len(ratios)), -1.0)
    return old + torch.log(torch.tensor([ratios])), old


def test_ppo_clip_positive_advantage():
    logp, old = _logps([0.5, 0.9, 1.1, 1.5])
    loss, clipped = ppo_clip_loss(logp, old, torch.tensor([1.0]), eps_low=0.2, eps_high=0.28)
    close(loss, [[-0.5, -0.9, -1.1, -1.28]])  # min(r, clip(r, 0.8, 1.28))
    close(clipped, [[0.0, 0.0, 0.0, 1.0]])


def test_ppo_clip_negative_advantage():
    logp, old = _logps([0.5, 0.9, 1.1, 1.5])
    loss, clipped = ppo_clip_loss(logp, old, torch.tensor([[-1.0]]), eps_low=0.2, eps_high=0.28)
    close(loss, [[0.8, 0.9, 1.1, 1.5]])  # -min(-r, -clip(r))
    close(clipped, [[1.0, 0.0, 0.0, 0.0]])


def test_ppo_clip_fraction_asymmetric_eps():
    logp, old = _logps([1.25, 1.25, 0.75, 0.75])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    _, sym = ppo_clip_loss(logp, old, adv, eps_low=0.2, eps_high=0.2)
    _, asym = ppo_clip_loss(logp, old, adv, eps_low=0.2, eps_high=0.28)
    assert sym.mean().item() == 1.0  # 1.25 > 1.2 and 0.75 < 0.8: everything clipped
    assert asym.mean().item() == 0.5  # clip-higher keeps the positive-advantage tokens


def test_ppo_clip_gradient_zero_where_clipped():
    logp, old = _logps([0.5, 1.0, 1.5])
    logp.requires_grad_(True)
    loss, clipped = ppo_clip_loss(logp, old, torch.tensor([1.0]), eps_low=0.2, eps_high=0.2)
    loss.sum().backward()
    close(clipped, [[0.0, 0.0, 1.0]])
    close(logp.grad, [[-0.5, -1.0, 0.0]])  # d(-r A)/dlogp = -r A


def test_kl_k3_hand_computed():
    logp = torch.log(torch.tensor([0.5, 0.3]))
    ref = torch.log(torch.tensor([0.25, 0.3]))
    close(kl_k3(logp, ref), [0.5 + math.log(2) - 1, 0.0])


def test_kl_k3_nonnegative_and_unbiased():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(7, generator=g), -1)
    q = torch.softmax(torch.randn(7, generator=g), -1)
    k3 = kl_k3(p.log(), q.log())
    assert (k3 >= 0).all()
    exact_kl = (p * (p.log() - q.log())).sum()
    close((p * k3).sum(), exact_kl)  # E_{x~p}[k3] = KL(p || q)


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e4, -1e4], [50.0, 0.0, 0.0, 0.0]]])
    h = entropy_from_logits(logits)
    assert h.shape == (1, 3)
    close(h, [[math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), 0.0]])


LOSS = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 9.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


def test_aggregate_loss_modes_hand_computed():
    close(aggregate_loss(LOSS, MASK, "token_mean"), 10 / 4)
    close(aggregate_loss(LOSS, MASK, "seq_mean_token_mean"), (2 + 4) / 2)
    close(aggregate_loss(LOSS, MASK, "token_sum_norm"), 10 / (2 * 4))  # C defaults to T = 4
    close(aggregate_loss(LOSS, MASK, "token_sum_norm", norm_constant=5), 10 / (2 * 5))
    with pytest.raises(KeyError, match="unknown loss aggregation"):
        aggregate_loss(LOSS, MASK, "mean")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "token_sum_norm"])
def test_micro_batches_with_global_counts_sum_to_full_batch(mode):
    g = torch.Generator().manual_seed(1)
    loss = torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[:, 0] = 1
    full = aggregate_loss(loss, mask, mode)
    counts = dict(num_seqs=6, num_tokens=float(mask.sum()), norm_constant=5)
    parts = sum(aggregate_loss(loss[i : i + 2], mask[i : i + 2], mode, **counts) for i in range(0, 6, 2))
    close(parts, full.item())


def test_micro_batches_with_local_counts_differ_for_token_mean():
    chunks = [aggregate_loss(LOSS[i : i + 1], MASK[i : i + 1], "token_mean") for i in range(2)]
    assert abs(sum(chunks).item() - aggregate_loss(LOSS, MASK, "token_mean").item()) > 1
