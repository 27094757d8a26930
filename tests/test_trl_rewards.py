"""TRL's reward-function calling convention: keyword arguments (``prompts=``, ``completions=``,
``completion_ids=``, every dataset column, ``trainer_state=``), conversational completions with a chat
template, None for "not applicable". The functions below are the signatures from TRL's documentation,
unchanged."""

from __future__ import annotations

import math
import re

import pytest
import torch

from critique_rl.errors import UserError
from critique_rl.models import build_tiny_model, build_tiny_tokenizer
from critique_rl.rewards import (
    TrainerState,
    Verifier,
    build_gates,
    build_reward_funcs,
    completion_text,
    evaluate_gates,
    reward_inputs,
    score_rewards,
)
from critique_rl.tasks import get_task

ADD = get_task("addition")


# --- TRL documentation examples, verbatim -----------------------------------------------------------------
def reward_func(completions, **kwargs):
    """Reward function that gives higher scores to longer completions."""
    return [float(len(completion)) for completion in completions]


def correct(completions, answer, **kwargs):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def ids_reward_func(prompts, completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def math_reward_func(prompts, completions, task, **kwargs):
    rewards = []
    for completion, t in zip(completions, task, strict=True):
        if t == "math":
            rewards.append(1.0 if completion.strip() == "4" else 0.0)
        else:
            rewards.append(None)  # not applicable to this sample
    return rewards


def step_reward(completions, trainer_state, **kwargs):
    return [float(trainer_state.global_step)] * len(completions)


ROWS = [
    {"prompt": "2+2=", "answer": "4", "task": "math"},
    {"prompt": "2+3=", "answer": "5", "task": "math"},
    {"prompt": "say hi", "answer": "hi", "task": "chat"},
]
TEXTS = ["4", " 6", "<think>x</think><answer>hi</answer>"]
IDS = [[7], [1, 8], [3, 3, 3, 3]]


def _inputs(conversational=False, step=0):
    return reward_inputs(ROWS, TEXTS, IDS, conversational=conversational,
                         trainer_state=TrainerState(global_step=step, max_steps=10))


def test_trl_signatures_score_unchanged():
    prompts, comps, cols = _inputs(step=3)
    R = score_rewards([reward_func, correct, ids_reward_func, math_reward_func, step_reward], prompts, comps, cols)
    assert R[:, 0].tolist() == [1.0, 2.0, 35.0]
    assert R[:, 1].tolist() == [1.0, 0.0, 0.0]  # "answer" is a column, passed once, by name
    assert R[:, 2].tolist() == [1.0, 2.0, 4.0]
    assert R[:2, 3].tolist() == [1.0, 0.0] and math.isnan(R[2, 3])  # None = not applicable -> NaN
    assert R[:, 4].tolist() == [3.0, 3.0, 3.0]


def test_keyword_call_receives_what_trl_passes():
    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        return [0.0] * len(kwargs["completions"])

    prompts, comps, cols = _inputs(conversational=True, step=2)
    score_rewards([spy], prompts, comps, cols)
    assert {"prompts", "completions", "completion_ids", "answer", "task", "trainer_state"} <= set(seen)
    assert "prompt" not in seen  # the prompt column arrives as `prompts`
    assert seen["prompts"][0] == [{"role": "user", "content": "2+2="}]
    assert seen["completions"][1] == [{"role": "assistant", "content": " 6"}]
    assert seen["completion_ids"] == IDS and seen["trainer_state"].global_step == 2


def test_conversational_completions_format_reward():
    prompts, comps, cols = _inputs(conversational=True)
    R = score_rewards([format_reward_func], prompts, comps, cols)
    assert R[:, 0].tolist() == [0.0, 0.0, 1.0]


def test_builtins_and_gates_read_conversational_completions():
    rows = [{"prompt": "12+13=", "answer": "25"}, {"prompt": "12+13=", "answer": "25"}]
    texts = ["25", "x"]
    funcs = build_reward_funcs(["correctness", "format", "overlong"], ADD, {"overlong": {"max_length": 1,
                                                                                       "cache_length": 0}})
    gates = build_gates(["has_answer", "format"], ADD)
    plain = score_rewards(funcs, *reward_inputs(rows, texts))
    chat = score_rewards(funcs, *reward_inputs(rows, texts, conversational=True))
    torch.testing.assert_close(chat, plain)
    assert plain[:, 0].tolist() == [1.0, 0.0]
    passed, _ = evaluate_gates(gates, *reward_inputs(rows, texts, conversational=True))
    assert passed.tolist() == [True, False]
    (brier,) = build_reward_funcs(["brier"], get_task("addition_conf"))
    out = score_rewards([brier], *reward_inputs(rows, ["25 <confidence>1</confidence>", "24"], conversational=True))
    assert out[:, 0].tolist() == [1.0, -1.0]


def test_trl_style_gate():
    def short(completions, **kwargs):
        return [len(completion_text(c)) <= 2 for c in completions]

    passed, rates = evaluate_gates([short], *_inputs(conversational=True))
    assert passed.tolist() == [True, True, False] and rates == {"short": pytest.approx(2 / 3)}


def test_completion_text():
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "abc"}]) == "abc"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                                             "text": "b"}]}]) == "ab"


