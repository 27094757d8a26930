"""One Registry type behind every extension point: duplicates refused, config checks, errors and CLI choices read
the registered names, a registered policy loss is what the update uses."""

from __future__ import annotations

import pytest
import torch

from critique_rl.agents.registry import ENVS
from critique_rl.algos import ADVANTAGE_ESTIMATORS, AGGREGATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from critique_rl.config import TrainConfig, from_dict
from critique_rl.critics.factory import CRITIC_BACKENDS
from critique_rl.errors import ConfigError
from critique_rl.memory.abstraction import ABSTRACTIONS
from critique_rl.registry import DuplicateNameError, Registry
from critique_rl.rewards.base import REWARD_FUNCS
from critique_rl.rewards.gates import GATES
from critique_rl.rollout.factory import ROLLOUT_ENGINES
from critique_rl.tasks import TASKS

ALL = {"tasks": TASKS, "reward functions": REWARD_FUNCS, "gates": GATES, "advantage estimators": ADVANTAGE_ESTIMATORS,
       "reward aggregators": AGGREGATORS, "loss aggregations": LOSS_AGGREGATIONS, "policy losses": POLICY_LOSSES,
       "memory abstractions": ABSTRACTIONS, "environments": ENVS, "rollout engines": ROLLOUT_ENGINES,
       "critic backends": CRITIC_BACKENDS}


def test_registry_refuses_a_second_entry_under_a_held_name():
    reg: Registry[int] = Registry("thing", "thing_field")
    reg.register("a", 1)
    assert reg.register("a", reg["a"]) == 1  # the identical entry again: no change
    with pytest.raises(DuplicateNameError, match="thing 'a' is already registered"):
        reg.register("a", 2)
    with pytest.raises(DuplicateNameError):
        reg["a"] = 3  # item assignment goes through register too
    with pytest.raises(DuplicateNameError):
        reg.update({"a": 4})
    assert reg["a"] == 1
    err = reg.unknown("zz")
    assert isinstance(err, ConfigError) and "thing_field" in str(err) and "['a']" in str(err)


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_registry_is_one_and_refuses_a_builtin_name(name):
    reg = ALL[name]
    assert isinstance(reg, Registry) and len(reg) > 0
    first = reg.names()[0]
    with pytest.raises(DuplicateNameError):
        reg.register(first, object())
    assert first in reg  # still the built-in


@pytest.mark.parametrize("field,registry", [("advantage_estimator", ADVANTAGE_ESTIMATORS),
                                            ("reward_aggregator", AGGREGATORS),
                                            ("loss_aggregation", LOSS_AGGREGATIONS),
                                            ("policy_loss", POLICY_LOSSES),
                                            ("rollout_backend", ROLLOUT_ENGINES)])
def test_config_errors_list_the_registered_names_and_accept_a_new_one(field, registry):
    with pytest.raises(ConfigError, match=field) as info:
        from_dict(TrainConfig, {field: "no_such_name"})
    assert str(registry.names()) in str(info.value)
    registry.register("plugin_for_test", registry[registry.names()[0]])
    try:
        assert getattr(from_dict(TrainConfig, {field: "plugin_for_test"}), field) == "plugin_for_test"
        with pytest.raises(ConfigError, match="plugin_for_test"):  # the error lists it now
            from_dict(TrainConfig, {field: "still_no_such_name"})
    finally:
        registry.unregister("plugin_for_test")


def test_critic_backend_names_reach_the_config_and_the_cli():
    import re

    from critique_rl.cli_critique import _backends
    from critique_rl.critics.factory import critic_backend_names

    # one place: the registry's keys (plus none); the built-ins are there, and so is every backend registered later
    names = critic_backend_names()
    assert names == ["none", *CRITIC_BACKENDS.names()]
    assert {"feedback", "hf", "openai", "rule"} <= set(names)
    with pytest.raises(ConfigError, match=r"critic.backend.*" + re.escape(", ".join(repr(n) for n in names))):
        from_dict(TrainConfig, {"critic": {"backend": "nope"}})
    assert set(_backends()) == set(names) - {"none", "feedback"}  # --backend: every backend that critiques rows
    CRITIC_BACKENDS.register("mine_for_test", CRITIC_BACKENDS["rule"])
    try:
        assert from_dict(TrainConfig, {"critic": {"backend": "mine_for_test"}}).critic.backend == "mine_for_test"
        assert "mine_for_test" in _backends() and "feedback" not in _backends()
    finally:
        CRITIC_BACKENDS.unregister("mine_for_test")


def test_a_registered_policy_loss_is_the_one_the_update_uses():
    from accelerate import Accelerator

    from critique_rl.algos import register_policy_loss
    from critique_rl.models import build_tiny_model, build_tiny_tokenizer
    from critique_rl.train.batching import pack
    from critique_rl.train.update import UpdateBatch, policy_update

    calls = []

    @register_policy_loss("zero_for_test")
    def zero(logp, old_logp, advantages, cfg):
        calls.append(logp.shape)
        return logp * 0.0, torch.zeros_like(logp)

    try:
        tok = build_tiny_tokenizer(["12+34=46", "7+8=15"] * 10, vocab_size=300)
        tokens = pack([[5, 6, 7]] * 4, [[8, 9], [10], [11, 12, 13], [14]], pad_id=0)
        ub = UpdateBatch(tokens=tokens, advantages=torch.ones(4, tokens.completion_len),
                         offpolicy=torch.zeros(4, dtype=torch.bool))
        stats = {}
        for loss in ("ppo_clip", "zero_for_test"):
            cfg = TrainConfig(policy_loss=loss, mini_batch_size=4, generation_batch_size=4, num_generations=4)
            acc = Accelerator(cpu=True)
            model = build_tiny_model(tok, hidden_size=64, layers=1, heads=2, seed=0)
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
            model, opt, sched = acc.prepare(model, opt, sched)
            stats[loss] = policy_update(model, opt, sched, acc, ub, cfg, norm_constant=4.0)
        assert calls and stats["zero_for_test"]["loss/policy"] == 0.0 and stats["ppo_clip"]["loss/policy"] != 0.0
    finally:
        POLICY_LOSSES.unregister("zero_for_test")
