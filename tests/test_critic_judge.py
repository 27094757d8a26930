"""The critic as judge (reward `critic`), pointwise and group-relative, through the trainer with a loopback
OpenAI-compatible server; the open-ended task `digit_sum` whose judge is a rule; `critique-rl critic distill`
end to end from a cache a run filled."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from critic_server import CriticServer, addition_responder
from typer.testing import CliRunner

from critique_rl.config import CriticConfig
from critique_rl.critics import OpenAICritic
from critique_rl.errors import UserError
from critique_rl.rewards.critic_judge import CriticJudge, parse_group_scores, parse_score
from critique_rl.tasks import get_task
from critique_rl.tasks.open_ended import violations

_Q = re.compile(r"digits (\d+) sum (\d+) first (\d)")


def _spec(question: str) -> str:
    m = _Q.search(question)
    assert m, question
    return f"len={m.group(1)} sum={m.group(2)} first={m.group(3)}"


def rule_judge(body: dict) -> dict:
    """A critic model stand-in: judges a digit_sum response from the question alone (no reference)."""
    prompt = body["messages"][-1]["content"]
    question = prompt.split("Question:\n", 1)[1].split("\n", 1)[0]
    response = prompt.split("Response:\n", 1)[1].split("\n\nCritique:", 1)[0].strip()
    broken = violations(response, _spec(question))
    text = ("All constraints hold.\nVerdict: correct" if not broken else
            "Problem: " + "; ".join(broken) + ".\nVerdict: incorrect")
    return {"content": text, "usage": (50, 10)}


def group_rule_judge(body: dict) -> dict:
    prompt = body["messages"][-1]["content"]
    question = prompt.split("Question:\n", 1)[1].split("\n", 1)[0]
    lines = []
    for k, resp in re.findall(r"Response (\d+):\n(.*?)\n", prompt):
        lines.append(f"Response {k}: checked. Score: {0 if violations(resp, _spec(question)) else 10}")
    return {"content": "\n".join(lines)}


def test_parse_score_and_group_scores_by_hand():
    assert parse_score("good\nScore: 7/10", 10) == 0.7
    assert parse_score("Score: 3", 4) == 0.75 and parse_score("Score: 12", 10) == 1.0
    assert parse_score("no number", 10) is None
    assert parse_group_scores("Response 2: meh Score: 5\nResponse 1: ok Score: 10\nResponse 9: x Score: 1",
                              3, 10) == [1.0, 0.5, None]


def test_digit_sum_task_has_many_valid_answers_and_a_rule_judge():
    t = get_task("digit_sum")
    rows = t.make_examples("train", 200, 0)
    held = t.make_examples("eval", 50, 0)
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in held}
    assert all(t.verify(r["example"], r["answer"]) for r in rows)
    same = [r for r in rows if r["prompt"] == rows[0]["prompt"]]
    spec = rows[0]["answer"]
    assert len({r["example"] for r in rows if r["answer"] == spec}) >= 1 and same
    mistake = t.mistake(rows[0])
    assert mistake is not None and not t.verify(mistake, spec)
    assert any("sum to" in v for v in violations(mistake, spec))


def test_judge_needs_a_model_critic():
    judge = CriticJudge(get_task("digit_sum"))
    with pytest.raises(UserError, match="critic"):
        judge(prompts=["digits 3 sum 9 first 1:"], completions=["180"])


def test_pointwise_judge_dedups_and_scores(tmp_path: Path):
    q = "digits 3 sum 9 first 1:"
    with CriticServer(responder=rule_judge) as srv:
        critic = OpenAICritic("judge", base_url=srv.base_url, reference="hidden", cache_path=tmp_path / "c.sqlite")
        judge = CriticJudge(get_task("digit_sum"), critic=critic)
        rewards = judge(prompts=[q] * 4, completions=["180", "180", "999", "117"], answer=["len=3 sum=9 first=1"] * 4)
        assert rewards == [1.0, 1.0, 0.0, 1.0]
        assert srv.requests == 3  # the identical pair is judged once
        again = judge(prompts=[q], completions=["999"], answer=["len=3 sum=9 first=1"])
        assert again == [0.0] and srv.requests == 3  # the disk cache answers repeats
        score = CriticJudge(get_task("digit_sum"), critic=critic, mode="score")
    with CriticServer([{"content": "Decent.\nScore: 7/10\nVerdict: correct"}]) as srv2:
        critic2 = OpenAICritic("judge", base_url=srv2.base_url)
        assert CriticJudge(get_task("digit_sum"), critic=critic2, mode="score")(
            prompts=[q], completions=["180"]) == [0.7]
    assert score.mode == "score"


def test_group_judge_scores_in_one_call_in_shuffled_orders():
    q1, q2 = "digits 3 sum 9 first 1:", "digits 3 sum 12 first 3:"
    texts = ["180", "999", "117", "100"] * 5
    prompts = ([q1] * 4 + [q2] * 4) * 2 + [q1] * 4
    with CriticServer(responder=group_rule_judge) as srv:
        critic = OpenAICritic("judge", base_url=srv.base_url)
        judge = CriticJudge(get_task("digit_sum"), critic=critic, group=True, seed=3)
        rewards = judge(prompts=prompts, completions=texts)
        assert srv.requests == 5  # one call per group of 4
        # the group reply's lines are the critiques of the critique stage: no further call
        from critique_rl.critics.base import CritiqueRequest

        crits = critic.critique([CritiqueRequest(question=q1, response="999", verdict=False),
                                 CritiqueRequest(question=q1, response="180", verdict=True)])
        assert srv.requests == 5 and [c.verdict for c in crits] == [False, True]
        assert crits[0].text.startswith("checked") and not crits[0].fallback
    expected = [0.0 if violations(t, _spec(q)) else 1.0 for q, t in zip(prompts, texts, strict=True)]
    assert rewards == expected  # scores mapped back to the right responses whatever the order shown
    assert len({tuple(o) for o in judge.positions}) > 1 and any(o != sorted(o) for o in judge.positions)


def test_group_judge_position_bias_is_spread_by_shuffling():
    """A judge that always prefers the first response it is shown: with shuffled orders the preferred response
    is spread over the group (no index always wins); with two orders each score is the mean of both."""
    biased = {"content": "Response 1: best Score: 10\nResponse 2: x Score: 0\nResponse 3: x Score: 0\n"
                         "Response 4: x Score: 0"}
    with CriticServer([biased]) as srv:
        critic = OpenAICritic("judge", base_url=srv.base_url)
        judge = CriticJudge(get_task("digit_sum"), critic=critic, group=True, seed=0)
        prompts = [f"digits 3 sum 9 first {g % 9 + 1}:" for g in range(20) for _ in range(4)]
        rewards = judge(prompts=prompts, completions=["180"] * 80)
        winners = {i % 4 for i, r in enumerate(rewards) if r == 1.0}
        assert len(winners) >= 3
        two = CriticJudge(get_task("digit_sum"), critic=critic, group=True, orders=2, seed=0)
        r2 = two(prompts=prompts[:4], completions=["180"] * 4)
        assert srv.requests == 20 + 2 and sorted(r2) in ([0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 1.0])


def test_reference_free_run_trains_from_the_judge_with_one_call_per_response(fast_config):
    """digit_sum with the judge as reward and verifier, critiques for every rejected response: the critique stage
    reuses the judge's critiques, so each distinct (question, response) reaches the server exactly once."""
    from critique_rl.train.metrics import read_jsonl
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    with CriticServer(responder=rule_judge) as srv:
        cfg = fast_config(task="digit_sum", max_steps=2, reward_funcs=["critic"], sft_mistake_rate=0.5, eval_n=8,
                          verifier="critique_rl.rewards.critic_judge:judge_verdict", sft_refine_fraction=0.3,
                          critic=CriticConfig(backend="openai", model="judge", base_url=srv.base_url, kind="cot",
                                              reference="hidden", max_regenerations=0))
        trainer = CritiqueGRPOTrainer(args=cfg)
        trainer.train()
        judge = trainer.reward_funcs[0]
        assert isinstance(judge, CriticJudge) and judge.critic is trainer.critic
        bodies = [json.dumps(b["messages"], sort_keys=True) for b in srv.bodies]
        assert len(bodies) == len(set(bodies))  # no prompt was sent twice
        assert srv.requests == len(judge.scores)  # one call per distinct judged response
        for prompt in bodies:
            assert "len=" not in prompt  # the spec column (answer) never reaches the hidden-reference critic
    rows = [r for r in read_jsonl(f"{cfg.output_dir}/metrics.jsonl") if "loss/total" in r]
    critiqued = sum(r["critique/critiqued"] for r in rows)
    assert critiqued > 0  # the judge rejected some responses and they were refined with its critiques
    assert rows[-1]["critic/cache_hits"] >= critiqued
    assert rows[-1]["critic/prompt_tokens"] == 50 * srv.requests  # every paid call counted once
    assert all(r["reward/critic/mean"] is not None for r in rows)


