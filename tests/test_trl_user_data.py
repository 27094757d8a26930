"""A TRL GRPO user's data trained from a config: a conversational dataset with a `solution` column and extra
columns, TRL-style reward functions from a file, a local instruct-like model directory (chat template); and a
reference-free dataset trained on the user's reward function with an API critic (the loopback
OpenAI-compatible server) writing its critiques.

The rows are loaded with :func:`critique_rl.data.load_split` from the same config and passed as
``train_dataset`` / ``eval_dataset`` (the trainer's public API); once the trainer reads its data through
``load_split`` itself (the hook in the report of issue 25), ``CritiqueGRPOTrainer(args=cfg)`` alone is the same run.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from critic_server import CriticServer
from tiny_chat_model import save_tiny_chat_model

from critique_rl.config import load_config
from critique_rl.data import load_split
from critique_rl.tasks import get_task

SYSTEM = "Answer with the number only."

REWARDS = '''
import json
from pathlib import Path

LOG = Path(__file__).with_suffix(".log")


def _log(name, **values):
    with LOG.open("a") as fh:
        fh.write(json.dumps({"fn": name, **values}) + "\\n")


def accuracy_reward(completions, solution, **kwargs):
    """TRL's conversational form: completions are [{"role": "assistant", "content": ...}] lists."""
    _log("accuracy_reward", completion=completions[0], solution=solution[:2], keys=sorted(kwargs))
    return [1.0 if c[0]["content"].strip() == s else 0.0 for c, s in zip(completions, solution)]


def hard_bonus(completions, difficulty, **kwargs):
    _log("hard_bonus", difficulty=difficulty[:2])
    return [0.1 if d == "hard" else 0.0 for d in difficulty]


def rhymes(completions, rubric, **kwargs):
    _log("rhymes", rubric=rubric[:1], answer=kwargs.get("answer", [None])[:1])
    return [1.0 if c[0]["content"].strip().endswith("at") else 0.0 for c in completions]
