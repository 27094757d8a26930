"""`sft_refine_critic`: the warm-up's refinement demos written by the run's own critic (`run`) or by the rule
ground-truth critique (`rule`, the default)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from critic_server import CriticServer, addition_responder

from critique_rl.config import CriticConfig, TrainConfig
from critique_rl.critics import build_critic
from critique_rl.critics.base import CritiqueRequest, render_rule
from critique_rl.errors import ConfigError
from critique_rl.tasks import get_task
from critique_rl.train.critique_step import refine_text, refinement_demos

# a hidden-reference API critic stand-in that recomputes the sum and writes in its own words
_api_critic = addition_responder("Looks right.\nVerdict: correct",
                                 "Carry check: {a} plus {b} makes {sum}.\nVerdict: incorrect", usage=(40, 10))


def _rows(n: int = 60) -> tuple[object, list[dict]]:
    task = get_task("addition")
    return task, task.make_examples("train", n, 0)


def test_run_critic_writes_the_demos_and_the_target_stays_the_answer(tmp_path: Path):
    task, rows = _rows()
    with CriticServer(responder=_api_critic) as srv:
        critic = build_critic(CriticConfig(backend="openai", model="api-critic", base_url=srv.base_url, kind="cot",
                                           reference="hidden", max_retries=0,
                                           cache_path=str(tmp_path / "cache.sqlite")))
        counts: dict[str, int] = {}
        demos = refinement_demos(task, rows, 0.5, 0, task.sft_completion, critique_fn=critic.critique, counts=counts)
        critic.close()
        calls = srv.requests
    rule = refinement_demos(task, rows, 0.5, 0, task.sft_completion)
    assert len(demos) == len(rule) == counts["critiqued"] == counts["kept"] == calls > 10
    assert counts["dropped"] == 0 and counts["fallbacks"] == 0
    for (prompt, target), (rule_prompt, rule_target) in zip(demos, rule, strict=True):
        question = prompt.split("\n", 1)[0]
        a, b = (int(x) for x in re.findall(r"\d+", question)[:2])
        assert f"Carry check: {a} plus {b} makes {a + b}." in prompt  # the critic's own text ...
        assert "The correct answer is" not in prompt and "The correct answer is" in rule_prompt  # ... not the rule's
        row = next(r for r in rows if question.startswith(r["prompt"]))  # "39+50=" + the wrong answer
        assert target == rule_target == row["answer"]


def test_critiques_that_do_not_call_the_wrong_answer_wrong_are_dropped():
    task, rows = _rows()
    flipped = build_critic(CriticConfig(backend="noisy", error_rate=1.0, error_kind="verdict", error_check=False))
    counts: dict[str, int] = {}
    assert refinement_demos(task, rows, 0.5, 0, task.sft_completion, critique_fn=flipped.critique, counts=counts) == []
    assert counts["critiqued"] == counts["dropped"] > 10 and counts["kept"] == 0
    # with the verifier check the flipped critiques are replaced by the fallback rule critique, and kept
    checked = build_critic(CriticConfig(backend="noisy", error_rate=1.0, error_kind="verdict", error_check=True,
                                        max_regenerations=1))
    counts = {}
    demos = refinement_demos(task, rows, 0.5, 0, task.sft_completion, critique_fn=checked.critique, counts=counts)
    assert len(demos) == counts["kept"] == counts["fallbacks"] == counts["critiqued"] > 10


def test_the_rule_critic_through_critique_fn_gives_the_default_demos():
    task, rows = _rows()
    rule = build_critic(CriticConfig(backend="rule", kind="ground_truth"))
    default = refinement_demos(task, rows, 0.5, 3, task.sft_completion)
    assert refinement_demos(task, rows, 0.5, 3, task.sft_completion, critique_fn=rule.critique) == default
    prompt, target = default[0]  # the default is the rule ground-truth critique, as before this option
    row = next(r for r in rows if prompt.startswith(r["prompt"]))
    assert "The correct answer is " + row["answer"] in prompt and target == row["answer"]


def test_trainer_asks_its_critic_for_the_demos_only_with_run(fast_config):
    from critique_rl.train.metrics import read_jsonl
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    for mode in ("rule", "run"):
        with CriticServer(responder=_api_critic) as srv:
            cfg = fast_config(output_dir=str(Path(fast_config().output_dir).parent / mode), eval_n=4,
                              max_steps=0 if mode == "rule" else 1, critique_on="all",
                              sft_steps=2, sft_examples=60, sft_refine_fraction=0.3, sft_refine_critic=mode,
                              critic=CriticConfig(backend="openai", model="api-critic", base_url=srv.base_url,
                                                  kind="cot", reference="hidden", max_retries=0))
            summary = CritiqueGRPOTrainer(args=cfg).train()
            calls = srv.requests
        if mode == "rule":  # the default: no critic call before RL, demos as before
            assert calls == 0 and "sft_refine_demo_critiques" not in summary
        else:
            counts = summary["sft_refine_demo_critiques"]
            step = [r for r in read_jsonl(f"{cfg.output_dir}/metrics.jsonl") if "loss/total" in r][0]
            assert counts["critiqued"] == counts["kept"] > 0 and calls >= counts["critiqued"]
            # the warm-up's calls count in the critic's cost, not in the first step's verdict accuracy
            assert step["critic/requests"] == counts["critiqued"] + step["critique/critiqued"]
            assert step["critique/verdicts_checked"] == step["critique/critiqued"] == 16
            saved = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
            assert saved["sft_refine_demo_critiques"] == counts


@pytest.mark.parametrize("overrides,says", [
    (dict(sft_refine_critic="model"), "rule"),
    (dict(sft_refine_fraction=0.0), "sft_refine_fraction is 0"),
    (dict(critic=CriticConfig(backend="none")), "no critic"),
    (dict(critique_on="none"), "critique_on is none"),
    (dict(refinement_source="reference"), "refinement_source is reference"),
    (dict(critic=CriticConfig(backend="hf", kind="cot", model="policy")), "policy"),
])
def test_config_refuses_run_demos_without_a_usable_critic(overrides, says):
    kw = {"sft_refine_fraction": 0.3, "sft_refine_critic": "run", **overrides}
    with pytest.raises(ConfigError, match="sft_refine_critic") as err:
        TrainConfig(**kw)
    assert says in str(err.value)
    assert TrainConfig(sft_refine_fraction=0.3, sft_refine_critic="run").sft_refine_critic == "run"


def test_rule_demo_is_the_rule_ground_truth_critique():
    task, rows = _rows(40)
    row = next(r for r in rows if task.mistake(r) is not None)
    (prompt, _), = refinement_demos(task, [row], 1.0, 0, task.sft_completion)
    wrong = task.mistake(row)
    req = CritiqueRequest(question=row["prompt"], response=wrong, reference=row["answer"], verdict=False,
                          metadata={"answer": task.extract(wrong) or wrong})
    assert prompt == refine_text(row["prompt"], wrong, render_rule("ground_truth", req))
