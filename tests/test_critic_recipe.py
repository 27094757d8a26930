"""The local critic's training recipe (digit working, compact prompt saved with the model), the noisy critic
through the trainer, and the critic-error benchmark's arms."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from critique_rl.config import CriticConfig
from critique_rl.critics.base import CritiqueRequest, parse_verdict
from critique_rl.critics.train_critic import SHORT_PROMPT, digit_working, rule_critique_examples


def test_digit_working_by_hand():
    # 47+38: units 7+8=15 (carry 1), tens 4+3+1=08 -> 085; 84 -> 084; digits 0=0 8=8 5!=4
    assert digit_working("47+38=", "84") == "Work 7+8=15 4+3+1=08\nSum 085\nGiven 084\nMatch 110"
    assert digit_working("40+45=", "85") == "Work 0+5=05 4+4+0=08\nSum 085\nGiven 085\nMatch 111"
    assert digit_working("99+99=", "198").endswith("Sum 198\nGiven 198\nMatch 111")
    assert digit_working("5+7=", "12345") == "Work 5+7=12\nSum 12\nGiven none\nMatch 00"  # too long to align
    assert digit_working("5+7=", None).endswith("Given none\nMatch 00")
    assert digit_working("reverse: abc", "cba") is None


def test_rule_examples_working_agrees_with_the_verdict():
    examples = rule_critique_examples("addition", 300, seed=0)
    wrong = [e for e in examples if not e["verdict"]]
    assert 0.35 < len(wrong) / len(examples) < 0.65
    for e in examples:
        lines = e["critique"].splitlines()
        assert lines[0].startswith("Work ") and lines[1] == f"Sum {int(e['reference']):03d}"
        match = lines[3].removeprefix("Match ")
        assert (set(match) == {"1"}) == e["verdict"] == parse_verdict(e["critique"])
        assert str(int(e["reference"])) in e["critique"]  # worked out, then quoted by the critique
    assert any(len(e["response"]) > 3 for e in wrong)  # some numbers a policy early in training writes
    old = rule_critique_examples("addition", 5, seed=0, working="check")
    assert all(e["critique"].startswith("Check: ") for e in old)


def test_trained_critic_directory_carries_its_prompt(tmp_path: Path):
    from critique_rl.critics.hf import HFCritic
    from critique_rl.critics.train_critic import CARD, critic_prompt, train_critic_model

    examples = rule_critique_examples("addition", 40, seed=0)
    out = train_critic_model(examples, tmp_path / "c", steps=2, batch_size=4, hidden_size=64, heads=2, layers=1)
    assert (out / "critique_cot.j2").read_text().strip() == SHORT_PROMPT
    req = CritiqueRequest(question="47+38=", response="84", reference="85")
    hidden = HFCritic(out, kind="cot", reference="hidden", device="cpu").prompt(req)
    assert hidden == critic_prompt("47+38=", "84", None, template_dir=str(out))
    assert hidden.startswith("Grade the response.") and "Question: 47+38=\nResponse: 84\nCritique:" in hidden
    assert "85" not in hidden
    shown = HFCritic(out, kind="cot", reference="visible", device="cpu").prompt(req)
    assert "Reference: 85" in shown
    # going on from a saved critic keeps its tokenizer and counts the steps of both stints
    more = train_critic_model(examples, tmp_path / "c2", steps=3, batch_size=4, init_from=out)
    card = json.loads((more / CARD).read_text())
    assert card["steps"] == 5 and (more / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()


def test_noisy_critic_through_the_trainer_logs_the_errors_it_delivered(fast_config):
    from critique_rl.train.metrics import read_jsonl
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    cfg = fast_config(max_steps=2, critique_on="wrong", offpolicy_gamma=None,
                      critic=CriticConfig(backend="noisy", kind="ground_truth", error_rate=1.0, error_kind="verdict",
                                          error_check=False))
    trainer = CritiqueGRPOTrainer(args=cfg)
    trainer.train()
    rows = [r for r in read_jsonl(f"{cfg.output_dir}/metrics.jsonl") if "loss/total" in r]
    critiqued = sum(r["critique/critiqued"] for r in rows)
    assert critiqued > 0
    # every critique of a wrong answer called it correct, and all of them reached the refinements
    assert sum(r["critique/errors_delivered"] for r in rows) == critiqued
    assert all(r["critique/verdict_recall_wrong"] == 0.0 for r in rows if r["critique/critiqued"])


def test_critic_error_benchmark_arms_are_valid_configs(tmp_path: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import critic_errors
    import learning_evidence as le

    arms = critic_errors.critic_arms(str(tmp_path / "local"), None)
    assert {"grpo", "gt", "local", "verdict10", "verdict50_check", "hint30"} <= set(arms) and "distilled" not in arms
    le.ARMS.update(arms)
    seen = {}
    for name in arms:
        spec = dict(task="addition", seed=0, out=str(tmp_path / name), max_steps=5, eval_every=5, eval_n=10,
                    extra={}, arm=name, model_dir="tiny")
        seen[name] = le.run_config(spec)
    assert seen["gt"].critic.backend == "rule" and seen["gt"].critique_on == "wrong"
    assert seen["gt"].offpolicy_gamma is None
    v = seen["verdict30"].critic
    assert (v.backend, v.error_rate, v.error_kind, v.error_check) == ("noisy", pytest.approx(0.3), "verdict", False)
    assert seen["verdict30_check"].critic.error_check and seen["hint10"].critic.error_kind == "hint"
    loc = seen["local"].critic
    assert (loc.backend, loc.reference, loc.kind) == ("hf", "hidden", "cot")
    assert seen["grpo"].critique_on == "none"


def test_critic_error_summary_finds_the_break_even_rate():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import critic_errors

    after = {"grpo": [0.70, 0.60], "gt": [0.74, 0.64], "local": [0.72, 0.62], "verdict10": [0.73, 0.63],
             "verdict30": [0.71, 0.61], "verdict50": [0.69, 0.60]}
    results = [{"arm": a, "seed": s, "after": v, "means": {}} for a, vals in after.items() for s, v in enumerate(vals)]
    results[2]["before"] = 0.5  # gt seed 0's warm-up start; runs without one print "-"
    text = critic_errors.summary(results, list(after), [0, 1])
    assert "| gt | 2 | 50.0 / - | +4.0 ± 0.0 (+4.0 / +4.0) | - |" in text
    assert "| local | 2 | - / - | +2.0 ± 0.0 (+2.0 / +2.0) | 0.50 |" in text  # half of the ground-truth critic's gain
    # 0%: +4.0, 10%: +3.0, 30%: +1.0, 50%: -0.5 -> break-even at 50%
    assert "- verdictP: 0%: +4.0, 10%: +3.0, 30%: +1.0, 50%: -0.5 -> stops beating GRPO at 50%" in text
    assert "- hintP: 0%: +4.0 -> ahead of GRPO at every rate run" in text
