"""End-to-end trainer tests on the tiny model: run directory, resume equivalence, crash-safe checkpoints."""

import json
from pathlib import Path

import pytest
import torch

from critique_rl.train import checkpoint as ckpt
from critique_rl.train.metrics import read_jsonl
from critique_rl.train.trainer import CritiqueGRPOTrainer


def test_run_directory_contents(fast_config):
    cfg = fast_config(max_steps=2, kl_beta=0.05, entropy_coef=0.01, num_iterations=2)
    summary = CritiqueGRPOTrainer(args=cfg).train()
    out = cfg.output_dir
    for name in ("config.yaml", "metrics.jsonl", "rollouts.jsonl", "curves.png", "summary.json"):
        assert (tmp := Path(out) / name).is_file() and tmp.stat().st_size > 0, name
    s = json.loads((Path(out) / "summary.json").read_text())
    for key in ("eval_accuracy_before_rl", "eval_accuracy_after_rl", "eval_n", "steps", "wall_seconds"):
        assert key in s
    assert s["steps"] == 2 and s["eval_n"] == 20 and summary == s
    rows = [r for r in read_jsonl(f"{out}/metrics.jsonl") if "loss/total" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/correctness/mean", "reward/correctness/std", "train/accuracy", "loss/policy", "loss/kl",
                "loss/entropy", "entropy", "clip_frac", "kl", "time/generate", "time/score", "time/train"):
        assert key in rows[0], key
    assert rows[1]["kl"] > 0  # the policy moved away from the reference after one update
    roll = read_jsonl(f"{out}/rollouts.jsonl")
    assert {"prompt", "completion", "rewards", "advantage"} <= set(roll[0])
    assert (Path(out) / "final" / "config.json").is_file()


def _rl_rows(out):
    return [r for r in read_jsonl(f"{out}/metrics.jsonl") if "loss/total" in r]


def test_resume_equals_straight_run(fast_config, tmp_path):
    straight = fast_config(max_steps=6, checkpoint_every=3, output_dir=str(tmp_path / "a"), num_iterations=2)
    CritiqueGRPOTrainer(args=straight).train()

    first = fast_config(max_steps=3, checkpoint_every=3, output_dir=str(tmp_path / "b"), num_iterations=2)
    CritiqueGRPOTrainer(args=first).train()
    second = fast_config(max_steps=6, checkpoint_every=3, output_dir=str(tmp_path / "b"), num_iterations=2)
    CritiqueGRPOTrainer(args=second).train(resume=True)

    a, b = _rl_rows(tmp_path / "a"), _rl_rows(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    pa = [(r["step"], r["prompt"], r["completion"]) for r in read_jsonl(tmp_path / "a" / "rollouts.jsonl")]
    pb = [(r["step"], r["prompt"], r["completion"]) for r in read_jsonl(tmp_path / "b" / "rollouts.jsonl")]
    assert pa == pb  # same prompts drawn and same samples after resume
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss/total"] == pytest.approx(rb["loss/total"], abs=1e-5)
        assert ra["reward/mean"] == pytest.approx(rb["reward/mean"], abs=1e-6)
    from safetensors.torch import load_file

    ma = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    mb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    for k in ma:
        assert torch.allclose(ma[k], mb[k], atol=1e-5), k


def test_crash_during_save_keeps_previous_checkpoint(fast_config, monkeypatch):
    cfg = fast_config(max_steps=4, checkpoint_every=2)
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: model files are written, then the process "dies"
            raise KeyboardInterrupt("killed during save")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        CritiqueGRPOTrainer(args=cfg).train()
    root = Path(cfg.output_dir) / "checkpoints"
    assert any(p.name.startswith(".tmp-checkpoint-") for p in root.iterdir())  # the torn save is left behind
    latest = ckpt.latest_checkpoint(root)
    assert latest is not None and latest.name == "checkpoint-000002"
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    summary = CritiqueGRPOTrainer(args=cfg).train(resume=True)
    assert summary["steps"] == 4
    assert not any(p.name.startswith(".tmp-checkpoint-") for p in root.iterdir())
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-000002", "checkpoint-000004"]


def test_fresh_run_refuses_a_dir_with_checkpoints(fast_config):
    from critique_rl.errors import UserError

    cfg = fast_config(max_steps=1)
    CritiqueGRPOTrainer(args=cfg).train()
    with pytest.raises(UserError, match="--resume"):
        CritiqueGRPOTrainer(args=cfg).train()
