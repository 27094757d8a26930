"""Reward functions (format, overlong, brier), scoring/validation, and the addition_conf task."""

import asyncio
import math
import re

import pytest
import torch

from critique_rl.errors import UserError
from critique_rl.rewards import (
    REWARD_FUNCS,
    brier_reward,
    build_reward_funcs,
    call_reward,
    overlong_penalty,
    parse_confidence,
    score_rewards,
)
from critique_rl.tasks import TASKS, Task, get_task
from critique_rl.tasks.confidence import CONFIDENCE_FORMAT, carries, sft_confidence

ADD = get_task("addition")
CONF = get_task("addition_conf")


def one(name: str, task: Task, completions: list[str], **cols) -> list:
    (fn,) = build_reward_funcs([name], task, {name: cols.pop("kw")} if "kw" in cols else None)
    return fn([""] * len(completions), completions, **cols)


def test_registry_has_builtins():
    assert {"correctness", "format", "overlong", "brier"} <= set(REWARD_FUNCS)
    names = [f.__name__ for f in build_reward_funcs(["correctness", "format", "overlong", "brier"], CONF)]
    assert names == ["correctness", "format", "overlong", "brier"]


# --- format -----------------------------------------------------------------------------------------------
def test_format_default_patterns():
    assert one("format", ADD, ["85", " 85 ", "85 <confidence>0.7</confidence>", "x85"]) == [1.0, 1.0, 0.0, 0.0]
    conf = ["85 <confidence>0.7</confidence>", "85<confidence>1</confidence>", "85", "85 <confidence>x</confidence>"]
    assert one("format", CONF, conf) == [1.0, 1.0, 0.0, 0.0]


def test_format_custom_pattern_and_errors():
    assert one("format", ADD, ["ans: 12", "12"], kw={"pattern": r"ans: \d+"}) == [1.0, 0.0]
    with pytest.raises(UserError, match="not a valid regex"):
        build_reward_funcs(["format"], ADD, {"format": {"pattern": "("}})
    with pytest.raises(UserError, match="unknown argument"):
        build_reward_funcs(["format"], ADD, {"format": {"regex": "x"}})
    with pytest.raises(UserError, match="not in 'reward_funcs'"):
        build_reward_funcs(["format"], ADD, {"overlong": {}})


def test_format_falls_back_to_extract():
    task = Task(name="custom", make_examples=ADD.make_examples, verify=ADD.verify, extract=ADD.extract)
    assert one("format", task, ["the answer is 4", "no idea"]) == [1.0, 0.0]


# --- overlong ---------------------------------------------------------------------------------------------
def test_overlong_penalty_hand_computed():
    vals = [overlong_penalty(n, max_length=10, cache_length=4) for n in (0, 6, 7, 8, 10, 12)]
    assert vals == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]


def test_overlong_reward_token_lengths_and_whitespace_fallback():
    kw = {"max_length": 10, "cache_length": 4}
    assert one("overlong", ADD, ["a"] * 4, completion_lengths=[6, 7, 9, 11], kw=kw) == [0.0, -0.25, -0.75, -1.0]
    assert one("overlong", ADD, ["1 2 3 4 5 6 7 8", "1"], kw=kw) == [-0.5, 0.0]
    # defaults: max_length = task.max_new_tokens (6), cache = round(0.2 * 6) = 1
    assert one("overlong", ADD, ["a"] * 3, completion_lengths=[5, 6, 7]) == [0.0, -1.0, -1.0]
    hard = {"max_length": 3, "cache_length": 0}
    assert one("overlong", ADD, ["a"] * 2, completion_lengths=[3, 4], kw=hard) == [0.0, -1.0]
    with pytest.raises(UserError, match="cache_length"):
        build_reward_funcs(["overlong"], ADD, {"overlong": {"max_length": 4, "cache_length": 5}})


# --- brier ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "q"),
    [
        ("85 <confidence>0.8</confidence>", 0.8),
        ("85<confidence> .25 </confidence>", 0.25),
        ("85 <CONFIDENCE>1</CONFIDENCE>", 1.0),
        ("85 <confidence>0</confidence>", 0.0),
        ("85", None),
        ("85 <confidence>0.8", None),
        ("85 <confidence>1.2</confidence>", None),
        ("85 <confidence>80%</confidence>", None),
        ("85 <confidence>nan</confidence>", None),
        ("85 <confidence>-0.1</confidence>", None),
        ("85 <confidence>0.5</confidence><confidence>0.9</confidence>", None),
    ],
)
def test_parse_confidence(text, q):
    assert parse_confidence(text) == q


def test_brier_hand_computed():
    comps = [
        "85 <confidence>0.8</confidence>",  # correct: 1 - 0.2^2
        "84 <confidence>0.8</confidence>",  # wrong: 0 - 0.8^2
        "85 <confidence>1.0</confidence>",  # correct, certain: 1
        "84 <confidence>0</confidence>",  # wrong, says so: 0
        "85",  # no tag: format penalty
        "85 <confidence>1.5</confidence>",  # out of range: format penalty
    ]
    got = one("brier", CONF, comps, answer=["85"] * 6)
    assert got == pytest.approx([0.96, -0.64, 1.0, 0.0, -1.0, -1.0])
    assert one("brier", CONF, ["85"], answer=["85"], kw={"format_penalty": -2.0}) == [-2.0]
    assert brier_reward(True, 0.5) == 0.75


