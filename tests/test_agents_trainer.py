"""Episode training: GRPO / Critique-GRPO on multi-turn episodes, logs, resume, memory in the loop, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from critique_rl.agents.guess import GuessCritic, GuessNumberEnv, critique_text, make_tasks
from critique_rl.agents.registry import get_env_spec
from critique_rl.agents.source import EpisodeTrainer
from critique_rl.config import TrainConfig, from_dict
from critique_rl.errors import ConfigError
from critique_rl.train import trainer as agent_trainer

TINY = dict(
    tiny_hidden_size=64, tiny_heads=2, tiny_layers=1, tiny_vocab_size=300, sft_steps=10, sft_batch_size=16,
    sft_examples=60, sft_learning_rate=3e-3, sft_refine_fraction=0.3, max_steps=2, num_generations=4,
    generation_batch_size=8, mini_batch_size=8, eval_n=4, eval_batch_size=4, checkpoint_every=100, progress=False,
    log_rollouts=4, device="cpu",
)


def config(tmp_path, name="run", **kw) -> TrainConfig:
    data = dict(TINY, output_dir=str(tmp_path / name), agent={"env": "guess_number", "max_turns": 4,
                                                              "max_turn_tokens": 4})
    data.update(kw)
    return from_dict(TrainConfig, data)


def test_guess_env_and_critic():
    env = GuessNumberEnv(max_guesses=3)
    assert env.reset({"target": 5, "lo": 1, "hi": 16}) == "Guess my number from 1 to 16."
    r = env.step("8")
    assert (r.observation, r.done) == ("Lower. It is from 1 to 7.", False)
    r = env.step("nothing")
    assert r.observation == "Say one number from 1 to 7." and not r.done
    r = env.step("I say 5")
    assert r.done and r.info["success"] and r.reward == 1.0
    env.reset({"target": 2, "lo": 1, "hi": 16})
    env.step("9"), env.step("3")
    last = env.step("1")
    assert last.done and not last.info["success"] and last.observation == "Out of guesses. It was 2."
    assert {t["target"] for t in make_tasks("train", 200, 0)} <= set(range(1, 17))
    assert make_tasks("eval", 5, 1) != make_tasks("train", 5, 1)


def test_episode_trainer_critique_grpo_memory(tmp_path, monkeypatch):
    seen = []
    real = agent_trainer.policy_update

    def spy(model, opt, sched, acc, ub, cfg, **kw):
        seen.append(ub)
        return real(model, opt, sched, acc, ub, cfg, **kw)

    monkeypatch.setattr(agent_trainer, "policy_update", spy)
    cfg = config(tmp_path, critique_on="wrong", distill_weight=0.5,
                 memory={"enabled": True, "embeddings": "lexical", "top_k_demos": 1, "top_k_lessons": 1,
                         "token_budget": 40})
    tr = EpisodeTrainer(cfg)
    summary = tr.train()
    out = tmp_path / "run"
    for key in ("eval_accuracy_before_rl", "eval_accuracy_after_rl", "eval_n"):
        assert key in summary
    assert summary["eval_n"] == 4 and 0.0 <= summary["eval_accuracy_after_rl"] <= 1.0
    assert json.loads((out / "summary.json").read_text())["eval_n"] == 4
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["episode/action_tokens"] > 0 and r["episode/observation_tokens"] > 0 for r in steps)
    assert any(r.get("critique/critiqued", 0) > 0 for r in steps)
    assert steps[-1]["memory/lessons"] + steps[-1]["memory/demonstrations"] > 0
    assert steps[-1]["memory/context_rate"] > 0  # step 2 read what step 1 wrote
    logged = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert logged and all(isinstance(r["turns"], list) and r["turns"] for r in logged)
    assert {"observation", "action", "reward"} <= set(logged[0]["turns"][0])
    assert any("critique" in r for r in logged) and any("refinement" in r for r in logged)
    # the loss sees action tokens only: per row, the completion mask equals the episode's action mask
    ub = seen[0]
    mask = ub.tokens.completion_mask
    assert 0 < mask.sum() < (ub.tokens.completion_ids != tr.tokenizer.pad_token_id).sum()
    eos = tr.tokenizer.eos_token_id
    assert int((ub.tokens.completion_ids[mask.bool()] == eos).sum()) > 0  # each action's EOS is trained
    assert ub.offpolicy.any() == any(r.get("critique/kept", 0) for r in steps[:1])
    # directive distillation moved per-token advantages on action tokens only: observation/padding positions
    # keep the row's episode advantage, action positions of distilled rows vary
    assert any(r.get("distill/rows", 0) > 0 for r in steps)
    varied = 0
    for row in range(ub.advantages.shape[0]):
        off_action = ub.advantages[row][~mask[row].bool()]
        if len(off_action):
            assert torch.allclose(off_action, off_action[0].expand_as(off_action))
        varied += int(ub.advantages[row][mask[row].bool()].unique().numel() > 1)
    assert varied > 0
    assert (out / "final" / "config.json").is_file()


def test_resume_continues_exactly(tmp_path):
    kw = dict(checkpoint_every=1, critique_on="wrong", memory={"enabled": True, "embeddings": "lexical",
                                                                "top_k_demos": 0, "token_budget": 40})
    full = EpisodeTrainer(config(tmp_path, "full", max_steps=2, **kw))
    full.train()
    part = EpisodeTrainer(config(tmp_path, "part", max_steps=1, **kw))
    part.train()
    resumed = EpisodeTrainer(config(tmp_path, "part", max_steps=2, **kw))
    resumed.train(resume=True)

    def losses(name):
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss/total"], r["train/accuracy"]) for r in rows if "loss/total" in r]

    assert losses("part") == losses("full") and len(losses("full")) == 2
    a = full.accelerator.unwrap_model(full.model).state_dict()
    b = resumed.accelerator.unwrap_model(resumed.model).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_without_critic_and_clear_errors(tmp_path):
    s = EpisodeTrainer(config(tmp_path, critique_on="none", max_steps=1)).train()
    assert s["steps"] == 1 and "critique_refinements" not in s
    with pytest.raises(ConfigError, match="agent.env"):
        get_env_spec("no_such_env")
    with pytest.raises(ConfigError, match="agent.env_kwargs"):
        EpisodeTrainer(config(tmp_path, "bad", agent={"env": "guess_number", "env_kwargs": {"colour": 1}})).train()
    with pytest.raises(ConfigError, match="agent.max_episode_tokens.*no episode fits"):
        EpisodeTrainer(config(tmp_path, "short", sft_steps=0, agent={"env": "guess_number",
                                                                      "max_episode_tokens": 5})).train()
    with pytest.raises(ConfigError, match="agent.max_turns"):
        from_dict(TrainConfig, {"agent": {"env": "guess_number", "max_turns": 0}})


def test_guess_critic_sees_whole_episode():
    from critique_rl.agents.trajectory import Trajectory, Turn

    t = Trajectory(task={"prompt": "p"})
    for obs, act in (("Guess my number from 1 to 16.", "8"), ("Higher. It is from 9 to 16.", "10")):
        t.turns.append(Turn(obs, [], [], [], act, True))
    text = critique_text(t)
    assert "Turn 2: 10 is not the middle of 9 to 16, which is 12." in text and "Turn 1" not in text
    [c] = GuessCritic().critique_episodes([t])
    assert c.text == text and c.verdict is False


def test_cli_trains_on_agent_config(tmp_path, monkeypatch, capsys):
    import yaml

    from critique_rl import cli

    cfg = dict(TINY, max_steps=1, output_dir=str(tmp_path / "cli"),
               agent={"env": "guess_number", "max_turns": 3, "max_turn_tokens": 4})
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def run(*args):
        monkeypatch.setattr("sys.argv", ["critique-rl", *args])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        return exc.value.code

    assert run("train", "--config", str(path), "--no-progress") == 0
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert {"eval_accuracy_before_rl", "eval_accuracy_after_rl", "eval_n"} <= set(summary) and summary["steps"] == 1
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg, "agent": {"env": "chess"}}))
    assert run("train", "--config", str(bad)) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "config field 'agent.env' = 'chess': unknown env" in err
