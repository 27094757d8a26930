"""Training phases: the default schedule is the old warm-up + RL bit for bit; an explicit schedule with a later
SFT phase, per-phase learning rates and objectives resumes inside any phase with the same result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import critique_rl.train.sft_phase as sft_phase
from critique_rl.config import TrainConfig, from_dict
from critique_rl.errors import ConfigError
from critique_rl.train.metrics import read_jsonl
from critique_rl.train.trainer import CritiqueGRPOTrainer

VOLATILE = ("time/", "critic/latency")


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in read_jsonl(out / "metrics.jsonl")]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def test_explicit_default_schedule_is_bit_identical(fast_config, tmp_path):
    kw = dict(max_steps=3, sft_steps=40, kl_beta=0.05, lr_scheduler="cosine", checkpoint_every=2)
    CritiqueGRPOTrainer(args=fast_config(output_dir=str(tmp_path / "a"), **kw)).train()
    phases = [{"kind": "sft", "steps": 40}, {"kind": "rl", "steps": 3}]
    b = fast_config(output_dir=str(tmp_path / "b"), phases=phases, **{k: v for k, v in kw.items() if k != "max_steps"})
    assert b.max_steps == 3
    CritiqueGRPOTrainer(args=b).train()
    ra, rb = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert len(ra) == len(rb) == 5
    for x, y in zip(ra, rb, strict=True):
        y.pop("phase", None)
        assert x == y  # every logged value identical, not just close
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


PHASES = [
    {"kind": "sft", "steps": 30, "name": "imitate"},
    {"kind": "rl", "steps": 2, "name": "explore"},
    {"kind": "sft", "steps": 12, "learning_rate": 1e-3, "name": "refresh"},
    {"kind": "rl", "steps": 2, "learning_rate": 5e-5, "reward_funcs": ["correctness", "format"],
     "reward_weights": [1.0, 0.5], "name": "polish"},
]


def test_phases_resume_inside_sft_and_rl_phases(fast_config, tmp_path, monkeypatch):
    kw = dict(phases=PHASES, checkpoint_every=1, learning_rate=1e-4, max_steps=4)
    summary = CritiqueGRPOTrainer(args=fast_config(output_dir=str(tmp_path / "straight"), **kw)).train()
    straight = [r for r in _rows(tmp_path / "straight") if "loss/total" in r]
    assert [r["step"] for r in straight] == [1, 2, 3, 4] and [r["phase"] for r in straight] == [1, 1, 3, 3]
    assert straight[0]["lr"] == pytest.approx(1e-4) and straight[2]["lr"] == pytest.approx(5e-5)
    assert "reward/format/mean" in straight[2] and "reward/format/mean" not in straight[1]
    assert [p["name"] for p in summary["phases"]] == ["imitate", "refresh"]
    assert summary["phases"][1]["at_rl_step"] == 2

    # crash inside the second SFT phase, resume; crash inside the last rl phase, resume again
    real_sft = sft_phase.sft_warmup
    calls = {"n": 0}

    def dying_sft(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed inside the refresh phase")
        return real_sft(*a, **k)

    out = tmp_path / "crashed"
    monkeypatch.setattr(sft_phase, "sft_warmup", dying_sft)
    with pytest.raises(KeyboardInterrupt):
        CritiqueGRPOTrainer(args=fast_config(output_dir=str(out), **kw)).train()
    monkeypatch.setattr(sft_phase, "sft_warmup", real_sft)
    real_step = CritiqueGRPOTrainer._step

    def dying_step(self):
        if self.step == 3:
            raise KeyboardInterrupt("killed inside the polish phase")
        return real_step(self)

    monkeypatch.setattr(CritiqueGRPOTrainer, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        CritiqueGRPOTrainer(args=fast_config(output_dir=str(out), **kw)).train(resume=True)
    monkeypatch.setattr(CritiqueGRPOTrainer, "_step", real_step)
    resumed_summary = CritiqueGRPOTrainer(args=fast_config(output_dir=str(out), **kw)).train(resume=True)

    resumed = [r for r in _rows(out) if "loss/total" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for x, y in zip(straight, resumed, strict=True):
        for key in ("loss/total", "reward/mean", "lr", "train/accuracy"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)
    assert [p["name"] for p in resumed_summary["phases"]] == ["imitate", "refresh"]
    wa, wb = _weights(tmp_path / "straight"), _weights(out)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


@pytest.mark.parametrize("data, field", [
    ({"phases": [{"kind": "rl"}]}, "phases[0].steps"),
    ({"phases": [{"kind": "dpo", "steps": 3}]}, "phases[0].kind"),
    ({"phases": [{"kind": "rl", "steps": 3, "lr": 1e-4}]}, "phases[0].lr"),
    ({"phases": [{"kind": "sft", "steps": 3, "reward_funcs": ["correctness"]}]}, "phases[0].reward_funcs"),
    ({"phases": [{"kind": "rl", "steps": 3, "reward_funcs": ["correctness", "format"], "reward_weights": [1.0]}]},
     "phases[0].reward_weights"),
    ({"phases": [{"kind": "rl", "steps": 3}], "max_steps": 7}, "max_steps"),
    ({"phases": [{"kind": "rl", "steps": 3, "learning_rate": 0}]}, "phases[0].learning_rate"),
])
def test_bad_phases_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, data)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_schedule_default_and_yaml_roundtrip(tmp_path):
    cfg = TrainConfig(sft_steps=7, max_steps=5)
    assert [(p.kind, p.steps) for p in cfg.schedule()] == [("sft", 7), ("rl", 5)] and cfg.phases == []
    cfg = from_dict(TrainConfig, {"phases": PHASES})
    assert cfg.max_steps == 4
    cfg.save_yaml(tmp_path / "c.yaml")
    from critique_rl.config import load_config

    back = load_config(tmp_path / "c.yaml")
    assert back.phases == cfg.phases and back.max_steps == 4


def test_example_schedule_config_loads():
    from critique_rl.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "examples" / "schedule_selection_cpu.yaml")
    assert [p.kind for p in cfg.schedule()] == ["sft", "rl", "sft", "rl"] and cfg.max_steps == 250
    assert cfg.dynamic_sampling.enabled and cfg.pass_rate_filter.refresh_every == 50
