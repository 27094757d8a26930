"""The difficulty filters, per-phase data and process-count-free sampling on episodes (critique_rl/agents):
dynamic sampling drops groups of equal returns and draws more tasks, the pass-rate filter measures tasks by
episodes, the low-variance filter drops flat groups, a phase may set the env's task_kwargs / env_kwargs, and a run
with all of them resumes to the numbers of a straight run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from critique_rl.agents import episode_filters as filters
from critique_rl.agents.source import EpisodeSource, EpisodeTrainer
from critique_rl.agents.trajectory import Trajectory, Turn
from critique_rl.config import TrainConfig, from_dict
from critique_rl.errors import ConfigError
from critique_rl.train import selection
from critique_rl.train.checkpoint import load_trainer_state
from critique_rl.train.metrics import read_jsonl
from critique_rl.train.rollout_batch import RolloutBatch

TINY = dict(
    tiny_hidden_size=64, tiny_heads=2, tiny_layers=1, tiny_vocab_size=300, sft_steps=40, sft_batch_size=16,
    sft_examples=40, sft_learning_rate=3e-3, sft_refine_fraction=0.3, max_steps=2, num_generations=4,
    generation_batch_size=8, mini_batch_size=8, eval_n=4, eval_batch_size=4, checkpoint_every=100, progress=False,
    log_rollouts=2, device="cpu",
)
AGENT = {"env": "guess_number", "max_turns": 3, "max_turn_tokens": 4, "env_kwargs": {"max_guesses": 3},
         "task_kwargs": {"lo": 1, "hi": 4}}
"""Games from 1 to 4: after 40 SFT steps the tiny policy solves some (pass rates between 0 and 1, groups with
and without spread), so the filters have something to decide."""


def config(tmp_path: Path, name: str = "run", agent: dict | None = None, **kw) -> TrainConfig:
    data = dict(TINY, output_dir=str(tmp_path / name), agent={**AGENT, **(agent or {})})
    if "phases" in kw:  # the run's steps are the rl phases'
        data.pop("max_steps")
    data.update(kw)
    return from_dict(TrainConfig, data)


def _rl(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if "loss/total" in r]


def _spy(monkeypatch, name: str) -> list:
    """Record what ``EpisodeSource.<name>`` is called with and returns: ``[(args, result), ...]``."""
    seen: list = []
    real = getattr(EpisodeSource, name)

    def spy(self, *args, **kw):
        out = real(self, *args, **kw)
        seen.append((args, out))
        return out

    monkeypatch.setattr(EpisodeSource, name, spy)
    return seen


# ---- pure pieces -----------------------------------------------------------------------------------------------

def _episode(task: dict, ret: float) -> Trajectory:
    x = Trajectory(task=task)
    x.turns.append(Turn(observation="o", obs_ids=[5], action_ids=[7, 2], action_logprobs=[-0.5, -0.1],
                        action_text="7", finished=True, reward=ret))
    x.success = ret > 0
    return x


def _batch(returns: list[list[float]], tag: str) -> RolloutBatch:
    trajs = [_episode({"prompt": f"{tag}{g}"}, r) for g, rs in enumerate(returns) for r in rs]
    n = len(returns[0])
    return RolloutBatch(rows=[x.task for x in trajs], prompts=["p"] * len(trajs),
                        completions=[x.to_completion() for x in trajs], group_size=n,
                        rewards=torch.tensor([[x.total_reward] for x in trajs]),
                        passed=torch.ones(len(trajs), dtype=torch.bool), correct=[x.success for x in trajs],
                        action_masks=[x.action_mask() for x in trajs], episodes=trajs)


def test_fill_episodes_keeps_each_rows_episode():
    first = _batch([[1.0, 1.0], [0.0, 1.0]], "a")  # group a0: equal returns, dropped
    draws = [_batch([[0.0, 0.0], [1.0, 0.0]], "b")]  # b0 equal (not needed), b1 has spread
    fill = filters.fill_episodes(first, lambda: draws.pop(0), max_refill_batches=2, enabled=True)
    b = fill.batch
    assert (fill.refills, fill.dropped, fill.padded, fill.samples) == (1, 2, 0, 8)
    assert [r["prompt"] for r in b.rows] == ["a1", "a1", "b1", "b1"]
    assert [x.task["prompt"] for x in b.episodes] == ["a1", "a1", "b1", "b1"]
    for c, x, m in zip(b.completions, b.episodes, b.action_masks, strict=True):
        assert c.token_ids == x.completion_ids() and m == x.action_mask()
    assert not selection.zero_spread_groups(b.rewards, 2).any()
    off = filters.fill_episodes(first, lambda: pytest.fail("no draw when disabled"), 2, enabled=False)
    assert off.batch is first and off.first_zero_spread == 0.5


def test_low_variance_groups_drop_the_flattest():
    returns = torch.tensor([[0.0], [1.0], [1.0], [1.0], [0.0], [0.5]])  # stds 0.5, 0, 0.25
    drop, total = filters.low_variance_groups(returns, 2, min_std=0.0, drop_fraction=0.34, rank=0)
    assert drop.tolist() == [False, True, False] and total == 1
    drop, total = filters.low_variance_groups(returns, 2, min_std=0.3, drop_fraction=0.0, rank=0)
    assert drop.tolist() == [False, True, True] and total == 2


# ---- training on episodes --------------------------------------------------------------------------------------

def test_episode_dynamic_sampling_refills_groups_of_equal_returns(tmp_path, monkeypatch):
    collected = _spy(monkeypatch, "collect")
    cfg = config(tmp_path, critique_on="none", dynamic_sampling={"enabled": True, "max_refill_batches": 2},
                 max_steps=3)
    EpisodeTrainer(cfg).train()
    steps = _rl(tmp_path / "run")
    assert len(steps) == 3
    for (_, (batch, info)), row in zip(collected, steps, strict=True):
        assert batch.num_groups == 2 and len(batch.episodes) == 8
        for c, x in zip(batch.completions, batch.episodes, strict=True):
            assert c.token_ids == x.completion_ids()
        flat = selection.zero_spread_groups(batch.rewards, 4)
        assert int(flat.sum()) == info["selection/zero_spread_padded"]  # only padding is flat
        assert info["selection/samples"] == 8 * (1 + info["selection/refills"])
        assert row["selection/refills"] == info["selection/refills"]
        if info["train/zero_spread_groups"] > 0:
            assert info["selection/refills"] > 0  # a flat first draw draws more tasks
    assert any(i["selection/refills"] for _, (_, i) in collected)  # the seeded run met a flat draw
    total = sum(i["selection/samples"] for _, (_, i) in collected)
    assert steps[-1]["selection/samples_total"] == total


def test_episode_pass_rate_filter_measures_tasks_by_episodes(tmp_path, monkeypatch):
    collected = _spy(monkeypatch, "collect")
    cfg = config(tmp_path, critique_on="none", max_steps=2,
                 pass_rate_filter={"enabled": True, "samples": 2, "max_prompts": 12, "refresh_every": 1})
    tr = EpisodeTrainer(cfg)
    summary = tr.train()
    out = tmp_path / "run"
    first = read_jsonl(out / "metrics.jsonl")[0]
    assert first["step"] == 0 and first["selection/pass_rate_measured"] == 12
    assert first["selection/pass_rate_samples"] == 24
    rates = read_jsonl(out / "selection" / "pass_rates_step000000.jsonl")
    assert len(rates) == 12 and all(r["pass_rate"] in (0.0, 0.5, 1.0) for r in rates)
    for r in rates:  # dropped exactly when the rate is at a threshold (and the filter applied)
        expect = "too_hard" if r["pass_rate"] <= 0.0 else "too_easy" if r["pass_rate"] >= 1.0 else None
        assert r["dropped"] == (expect if first["selection/pass_rate_applied"] else None)
    assert any(r["dropped"] for r in rates) and not all(r["dropped"] for r in rates)  # the seeded run: both kinds
    assert (out / "selection" / "pass_rates_step000001.jsonl").is_file()  # refresh_every: 1
    # the tasks RL drew are in the pool the last measurement left
    last = {r["index"]: r for r in read_jsonl(out / "selection" / "pass_rates_step000001.jsonl")}
    pool = tr.sampler.rows
    dropped = {i for i, r in last.items() if r["dropped"]}
    assert tr.sampler.excluded == dropped
    batch = collected[-1][1][0]
    drawn = {next(i for i, t in enumerate(pool) if t is row) for row in batch.rows}
    assert not drawn & dropped
    assert summary["samples_generated"] == 24 + 24 + 2 * 8 and summary["pass_rate_filter"]["selection/pass_rate_measured"] == 12


def test_episode_low_variance_filter_masks_the_flattest_group(tmp_path, monkeypatch):
    planned = _spy(monkeypatch, "advantages")
    cfg = config(tmp_path, critique_on="none", max_steps=2,
                 low_variance_filter={"enabled": True, "drop_fraction": 0.5})
    EpisodeTrainer(cfg).train()
    steps = _rl(tmp_path / "run")
    assert [r["selection/low_variance_dropped"] for r in steps] == [1, 1]  # floor(0.5 x 2 groups)
    for (batch, _crit), plan in planned:
        std = selection.group_reward_std(batch.rewards, torch.ones(1), 4)
        lowest = min(range(2), key=lambda g: (float(std[g]), g))
        assert not plan.mask[lowest].any() and plan.mask[1 - lowest, :4].all()


def test_episode_phases_set_task_and_env_kwargs(tmp_path, monkeypatch):
    collected = _spy(monkeypatch, "collect")
    phases = [{"kind": "sft", "steps": 6},
              {"kind": "rl", "steps": 1},
              {"kind": "sft", "steps": 2, "task_kwargs": {"lo": 5, "hi": 8}},
              {"kind": "rl", "steps": 2, "task_kwargs": {"lo": 5, "hi": 8}, "env_kwargs": {"max_guesses": 1}}]
    cfg = config(tmp_path, critique_on="wrong", phases=phases, checkpoint_every=2)
    tr = EpisodeTrainer(cfg)
    summary = tr.train()
    batches = [b for _, (b, _) in collected]
    assert len(batches) == 3
    assert all(1 <= r["target"] <= 4 for r in batches[0].rows)  # the run's tasks
    for b in batches[1:]:  # the phase's other tasks, one guess each
        assert all(5 <= r["target"] <= 8 and r["lo"] == 5 for r in b.rows)
        assert all(x.num_turns <= 1 for x in b.episodes)
    assert max(x.num_turns for x in batches[0].episodes) >= 1
    assert all(1 <= t["target"] <= 4 for t in tr.episodes.eval_tasks)  # evaluation keeps the run's games
    assert [p["kind"] for p in summary["phases"]] == ["sft", "sft"]
    steps = _rl(tmp_path / "run")
    assert [r["phase"] for r in steps] == [1, 3, 3]
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))[-1]
    assert "agent:phases[3]" in load_trainer_state(ckpt)["phase_samplers"]


def test_episode_phase_refusals_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"phases\[1\]\.env_kwargs.*does not take"):
        EpisodeTrainer(config(tmp_path, "a", phases=[{"kind": "sft", "steps": 2},
                                                     {"kind": "rl", "steps": 1, "env_kwargs": {"colour": 1}}])).train()
    with pytest.raises(ConfigError, match=r"phases\[1\]\.task_kwargs"):
        EpisodeTrainer(config(tmp_path, "b", phases=[{"kind": "sft", "steps": 2},
                                                     {"kind": "rl", "steps": 1, "task_kwargs": {"size": 3}}])).train()
    with pytest.raises(ConfigError, match=r"phases\[0\]\.task_kwargs.*train_file"):
        config(tmp_path, "c", phases=[{"kind": "rl", "steps": 1, "task_kwargs": {"hi": 9}, "train_file": "x.jsonl"}])


def test_seed_per_task_episodes_do_not_depend_on_the_batch(tmp_path):
    """``agent.seed_per_task``: a task's episodes are the same whether it is sampled with other tasks or alone
    (what makes a 2-process run repeat the 1-process run; tests/test_distributed_episodes.py)."""
    tr = EpisodeTrainer(config(tmp_path, critique_on="none", max_steps=1, agent={"seed_per_task": True}))
    tr.train()
    src = tr.episodes
    a, b = src.train_tasks[0], src.train_tasks[1]
    both = src.run_groups(tr.generator, [a, b], 3, keys=[4, 5], purpose="t", step=tr.step)
    alone = src.run_groups(tr.generator, [b], 3, keys=[5], purpose="t", step=tr.step)
    again = src.run_groups(tr.generator, [b], 3, keys=[5], purpose="t", step=tr.step)
    other = src.run_groups(tr.generator, [b], 3, keys=[6], purpose="t", step=tr.step)
    ids = [[x.completion_ids() for x in eps] for eps in (both[3:], alone, again, other)]
    assert ids[0] == ids[1] == ids[2]
    assert ids[3] != ids[1]  # another key samples others (with 3 episodes of up to 3 turns, a tie is negligible)


def test_episode_resume_with_phases_and_filters_equals_a_straight_run(tmp_path, monkeypatch):
    kw = dict(critique_on="wrong", checkpoint_every=1,
              phases=[{"kind": "sft", "steps": 40}, {"kind": "rl", "steps": 1},
                      {"kind": "rl", "steps": 2, "task_kwargs": {"lo": 2, "hi": 5}}],
              dynamic_sampling={"enabled": True, "max_refill_batches": 1},
              pass_rate_filter={"enabled": True, "samples": 2, "max_prompts": 8, "too_easy_at_least": None},
              low_variance_filter={"enabled": True, "min_std": 0.01},
              memory={"enabled": True, "embeddings": "lexical", "top_k_demos": 1, "token_budget": 40})
    EpisodeTrainer(config(tmp_path, "full", **kw)).train()

    calls = [0]
    real = EpisodeSource.collect

    def crash_on_second(self, timer):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("simulated crash in step 2")
        return real(self, timer)

    monkeypatch.setattr(EpisodeSource, "collect", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        EpisodeTrainer(config(tmp_path, "part", **kw)).train()
    monkeypatch.setattr(EpisodeSource, "collect", real)
    resumed = EpisodeTrainer(config(tmp_path, "part", **kw))
    resumed.train(resume=True)

    keys = ("loss/total", "train/accuracy", "reward/mean", "selection/samples", "selection/samples_total",
            "memory/lessons", "selection/pass_rate_measured", "selection/low_variance_dropped")

    def rows(name):
        return [[r["step"]] + [r.get(k) for k in keys] for r in _rl(tmp_path / name)]

    assert len(rows("full")) == 3 and rows("part") == rows("full")
    assert rows("full")[1][keys.index("selection/pass_rate_measured") + 1] == 8  # the phase's pool was measured
    assert json.loads((tmp_path / "part" / "summary.json").read_text())["samples_generated"] == \
        json.loads((tmp_path / "full" / "summary.json").read_text())["samples_generated"]
    from safetensors.torch import load_file

    fw = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    pw = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    assert fw.keys() == pw.keys() and all(torch.equal(fw[k], pw[k]) for k in fw)
