"""onpolicy_baseline: hand-computed mixed groups (Dr.GRPO advantages, one refinement per group)."""

import pytest
import torch

from critique_rl.algos.advantages import dr_grpo_advantages
from critique_rl.algos.offpolicy_baseline import onpolicy_baseline


def test_all_wrong_group_wrong_samples_get_zero_and_the_refinement_one() -> None:
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])  # 3 on-policy wrong, 1 right refinement
    mixed = dr_grpo_advantages(rewards)  # mean 0.25: [-.25, -.25, -.25, .75]
    assert torch.allclose(mixed, torch.tensor([[-0.25, -0.25, -0.25, 0.75]]))
    assert torch.allclose(onpolicy_baseline(mixed, 3), torch.tensor([[0.0, 0.0, 0.0, 1.0]]))


def test_mixed_group_equals_reward_minus_onpolicy_mean() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0, 0.0]])
    got = onpolicy_baseline(dr_grpo_advantages(rewards), 4)
    # on-policy means 0.25 and 0.75: R - 0.25 and R - 0.75
    want = torch.tensor([[0.75, -0.25, -0.25, -0.25, 0.75], [-0.75, 0.25, 0.25, 0.25, -0.75]])
    assert torch.allclose(got, want)


def test_masked_samples_stay_zero_and_leave_the_mean() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    mask = torch.tensor([[True, True, False, True]])
    got = onpolicy_baseline(dr_grpo_advantages(rewards, mask), 3, mask)
    assert torch.allclose(got, torch.tensor([[0.5, -0.5, 0.0, 0.5]]))  # on-policy mean over samples 0,1: 0.5


def test_group_without_onpolicy_samples_unchanged_and_bad_width_raises() -> None:
    adv = torch.tensor([[0.0, 0.0, 0.3]])
    mask = torch.tensor([[False, False, True]])
    assert torch.allclose(onpolicy_baseline(adv, 2, mask), adv)
    with pytest.raises(ValueError, match="n_onpolicy"):
        onpolicy_baseline(adv, 4)
