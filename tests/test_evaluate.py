"""Held-out evaluation: pass@k (hand-computed), greedy accuracy, and calibration when a confidence is parsed."""

import pytest

from critique_rl.rewards.builtin import parse_confidence
from critique_rl.rollout.base import Completion, SamplingParams
from critique_rl.tasks import get_task
from critique_rl.train.evaluate import evaluate, pass_at_k
from critique_rl.train.metrics import read_jsonl
from critique_rl.train.trainer import CritiqueGRPOTrainer


class ScriptedGenerator:
    """A Generator that answers each prompt from a table (greedy) and records what it was asked."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls: list[SamplingParams] = []

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        self.calls.append(params)
        return [[Completion(token_ids=[1] * len(self.answers[p]), logprobs=[0.0] * len(self.answers[p]),
                            text=self.answers[p], finished=True)] * params.n for p in prompts]


def test_pass_at_k_hand_computed():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k


def test_evaluate_scores_calibration_of_greedy_answers():
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"},
            {"prompt": "3+3=", "answer": "6"}, {"prompt": "4+4=", "answer": "8"}]
    answers = {"1+1=": "2 <confidence>0.9</confidence>", "2+2=": "4 <confidence>0.9</confidence>",
               "3+3=": "5 <confidence>0.9</confidence>", "4+4=": "8 no tag"}
    verify = get_task("addition_conf").verify
    gen = ScriptedGenerator(answers)
    plain = evaluate(gen, rows, lambda r: r["prompt"], verify, max_new_tokens=16)
    assert plain["accuracy"] == pytest.approx(0.75) and "ece" not in plain
    assert gen.calls[-1].greedy
    res = evaluate(gen, rows, lambda r: r["prompt"], verify, max_new_tokens=16, confidence_fn=parse_confidence)
    # q = 0.9, 0.9, 0.9 (wrong), None -> 0 (correct). Bin 9: acc 2/3 vs conf 0.9 -> 3/4 * |2/3 - 0.9| = 0.175;
    # bin 0: acc 1 vs conf 0 -> 1/4 * 1 = 0.25. ECE = 0.425.
    assert res["ece"] == pytest.approx(0.425)
    assert res["brier_score"] == pytest.approx((0.01 + 0.01 + 0.81 + 1.0) / 4)
    assert res["unparsable_rate"] == pytest.approx(0.25)
    assert res["mean_confidence"] == pytest.approx(2.7 / 4)
    # correct q: 0.9, 0.9, 0; wrong q: 0.9 -> pairs (win, tie) = (0, 2 ties) + (0 for q=0) -> 1/3
    assert res["auroc"] == pytest.approx(1 / 3)


def test_trainer_logs_calibration_with_a_brier_reward(fast_config, tmp_path):
    cfg = fast_config(task="addition_conf", reward_funcs=["correctness", "brier"], reward_aggregator="dvao",
                      max_steps=2, eval_every=1)
    summary = CritiqueGRPOTrainer(args=cfg).train()
    assert 0.0 <= summary["eval_ece_before_rl"] <= 1.0 and 0.0 <= summary["eval_ece_after_rl"] <= 1.0
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for r in evals:
        assert 0.0 <= r["eval/ece"] <= 1.0 and 0.0 <= r["eval/brier_score"] <= 1.0
        assert 0.0 <= r["eval/unparsable_rate"] <= 1.0
    assert evals[0]["eval/ece"] == pytest.approx(summary["eval_ece_before_rl"])
    assert evals[-1]["eval/ece"] == pytest.approx(summary["eval_ece_after_rl"])


def test_trainer_without_brier_logs_no_calibration(fast_config, tmp_path):
    summary = CritiqueGRPOTrainer(args=fast_config(max_steps=1)).train()
    assert "eval_ece_after_rl" not in summary
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/accuracy" in r]
    assert evals and all("eval/ece" not in r for r in evals)