'''


def _run(cfg_path: Path, monkeypatch) -> tuple[dict, list[str], Path]:
    from critique_rl.rollout.hf import HFGenerator
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    prompts_seen: list[str] = []
    real_generate = HFGenerator.generate
    monkeypatch.setattr(HFGenerator, "generate",
                        lambda self, prompts, params: prompts_seen.extend(prompts) or real_generate(self, prompts, params))
    cfg = load_config(cfg_path)
    summary = CritiqueGRPOTrainer(args=cfg, train_dataset=load_split(cfg, "train"),
                                  eval_dataset=load_split(cfg, "eval")).train()
    return summary, prompts_seen, Path(cfg.output_dir)


SMALL = dict(num_generations=4, generation_batch_size=8, mini_batch_size=8, max_steps=2, max_new_tokens=6,
             eval_n=8, eval_batch_size=8, checkpoint_every=100, progress=False, device="cpu", learning_rate=1e-3)


def test_trl_conversational_dataset_with_solution_column_trains_from_config(tmp_path, monkeypatch):
    rows = get_task("addition").make_examples("train", 48, 0)
    data = [{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {r['prompt']}"}],
             "solution": r["answer"], "difficulty": "hard" if int(r["answer"]) > 100 else "easy"} for r in rows]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in data))
    (tmp_path / "rewards.py").write_text(REWARDS)
    model = save_tiny_chat_model(tmp_path / "model", [f"S: {SYSTEM}\nU: What is {r['prompt']}\nA: {r['answer']}"
                                                      for r in rows])
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model": str(model), "train_file": str(tmp_path / "train.jsonl"), "eval_file": str(tmp_path / "train.jsonl"),
        "reference_column": "solution",
        "reward_funcs": [f"{tmp_path}/rewards.py:accuracy_reward", f"{tmp_path}/rewards.py:hard_bonus"],
        "sft_steps": 5, "sft_batch_size": 8, "output_dir": str(tmp_path / "run"), **SMALL}))
    summary, prompts_seen, out = _run(cfg_path, monkeypatch)
    assert summary["steps"] == 2
    # the policy saw the conversation through the model's chat template, system message first
    assert prompts_seen and all(p.startswith(f"S: {SYSTEM}\nU: What is ") and p.endswith("A: ")
                                for p in prompts_seen[:8])
    calls = [json.loads(line) for line in (tmp_path / "rewards.log").read_text().splitlines()]
    acc = next(c for c in calls if c["fn"] == "accuracy_reward")
    assert acc["completion"][0]["role"] == "assistant" and acc["solution"][0].isdigit()
    assert {"answer", "difficulty", "trainer_state", "completion_ids"} <= set(acc["keys"])
    assert any(c["fn"] == "hard_bonus" and set(c["difficulty"]) <= {"easy", "hard"} for c in calls)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/accuracy_reward/mean" in m and "reward/hard_bonus/mean" in m
               for m in metrics if "loss/total" in m)


def test_reference_free_dataset_trains_on_user_reward_with_api_critic(tmp_path, monkeypatch):
    words = ["cat", "dog", "sun", "tree", "car", "fish", "book", "hat"]
    data = [{"prompt": [{"role": "user", "content": f"Write a word that rhymes with {w}."}],
             "rubric": f"rhymes with {w}"} for w in words]
    (tmp_path / "open.jsonl").write_text("".join(json.dumps(d) + "\n" for d in data))
    (tmp_path / "rewards.py").write_text(REWARDS)
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "critique_cot.j2").write_text(
        "Grade the answer against the rubric ({{ rubric }}).\nQuestion: {{ question }}\nAnswer: {{ response }}\n"
        "{% if reference is not none %}Reference: {{ reference }}{% endif %}\nEnd with Verdict: correct|incorrect")
    model = save_tiny_chat_model(tmp_path / "model", [f"U: Write a word that rhymes with {w}.\nA: {w}" for w in words])
    critique = "That word does not rhyme; pick one ending in the same sound.\nVerdict: incorrect"
    monkeypatch.setenv("OPENAI_API_KEY", "test-key-not-real")
    with CriticServer([{"content": critique}]) as server:
        cfg_path = tmp_path / "run.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "model": str(model), "train_file": str(tmp_path / "open.jsonl"), "eval_file": str(tmp_path / "open.jsonl"),
            "reference_column": None, "sft_steps": 0,
            "reward_funcs": [f"{tmp_path}/rewards.py:rhymes"], "verifier": f"{tmp_path}/rewards.py:rhymes",
            "critique_on": "wrong", "output_dir": str(tmp_path / "run"),
            "critic": {"backend": "openai", "kind": "cot", "model": "grader", "base_url": server.base_url,
                       "max_retries": 0, "template_dir": str(templates)}, **SMALL}))
        summary, prompts_seen, out = _run(cfg_path, monkeypatch)
        bodies = [json.dumps(b) for b in server.bodies]
    assert summary["steps"] == 2
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert all(r["answer"] is None for r in rollouts)  # no reference anywhere
    critiqued = [r for r in rollouts if "critique" in r]
    wrong = [r for r in rollouts if r["rewards"]["rhymes"] == 0.0]
    assert wrong and critiqued and all(r["critique"] == critique.strip() for r in critiqued)
    assert bodies and all("Reference:" not in b for b in bodies)  # the critic got no reference to quote
    assert any("Grade the answer against the rubric (rhymes with" in b for b in bodies)  # a column in the template
    calls = [json.loads(line) for line in (tmp_path / "rewards.log").read_text().splitlines()]
    assert calls and all(c["answer"] == [None] and c["rubric"][0].startswith("rhymes with") for c in calls)
    # refinements were sampled from prompts carrying the API critic's critique
    assert any("pick one ending in the same sound" in p for p in prompts_seen)