def test_legacy_and_narrow_signatures_still_work():
    def positional(ps, cs, **cols):  # the old (prompts, completions, **columns) form under other names
        return [float(len(c)) + len(cols["answer"][i]) for i, c in enumerate(cs)]

    def narrow(completions, answer):  # no **kwargs: gets only what it names
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    R = score_rewards([positional, narrow], *_inputs())
    assert R[:, 0].tolist() == [2.0, 3.0, 37.0] and R[:, 1].tolist() == [1.0, 0.0, 0.0]


def test_missing_argument_names_the_function_and_the_columns():
    def needs_solution(completions, solution, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(UserError, match=r"'needs_solution' needs argument 'solution'.*'answer'"):
        score_rewards([needs_solution], *_inputs())


def test_verifier_both_forms():
    prompts, comps, cols = _inputs()
    trl = Verifier(correct)
    assert trl.batched and trl.check(prompts, comps, cols) == [True, False, False]
    assert trl("4", "4") and not trl("5", "4")
    chat_trl = Verifier(lambda completions, answer, **kw: [float(c[0]["content"] == a)
                                                           for c, a in zip(completions, answer, strict=True)])
    chat_trl.conversational = True  # per-sample calls with text wrap it as messages, like the batch calls
    assert chat_trl("4", "4") and not chat_trl("5", "4")
    per_sample = Verifier(ADD.verify)
    assert not per_sample.batched
    assert per_sample.check(prompts, comps, cols) == [True, False, False]
    chat = reward_inputs(ROWS, TEXTS, conversational=True)
    assert per_sample.check(*chat) == [True, False, False]  # the per-sample form gets the completion text
    scored = Verifier(lambda completions, **kw: [0.4, 0.6, None])  # correct iff > threshold (0.5)
    assert scored.check(prompts, comps, cols) == [False, True, False]
    assert Verifier(lambda completions, **kw: [0.4, 0.6, None], threshold=0.3).check(prompts, comps, cols)[0]


# --- inside the trainer -------------------------------------------------------------------------------------
CALLS: list[dict] = []


def recording_correct(completions, answer, **kwargs):
    """A TRL-style correctness reward that records what it was called with."""
    CALLS.append({"completions": completions, **kwargs})
    return [1.0 if completion_text(c).strip() == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def test_trainer_calls_trl_reward_and_verifier_with_a_chat_template(fast_config, tmp_path):
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    rows = ADD.make_examples("train", 64, 0)
    tok = build_tiny_tokenizer([r["prompt"] + r["answer"] for r in rows] + ["user assistant"], 320)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = build_tiny_model(tok, 64, 1, 2, seed=0)
    verifier = tmp_path / "ver.py"
    verifier.write_text("def correct(completions, answer, **kwargs):\n"
                        "    return [float(c[0]['content'].strip() == a) for c, a in zip(completions, answer)]\n")
    CALLS.clear()
    cfg = fast_config(sft_steps=0, max_steps=1, eval_n=4, eval_batch_size=4, critique_on="none",
                      use_chat_template="yes", verifier=f"{verifier}:correct")
    trainer = CritiqueGRPOTrainer(model=model, tokenizer=tok, train_dataset=rows,
                                  reward_funcs=[recording_correct, reward_func, "correctness"], args=cfg)
    trainer.train()
    # the built-in correctness reward judges by the configured verifier (messages, as the verifier expects)
    assert trainer.task.verify is trainer.verify
    assert trainer.task.verify("25", "25") and not trainer.task.verify("24", "25")
    assert CALLS, "the reward function was never called"
    call = CALLS[-1]
    assert isinstance(call["completions"][0], list) and call["completions"][0][0]["role"] == "assistant"
    assert isinstance(call["prompts"][0], list) and call["prompts"][0][0]["role"] == "user"
    assert len(call["completion_ids"]) == len(call["completions"]) and all(
        isinstance(i, int) for i in call["completion_ids"][0])
    assert isinstance(call["trainer_state"], TrainerState) and call["trainer_state"].max_steps == 1
    assert {"completion_lengths", "truncated"} <= set(call)
    assert trainer.verify.batched and trainer.verify.conversational
