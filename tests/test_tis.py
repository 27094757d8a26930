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
