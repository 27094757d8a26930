import math

import torch

from critique_rl.algos import sampled_token_advantage, shaped_offpolicy_loss, topk_reverse_kl


def test_shaped_loss_values_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.1]]))
    adv = torch.tensor([2.0])
    loss = shaped_offpolicy_loss(logp, adv, gamma=0.1)
    assert torch.allclose(loss, torch.tensor([[-2 * 0.5 / 0.6, -2 * 0.1 / 0.2]]))
    plain = shaped_offpolicy_loss(logp, adv, gamma=None)
    assert torch.allclose(plain, -2 * logp)


def test_shaped_gradient_is_gamma_p_over_p_plus_gamma_squared_times_grad_logp():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, requires_grad=True)
    tok = torch.tensor([1, 3, 0])
    gamma = 0.1
    logp = torch.log_softmax(logits, -1)[torch.arange(3), tok]
    adv = torch.tensor([1.0, -0.5, 2.0])
    loss = shaped_offpolicy_loss(logp.unsqueeze(-1), adv, gamma).sum()
    (g_shaped,) = torch.autograd.grad(loss, logits)
    p = logp.exp().detach()
    coef = gamma * p / (p + gamma) ** 2
    logp2 = torch.log_softmax(logits, -1)[torch.arange(3), tok]
    (g_ref,) = torch.autograd.grad((-adv * coef * logp2).sum(), logits)
    assert torch.allclose(g_shaped, g_ref, atol=1e-6)


def test_no_ratio_to_old_policy():
    """The shaped term depends on the current probability only (no pi_old anywhere)."""
    logp = torch.log(torch.tensor([[0.3]]))
    assert abs(shaped_offpolicy_loss(logp, torch.tensor([1.0])).item() + 0.3 / 0.4) < 1e-6


def test_sampled_token_advantage_by_hand():
    t = torch.log(torch.tensor([[0.8, 0.5]]))
    s = torch.log(torch.tensor([[0.2, 0.5]]))
    a = sampled_token_advantage(t, s)
    assert torch.allclose(a, torch.tensor([[math.log(4.0), 0.0]]))
    assert not a.requires_grad


def test_topk_reverse_kl_by_hand_and_zero_when_equal():
    # vocabulary of 3; teacher top-1 = token 0 with p=0.5, tail 0.5; student p(token0)=0.25, tail 0.75
    student_logits = torch.log(torch.tensor([[[0.25, 0.375, 0.375]]])).requires_grad_(True)
    t_idx = torch.tensor([[[0]]])
    t_logp = torch.log(torch.tensor([[[0.5]]]))
    kl = topk_reverse_kl(student_logits, t_logp, t_idx)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert abs(kl.item() - expected) < 1e-6
    kl.sum().backward()
    assert student_logits.grad.abs().sum() > 0
    same = topk_reverse_kl(torch.log(torch.tensor([[[0.5, 0.25, 0.25]]])), t_logp, t_idx)
    assert abs(same.item()) < 1e-7


def test_topk_reverse_kl_descends_towards_teacher():
    torch.manual_seed(1)
    student = torch.randn(1, 2, 6, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(1, 2, 6), -1)
    t_logp, t_idx = teacher.topk(3, dim=-1)
    opt = torch.optim.SGD([student], lr=0.5)
    first = None
    for _ in range(50):
        kl = topk_reverse_kl(student, t_logp, t_idx).sum()
        first = first if first is not None else kl.item()
        opt.zero_grad()
        kl.backward()
        opt.step()
    assert kl.item() < 0.1 * first
