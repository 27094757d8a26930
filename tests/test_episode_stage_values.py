"""The episode stages return new values (the update batch they were given is never changed), and the trainer asks
its rollout source for its hooks (``measure_pass_rates``, ``weight_update``) instead of having methods assigned
onto its instance."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from critique_rl.agents import source as source_mod
from critique_rl.agents.source import EpisodeSource, EpisodeTrainer
from critique_rl.train import trainer as trainer_mod
from tests.test_episode_pipeline import config


def _shadowed_methods(tr: object) -> list[str]:
    """Instance attributes that replace a method of the trainer's class."""
    return [k for k, v in vars(tr).items() if callable(v) and callable(getattr(type(tr), k, None))]


@pytest.mark.parametrize("mode", ["sampled_token", "topk_logits"])
def test_episode_distillation_returns_a_new_batch_and_leaves_its_input(tmp_path, monkeypatch, mode):
    calls = []
    real = source_mod.distill_episodes

    def spy(ub, *args, **kw):
        before = (ub.advantages.clone(), ub.tokens.completion_mask.clone(), ub.sampling_logp.clone())
        out, metrics = real(ub, *args, **kw)
        after = (ub.advantages, ub.tokens.completion_mask, ub.sampling_logp)
        calls.append((all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), ub, out, metrics))
        return out, metrics

    monkeypatch.setattr(source_mod, "distill_episodes", spy)
    cfg = config(tmp_path, critique_on="all", distill_weight=0.5, distill_mode=mode, distill_topk=4,
                 pass_rate_filter={"enabled": True, "samples": 2, "max_prompts": 8, "refresh_every": 1,
                                   "too_hard_at_most": None, "too_easy_at_least": None})
    tr = EpisodeTrainer(cfg)
    tr.train()
    assert calls and all(unchanged for unchanged, *_ in calls)  # the given batch is not modified
    distilled = [(ub, out) for _, ub, out, m in calls if m]
    assert distilled
    for ub, out in distilled:
        assert out is not ub and ub.teacher_topk_logp is None and ub.distill_rows is None
        if mode == "sampled_token":
            assert not torch.equal(out.advantages, ub.advantages)  # the log-ratio is in the new batch only
        else:
            assert out.distill_rows.any() and torch.equal(out.advantages, ub.advantages)
    assert _shadowed_methods(tr) == []  # no method assigned onto the trainer (pass-rate filter on included)
    assert tr.selection.pass_rate  # measured through the rollout source, kept by the trainer


def test_weight_changes_run_inside_the_sources_weight_update(tmp_path, monkeypatch):
    depth, entered, updates_inside = [0], [0], []
    real = trainer_mod.policy_update

    @contextmanager
    def guard(self):
        depth[0] += 1
        entered[0] += 1
        yield
        depth[0] -= 1

    def spy(*args, **kw):
        updates_inside.append(depth[0] == 1)
        return real(*args, **kw)

    monkeypatch.setattr(EpisodeSource, "weight_update", guard)
    monkeypatch.setattr(trainer_mod, "policy_update", spy)
    cfg = config(tmp_path, critique_on="none", max_steps=2,
                 phases=[{"kind": "sft", "steps": 5}, {"kind": "rl", "steps": 1}, {"kind": "sft", "steps": 3},
                         {"kind": "rl", "steps": 1}])
    tr = EpisodeTrainer(cfg)
    tr.train()
    assert updates_inside == [True, True]  # every optimizer update inside the hook
    assert entered[0] == 2 + 2 and depth[0] == 0  # + the two SFT phases (warm-up and the later one)
    assert _shadowed_methods(tr) == []
