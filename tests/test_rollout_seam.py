"""The rollout seam: the factory is the one place an engine is built, the trainer syncs weights after every
update, stages pass typed values, and the module graph has no trainer -> evaluate -> calibration circle."""

from __future__ import annotations

import subprocess
import sys

import pytest

from critique_rl.errors import ConfigError
from critique_rl.rollout import HFGenerator
from critique_rl.rollout.factory import build_generator
from critique_rl.train import critique_stage
from critique_rl.train import trainer as trainer_mod
from critique_rl.train.rollout_batch import AdvantagePlan, CritiqueResult, RolloutBatch
from critique_rl.train.step_context import StepContext


def test_factory_builds_the_hf_engine_and_names_bad_backends():
    gen = build_generator("hf", object(), object(), batch_size=7)
    assert isinstance(gen, HFGenerator) and gen.batch_size == 7
    with pytest.raises(ConfigError, match="rollout_backend"):
        build_generator("nope", object(), object())


def test_trainer_syncs_weights_after_every_update_and_passes_typed_batches(fast_config, monkeypatch):
    calls = {"sync": 0, "generate": 0}
    seen: list[type] = []

    class Counting(HFGenerator):
        def sync_weights(self) -> None:
            calls["sync"] += 1

        def generate(self, prompts, params):
            calls["generate"] += 1
            return super().generate(prompts, params)

    real = trainer_mod.build_generator

    def factory(backend, model, tokenizer, **kw):
        gen = real(backend, model, tokenizer, **kw)
        return Counting(gen.model, gen.tokenizer, batch_size=gen.batch_size)

    monkeypatch.setattr(trainer_mod, "build_generator", factory)
    orig_update_batch = critique_stage.update_batch

    def spy(ctx, batch, crit, plan):
        seen.extend([type(ctx), type(batch), type(crit), type(plan)])
        return orig_update_batch(ctx, batch, crit, plan)

    monkeypatch.setattr(critique_stage, "update_batch", spy)
    cfg = fast_config(max_steps=3, critique_on="all", sft_refine_fraction=0.3)
    trainer_mod.CritiqueGRPOTrainer(args=cfg).train()
    assert calls["sync"] == 3  # once per optimizer update
    assert calls["generate"] >= 3
    assert seen[0] is StepContext and seen[1] is RolloutBatch and seen[2] is CritiqueResult
    assert seen[3] is AdvantagePlan


def test_no_import_circle_through_the_trainer():
    code = ("import sys, critique_rl.train.calibration, critique_rl.train.evaluate; "
            "assert 'critique_rl.train.trainer' not in sys.modules, 'evaluate/calibration pull in the trainer'")
    subprocess.run([sys.executable, "-c", code], check=True)