# --- calling and scoring ----------------------------------------------------------------------------------
def test_score_rewards_shape_and_nan_for_none():
    def half(prompts, completions, **_):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    funcs = build_reward_funcs(["correctness", "brier"], CONF) + [half]
    comps = ["85 <confidence>0.8</confidence>", "84 <confidence>0.8</confidence>", "85"]
    out = score_rewards(funcs, ["p"] * 3, comps, {"answer": ["85", "85", None]})
    assert out.shape == (3, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out[:2, :2], torch.tensor([[1.0, 0.96], [0.0, -0.64]]))
    assert math.isnan(out[2, 0]) and math.isnan(out[2, 1]) and math.isnan(out[1, 2]) and out[0, 2] == 1.0
    assert score_rewards([], ["p"], ["c"]).shape == (1, 0)


def test_async_reward_functions_are_awaited():
    async def slow(prompts, completions, bonus, **_):
        await asyncio.sleep(0)
        return [float(len(c)) + b for c, b in zip(completions, bonus, strict=True)]

    assert call_reward(slow, ["p", "p"], ["ab", "c"], bonus=[1, 2]) == [3.0, 3.0]
    out = score_rewards([slow, slow], ["p"], ["abc"], {"bonus": [0.5]})
    assert out.tolist() == [[3.5, 3.5]]

    async def inside_a_loop():  # the sync entry point also works from code already running an event loop
        return call_reward(slow, ["p"], ["a"], bonus=[0])

    assert asyncio.run(inside_a_loop()) == [1.0]


def test_validation_names_the_function():
    def short(prompts, completions, **_):
        return [1.0]

    def wordy(prompts, completions, **_):
        return ["good"] * len(completions)

    def scalar(prompts, completions, **_):
        return 1.0

    def boom(prompts, completions, **_):
        raise RuntimeError("kaput")

    with pytest.raises(UserError, match=r"'short' returned 1 values for 2 completions"):
        score_rewards([short], ["p", "p"], ["a", "b"])
    with pytest.raises(UserError, match=r"'wordy' returned 'good'"):
        score_rewards([wordy], ["p"], ["a"])
    with pytest.raises(UserError, match=r"'scalar' must return a list"):
        score_rewards([scalar], ["p"], ["a"])
    with pytest.raises(RuntimeError, match="kaput") as info:
        score_rewards([boom], ["p"], ["a"])
    assert "'boom'" in "".join(getattr(info.value, "__notes__", []))


def test_user_reward_from_file_with_kwargs(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def length(prompts, completions, scale=1.0, **_):\n    return [scale * len(c) for c in completions]\n")
    (fn,) = build_reward_funcs([f"{path}:length"], ADD, {f"{path}:length": {"scale": 2.0}})
    assert fn.__name__ == "length"
    assert score_rewards([fn], ["p"], ["abc"]).tolist() == [[6.0]]
    with pytest.raises(UserError, match="unknown reward"):
        build_reward_funcs(["nope"], ADD)


# --- addition_conf task -------------------------------------------------------------------------------------
def test_addition_conf_task():
    assert TASKS["addition_conf"] is CONF
    assert CONF.make_examples("eval", 20, 3) == ADD.make_examples("eval", 20, 3)
    assert CONF.verify("85 <confidence>0.2</confidence>", "85") and not CONF.verify("84 <confidence>1</confidence>", "85")
    assert CONF.extract("85 <confidence>0.2</confidence>") == "85"
    rows = CONF.make_examples("train", 400, 0)
    targets = [CONF.sft_completion(r) for r in rows]
    assert all(re.fullmatch(CONFIDENCE_FORMAT, t) for t in targets)
    assert all(CONF.verify(t, r["answer"]) for t, r in zip(targets, rows, strict=True))
    qs = {parse_confidence(t) for t in targets}
    assert qs == {0.5, 0.6, 0.7, 0.8, 0.9, 1.0}  # a diffuse prior for brier to shape
    (brier,) = build_reward_funcs(["brier"], CONF)
    assert brier([""], [targets[0]], answer=[rows[0]["answer"]]) == [pytest.approx(1 - (1 - parse_confidence(targets[0])) ** 2)]


def test_addition_conf_confidence_is_seeded_per_problem():
    assert (carries(12, 13), carries(19, 13), carries(99, 99), carries(55, 50)) == (0, 1, 2, 1)
    assert sft_confidence({"a": 12, "b": 13}) == sft_confidence({"a": 12, "b": 13, "answer": "25"})  # per problem
    assert len({sft_confidence({"a": a, "b": 13}) for a in range(10, 100)}) == 6


def test_addition_conf_max_new_tokens_fits_the_tag():
    from critique_rl.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer(CONF.texts_for_tokenizer(n=1000), vocab_size=320)
    rows = CONF.make_examples("train", 300, 1) + [{"a": 99, "b": 99, "answer": "198", "prompt": "99+99="}]
    longest = max(len(tok(CONF.sft_completion(r), add_special_tokens=False)["input_ids"]) for r in rows)
    assert longest + 1 <= CONF.max_new_tokens  # + EOS
    # room for a two-decimal confidence the policy may produce after RL
    assert len(tok("198 <confidence>0.85</confidence>", add_special_tokens=False)["input_ids"]) + 1 <= CONF.max_new_tokens
