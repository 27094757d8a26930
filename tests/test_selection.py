"""Data selection: DAPO dynamic sampling, the pass-rate filter, DRO's low-variance filter (pure functions with
hand-computed cases, then the trainer hooks on the tiny model)."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch

from critique_rl.config import TrainConfig, from_dict
from critique_rl.errors import ConfigError
from critique_rl.rollout import Completion
from critique_rl.train import selection
from critique_rl.train.metrics import read_jsonl
from critique_rl.train.rollout_batch import RolloutBatch
from critique_rl.train.sampler import PromptSampler
from critique_rl.train.trainer import CritiqueGRPOTrainer

NAN = math.nan


# ---- pure functions ------------------------------------------------------------------------------------------

def test_zero_spread_groups_by_hand():
    # n = 2, three groups, one objective: {1, 1} zero spread, {0, 1} spread, {0, 0} zero spread
    R = torch.tensor([[1.0], [1.0], [0.0], [1.0], [0.0], [0.0]])
    assert selection.zero_spread_groups(R, 2).tolist() == [True, False, True]
    # two objectives: equal correctness but different brier -> spread; NaN (not applicable) is ignored
    R2 = torch.tensor([[1.0, 0.5], [1.0, 0.7], [0.0, NAN], [0.0, 0.2], [NAN, NAN], [NAN, NAN]])
    assert selection.zero_spread_groups(R2, 2).tolist() == [False, True, True]


def test_group_reward_std_and_low_variance_drop_by_hand():
    R = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, NAN]])
    w = torch.tensor([1.0, 0.5])
    # scalar rewards: g0 {1, 0} std 0.5; g1 {1.5, 1.5} std 0; g2 {0.5, 1.0} std 0.25
    std = selection.group_reward_std(R, w, 2)
    assert std.tolist() == pytest.approx([0.5, 0.0, 0.25])
    assert selection.low_variance_drop(std, 0.3, 0.0).tolist() == [False, True, True]
    assert selection.low_variance_drop(std, 0.0, 0.0).tolist() == [False, False, False]
    # drop_fraction 0.5 of 3 groups = floor(1.5) = 1 group: the lowest std (g1)
    assert selection.low_variance_drop(std, 0.0, 0.5).tolist() == [False, True, False]
    # ties: the earlier group goes first
    assert selection.low_variance_drop(torch.tensor([0.2, 0.1, 0.1, 0.3]), 0.0, 0.25).tolist() == [
        False, True, False, False]


def test_pass_rate_exclusions_by_hand():
    rates = {0: 0.0, 1: 0.125, 2: 0.5, 3: 1.0, 4: 0.875}
    assert selection.pass_rate_exclusions(rates, 0.0, 1.0) == ({0}, {3})
    assert selection.pass_rate_exclusions(rates, 0.125, 0.875) == ({0, 1}, {3, 4})
    assert selection.pass_rate_exclusions(rates, None, 1.0) == (set(), {3})
    assert selection.pass_rate_exclusions(rates, 0.0, None) == ({0}, set())
    assert selection.measured_indices(10, None, 0) == list(range(10))
    sub = selection.measured_indices(10, 4, 0)
    assert len(sub) == 4 and sub == selection.measured_indices(10, 4, 0) and set(sub) <= set(range(10))


def _batch(group_values: list[list[float]], tag: str = "") -> RolloutBatch:
    """A batch with one objective, groups given by their rewards; row prompts name (tag, group)."""
    n = len(group_values[0])
    rows, comps, rewards = [], [], []
    for g, vals in enumerate(group_values):
        for j, v in enumerate(vals):
            rows.append({"prompt": f"{tag}{g}", "answer": "0"})
            comps.append(Completion(text=f"{tag}{g}.{j}", token_ids=[1], logprobs=[], finished=True))
            rewards.append([v])
    N = len(rows)
    return RolloutBatch(rows=rows, prompts=[r["prompt"] for r in rows], completions=comps, group_size=n,
                        rewards=torch.tensor(rewards), passed=torch.ones(N, dtype=torch.bool),
                        correct=[r[0] > 0.5 for r in rewards])


def _groups(batch: RolloutBatch) -> list[str]:
    return [batch.rows[i]["prompt"] for i in range(0, len(batch.rows), batch.group_size)]


def test_dynamic_fill_refills_and_keeps_order():
    first = _batch([[1, 0], [1, 1], [0, 0], [0, 1]], "a")
    second = _batch([[0, 0], [1, 0], [0, 1], [1, 1]], "b")
    draws = iter([second])
    out = selection.dynamic_fill(first, lambda: next(draws), max_refill_batches=3)
    assert _groups(out.batch) == ["a0", "a3", "b1", "b2"]
    assert out.first_zero_spread == 0.5 and out.refills == 1 and out.padded == 0
    assert out.dropped == 4 and out.samples == 16  # a1, a2, b0, b3 dropped; 2 batches x 8 samples
    assert not selection.zero_spread_groups(out.batch.rewards, 2).any()
    assert [c.text for c in out.batch.completions] == ["a0.0", "a0.1", "a3.0", "a3.1", "b1.0", "b1.1", "b2.0", "b2.1"]


def test_dynamic_fill_limit_pads_and_disabled_is_identity():
    first = _batch([[1, 0], [1, 1], [0, 0], [0, 1]], "a")
    zero = _batch([[0, 0], [1, 1], [0, 0], [1, 1]], "b")
    out = selection.dynamic_fill(first, lambda: zero, max_refill_batches=1)
    # refill found nothing: padded with the earliest dropped groups, in draw order
    assert _groups(out.batch) == ["a0", "a1", "a2", "a3"] and out.refills == 1 and out.padded == 2
    assert out.dropped == 4 and out.samples == 16
    out = selection.dynamic_fill(first, lambda: pytest.fail("no draw when disabled"), 3, enabled=False)
    assert out.batch is first and out.first_zero_spread == 0.5 and out.refills == 0 and out.samples == 8
    spread = _batch([[1, 0], [0, 1]])
    assert selection.dynamic_fill(spread, lambda: pytest.fail("no draw needed"), 3).batch is spread


def test_dynamic_fill_ranks_refill_in_lockstep():
    """Two ranks (threads with a summing all-reduce): only rank 1 is short, yet both draw the same number of
    refill batches (the shared sampler stays in step) and the counters agree."""
    barrier = threading.Barrier(2)
    slots: list[list[float] | None] = [None, None]
    lock = threading.Lock()

    def reducer(rank: int):
        def all_reduce_sum(values):
            with lock:
                slots[rank] = list(values)
            barrier.wait()
            total = [a + b for a, b in zip(slots[0], slots[1], strict=True)]
            barrier.wait()
            return total
        return all_reduce_sum

    firsts = [_batch([[1, 0], [0, 1]], "r0"), _batch([[1, 1], [0, 0]], "r1")]
    refills = [[_batch([[0, 0], [1, 1]], "x0"), _batch([[1, 0], [0, 1]], "y0")],
               [_batch([[0, 0], [1, 0]], "x1"), _batch([[0, 1], [1, 1]], "y1")]]
    results: list[selection.FillResult | None] = [None, None]

    def run(rank: int) -> None:
        draws = iter(refills[rank])
        results[rank] = selection.dynamic_fill(firsts[rank], lambda: next(draws), 5, reducer(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    r0, r1 = results
    assert r0.refills == r1.refills == 2  # rank 1 needed two refills; rank 0 drew along
    assert _groups(r0.batch) == ["r00", "r01"] and _groups(r1.batch) == ["x11", "y10"]
    for key in ("first_zero_spread", "dropped", "padded", "samples"):
        assert getattr(r0, key) == getattr(r1, key), key
    assert r0.first_zero_spread == 0.5 and r0.samples == 24


def test_sampler_exclusion_is_checkpointed():
    rows = [{"prompt": str(i), "answer": str(i)} for i in range(10)]
    s = PromptSampler(rows, seed=3)
    s.exclude({1, 2, 3})
    drawn = [r["prompt"] for r in s.next_batch(25)]
    assert not {"1", "2", "3"} & set(drawn) and len(drawn) == 25
    state = s.state_dict()
    t = PromptSampler(rows, seed=3)
    t.load_state_dict(state)
    assert [r["prompt"] for r in t.next_batch(9)] == [r["prompt"] for r in s.next_batch(9)]
    with pytest.raises(ValueError):
        s.exclude(set(range(10)))
    plain = PromptSampler(rows, seed=3)
    assert "excluded" not in plain.state_dict()  # the old checkpoint format when nothing is excluded


@pytest.mark.parametrize("data, field", [
    ({"dynamic_sampling": {"max_refill_batches": -1}}, "dynamic_sampling.max_refill_batches"),
    ({"dynamic_sampling": {"enable": True}}, "dynamic_sampling.enable"),
    ({"pass_rate_filter": {"samples": 0}}, "pass_rate_filter.samples"),
    ({"pass_rate_filter": {"too_hard_at_most": 1.5}}, "pass_rate_filter.too_hard_at_most"),
    ({"pass_rate_filter": {"too_hard_at_most": 0.5, "too_easy_at_least": 0.5}}, "pass_rate_filter.too_hard_at_most"),
    ({"low_variance_filter": {"drop_fraction": 1.0}}, "low_variance_filter.drop_fraction"),
    ({"low_variance_filter": {"min_std": -0.1}}, "low_variance_filter.min_std"),
])
def test_bad_selection_config_names_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, data)
    assert field in str(err.value) and "\n" not in str(err.value)


# ---- the trainer hooks ---------------------------------------------------------------------------------------

def _rl_rows(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if "loss/total" in r]


def _step_batches(out: Path, n: int) -> dict[int, list[dict]]:
    """The first ``generation_batch_size`` logged rollouts of each step (the whole training batch)."""
    by_step: dict[int, list[dict]] = {}
    for r in read_jsonl(out / "rollouts.jsonl"):
        by_step.setdefault(r["step"], []).append(r)
    return {s: rows[:n] for s, rows in by_step.items()}


def _zero_spread(rows: list[dict], n: int) -> list[bool]:
    return [len({json.dumps(r["rewards"]) for r in rows[g : g + n]}) == 1 for g in range(0, len(rows), n)]


def test_zero_spread_logged_without_filters_and_dynamic_sampling_refills(fast_config, tmp_path):
    plain = fast_config(max_steps=2, output_dir=str(tmp_path / "plain"), critique_on="none")
    CritiqueGRPOTrainer(args=plain).train()
    rows = _rl_rows(tmp_path / "plain")
    batches = _step_batches(tmp_path / "plain", 16)
    for r in rows:  # logged with every filter off, and it is the share in the logged batch
        flags = _zero_spread(batches[r["step"]], 4)
        assert r["train/zero_spread_groups"] == pytest.approx(sum(flags) / len(flags))
        assert r["selection/samples"] == 16 and "selection/refills" not in r

    dyn = fast_config(max_steps=8, output_dir=str(tmp_path / "dyn"), critique_on="none", sample_budget=64,
                      dynamic_sampling={"enabled": True, "max_refill_batches": 2})
    summary = CritiqueGRPOTrainer(args=dyn).train()
    rows = _rl_rows(tmp_path / "dyn")
    batches = _step_batches(tmp_path / "dyn", 16)
    total = 0
    for r in rows:
        assert r["selection/samples"] == 16 * (1 + r["selection/refills"])
        total += r["selection/samples"]
        assert r["selection/samples_total"] == total
        # the trained batch holds zero-spread groups only as padding
        assert sum(_zero_spread(batches[r["step"]], 4)) == r["selection/zero_spread_padded"]
    assert any(r["selection/refills"] > 0 for r in rows)  # the warmed-up tiny model solves some groups fully
    assert summary["samples_generated"] == total
    # sample_budget: no step starts once 64 completions were sampled
    assert total >= 64 and (len(rows) == 1 or rows[-2]["selection/samples_total"] < 64)
    assert len(rows) < 8 and summary["stopped_at_sample_budget"] == total


def test_low_variance_filter_drops_lowest_std_groups(fast_config):
    cfg = fast_config(max_steps=2, critique_on="none", low_variance_filter={"enabled": True, "drop_fraction": 0.5})
    CritiqueGRPOTrainer(args=cfg).train()
    out = Path(cfg.output_dir)
    batches = _step_batches(out, 16)
    for r in _rl_rows(out):
        assert r["selection/low_variance_dropped"] >= 2  # floor(0.5 * 4 groups), plus any below min_std
        rows = batches[r["step"]]
        zeroed = [all(x["advantage"] == 0 for x in rows[g : g + 4]) for g in range(0, 16, 4)]
        assert sum(zeroed) >= 2


def test_pass_rate_filter_drops_impossible_prompts(fast_config):
    # 20 prompts whose answer needs 8 digits: with max_new_tokens 4 the policy can never write it
    good = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 40) for b in (11, 12)]
    impossible = [{"prompt": f"{a}+{a}=", "answer": "99999999"} for a in range(50, 70)]
    cfg = fast_config(max_steps=2, critique_on="none", max_new_tokens=4, sft_steps=150,
                      pass_rate_filter={"enabled": True, "samples": 4, "too_easy_at_least": None})
    trainer = CritiqueGRPOTrainer(args=cfg, train_dataset=good + impossible, eval_dataset=good[:20])
    summary = trainer.train()
    out = Path(cfg.output_dir)
    row0 = next(r for r in read_jsonl(out / "metrics.jsonl") if r["step"] == 0)
    assert row0["selection/pass_rate_measured"] == 80 and row0["selection/pass_rate_applied"] == 1
    assert row0["selection/pass_rate_too_hard"] >= 20 and row0["selection/pass_rate_too_easy"] == 0
    assert set(range(60, 80)) <= trainer.sampler.excluded
    drawn = {r["prompt"] for r in read_jsonl(out / "rollouts.jsonl")}
    assert not drawn & {r["prompt"] for r in impossible}
    assert summary["pass_rate_filter"]["selection/pass_rate_too_hard"] == row0["selection/pass_rate_too_hard"]
    listed = read_jsonl(out / "selection" / "pass_rates_step000000.jsonl")
    assert len(listed) == 80 and {r["index"] for r in listed if r["dropped"] == "too_hard"} == trainer.sampler.excluded
    assert all(r["pass_rate"] == 0.0 for r in listed if r["index"] >= 60)


def test_resume_with_every_filter_equals_straight_run(fast_config, tmp_path):
    kw = dict(checkpoint_every=2, dynamic_sampling={"enabled": True, "max_refill_batches": 1},
              pass_rate_filter={"enabled": True, "samples": 2, "max_prompts": 40, "refresh_every": 2},
              low_variance_filter={"enabled": True, "drop_fraction": 0.25})
    CritiqueGRPOTrainer(args=fast_config(max_steps=4, output_dir=str(tmp_path / "a"), **kw)).train()
    CritiqueGRPOTrainer(args=fast_config(max_steps=2, output_dir=str(tmp_path / "b"), **kw)).train()
    CritiqueGRPOTrainer(args=fast_config(max_steps=4, output_dir=str(tmp_path / "b"), **kw)).train(resume=True)
    a, b = _rl_rows(tmp_path / "a"), _rl_rows(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert "selection/pass_rate_measured" in a[2] and "selection/pass_rate_measured" in b[2]  # refreshed at step 3
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss/total", "reward/mean", "train/zero_spread_groups", "selection/samples_total",
                    "selection/refills", "selection/low_variance_dropped", "selection/pool_size"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["step"], key)
    pa = [(r["step"], r["prompt"], r["completion"]) for r in read_jsonl(tmp_path / "a" / "rollouts.jsonl")]
    pb = [(r["step"], r["prompt"], r["completion"]) for r in read_jsonl(tmp_path / "b" / "rollouts.jsonl")]
    assert pa == pb


@pytest.mark.slow
def test_two_processes_agree_on_selection(tmp_path):
    """Under ``accelerate launch`` with 2 CPU processes: every filter on, the ranks end with equal weights, the
    selection counters are written once and the pass-rate decision is the same on both (same pool size)."""
    from test_distributed import _config, _ranks, launch

    cfg = _config(tmp_path, "sel", max_steps=3, memory={"enabled": False},
                  dynamic_sampling={"enabled": True, "max_refill_batches": 2},
                  pass_rate_filter={"enabled": True, "samples": 2, "max_prompts": 40, "refresh_every": 2},
                  low_variance_filter={"enabled": True, "drop_fraction": 0.25})
    launch(["train", str(cfg), str(tmp_path / "s.json")], 2)
    ranks = _ranks(tmp_path / "s.json", 2)
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and ranks[0]["summary"] == ranks[1]["summary"]
    rows = [r for r in read_jsonl(tmp_path / "sel" / "metrics.jsonl") if "loss/total" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["selection/samples"] == 16 * (1 + r["selection/refills"])
        assert 0.0 <= r["train/zero_spread_groups"] <= 1.0
    assert ranks[0]["summary"]["pass_rate_filter"]["selection/pass_rate_measured"] == 40
