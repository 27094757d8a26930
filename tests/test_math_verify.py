"""The `math` reward, verifier and task (math-verify: \\boxed{}, GSM8K ####, plain numbers, fractions), the extra's
error when it is missing, and the GSM8K recipe's data and reward code trained on the tiny model against a
loopback OpenAI-compatible critic."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import yaml

pytest.importorskip("math_verify", reason="the math extra: pip install 'critique-rl[math]'")

from critic_server import CriticServer  # noqa: E402

from critique_rl.config import TrainConfig, from_dict  # noqa: E402
from critique_rl.data import load_split  # noqa: E402
from critique_rl.errors import ConfigError, UserError  # noqa: E402
from critique_rl.rewards import Verifier, build_reward_funcs, reward_inputs, score_rewards  # noqa: E402
from critique_rl.rewards.math_verify import (  # noqa: E402
    extract_math_answer,
    final_answer_text,
    math_equal,
    require_math_verify,
)
from critique_rl.tasks import get_task, load_callable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "gsm8k_api_critic.yaml"

EQUAL = [
    ("so the answer is \\boxed{72}.", "72"),
    ("48 + 24 = 72\n#### 72", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"),  # GSM8K both sides
    ("She has 72 clips in all.", "72"),  # plain number: the last one
    ("The total is 1,000 dollars.", "1000"),  # thousands separator
    ("\\boxed{\\frac{1}{2}}", "0.5"),  # fraction = decimal
    ("\\boxed{0.5}", "\\frac{1}{2}"),  # a bare-LaTeX reference
    ("x = \\boxed{2\\sqrt{2}}", "\\sqrt{8}"),  # LaTeX equivalence
    ("#### 18\nI hope this helps! 5 stars", "18"),  # #### wins over a later number
    ("The answer is -4.", "-4"),
]
NOT_EQUAL = [
    ("so the answer is \\boxed{71}.", "72"),
    ("#### 27\nwait, 28", "28"),  # the stated final answer counts, not a later number
    ("\\boxed{\\frac{1}{3}}", "0.5"),
    ("I don't know.", "72"),
    ("seventy-two", "72"),
]


@pytest.mark.parametrize("completion, reference", EQUAL)
def test_math_equal(completion, reference):
    assert math_equal(completion, reference)


@pytest.mark.parametrize("completion, reference", NOT_EQUAL)
def test_math_not_equal(completion, reference):
    assert not math_equal(completion, reference)


def test_final_answer_text_and_extract():
    assert final_answer_text("step 1\n#### 1,234\n") == "1,234"
    assert final_answer_text("no hashes here 5") == "no hashes here 5"
    assert extract_math_answer("thus \\boxed{\\frac{3}{4}}") == "\\frac{3}{4}"  # as written
    assert extract_math_answer("#### 42") == "42"
    assert extract_math_answer("no number") is None


def test_math_reward_and_task():
    task = get_task("math")
    (reward,) = build_reward_funcs(["math"], task)
    rows = [{"prompt": "q1", "answer": "#### 72"}, {"prompt": "q2", "answer": "1/2"}, {"prompt": "q3", "answer": None}]
    R = score_rewards([reward], *reward_inputs(rows, ["\\boxed{72}", "0.25", "7"]))
    assert R[:2, 0].tolist() == [1.0, 0.0] and R[2, 0].isnan()  # None (no reference) -> NaN, not applicable
    assert task.verify("so \\boxed{0.5}", "\\frac{1}{2}") and task.extract("#### 9") == "9"
    with pytest.raises(UserError) as info:
        task.make_examples("eval", 4, 0)
    assert "eval_file" in str(info.value) and "\n" not in str(info.value)


def test_math_verifier_spec_and_worker_thread():
    verify = Verifier(load_callable("critique_rl.rewards.math_verify:verify"))
    assert verify("#### 56", "56") and not verify("#### 57", "56")
    out = {}
    t = threading.Thread(target=lambda: out.update(ok=math_equal("\\boxed{\\frac{1}{2}}", "0.5")))  # no signal timer
    t.start()
    t.join()
    assert out == {"ok": True}


def test_missing_extra_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify -> ImportError
    with pytest.raises(UserError) as info:
        require_math_verify("reward 'math'")
    assert "pip install" in str(info.value) and "critique-rl[math]" in str(info.value)
    with pytest.raises(UserError, match="math-verify"):
        build_reward_funcs(["math"], get_task("math"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    with pytest.raises(ConfigError) as info:
        from_dict(TrainConfig, {"task": "math", "train_file": "x.jsonl"})
    assert info.value.field == "task" and "critique-rl[math]" in str(info.value)


def test_gsm8k_sample_is_gsm8k_format_and_its_references_score_one():
    cfg = _recipe_config(ROOT / "unused")
    for split in ("train", "eval"):
        rows = load_split(cfg, split)
        assert len(rows) == {"train": 16, "eval": 8}[split]
        assert all(set(r) >= {"question", "answer"} and "\n#### " in r["answer"] for r in rows)
        (reward,) = build_reward_funcs(["math"], get_task("math"))
        right = score_rewards([reward], *reward_inputs(rows, [r["answer"] for r in rows]))[:, 0]
        wrong = score_rewards([reward], *reward_inputs(rows, ["#### 100000"] * len(rows)))[:, 0]
        assert right.tolist() == [1.0] * len(rows) and wrong.tolist() == [0.0] * len(rows)


def _recipe_config(out: Path, **changes) -> TrainConfig:
    """The recipe as written, but for what only a GPU box has: the tiny model instead of the Qwen directory,
    hf rollouts instead of vLLM, CPU, and small batches."""
    data = yaml.safe_load(RECIPE.read_text())
    data.pop("vllm")
    data["train_file"] = str(ROOT / data["train_file"])
    data["eval_file"] = str(ROOT / data["eval_file"])
    data.update(model="tiny", tiny_hidden_size=64, tiny_heads=2, tiny_layers=1, tiny_vocab_size=400,
                rollout_backend="hf", device="cpu", mixed_precision="no", output_dir=str(out), max_steps=2,
                max_new_tokens=8, num_generations=4, generation_batch_size=8, mini_batch_size=8, progress=False,
                eval_n=4, eval_batch_size=4,
                checkpoint_every=100)
    data.update(changes)
    return from_dict(TrainConfig, data)


def test_gsm8k_recipe_trains_on_tiny_model_with_loopback_critic(tmp_path, monkeypatch):
    critique = "The total is added wrongly: recount the clips sold in May.\nVerdict: incorrect"
    monkeypatch.setenv("OPENAI_API_KEY", "test-key-not-real")
    with CriticServer([{"content": critique}]) as server:
        cfg = _recipe_config(tmp_path / "run", critic={**yaml.safe_load(RECIPE.read_text())["critic"],
                                                        "base_url": server.base_url, "max_retries": 0})
        assert cfg.task == "math" and cfg.prompt_column == "question" and cfg.reward_funcs == ["math", "overlong"]
        from critique_rl.train.trainer import CritiqueGRPOTrainer

        summary = CritiqueGRPOTrainer(args=cfg, train_dataset=load_split(cfg, "train"),
                                      eval_dataset=load_split(cfg, "eval")).train()
        requests = server.requests
        bodies = [json.dumps(b) for b in server.bodies]
    assert summary["steps"] == 2 and summary["eval_n"] == 4
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss/total" in m]
    assert len(steps) == 2 and all("reward/math/mean" in m and "reward/overlong/mean" in m for m in steps)
    assert requests > 0  # the untrained policy is wrong: the API critic wrote critiques
    questions = [json.loads(line)["question"] for line in (ROOT / "examples/data/gsm8k_sample.jsonl").open()]
    assert any(q in body for body in bodies for q in questions)  # the critic saw GSM8K questions
    rollouts = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    critiqued = [r for r in rollouts if "critique" in r]
    assert critiqued and all(r["critique"] == critique.strip() for r in critiqued)
    assert all(r["rewards"]["math"] in (0.0, 1.0) for r in rollouts)
