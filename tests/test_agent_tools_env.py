"""The built-in tool-use env (price_lookup): typed tool calls, observations, rewards, malformed calls, the
held-out split, the demonstrator's systematic mistake, the rule critic, action masks of tool-call episodes
and a short training run through `critique-rl train`."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
import yaml

from critique_rl.agents import lookup_env as le
from critique_rl.agents.env import parse_tool_call
from critique_rl.agents.registry import get_env_spec
from critique_rl.agents.runner import EpisodeLimits, run_episodes
from critique_rl.agents.trajectory import TINY_CHAT_TEMPLATE, Trajectory, Turn, TurnRenderer
from critique_rl.agents.warmup import play_scripted
from critique_rl.models import build_tiny_tokenizer
from critique_rl.rollout.base import Completion, SamplingParams

TASK = {"key": "gold", "addend": 3, "prices": {**{k: 1 for k in le.ITEMS}, "gold": 8}}


def env_at(task=TASK, max_calls=4) -> le.PriceLookupEnv:
    env = le.PriceLookupEnv(max_calls=max_calls)
    env.reset(task)
    return env


# ---- env semantics ------------------------------------------------------------------------------------------

def test_first_observation_lists_the_typed_tools():
    obs = le.PriceLookupEnv().reset(TASK)
    assert obs == ('Tools: lookup(key: str) -> int; add(a: int, b: int) -> int; answer(n: int). '
                   'What is the price of "gold" plus 3?')


def test_tool_calls_observations_and_reward():
    env = env_at()
    r = env.step('lookup("gold")')
    assert (r.observation, r.reward, r.done) == ("gold = 8", 0.0, False)
    assert r.info == {"tool": "lookup", "ok": True, "args": ["gold"], "value": 8}
    r = env.step("  add(8, b=3) ")  # keywords and surrounding whitespace are fine
    assert (r.observation, r.done, r.info["args"]) == ("8 + 3 = 11", False, [8, 3])
    r = env.step("answer(11)")
    assert (r.observation, r.reward, r.done, r.info["success"]) == ("Correct!", 1.0, True, True)
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step("answer(11)")
    env = env_at()
    r = env.step("answer(12)")  # any answer ends the episode; a wrong one scores 0
    assert (r.observation, r.reward, r.done, r.info["success"]) == ("Wrong. The answer was 11.", 0.0, True, False)
    assert env_at().step("lookup('gold')").observation == "gold = 8"  # single quotes are a literal too


@pytest.mark.parametrize("action, error", [
    ("I think it is 11", "write exactly one tool call"),
    ("mul(8, 3)", "unknown tool 'mul'"),
    ("lookup(gold)", "arguments must be literals"),
    ("lookup(3)", "argument key=3 is not str"),
    ('lookup("silver")', "no item 'silver'"),
    ("add(8)", "missing a required argument"),
    ("answer('11')", "argument n='11' is not int"),
    ("add(__import__('os').getpid(), 1)", "arguments must be literals"),  # never evaluated
])
def test_malformed_calls_get_an_error_observation_and_cost_a_turn(action, error):
    env = env_at(max_calls=2)
    r = env.step(action)
    assert r.observation.startswith("Error: ") and error in r.observation, r.observation
    assert (r.reward, r.done, r.info["ok"]) == (0.0, False, False)
    r = env.step(action)  # the second malformed call uses the last turn
    assert r.done and r.info["success"] is False and r.reward == 0.0
    assert r.observation.endswith("Out of turns. The answer was 11.")


def test_bad_task_rows_and_settings_are_named():
    with pytest.raises(ValueError, match="need 'prices'"):
        le.PriceLookupEnv().reset({"key": "gold", "addend": 1})
    with pytest.raises(ValueError, match="not in its price table"):
        le.PriceLookupEnv().reset({"key": "silver", "addend": 1, "prices": {"gold": 1}})
    with pytest.raises(ValueError, match="max_calls"):
        le.PriceLookupEnv(max_calls=0)
    with pytest.raises(ValueError, match="split"):
        le.make_tasks("test", 3, 0)


def test_tasks_are_deterministic_per_seed_and_the_held_out_split_is_disjoint():
    assert le.make_tasks("train", 50, 3) == le.make_tasks("train", 50, 3)
    assert le.make_tasks("train", 50, 3) != le.make_tasks("train", 50, 4)
    train, held = le.make_tasks("train", 3000, 0), le.make_tasks("eval", 500, 0)
    combo = lambda t: (t["key"], t["prices"][t["key"]], t["addend"])  # noqa: E731
    assert not {combo(t) for t in train} & {combo(t) for t in held}
    assert all(le.is_heldout(*combo(t)) for t in held) and not any(le.is_heldout(*combo(t)) for t in train)
    for t in train + held:
        assert t["answer"] == str(t["prices"][t["key"]] + t["addend"]) and t["kind"] == le.KIND[t["key"]]
    # a fixed one-in-five share of all combinations, every item in both splits, prices redrawn per episode
    space = [(k, p, a) for k in le.ITEMS for p in range(1, 10) for a in range(1, 10)]
    assert 0.12 < sum(le.is_heldout(*c) for c in space) / len(space) < 0.28
    assert {t["key"] for t in held} == set(le.ITEMS) == {t["key"] for t in train}
    assert len({t["prices"]["gold"] for t in train}) == 9


def test_the_tool_is_needed_without_it_one_answer_in_nine():
    """A player that never looks up (answers the assumed price plus the addend) is right only when the hidden
    price happens to be that number: about 1 in 9."""
    tasks = le.make_tasks("eval", 900, 1)
    wins = 0
    for t in tasks:
        env = le.PriceLookupEnv()
        env.reset(t)
        wins += env.step(f"answer({le.ASSUMED_PRICE + t['addend']})").info["success"]
    assert 0.06 < wins / len(tasks) < 0.17


# ---- scripted players and the critic -------------------------------------------------------------------------

def scripted(policy, tasks, seed=0):
    spec = get_env_spec("price_lookup")
    rng = random.Random(seed)
    return [play_scripted(spec, {}, t, policy, rng, 4) for t in tasks]


def test_demonstrator_skips_the_lookup_for_metals_only_and_the_expert_never_does():
    spec = get_env_spec("price_lookup")
    trajs = scripted(spec.demonstrator, le.make_tasks("train", 2000, 0))
    skipped = Counter((t.task["kind"], t.turns[0].info["tool"] != "lookup") for t in trajs)
    metals = skipped["metal", True] + skipped["metal", False]
    assert abs(skipped["metal", True] / metals - le.DEMONSTRATOR_P_SKIP) < 0.04
    assert skipped["fruit", True] == 0 and skipped["fruit", False] > 800
    fruit = [t for t in trajs if t.task["kind"] == "fruit"]
    assert all(t.success and [x.info["tool"] for x in t.turns] == ["lookup", "add", "answer"] for t in fruit)
    skip = [t for t in trajs if t.turns[0].info["tool"] == "add"]
    assert all(t.turns[0].action_text == f"add(5, {t.task['addend']})" for t in skip)
    # skipping wins only when the hidden price is the assumed 5
    assert all(t.success == (t.task["prices"][t.task["key"]] == 5) for t in skip)
    expert = scripted(spec.expert, le.make_tasks("eval", 300, 0))
    assert all(t.success and t.num_turns == 3 for t in expert)


def traj_of(task, actions):
    env = le.PriceLookupEnv()
    obs = env.reset(task)
    traj = Trajectory(task=task)
    for a in actions:
        r = env.step(a)
        traj.turns.append(Turn(obs, [], [], [], a, True, r.reward, r.info))
        obs = r.observation
        if r.done:
            traj.done, traj.success = True, r.info["success"]
            break
    return traj


@pytest.mark.parametrize("actions, says", [
    (["add(5, 3)", "answer(8)"], 'Turn 1: add(5, 3) used a price for gold that was never looked up; call '
                                 'lookup("gold") first.'),
    (["answer(11)"], "Turn 1: answer(11) answered without looking up"),
    (['lookup("iron")', "add(1, 3)"], "Turn 1: lookup(\"iron\") looked up another item; the question asks about gold."),
    (['lookup("gold")', "add(3, 3)"], "Turn 2: add(3, 3) should add the price of gold, 8, and 3."),
    (['lookup("gold")', "add(8, 3)", "answer(12)"], "Turn 3: answer(12) is not the price of gold plus 3."),
    (["the price is 8"], "Turn 1: the price is 8 is not a valid tool call (write exactly one tool call"),
    (['lookup("gold")', 'lookup("gold")', 'lookup("gold")', 'lookup("gold")'], "There was no answer(...) call"),
    (['lookup("gold")', "add(3, 8)", "answer(11)"], "Every step used the tools correctly."),
])
def test_critic_names_the_first_mistake(actions, says):
    text = le.PriceCritic().critique_episodes([traj_of(TASK, actions)])[0].text
    assert text.startswith(says), text
    assert text.endswith(le.DIRECTIVE)


# ---- tool-call episodes as token ids: action spans and masks ------------------------------------------------

class ExpertEngine:
    """A generator that plays the expert from the decoded context (so the test does not depend on training)."""

    def __init__(self, tok):
        self.tok = tok

    def generate_ids(self, prompt_ids, params: SamplingParams):
        out = []
        for ids in prompt_ids:
            users = re.findall(r"U: (.*)\n", self.tok.decode(ids, skip_special_tokens=False))
            player = le.ScriptedPlayer(0.0)
            action = player(users[0], random.Random(0))
            if len(users) > 1:
                action = player(users[-1], random.Random(0))
            ids_ = self.tok(action, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            out.append([Completion(ids_, [-0.5] * len(ids_), action, True)])
        return out

    def generate(self, prompts, params):  # pragma: no cover - generate_ids is used
        raise AssertionError("the runner should send token ids")

    def sync_weights(self):
        pass


def test_tool_call_episodes_have_action_spans_and_masks_on_the_calls_only():
    spec = get_env_spec("price_lookup")
    tasks = le.make_tasks("eval", 6, 0)
    texts = [f'U: {le.first_observation(t["key"], t["addend"])}\nA: lookup("{t["key"]}")<|eos|>\n' for t in tasks]
    tok = build_tiny_tokenizer(texts * 5 + ["gold = 8\n8 + 3 = 11\nadd(8, 3) answer(11) Correct!"] * 5, 300)
    tok.chat_template = TINY_CHAT_TEMPLATE
    renderer = TurnRenderer(tok, use_chat=True)
    trajs = run_episodes(ExpertEngine(tok), renderer, lambda: spec.make_env(), tasks, n=2,
                         limits=EpisodeLimits(max_turns=4, max_new_tokens=12))
    for t in trajs:
        assert t.success and [x.info["tool"] for x in t.turns] == ["lookup", "add", "answer"]
        comp, mask = t.completion_ids(), t.action_mask()
        assert len(comp) == len(mask) == len(t.sampling_logprobs())
        spans = t.action_spans()
        assert [tok.decode(comp[a:b], skip_special_tokens=True) for a, b in spans] == [x.action_text for x in t.turns]
        assert all(parse_tool_call(x.action_text, le.PriceLookupEnv().tools) for x in t.turns)
        inside = {i for a, b in spans for i in range(a, b)}
        assert [i in inside for i in range(len(comp))] == mask  # True exactly on the tool-call tokens
        between = tok.decode([c for c, m in zip(comp, mask, strict=True) if not m])
        assert f'{t.task["key"]} = {t.task["prices"][t.task["key"]]}' in between  # the tool results, masked out
        assert "lookup(" not in between and "add(" not in between


# ---- a short training run through the CLI --------------------------------------------------------------------

def test_train_cli_on_price_lookup_logs_tool_calls(tmp_path):
    from typer.testing import CliRunner

    from critique_rl.cli import app

    cfg = yaml.safe_load(open("examples/agent_tools_cpu.yaml"))
    cfg.update(output_dir=str(tmp_path / "run"), sft_examples=100, sft_steps=25, sft_batch_size=16, max_steps=2,
               num_generations=2, generation_batch_size=4, mini_batch_size=4, eval_n=4, eval_batch_size=4,
               eval_every=0, checkpoint_every=100, log_rollouts=8, progress=False, tiny_layers=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["env"] == "price_lookup" and summary["eval_n"] == 4
    logged = [json.loads(x) for x in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert {r["step"] for r in logged} == {1, 2}
    turns = [t for r in logged for t in r["turns"]]
    assert all(t["observation"] and t["action_tokens"] > 0 for t in turns)
    assert all(r["turns"][0]["observation"].startswith("Tools: lookup(key: str) -> int;") for r in logged)
    # the logged actions are tool calls, and each reply is that tool's result or an error naming the problem
    tools = le.PriceLookupEnv().tools
    for r in logged:
        replies = [t["observation"] for t in r["turns"][1:]] + [r["final_observation"]]
        for t, reply in zip(r["turns"], replies, strict=True):
            try:
                call = parse_tool_call(t["action"], tools)
            except Exception:
                call = None
            if call is None or reply.startswith("Error:"):
                assert reply.startswith("Error:"), (t["action"], reply)
            elif call[0].name == "lookup":
                assert re.fullmatch(r"\w+ = \d+", reply.split(". Out of turns")[0]), reply
            elif call[0].name == "add":
                assert re.fullmatch(r"-?\d+ \+ -?\d+ = -?\d+", reply.split(". Out of turns")[0]), reply
    # the trained policy's own episodes: every action span of the token-level trajectory decodes to the action
    # text the env parsed, and the action mask is True exactly on those spans
    from critique_rl.models import load_policy
    from critique_rl.rollout.hf import HFGenerator

    model, tok = load_policy(tmp_path / "run" / "final", device="cpu")
    assert cfg["use_chat_template"] == "no"  # plain-text turns, as in the run
    trajs = run_episodes(HFGenerator(model, tok), TurnRenderer(tok, use_chat=False), le.PriceLookupEnv,
                         le.make_tasks("eval", 3, 0), n=1, limits=EpisodeLimits(max_turns=4, max_new_tokens=10))
    assert sum(t.num_turns for t in trajs) >= 3
    for t in trajs:
        comp, mask, spans = t.completion_ids(), t.action_mask(), t.action_spans()
        assert [tok.decode(comp[a:b], skip_special_tokens=True) for a, b in spans] == [x.action_text for x in t.turns]
        inside = {i for a, b in spans for i in range(a, b)}
        assert [i in inside for i in range(len(comp))] == mask and sum(mask) == sum(len(x.action_ids) for x in t.turns)


def test_plain_text_warm_up_contexts_equal_the_runners_token_ids():
    """With ``use_chat_template: "no"`` (the example config), every warm-up prompt, tokenised as one string,
    is token for token the context the runner builds from separately encoded turns."""
    from critique_rl.agents.warmup import sft_pairs

    spec = get_env_spec("price_lookup")
    tasks = le.make_tasks("train", 60, 0)
    probe = build_tiny_tokenizer(["0123456789"], 300)
    pairs = sft_pairs(spec, TurnRenderer(probe, False), tasks, {}, 4, 0.0, 0)
    tok = build_tiny_tokenizer([p + c for p, c in pairs], 400)
    r = TurnRenderer(tok, use_chat=False)
    warm, rng = iter(pairs), random.Random(0 + 11)  # replay sft_pairs' draws (seed 0, no context episodes)
    for task in tasks:
        rng.random()
        traj = play_scripted(spec, {}, task, spec.demonstrator, rng, 4)
        ids = r.first(traj.turns[0].observation)
        for i, turn in enumerate(traj.turns):
            if i:
                ids = ids + r.observation(turn.observation, True)
            prompt, action = next(warm)
            assert tok(prompt, add_special_tokens=False)["input_ids"] == ids and action == turn.action_text
            ids = ids + tok(turn.action_text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@pytest.mark.slow
def test_example_config_learns_to_look_up_on_held_out_episodes(tmp_path):
    """The demo as shipped (seed 0): held-out greedy success rises by >= 10 points over 200 episodes, the
    systematic mistake (skipping the lookup for metals) is gone, and the trained policy's calls are tool calls.
    About 3.5 minutes of one idle core."""
    from critique_rl.agents.source import EpisodeTrainer
    from critique_rl.config import load_config

    cfg = load_config("examples/agent_tools_cpu.yaml", output_dir=str(tmp_path / "run"), seed=0, progress=False)
    summary = EpisodeTrainer(cfg).train()
    assert summary["eval_n"] >= 200
    assert summary["eval_accuracy_after_rl"] - summary["eval_accuracy_before_rl"] >= 0.10, summary
    logged = [json.loads(x) for x in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    last = [r for r in logged if r["step"] == summary["steps"]]
    first_calls = [r["turns"][0]["action"] for r in last]
    assert sum(a.startswith("lookup(") for a in first_calls) >= 0.8 * len(first_calls), first_calls
