"""feedback_column: a row's feedback text is the critique of its wrong answers (critic.backend feedback), with
no critic call, in the refinement prompts and for directive distillation; unit tests and runs of the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from critique_rl.config import CriticConfig
from critique_rl.critics import build_critic
from critique_rl.critics.base import CritiqueRequest
from critique_rl.critics.feedback_column import FeedbackColumnCritic
from critique_rl.data import DataOptions, load_split, validate_rows
from critique_rl.errors import UserError
from critique_rl.tasks import get_task


def _rows(n: int = 120, every: int = 1) -> list[dict]:
    """Addition rows with a `hint` column (null on rows not divisible by ``every``)."""
    rows = get_task("addition").make_examples("train", n, 0)
    for i, r in enumerate(rows):
        r["hint"] = f"FB{i}: add {r['a']} and {r['b']} column by column, carrying." if i % every == 0 else None
    return rows


def test_wrong_answers_get_the_rows_feedback_others_the_rule_critique():
    rows = validate_rows(_rows(3, every=2), "train_dataset", options=DataOptions(feedback_column="hint"))
    critic = FeedbackColumnCritic(kind="indicative")
    requests = [
        CritiqueRequest(question=rows[0]["prompt"], response="1", reference=rows[0]["answer"], verdict=False),
        CritiqueRequest(question=rows[0]["prompt"], response=rows[0]["answer"], reference=rows[0]["answer"],
                        verdict=True),
        CritiqueRequest(question=rows[1]["prompt"], response="1", reference=rows[1]["answer"], verdict=False),
        CritiqueRequest(question=rows[2]["prompt"], response="1", reference=rows[2]["answer"], verdict=False),
    ]
    out = critic.critique(requests)
    assert out[0].text == rows[0]["hint"] and out[0].kind == "feedback" and out[0].verdict is False
    assert out[1].kind == "indicative" and "correct" in out[1].text  # a right answer: the rule critique
    assert out[2].kind == "indicative" and "incorrect" in out[2].text  # a row without feedback
    assert out[3].text == rows[2]["hint"]
    m = critic.metrics()
    assert m["critic/feedback_used"] == 2 and m["critic/requests"] == 4


def test_lesson_prompts_are_not_answered_with_feedback():
    (row,) = validate_rows(_rows(1), "train_dataset", options=DataOptions(feedback_column="hint"))
    request = CritiqueRequest(question=row["prompt"], response="1", verdict=False,
                              metadata={"prompt": "Write a lesson.", "purpose": "lesson"})
    (c,) = FeedbackColumnCritic().critique([request])
    assert c.kind == "prompt" and c.text != row["hint"]


def test_rows_without_the_feedback_column_loaded_are_refused():
    request = CritiqueRequest(question="12+34=", response="45", reference="46", verdict=False)  # a plain str row
    with pytest.raises(UserError) as info:
        FeedbackColumnCritic().critique([request])
    assert "feedback_column" in str(info.value) and "\n" not in str(info.value)


def test_factory_builds_it():
    critic = build_critic(CriticConfig(backend="feedback", kind="ground_truth"))
    assert isinstance(critic, FeedbackColumnCritic) and critic.kind == "ground_truth"
    with pytest.raises(ValueError, match="indicative or ground_truth"):
        FeedbackColumnCritic(kind="cot")


def _train_with_feedback(fast_config, monkeypatch, **overrides):
    from critique_rl.rollout.hf import HFGenerator
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    prompts_seen: list[str] = []
    real_generate = HFGenerator.generate

    def recording_generate(self, prompts, params):
        prompts_seen.extend(prompts)
        return real_generate(self, prompts, params)

    monkeypatch.setattr(HFGenerator, "generate", recording_generate)
    cfg = fast_config(max_steps=2, sft_steps=10, critique_on="wrong", feedback_column="hint",
                      critic=CriticConfig(backend="feedback", kind="indicative"), **overrides)
    rows = load_split(cfg, "train", given=_rows())
    summary = CritiqueGRPOTrainer(args=cfg, train_dataset=rows).train()
    out = Path(cfg.output_dir)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    hints = {str(r["prompt"]): r["hint"] for r in rows}
    return summary, metrics, rollouts, prompts_seen, hints


def test_trainer_refines_with_the_feedback_text(fast_config, monkeypatch):
    summary, metrics, rollouts, prompts_seen, hints = _train_with_feedback(fast_config, monkeypatch)
    assert summary["steps"] == 2
    critiqued = [r for r in rollouts if "critique" in r]
    assert critiqued, "the policy after 10 SFT steps gets answers wrong: some rows must be critiqued"
    for r in critiqued:
        wrong = r["rewards"]["correctness"] == 0.0
        assert wrong and r["critique"] == hints[r["prompt"]]  # the row's own feedback, verbatim
        # the refinement prompt the policy was sampled with carries that row's question and feedback
        assert any(hints[r["prompt"]] in p and r["prompt"] in p for p in prompts_seen), r["prompt"]
    steps = [m for m in metrics if "loss/total" in m]
    assert sum(m["critic/feedback_used"] for m in steps[-1:]) > 0
    assert any("refinement" in r for r in critiqued)


def test_directive_distillation_uses_the_feedback(fast_config, monkeypatch):
    summary, metrics, rollouts, prompts_seen, hints = _train_with_feedback(
        fast_config, monkeypatch, distill_weight=0.5)
    steps = [m for m in metrics if "loss/total" in m]
    assert summary["steps"] == 2 and sum(m.get("distill/rows", 0) for m in steps) > 0
    critiqued = [r for r in rollouts if "critique" in r]
    assert critiqued and all(r["critique"] == hints[r["prompt"]] for r in critiqued)
    # the teacher context is the refinement prompt built from those critiques
    assert any("Feedback: " + hints[r["prompt"]] in p for r in critiqued for p in prompts_seen)
