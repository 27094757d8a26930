"""Episodes run on the one trainer, so what the single-turn path has, the episode path has: LoRA (only the
adapter trains), top-K distillation with the EMA teacher and every divergence, weights_dtype, phases, trackers,
several processes (tests/test_distributed.py's launcher), and the checks it refuses with the field named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from critique_rl.agents.source import EpisodeTrainer
from critique_rl.config import TrainConfig, from_dict
from critique_rl.errors import ConfigError
from critique_rl.train import trainer as trainer_mod
from critique_rl.train.metrics import read_jsonl

TINY = dict(
    tiny_hidden_size=64, tiny_heads=2, tiny_layers=1, tiny_vocab_size=300, sft_steps=10, sft_batch_size=16,
    sft_examples=60, sft_learning_rate=3e-3, sft_refine_fraction=0.3, max_steps=2, num_generations=4,
    generation_batch_size=8, mini_batch_size=8, eval_n=4, eval_batch_size=4, checkpoint_every=100, progress=False,
    log_rollouts=4, device="cpu",
)
AGENT = {"env": "guess_number", "max_turns": 3, "max_turn_tokens": 4, "env_kwargs": {"max_guesses": 3},
         "task_kwargs": {"lo": 1, "hi": 8}}


def config(tmp_path: Path, name: str = "run", **kw) -> TrainConfig:
    data = dict(TINY, output_dir=str(tmp_path / name), agent=AGENT)
    data.update(kw)
    return from_dict(TrainConfig, data)


def _rl(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if "loss/total" in r]


def test_episode_lora_trains_only_the_adapter(tmp_path):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from critique_rl.lora import is_lora
    from critique_rl.train.run_setup import LORA_BASE_DIR

    cfg = config(tmp_path, critique_on="none", kl_beta=0.1, entropy_coef=0.05, learning_rate=5e-3,
                 lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0})
    tr = EpisodeTrainer(cfg)
    summary = tr.train()
    policy = tr.accelerator.unwrap_model(tr.model)
    assert is_lora(policy) and summary["lora_trainable_parameters"] > 0
    base = load_file(str(tmp_path / "run" / LORA_BASE_DIR / "model.safetensors"))
    live = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in policy.state_dict().items() if "lora_" not in k}
    for k, v in base.items():
        assert torch.equal(live[k], v), f"base weight {k} changed"
    assert any(v.abs().sum() > 0 for k, v in policy.state_dict().items() if "lora_B" in k)
    assert _rl(tmp_path / "run")[-1]["kl"] > 0  # reference = the base with the adapter off


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_episode_topk_distillation_with_the_ema_teacher(tmp_path, monkeypatch, divergence):
    seen = []
    real = trainer_mod.policy_update

    def spy(*args, **kw):
        seen.append(args[4])
        return real(*args, **kw)

    monkeypatch.setattr(trainer_mod, "policy_update", spy)
    cfg = config(tmp_path, critique_on="all", distill_weight=0.5, distill_mode="topk_logits", distill_topk=4,
                 distill_teacher="ema", distill_teacher_ema=0.5, distill_divergence=divergence)
    tr = EpisodeTrainer(cfg)
    tr.train()
    assert tr._ema_teacher is not None
    ema = dict(tr._ema_teacher.model.named_parameters())
    live = dict(tr.accelerator.unwrap_model(tr.model).named_parameters())
    assert any(not torch.equal(ema[k], live[k]) for k in live)  # the teacher lags the policy
    ub = seen[0]
    assert ub.teacher_topk_logp is not None and ub.distill_rows.any()
    rows = ub.distill_rows
    assert ub.teacher_topk_logp.shape == (*ub.advantages.shape, 4)
    # the teacher's top-K is a distribution over the vocabulary's top tokens: log-probs <= 0, sorted
    on = ub.tokens.completion_mask[rows].bool()
    lp = ub.teacher_topk_logp[rows][on]
    assert (lp <= 1e-6).all() and (lp[:, :-1] >= lp[:, 1:] - 1e-6).all()
    steps = _rl(tmp_path / "run")
    assert all(math.isfinite(r["loss/distill"]) for r in steps) and any(r["loss/distill"] != 0 for r in steps)


def test_episode_weights_dtype_phases_and_trackers(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = config(tmp_path, weights_dtype="bfloat16", report_to=["tensorboard"], critique_on="wrong",
                 phases=[{"kind": "sft", "steps": 6}, {"kind": "rl", "steps": 1},
                         {"kind": "sft", "steps": 3, "learning_rate": 1e-3}, {"kind": "rl", "steps": 1}],
                 max_steps=2)
    tr = EpisodeTrainer(cfg)
    summary = tr.train()
    policy = tr.accelerator.unwrap_model(tr.model)
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    steps = _rl(tmp_path / "run")
    assert [r["step"] for r in steps] == [1, 2] and [r["phase"] for r in steps] == [1, 3]
    assert all(math.isfinite(r["loss/total"]) for r in steps)
    assert [p["kind"] for p in summary["phases"]] == ["sft", "sft"]
    events = list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "the tensorboard tracker wrote no events"


def test_episode_refusals_name_the_field(tmp_path):
    """What still has no meaning on episodes is refused with the field and the fix (a phase's own data is
    phases[i].task_kwargs / env_kwargs, tests/test_episode_selection_phases.py)."""
    for kw, field in (({"refinement_source": "reference"}, "refinement_source"),
                      ({"phases": [{"kind": "rl", "steps": 2, "train_file": "x.jsonl"}]},
                       r"phases\[0\]\.train_file.*task_kwargs"),
                      ({"phases": [{"kind": "sft", "steps": 2}, {"kind": "rl", "steps": 2, "reward_funcs": ["x"]}]},
                       r"phases\[1\]\.reward_funcs")):
        with pytest.raises(ConfigError, match=field):
            EpisodeTrainer(config(tmp_path, "bad", **kw)).train()


@pytest.mark.slow
def test_two_processes_on_episodes_shard_write_once_and_track_one_process(tmp_path):
    """2 processes (gloo) vs 1 on the same global batch (8 episodes = 2 tasks x 4, one task per process): the
    held-out success before RL is equal exactly (same seeded warm-up, the eval set split and gathered), every
    metrics step is written once, both ranks end with identical weights, and each RL step's train/accuracy is
    within 0.5 of the 1-process run's (the ranks sample with their own seeds, so episodes differ)."""
    from test_distributed import _ranks, launch

    def run(name: str, nproc: int) -> tuple[list[dict], list[dict]]:
        path = tmp_path / f"{name}.json"
        data = dict(TINY, output_dir=str(tmp_path / name), agent=AGENT, max_steps=3, critique_on="wrong",
                    mini_batch_size=4)
        path.write_text(json.dumps(data))
        launch(["train", str(path), str(tmp_path / f"{name}.out")], nproc)
        return read_jsonl(tmp_path / name / "metrics.jsonl"), _ranks(tmp_path / f"{name}.out", nproc)

    rows2, ranks2 = run("two", 2)
    rows1, _ = run("one", 1)
    assert ranks2[0]["world"] == 2 and ranks2[0]["checksum"] == ranks2[1]["checksum"]
    assert ranks2[0]["summary"] == ranks2[1]["summary"]
    assert [r["step"] for r in rows2 if "loss/total" in r] == [1, 2, 3]
    assert sum(1 for r in rows2 if r.get("final")) == 1
    assert rows2[0]["eval/accuracy"] == rows1[0]["eval/accuracy"]
    roll = read_jsonl(tmp_path / "two" / "rollouts.jsonl")
    assert {r["rank"] for r in roll} == {0, 1}
    for a, b in zip((r for r in rows1 if "loss/total" in r), (r for r in rows2 if "loss/total" in r), strict=True):
        assert abs(a["train/accuracy"] - b["train/accuracy"]) <= 0.5


