import math

import pytest
import torch

from critique_rl.algos import (
    sampled_token_advantage,
    shaped_offpolicy_loss,
    topk_divergence,
    topk_reverse_kl,
)


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


def _student_and_teacher():
    """V = 3, K = 1: teacher top token 0 with p 0.9 (bins 0.9 / tail 0.1); student probs 0.5 / 0.3 / 0.2
    (bins 0.5 / tail 0.5)."""
    student = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]])) + 1.7  # logits: any shift gives the same softmax
    return student, torch.log(torch.tensor([[[0.9]]])), torch.tensor([[[0]]])


@pytest.mark.parametrize("kind,expected", [
    ("reverse_kl", 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)),  # 0.510826
    ("forward_kl", 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)),  # 0.368064
    # m = 0.5 t + 0.5 s = (0.7, 0.3)
    ("jsd", 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3))
     + 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3))),  # 0.101749
])
def test_topk_divergences_by_hand(kind, expected):
    student, t_logp, t_idx = _student_and_teacher()
    got = topk_divergence(student, t_logp, t_idx, kind).item()
    assert got == pytest.approx(expected, abs=1e-6)
    assert topk_divergence(torch.log(torch.tensor([[[0.9, 0.05, 0.05]]])), t_logp, t_idx, kind).item() == pytest.approx(0, abs=1e-6)


def test_topk_reverse_kl_is_the_reverse_kind():
    torch.manual_seed(1)
    student = torch.randn(2, 3, 11)
    t = torch.log_softmax(torch.randn(2, 3, 11), -1).topk(4, -1)
    assert torch.equal(topk_reverse_kl(student, t.values, t.indices),
                       topk_divergence(student, t.values, t.indices, "reverse_kl"))


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_topk_divergence_equals_full_formula_when_k_covers_the_vocabulary(kind):
    """With K = V the tail bin is empty, so the binned divergence is the full one (float64 reference)."""
    torch.manual_seed(2)
    student = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(2, 3, 7, dtype=torch.float64), -1)
    t = teacher.topk(7, -1)
    got = topk_divergence(student, t.values, t.indices, kind)
    s = torch.log_softmax(student, -1)
    if kind == "forward_kl":
        ref = (teacher.exp() * (teacher - s)).sum(-1)
    else:
        m = torch.log(0.5 * teacher.exp() + 0.5 * s.exp())
        ref = 0.5 * (teacher.exp() * (teacher - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)


def test_forward_kl_pulls_a_confidently_wrong_student_reverse_kl_barely_does():
    """The plateau: the student puts ~all its mass on token 1, the teacher 0.99 on token 0. The gradient on the
    student's logit of token 0 is s_0 - t_0 ~ -0.99 for forward KL but s_0 (log s_0 - log t_0 - KL) ~ 0 for
    reverse KL (scaled by s_0 ~ 5e-5)."""
    t_logp, t_idx = torch.log(torch.tensor([[[0.99]]])), torch.tensor([[[0]]])
    grads = {}
    for kind in ("forward_kl", "reverse_kl"):
        z = torch.tensor([[[0.0, 10.0, 0.0]]], requires_grad=True)  # s_0 = e^0 / (2 + e^10) ~ 4.5e-5
        topk_divergence(z, t_logp, t_idx, kind).sum().backward()
        grads[kind] = z.grad[0, 0, 0].item()
    s0 = 1 / (2 + math.exp(10))
    assert grads["forward_kl"] == pytest.approx(s0 - 0.99, abs=1e-4)
    assert abs(grads["reverse_kl"]) < 2e-3 and abs(grads["forward_kl"]) > 400 * abs(grads["reverse_kl"])


def test_topk_divergence_rejects_unknown_kind_and_beta():
    student, t_logp, t_idx = _student_and_teacher()
    with pytest.raises(ValueError, match="kind"):
        topk_divergence(student, t_logp, t_idx, "kl")
    with pytest.raises(ValueError, match="beta"):
        topk_divergence(student, t_logp, t_idx, "jsd", beta=1.0)
