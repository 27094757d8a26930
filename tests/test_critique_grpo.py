"""Critique-GRPO in the trainer: refinements, mixed groups, shaped loss, distillation, any critic backend."""

import random

import pytest
import torch
from critic_server import CriticServer

from critique_rl.algos import aggregate_rewards
from critique_rl.config import CriticConfig
from critique_rl.critics import OpenAICritic
from critique_rl.tasks import get_task
from critique_rl.train.critique_step import choose_refinements, refinement_demos, select_for_critique
from critique_rl.train.metrics import read_jsonl
from critique_rl.train.trainer import CritiqueGRPOTrainer


def test_select_for_critique_modes():
    correct = [False, False, True, False, False, False]  # two groups of 3
    assert select_for_critique(correct, 3, "all_wrong_groups") == [3, 4, 5]
    assert select_for_critique(correct, 3, "wrong") == [0, 1, 3, 4, 5]
    assert select_for_critique(correct, 3, "all") == list(range(6))


def test_choose_refinements_prefers_correct():
    group_of = [0, 0, 0, 1, 1]
    correct = [False, True, False, False, False]
    chosen = choose_refinements(group_of, correct, k=1, num_groups=3, rng=random.Random(0))
    assert chosen[0] == [1] and len(chosen[1]) == 1 and chosen[1][0] in (3, 4) and chosen[2] == []


def test_mixed_group_gives_the_rescuing_refinement_the_advantage():
    """An all-wrong group of 3 plus one correct refinement: Dr.GRPO advantages are -1/4 for the initial
    samples and +3/4 for the refinement; without it, the group has no signal at all."""
    R = torch.tensor([[[0.0], [0.0], [0.0], [1.0]]])
    adv, _ = aggregate_rewards("weighted_sum", R, torch.ones(1), torch.ones(1, 4, dtype=torch.bool),
                               estimator="dr_grpo")
    assert torch.allclose(adv, torch.tensor([[-0.25, -0.25, -0.25, 0.75]]))
    adv0, _ = aggregate_rewards("weighted_sum", R[:, :3], torch.ones(1), torch.ones(1, 3, dtype=torch.bool),
                                estimator="dr_grpo")
    assert adv0.abs().sum() == 0


def test_refinement_demos_teach_the_format():
    t = get_task("addition")
    rows = t.make_examples("train", 50, 0)
    demos = refinement_demos(t, rows, 1.0, 0, t.sft_completion)
    assert len(demos) >= 40
    prompt, target = demos[0]
    assert "Feedback:" in prompt and rows[0]["answer"] in prompt and target == rows[0]["answer"]


@pytest.mark.parametrize("mode,divergence", [("sampled_token", "reverse_kl"), ("topk_logits", "reverse_kl"),
                                             ("topk_logits", "forward_kl"), ("topk_logits", "jsd")])
def test_trainer_critique_path_logs_everything(fast_config, mode, divergence):
    cfg = fast_config(max_steps=2, critique_on="all", distill_weight=0.5, distill_mode=mode, distill_topk=5,
                      distill_divergence=divergence, sft_refine_fraction=0.3,
                      critic=CriticConfig(backend="rule", kind="ground_truth"))
    CritiqueGRPOTrainer(args=cfg).train()
    rows = [r for r in read_jsonl(f"{cfg.output_dir}/metrics.jsonl") if "loss/total" in r]
    for key in ("critique/refinements", "critique/refine_success_rate", "critique/groups_rescued", "distill/kl",
                "loss/offpolicy", "loss/policy", "critic/requests"):
        assert key in rows[0], key
    assert rows[0]["critique/refinements"] == 16  # critique_on=all: every response is refined
    if mode == "topk_logits":  # every divergence is >= 0, and > 0 while teacher and student differ
        assert all(r["loss/distill"] > 0.0 for r in rows)
    roll = read_jsonl(f"{cfg.output_dir}/rollouts.jsonl")
    with_ref = [r for r in roll if "refinement" in r]
    assert with_ref and "critique" in with_ref[0] and "refinement_rewards" in with_ref[0]
    assert "The correct answer is" in with_ref[0]["critique"] or "is correct" in with_ref[0]["critique"]


def test_trainer_with_api_critic_and_self_critique(fast_config):
    """Any critic backend plugs in: a real OpenAI-compatible server, and the policy critiquing itself."""
    with CriticServer([{"content": "Check the carry.\nVerdict: incorrect"}]) as srv:
        critic = OpenAICritic(model="critic-test", kind="cot", base_url=srv.base_url, timeout_s=5,
                              max_regenerations=0)
        cfg = fast_config(max_steps=1, critique_on="all")
        CritiqueGRPOTrainer(args=cfg, critic=critic).train()
        assert srv.requests >= 16
    cfg = fast_config(max_steps=1, critique_on="all", output_dir=cfg.output_dir + "_self",
                      critic=CriticConfig(backend="hf", kind="cot", model="policy", max_tokens=8,
                                          max_regenerations=0))
    CritiqueGRPOTrainer(args=cfg).train()
    row = [r for r in read_jsonl(f"{cfg.output_dir}/metrics.jsonl") if "loss/total" in r][0]
    assert row["critic/requests"] >= 16 and row["critique/refinements"] == 16


def test_python_api_as_in_readme(fast_config, tmp_path):
    """Objects in, the way the README shows: a row list, a callable reward, a critic and a memory bank."""
    from critique_rl import CritiqueGRPOTrainer
    from critique_rl.critics import RuleCritic
    from critique_rl.memory import MemoryBank

    rows = get_task("addition").make_examples("train", 300, 1)

    def short(prompts, completions, **_):
        return [1.0 if len(c) <= 3 else 0.0 for c in completions]

    bank = MemoryBank(tmp_path / "bank.sqlite")
    summary = CritiqueGRPOTrainer(
        model="tiny", train_dataset=rows, reward_funcs=["correctness", short], critic=RuleCritic(),
        memory=bank, args=fast_config(max_steps=2, reward_aggregator="dvao", critique_on="wrong"),
    ).train()
    assert summary["steps"] == 2 and summary["memory_demonstrations"] + summary["memory_lessons"] > 0
    row = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss/total" in r][0]
    assert "reward/short/mean" in row and "reward/short/weight" in row and "memory/size" in row
