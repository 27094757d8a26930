"""Single-turn runs refuse the episode-only phase fields (``phases[i].task_kwargs`` / ``env_kwargs``): the
config cannot (``EpisodeTrainer(env_spec=...)`` trains on episodes with ``agent.env`` unset), the prompt path's
setup does, naming the field and the fix, before any model is loaded."""

from __future__ import annotations

import pytest

from critique_rl.config import PhaseConfig
from critique_rl.errors import ConfigError
from critique_rl.train.trainer import CritiqueGRPOTrainer


@pytest.mark.parametrize("field", ["task_kwargs", "env_kwargs"])
def test_single_turn_run_refuses_episode_phase_fields(fast_config, field):
    phases = [PhaseConfig(kind="sft", steps=2), PhaseConfig(kind="rl", steps=2, **{field: {"hi": 64}})]
    trainer = CritiqueGRPOTrainer(args=fast_config(phases=phases, max_steps=2))
    with pytest.raises(ConfigError) as err:
        trainer.train()
    msg = str(err.value)
    assert f"phases[1].{field}" in msg and "agent.env" in msg
    assert not hasattr(trainer, "model")  # refused at setup, before the model is loaded