@pytest.mark.vllm
def test_episodes_with_the_vllm_engine(tmp_path, monkeypatch):
    """``rollout_backend: vllm`` on episodes: contexts go to the engine as token ids (``generate_ids``: a later turn's
    context extends the earlier one, never re-tokenized), the engine's log-probs of the action tokens equal the
    trainer's (float32 on CPU), weights sync each step, and the episode-side features run on the engine: the
    pass-rate filter and dynamic sampling, a phase with its own tasks, and ``seed_per_task`` (the same key samples
    the same episodes from the engine)."""
    pytest.importorskip("vllm")
    from critique_rl.rollout import engine_is_separate
    from critique_rl.rollout.vllm import VLLMGenerator

    contexts: list[list[list[int]]] = []
    real = VLLMGenerator.generate_ids

    def spy(self, prompt_ids, params):
        contexts.append([list(p) for p in prompt_ids])
        return real(self, prompt_ids, params)

    monkeypatch.setattr(VLLMGenerator, "generate_ids", spy)
    cfg = config(tmp_path, rollout_backend="vllm", tis_cap=2.0, critique_on="wrong", sft_steps=30,
                 vllm={"enforce_eager": True, "kv_cache_gb": 0.25}, agent={**AGENT, "seed_per_task": True},
                 phases=[{"kind": "sft", "steps": 30}, {"kind": "rl", "steps": 1},
                         {"kind": "rl", "steps": 1, "task_kwargs": {"lo": 2, "hi": 6}}],
                 pass_rate_filter={"enabled": True, "samples": 2, "max_prompts": 4, "too_easy_at_least": None},
                 dynamic_sampling={"enabled": True, "max_refill_batches": 1})
    tr = EpisodeTrainer(cfg)
    tr.train()
    assert engine_is_separate(tr.generator) and isinstance(tr.generator, VLLMGenerator)
    assert tr.generator.syncs >= 1 + cfg.max_steps
    steps = _rl(tmp_path / "run")
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert "mismatch/tis_weight" in r and r["mismatch/abs_log_ratio"] < 1e-3  # same weights: engine ~= trainer
        assert r["episode/mean_turns"] > 1 and "selection/samples" in r
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["selection/pass_rate_measured"] == 4
    assert steps[1]["selection/pass_rate_measured"] == 4  # the phase's own tasks measured as it starts
    # multi-turn: some call's context is an earlier call's context plus its action and the observation
    flat = [c for call in contexts for c in call]
    assert any(len(b) > len(a) and b[: len(a)] == a for a in flat[:40] for b in flat[:200])
    src = tr.episodes
    task = src.train_tasks[0]
    one = src.run_groups(tr.generator, [task], 2, keys=[3], purpose="t", step=tr.step)
    two = src.run_groups(tr.generator, [src.train_tasks[1], task], 2, keys=[2, 3], purpose="t", step=tr.step)
    assert [x.completion_ids() for x in one] == [x.completion_ids() for x in two[2:]]
