"""Multi-objective aggregators (critique_rl.algos.aggregators) against hand-computed numbers."""

import math

import pytest
import torch

from critique_rl.algos import AGGREGATORS, aggregate_rewards
from critique_rl.algos.aggregators import dvao, gdpo, weighted_sum

T, F = True, False
NAN = float("nan")


def close(a: torch.Tensor, b) -> None:
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=1e-4, rtol=0)


def stack(*objectives: list[list[float]]) -> torch.Tensor:
    """Objectives given as [G, n] lists -> [G, n, K]."""
    return torch.stack([torch.tensor(o) for o in objectives], dim=-1)


# one group, n=4, K=2: r1 = [1,0,1,0] (pop std 0.5), r2 = [.5,.5,0,1] (pop std sqrt(.125))
R = stack([[1.0, 0.0, 1.0, 0.0]], [[0.5, 0.5, 0.0, 1.0]])
B = torch.tensor([1.0, 2.0])
S2 = math.sqrt(0.125)
EW = [0.5 / (0.5 + 2 * S2), 2 * S2 / (0.5 + 2 * S2)]  # |b_k| sigma_k / sum_j |b_j| sigma_j


def test_registry():
    assert {"weighted_sum", "gdpo", "dvao"} <= set(AGGREGATORS)
    with pytest.raises(KeyError, match="unknown reward aggregator"):
        aggregate_rewards("nope", R)
    with pytest.raises(ValueError, match=r"\[G, n, K\]"):
        aggregate_rewards("dvao", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one entry per objective"):
        aggregate_rewards("dvao", R, torch.ones(3))


def test_weighted_sum_hand_computed():
    adv, diag = weighted_sum(R, B)  # combined [2, 1, 1, 2], dr_grpo: minus the mean 1.5
    close(adv, [[0.5, -0.5, -0.5, 0.5]])
    close(diag["combined_reward"], [[2.0, 1.0, 1.0, 2.0]])
    close(diag["reward_mean"], [0.5, 0.5])
    close(diag["reward_std"], [0.5, S2])
    close(diag["effective_weight"], EW)
    a = math.sqrt(3) / 2
    close(weighted_sum(R, B, estimator="grpo")[0], [[a, -a, -a, a]])
    close(weighted_sum(R, B, estimator="w_reinforce", reward_threshold=1.5)[0], [[0.1, -1, -1, 0.1]])


def test_weighted_sum_nan_contributes_zero_and_mask():
    r = stack([[1.0, 0.0, 1.0, 7.0]], [[NAN, 1.0, 1.0, 7.0]])
    m = torch.tensor([[T, T, T, F]])
    adv, diag = weighted_sum(r, None, m)  # combined [1, 1, 2, masked] -> mean 4/3
    close(adv, [[-1 / 3, -1 / 3, 2 / 3, 0.0]])
    close(diag["reward_mean"], [2 / 3, 1.0])  # NaN and masked entries left out


def test_gdpo_hand_computed_paper_example():
    # group 0: (0,0) vs (1,0); group 1: (0,0) vs (1,1)
    r = stack([[0.0, 1.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 1.0]])
    adv, diag = gdpo(r)
    # z per objective (n=2, unbiased std sqrt(.5)): +-sqrt(.5); sums: g0 +-0.7071, g1 +-1.4142
    # batch whitening: mean 0, unbiased std sqrt((2*.5 + 2*2)/3)
    s = math.sqrt(5 / 3)
    close(adv, [[-math.sqrt(0.5) / s, math.sqrt(0.5) / s], [-math.sqrt(2) / s, math.sqrt(2) / s]])
    close(diag["effective_weight"], [0.75, 0.25])  # g0: only obj 1 has spread; g1: both


def test_gdpo_separates_what_weighted_sum_collapses_across_groups():
    r = stack([[0.0, 1.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 1.0]])
    ws, _ = weighted_sum(r, estimator="grpo")
    torch.testing.assert_close(ws[0], ws[1])  # (0,0)/(1,0) and (0,0)/(1,1) look identical
    g, _ = gdpo(r)
    assert g[1, 1] > g[0, 1] + 0.3  # satisfying both objectives is worth more than one


def test_gdpo_separates_what_weighted_sum_collapses_within_a_group():
    # (1,0) is a rare success on objective 1; (0,1) twice is common on objective 2; combined [1,1,1,0]
    r = stack([[1.0, 0.0, 0.0, 0.0]], [[0.0, 1.0, 1.0, 0.0]])
    for est in ("dr_grpo", "grpo"):
        ws, _ = weighted_sum(r, estimator=est)
        close(ws[0, 0] - ws[0, 1], 0.0)
    g, _ = gdpo(r)
    # per-objective z: [1.5,-.5,-.5,-.5] + [-.866,.866,.866,-.866] = [.634,.366,.366,-1.366]
    s = torch.tensor([1.5 - math.sqrt(3) / 2, -0.5 + math.sqrt(3) / 2, -0.5 + math.sqrt(3) / 2, -0.5 - math.sqrt(3) / 2])
    close(g[0], (s - s.mean()) / s.std())
    assert g[0, 0] > g[0, 1] + 0.1


def test_dvao_hand_computed():
    adv, diag = dvao(R, B)
    # num = (r1 - .5) + 2 (r2 - .5) = [.5, -.5, -.5, .5]; den = .5 + 2 sqrt(.125)
    a = 0.5 / (0.5 + 2 * S2)
    close(adv, [[a, -a, -a, a]])
    close(diag["effective_weight"], EW)


def test_dvao_zero_spread_objective_gets_no_weight():
    r = stack([[1.0, 0.0, 1.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]])
    adv, diag = dvao(r, torch.tensor([1.0, 100.0]))
    close(diag["effective_weight"], [1.0, 0.0])
    close(adv, [[1.0, -1.0, 1.0, -1.0]])  # = z-score of objective 1 alone


def test_dvao_zero_denominator_gives_zero():
    r = stack([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], [[0.3, 0.3, 0.3], [2.0, 2.0, 2.0]])
    adv, diag = dvao(r)
    close(adv, torch.zeros(2, 3))
    close(diag["effective_weight"], [0.0, 0.0])


def test_dvao_mask_and_nan():
    r = stack([[1.0, 0.0, 1.0, 1e6]], [[NAN, 1.0, 0.0, -1e6]])
    m = torch.tensor([[T, T, T, F]])
    adv, _ = dvao(r, None, m)
    # obj1 over [1,0,1]: mu 2/3, sigma sqrt(2)/3; obj2 over [1,0]: mu .5, sigma .5
    den = math.sqrt(2) / 3 + 0.5
    close(adv, [[(1 / 3 + 0.0) / den, (-2 / 3 + 0.5) / den, (1 / 3 - 0.5) / den, 0.0]])


@pytest.mark.parametrize("seed", range(50))
def test_dvao_group_rms_at_most_one(seed):
    g = torch.Generator().manual_seed(seed)
    groups, n, k = 4, int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    r = torch.randn(groups, n, k, generator=g) * torch.rand(k, generator=g) * 10
    if seed % 2:
        r = r.round()  # discrete rewards: ties and zero-spread objectives
    r[torch.rand(groups, n, k, generator=g) < 0.1] = NAN
    w = torch.rand(k, generator=g) * 3
    if seed % 5 == 0:
        w[0] = -w[0]
    mask = torch.rand(groups, n, generator=g) > 0.2
    adv, diag = dvao(r, w, mask)
    m = mask.float()
    rms = ((adv**2 * m).sum(-1) / m.sum(-1).clamp_min(1)).sqrt()
    assert (rms <= 1 + 1e-5).all(), rms
    assert (adv[~mask] == 0).all()
    ew = diag["effective_weight"]
    assert (ew >= 0).all() and (ew.sum() - 1).abs() < 1e-5 or ew.sum() == 0


def test_all_aggregators_zero_where_masked():
    g = torch.Generator().manual_seed(3)
    r = torch.rand(3, 5, 2, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    for name in AGGREGATORS:
        adv, diag = aggregate_rewards(name, r, torch.tensor([1.0, 0.5]), mask)
        assert adv.shape == (3, 5)
        assert (adv[~mask] == 0).all()
        assert diag["effective_weight"].shape == (2,)
