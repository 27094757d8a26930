"""Hand-computed checks of the advantage estimators in critique_rl.algos.advantages."""

import math

import pytest
import torch

from critique_rl.algos.advantages import ADVANTAGE_ESTIMATORS, compute_advantages

T, F = True, False


def close(a: torch.Tensor, b: list) -> None:
    torch.testing.assert_close(a, torch.tensor(b, dtype=a.dtype), atol=1e-5, rtol=0)


def test_registry_names():
    assert {"dr_grpo", "grpo", "w_reinforce", "psr", "nsr"} <= set(ADVANTAGE_ESTIMATORS)
    with pytest.raises(KeyError, match="unknown advantage estimator"):
        compute_advantages("nope", torch.zeros(1, 2))


def test_dr_grpo_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 1.0, 0.0]])
    close(compute_advantages("dr_grpo", r), [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.5, -0.5]])


def test_dr_grpo_mask_excludes_sample_from_baseline():
    r = torch.tensor([[1.0, 0.0, 0.0, 99.0]])
    m = torch.tensor([[T, T, T, F]])
    close(compute_advantages("dr_grpo", r, m), [[2 / 3, -1 / 3, -1 / 3, 0.0]])


def test_grpo_hand_computed_unbiased_std():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = math.sqrt(3) / 2  # 0.5 / sqrt(1/3)
    close(compute_advantages("grpo", r), [[a, -a, -a, a], [0.0, 0.0, 0.0, 0.0]])


def test_grpo_with_mask():
    # valid [1, 0, 0]: mean 1/3, unbiased var ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3
    r = torch.tensor([[1.0, 0.0, 0.0, 5.0]])
    m = torch.tensor([[T, T, T, F]])
    s = math.sqrt(1 / 3)
    close(compute_advantages("grpo", r, m), [[(2 / 3) / s, -(1 / 3) / s, -(1 / 3) / s, 0.0]])


def test_w_reinforce_default_lambda_and_threshold():
    r = torch.tensor([[1.0, 0.0, 0.7, 0.3]])
    close(compute_advantages("w_reinforce", r), [[0.1, -1.0, 0.1, -1.0]])


def test_w_reinforce_kwargs_mask_and_nan():
    r = torch.tensor([[1.0, 0.0, 0.2, float("nan")]])
    m = torch.tensor([[T, F, T, T]])
    out = compute_advantages("w_reinforce", r, m, w_lambda=0.5, reward_threshold=0.1)
    close(out, [[0.5, 0.0, 0.5, 0.0]])


def test_psr_and_nsr():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.5]])  # 0.5 is not > 0.5: wrong
    close(compute_advantages("psr", r), [[1.0, 0.0, 1.0, 0.0]])
    close(compute_advantages("nsr", r), [[0.0, -1.0, 0.0, -1.0]])
    m = torch.tensor([[T, F, F, T]])
    close(compute_advantages("psr", r, m), [[1.0, 0.0, 0.0, 0.0]])
    close(compute_advantages("nsr", r, m), [[0.0, 0.0, 0.0, -1.0]])


def test_w_reinforce_is_lambda_psr_plus_nsr():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (5, 6), generator=g).float()
    combo = 0.1 * compute_advantages("psr", r) + compute_advantages("nsr", r)
    torch.testing.assert_close(compute_advantages("w_reinforce", r), combo)


def test_estimators_ignore_each_others_kwargs():
    r = torch.tensor([[1.0, 0.0]])
    for name in ("dr_grpo", "grpo", "w_reinforce", "psr", "nsr"):
        out = compute_advantages(name, r, None, w_lambda=0.3, reward_threshold=0.5, eps=1e-6)
        assert out.shape == (1, 2)


def test_config_accepts_new_estimators():
    from critique_rl.config import TrainConfig

    for name in ("w_reinforce", "psr", "nsr"):
        assert TrainConfig(advantage_estimator=name).advantage_estimator == name
