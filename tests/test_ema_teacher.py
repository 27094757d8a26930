"""distill_teacher: ema — the stabilised critique-conditioned teacher (SDPO arXiv:2601.20802)."""

from __future__ import annotations

import pytest
import torch

from critique_rl.config import CriticConfig
from critique_rl.errors import ConfigError
from critique_rl.train.ema import EmaTeacher
from critique_rl.train.metrics import read_jsonl
from critique_rl.train.trainer import CritiqueGRPOTrainer


def test_ema_update_by_hand():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = EmaTeacher(model, decay=0.9)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
    ema.update(model)  # 0.9 * [1, 2] + 0.1 * [3, -2] = [1.2, 1.6]
    torch.testing.assert_close(ema.model.weight, torch.tensor([[1.2, 1.6]]))
    ema.update(model)  # 0.9 * [1.2, 1.6] + 0.1 * [3, -2] = [1.38, 1.24]
    torch.testing.assert_close(ema.model.weight, torch.tensor([[1.38, 1.24]]))
    assert not ema.model.weight.requires_grad and model.weight.requires_grad
    with pytest.raises(ValueError, match="decay"):
        EmaTeacher(model, decay=1.0)


def test_ema_decay_is_validated(fast_config):
    with pytest.raises(ConfigError, match="distill_teacher_ema"):
        fast_config(distill_teacher_ema=1.5)


def _ema_cfg(fast_config, out, max_steps):
    return fast_config(max_steps=max_steps, checkpoint_every=2, output_dir=str(out), critique_on="all", sft_steps=5, eval_n=8,
                       distill_weight=0.5, distill_mode="topk_logits", distill_topk=5, distill_teacher="ema",
                       distill_teacher_ema=0.5, critic=CriticConfig(backend="rule", kind="ground_truth"))


def test_ema_teacher_trains_lags_the_policy_and_resumes_exactly(fast_config, tmp_path):
    straight = CritiqueGRPOTrainer(args=_ema_cfg(fast_config, tmp_path / "a", 4))
    straight.train()
    teacher, policy = straight._ema_teacher.model.state_dict(), straight._policy().state_dict()
    moved = [k for k in teacher if not torch.equal(teacher[k], policy[k])]
    assert moved  # the teacher lags the policy
    rows_a = [r for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "loss/total" in r]
    assert all(r["loss/distill"] != 0.0 for r in rows_a)

    CritiqueGRPOTrainer(args=_ema_cfg(fast_config, tmp_path / "b", 2)).train()
    resumed = CritiqueGRPOTrainer(args=_ema_cfg(fast_config, tmp_path / "b", 4))
    resumed.train(resume=True)
    rows_b = [r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "loss/total" in r]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b, strict=True):  # the teacher came back from the checkpoint
        assert ra["loss/distill"] == pytest.approx(rb["loss/distill"], abs=1e-5)
        assert ra["loss/total"] == pytest.approx(rb["loss/total"], abs=1e-5)
    for k, v in resumed._ema_teacher.model.state_dict().items():
        torch.testing.assert_close(v, teacher[k], atol=1e-5, rtol=0)