# an API critic stand-in that checks two-digit additions (it sees the reference, as API critics often do)
_addition_critic = addition_responder("The sum is right.\nVerdict: correct",
                                      "Check the carry: {a}+{b} is {sum}.\nVerdict: incorrect")


def test_distill_a_run_cache_into_a_local_critic(fast_config, tmp_path: Path):
    from critique_rl.cli import app
    from critique_rl.critics.cache import CritiqueCache
    from critique_rl.critics.hf import HFCritic
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    with CriticServer(responder=_addition_critic) as srv:
        cfg = fast_config(max_steps=2, critique_on="all", eval_n=8,
                          critic=CriticConfig(backend="openai", model="api-critic", base_url=srv.base_url, kind="cot"))
        CritiqueGRPOTrainer(args=cfg).train()
    cache = Path(cfg.output_dir) / "critic_cache.sqlite"
    records = CritiqueCache(cache).records()
    assert records and all(r["question"] and r["response"] is not None for r in records)
    out = tmp_path / "local_critic"
    result = CliRunner().invoke(app, ["critic", "distill", "--cache", str(cache), "--out", str(out), "--steps", "10",
                                      "--held-out", "0.25", "--max-new-tokens", "12", "--price-input", "0.15", "--price-output", "0.6",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    cost = report["api_cost_replaced"]
    assert cost["replies"] == len(records) and cost["prompt_tokens"] == 60 * len(records)
    assert cost["completion_tokens"] == 12 * len(records)
    assert cost["usd"] == pytest.approx(len(records) * (60 * 0.15 + 12 * 0.6) / 1e6)
    assert report["train_pairs"] + report["held_out_pairs"] <= len(records) and report["held_out_pairs"] > 0
    agreement = report["agreement_with_source"]
    assert agreement["n"] == report["held_out_pairs"] and 0.0 <= agreement["agreement"] <= 1.0
    assert report["source_vs_verifier"] == 1.0  # the stand-in API critic is always right
    assert report["reference"] == "visible"  # as the API critic saw it
    critic = HFCritic(out, kind="cot", max_new_tokens=4, reference="visible", device="cpu")
    assert len(critic.critique([critic_request()])) == 1
    bad = CliRunner().invoke(app, ["critic", "distill", "--cache", str(tmp_path / "none.sqlite"), "--out", str(out)])
    assert bad.exit_code != 0


def critic_request():
    from critique_rl.critics.base import CritiqueRequest

    return CritiqueRequest(question="47+38=", response="85", reference="85")
