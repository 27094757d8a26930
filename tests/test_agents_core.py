"""Env protocol, typed tools, the Gymnasium adapter, token-in/token-out trajectories and the batched runner."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from critique_rl.agents.env import (
    GymnasiumTextEnv,
    StepResult,
    Tool,
    ToolError,
    as_step_result,
    parse_tool_call,
)
from critique_rl.agents.runner import EpisodeLimits, run_episodes
from critique_rl.agents.trajectory import TINY_CHAT_TEMPLATE, TurnRenderer
from critique_rl.models import build_tiny_model, build_tiny_tokenizer
from critique_rl.rollout.base import Completion, SamplingParams
from critique_rl.rollout.hf import HFGenerator


@pytest.fixture(scope="module")
def tok():
    texts = ["U: Guess my number from 1 to 16.\nA: 4<|eos|>\nU: Higher. It is from 5 to 16.\nA: 8<|eos|>\n"] * 30
    texts += ["Higher Lower Correct range middle number guess", "S: Guess the middle of the range."] * 10
    t = build_tiny_tokenizer(texts, vocab_size=300)
    t.chat_template = TINY_CHAT_TEMPLATE
    return t


# ---- env protocol and tools ---------------------------------------------------------------------------------

def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_tool_calls_are_typed_and_literal_only():
    tool = Tool(add)
    assert tool.spec() == "add(a: int, b: int) -> int: Add two integers."
    t, args = parse_tool_call("add(2, 3)", {"add": tool})
    assert t.call(args) == 5
    assert tool.call("b=4, a=1") == 5
    with pytest.raises(ToolError, match="is not int"):
        tool.call("2, 'x'")
    with pytest.raises(ToolError, match="literals"):
        tool.call("__import__('os').getcwd(), 1")  # never evaluated
    with pytest.raises(ToolError, match="unknown tool 'mul'"):
        parse_tool_call("mul(1, 2)", {"add": tool})
    assert parse_tool_call("the answer is 5", {"add": tool}) is None


def test_step_results_normalise():
    assert as_step_result(("o", 1, True, {"success": True})) == StepResult("o", 1.0, True, {"success": True})
    five = as_step_result(("o", 0.0, False, True, {}))
    assert five.done and five.info["truncated"]
    with pytest.raises(TypeError, match="StepResult"):
        as_step_result(("o", 1.0))


class FakeGym:
    """A Gymnasium-API text env from 'another framework': count to the target."""

    def reset(self, seed=None, options=None):
        self.target = options["task"]["target"]
        self.seed = seed
        return f"count to {self.target}", {}

    def step(self, action):
        n = int(action)
        terminated = n == self.target
        return ("yes" if terminated else "no"), float(terminated), terminated, False, {}


def test_gymnasium_adapter():
    env = GymnasiumTextEnv(FakeGym())
    assert env.reset({"target": 3, "seed": 7}) == "count to 3" and env.env.seed == 7
    r = env.step("2")
    assert (r.done, r.info["truncated"]) == (False, False)
    r = env.step("3")
    assert r.done and r.info["success"] and r.reward == 1.0


# ---- a scripted engine ------------------------------------------------------------------------------------

class ScriptGen:
    """A Generator that returns scripted token ids and records the contexts it was given."""

    def __init__(self, tok, script):
        self.tok, self.script, self.seen = tok, script, []

    def sync_weights(self):
        return None

    def generate_ids(self, prompt_ids, params: SamplingParams):
        self.seen.append([list(p) for p in prompt_ids])
        out = []
        for p in prompt_ids:
            ids = list(self.script(p, len(self.seen) - 1))[: params.max_new_tokens]
            fin = bool(ids) and ids[-1] == self.tok.eos_token_id
            out.append([Completion(ids, [-0.5] * len(ids), self.tok.decode(ids[:-1] if fin else ids), fin)])
        return out

    def generate(self, prompts, params):  # pragma: no cover - generate_ids is used
        raise AssertionError("the runner must pass token ids")


class Higher:
    """Never done: always says higher (max-turn tests)."""

    def reset(self, task):
        return "Guess my number from 1 to 16."

    def step(self, action):
        return "Higher. It is from 5 to 16.", 0.0, False, {}


def char_ids(tok, text):
    """A non-canonical tokenisation: one token per character (BPE would merge them)."""
    return [tok.convert_tokens_to_ids(c) for c in text]


@pytest.mark.parametrize("use_chat", [True, False])
def test_token_alignment_over_three_turns(tok, use_chat):
    eos = tok.eos_token_id
    script = lambda p, t: char_ids(tok, "Higher"[: t + 1]) + [eos]  # noqa: E731 - non-canonical on purpose
    gen = ScriptGen(tok, script)
    r = TurnRenderer(tok, use_chat)
    [traj] = run_episodes(gen, r, Higher, [{"prompt": "g"}], limits=EpisodeLimits(max_turns=4, max_new_tokens=8))
    assert traj.num_turns == 4 and traj.stop_reason == "max_turns" and not traj.success
    for t in range(3):  # each context = previous context + exactly the generated ids + the observation ids
        before, after = gen.seen[t][0], gen.seen[t + 1][0]
        assert after[: len(before)] == before
        assert after[len(before): len(before) + len(traj.turns[t].action_ids)] == traj.turns[t].action_ids
    assert traj.turns[3].action_ids == char_ids(tok, "High") + [eos]
    # the exact ids survive; re-tokenising the decoded text would not give them back
    assert tok(traj.turns[3].action_text, add_special_tokens=False)["input_ids"] != traj.turns[3].action_ids[:-1]
    # the last context the engine saw is the chat-template rendering of the history
    msgs = traj.messages()[:-1]  # without the final observation (never shown to the policy)
    msgs = msgs[:-1]  # the 4th action was generated from this context
    assert tok.decode(gen.seen[3][0]) == r.render_messages(msgs, add_generation_prompt=True)
    assert traj.token_ids() == gen.seen[3][0] + traj.turns[3].action_ids


def test_action_mask_and_completion(tok):
    eos = tok.eos_token_id
    gen = ScriptGen(tok, lambda p, t: char_ids(tok, str(t + 1)) + [eos])
    [traj] = run_episodes(gen, TurnRenderer(tok, True), Higher, [{"prompt": "g"}],
                          limits=EpisodeLimits(max_turns=3))
    ids, mask, lp = traj.completion_ids(), traj.action_mask(), traj.sampling_logprobs()
    assert len(ids) == len(mask) == len(lp)
    assert sum(mask) == sum(len(t.action_ids) for t in traj.turns) == 6
    assert [ids[i] for i in range(len(ids)) if mask[i]] == [x for t in traj.turns for x in t.action_ids]
    obs_tokens = [ids[i] for i in range(len(ids)) if not mask[i]]
    assert obs_tokens == traj.turns[1].obs_ids + traj.turns[2].obs_ids and obs_tokens
    assert all(lp[i] == (-0.5 if mask[i] else 0.0) for i in range(len(ids)))
    assert traj.action_spans()[0] == (0, 2)
    c = traj.to_completion()
    assert c.token_ids == ids and c.logprobs == lp


def test_per_turn_token_limit_cuts_action_and_closes_turn(tok):
    gen = ScriptGen(tok, lambda p, t: char_ids(tok, "Higher"))  # never emits EOS
    r = TurnRenderer(tok, True)
    [traj] = run_episodes(gen, r, Higher, [{"prompt": "g"}], limits=EpisodeLimits(max_turns=2, max_new_tokens=3))
    assert [len(t.action_ids) for t in traj.turns] == [3, 3]
    assert not any(t.finished for t in traj.turns)
    assert r.observation_text("x", action_finished=False).startswith("<|eos|>")  # the template closes the turn
    msgs = traj.messages()[:3]
    assert tok.decode(gen.seen[1][0]) == r.render_messages(msgs, add_generation_prompt=True)


def test_episode_token_limit(tok):
    eos = tok.eos_token_id
    gen = ScriptGen(tok, lambda p, t: char_ids(tok, "12") + [eos])
    first = len(TurnRenderer(tok, True).first("Guess my number from 1 to 16."))
    limit = first + 20
    [traj] = run_episodes(gen, TurnRenderer(tok, True), Higher, [{"prompt": "g"}],
                          limits=EpisodeLimits(max_turns=10, max_new_tokens=4, max_episode_tokens=limit))
    assert traj.stop_reason == "max_tokens" and 1 <= traj.num_turns < 10
    assert all(len(seen[0]) + 4 <= limit for seen in gen.seen)


class Scored:
    """Done after two steps; reward 1 but the env says it failed (success is the env's call)."""

    def __init__(self):
        self.k = 0

    def reset(self, task):
        return "go"

    def step(self, action):
        self.k += 1
        return StepResult("end" if self.k == 2 else "more", 0.5, self.k == 2, {"success": False} if self.k == 2 else {})


def test_rewards_per_turn_and_success_from_env(tok):
    gen = ScriptGen(tok, lambda p, t: [tok.eos_token_id])
    trajs = run_episodes(gen, TurnRenderer(tok, True), Scored, [{"prompt": "a"}, {"prompt": "b"}], n=3)
    assert len(trajs) == 6 and [t.task["prompt"] for t in trajs] == ["a"] * 3 + ["b"] * 3
    for t in trajs:
        assert [x.reward for x in t.turns] == [0.5, 0.5] and t.total_reward == 1.0
        assert t.done and not t.success and t.final_observation == "end"
    assert len(gen.seen[0]) == 6  # one batched engine call per turn for all episodes


class SlowAsync:
    in_flight = 0
    most = 0

    async def reset(self, task):
        return "start"

    async def step(self, action):
        SlowAsync.in_flight += 1
        SlowAsync.most = max(SlowAsync.most, SlowAsync.in_flight)
        await asyncio.sleep(0.2)
        SlowAsync.in_flight -= 1
        return StepResult("done", 1.0, True, {"success": True})


class Broken:
    def reset(self, task):
        return "start"

    def step(self, action):
        raise RuntimeError("boom")


def test_async_envs_step_concurrently_and_errors_end_one_episode(tok):
    gen = ScriptGen(tok, lambda p, t: [tok.eos_token_id])
    t0 = time.perf_counter()
    trajs = run_episodes(gen, TurnRenderer(tok, True), SlowAsync, [{"prompt": "x"}], n=8)
    assert time.perf_counter() - t0 < 1.0 and SlowAsync.most == 8  # 8 x 0.2 s sequentially
    assert all(t.success for t in trajs)
    [bad] = run_episodes(gen, TurnRenderer(tok, True), Broken, [{"prompt": "x"}])
    assert bad.stop_reason == "error" and "boom" in bad.error and not bad.success


def test_hf_generate_ids_matches_text_path(tok):
    torch.manual_seed(0)
    model = build_tiny_model(tok, hidden_size=64, layers=1, heads=2).eval()
    gen = HFGenerator(model, tok)
    prompts = ["U: Guess my number from 1 to 16.\nA: ", "U: Higher.\nA: "]
    params = SamplingParams(n=2, max_new_tokens=5, greedy=True)
    by_text = gen.generate(prompts, params)
    by_ids = gen.generate_ids([tok(p, add_special_tokens=False)["input_ids"] for p in prompts], params)
    assert [[c.token_ids for c in g] for g in by_ids] == [[c.token_ids for c in g] for g in by_text]
    assert len(by_ids) == 2 and all(len(g) == 2 for g in by_ids)


class TextOnlyGen:
    """An engine with only generate(prompts): the runner passes decoded contexts."""

    def __init__(self, tok):
        self.tok, self.prompts = tok, []

    def sync_weights(self):
        return None

    def generate(self, prompts, params):
        self.prompts.append(list(prompts))
        ids = self.tok("7", add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return [[Completion(ids, [-1.0] * len(ids), "7", True)] for _ in prompts]


def test_text_only_engine_gets_the_rendered_context(tok):
    gen = TextOnlyGen(tok)
    r = TurnRenderer(tok, True)
    [traj] = run_episodes(gen, r, Higher, [{"prompt": "g"}], limits=EpisodeLimits(max_turns=2))
    assert gen.prompts[1][0] == r.render_messages(traj.messages()[:3], add_generation_prompt=True)
    assert traj.turns[1].action_ids == traj.turns[0].action_ids and traj.turns[1].action_text == "7"
