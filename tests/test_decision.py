"""Deciding apart from learning: the abstention threshold, recalibration maps, and `critique-rl calibrate` /
`critique-rl eval` through the command line."""

from __future__ import annotations

import json

import pytest
from test_cli import run_cli

from critique_rl.train.decision import (
    DecisionRule,
    Utility,
    bayes_threshold,
    fit_isotonic,
    fit_rule,
    fit_temperature,
    fit_threshold,
    isotonic_apply,
    selective_scores,
    temperature_scale,
)
from critique_rl.train.trainer import CritiqueGRPOTrainer


def test_threshold_maximises_utility_by_hand():
    conf, correct = [0.9, 0.8, 0.6, 0.3], [True, True, False, False]
    u = Utility(1.0, 1.0, 0.0)
    # answer >= 0.3: 2 - 2 = 0; >= 0.6: 2 - 1 = 1; >= 0.8: 2; >= 0.9: 1; never: 0  (divided by 4)
    assert selective_scores(conf, correct, 0.6, u) == {"utility": 0.25, "coverage": 0.75,
                                                       "selective_accuracy": pytest.approx(2 / 3)}
    t, s = fit_threshold(conf, correct, u)
    assert t == 0.8 and s["utility"] == 0.5 and s["coverage"] == 0.5 and s["selective_accuracy"] == 1.0
    # abstaining worth 0.6: abstain on the two low ones, answer the two right ones: (2 + 2 * 0.6) / 4
    t, s = fit_threshold(conf, correct, Utility(1.0, 1.0, 0.6))
    assert t == 0.8 and s["utility"] == pytest.approx(0.8)
    # abstaining worth more than a right answer: never answer (1.2 beats (2 + 2 * 1.2) / 4 = 1.1)
    t, s = fit_threshold(conf, correct, Utility(1.0, 1.0, 1.2))
    assert t is None and s["coverage"] == 0.0 and s["utility"] == pytest.approx(1.2)
    # no penalty: answer everything (ties go to the higher coverage)
    t, s = fit_threshold(conf, correct, Utility(1.0, 0.0, 0.0))
    assert t == 0.3 and s["coverage"] == 1.0
    assert bayes_threshold(Utility(1.0, 4.0, 0.6)) == pytest.approx(0.92)


def test_temperature_recovers_a_known_scale():
    # T = 2 maps q = 0.9 -> 0.75 and q = 0.2 -> 1/3; the data's accuracy in each bin is exactly that
    conf = [0.9] * 100 + [0.2] * 60
    correct = [True] * 75 + [False] * 25 + [True] * 20 + [False] * 40
    assert temperature_scale(0.9, 2.0) == pytest.approx(0.75)
    assert temperature_scale(0.2, 2.0) == pytest.approx(1 / 3)
    assert fit_temperature(conf, correct) == pytest.approx(2.0, rel=1e-3)


def test_isotonic_pools_adjacent_violators_by_hand():
    xs, ys = fit_isotonic([0.1, 0.2, 0.3, 0.4], [False, True, False, True])
    assert xs == [0.1, 0.2, 0.3, 0.4] and ys == [0.0, 0.5, 0.5, 1.0]
    assert isotonic_apply(0.05, xs, ys) == 0.0 and isotonic_apply(0.25, xs, ys) == 0.5
    assert isotonic_apply(0.35, xs, ys) == pytest.approx(0.75) and isotonic_apply(0.9, xs, ys) == 1.0
    xs, ys = fit_isotonic([0.5, 0.5, 0.9, 0.9], [True, False, False, False])  # decreasing: one pooled block
    assert ys == [0.25, 0.25]


def test_rule_roundtrip_and_recalibrated_fit(tmp_path):
    conf = [0.9, 0.9, 0.9, 0.9, 0.5, 0.5, None, 0.7]
    correct = [True, True, True, False, False, False, False, True]
    rule = fit_rule(conf, correct, Utility(1.0, 2.0, 0.0), "isotonic")
    assert rule.recalibrate(None) == rule.recalibrate(0.0)  # unparsable counts as 0
    assert rule.fit["n"] == 8 and rule.fit["bayes_threshold"] == pytest.approx(2 / 3)
    back = DecisionRule.load(rule.save(tmp_path / "rule.json"))
    assert back == rule and [back.answers(q) for q in conf] == [rule.answers(q) for q in conf]
    never = DecisionRule(threshold=None, utility=Utility())
    assert not never.answers(1.0)


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `critique-rl ARGS` in this process through :func:`critique_rl.cli.main` (argument parsing, one-line
    errors and exit codes as from the shell, without paying the torch/transformers import again)."""
    import sys

    from critique_rl.cli import main

    capsys.readouterr()
    old = sys.argv
    sys.argv = ["critique-rl", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_calibrate_then_eval_through_the_cli(fast_config, tmp_path, capsys):
    cfg = fast_config(task="addition_conf", sft_steps=150, max_steps=0, output_dir=str(tmp_path / "run"))
    CritiqueGRPOTrainer(args=cfg).train()
    run = tmp_path / "run"
    # no penalty for a wrong answer: answering everything is optimal -> the lowest confidence, coverage 1
    code, out, err = cli(capsys, "calibrate", run, "--n", "60", "--eval-n", "20", "--penalty-wrong", "0",
                         "--device", "cpu")
    assert code == 0, err
    fit = _last_json(out)
    assert fit["task"] == "addition_conf" and fit["n"] == 60 and fit["coverage"] == 1.0
    assert fit["utility"] == pytest.approx(fit["utility_answer_all"])
    code, out, err = cli(capsys, "eval", run / "final", "--task", "addition_conf", "--n", "20", "--device", "cpu")
    assert code == 0, err
    ev = _last_json(out)
    assert ev["decision_rule"]["threshold"] == fit["threshold"]
    assert ev["selective/coverage"] == pytest.approx(1 - ev["unparsable_rate"]) or fit["threshold"] == 0.0
    # a heavy penalty, isotonic recalibration: the rule never does worse than answering all on its own split
    code, out, err = cli(capsys, "calibrate", run, "--n", "60", "--eval-n", "20", "--penalty-wrong", "3",
                         "--recalibration", "isotonic", "--device", "cpu")
    assert code == 0, err
    fit = _last_json(out)
    assert fit["recalibration"] == "isotonic" and 0.0 <= fit["coverage"] <= 1.0
    assert fit["utility"] >= max(fit["utility_answer_all"], 0.0) - 1e-12  # never answering (0) is a candidate
    assert (run / "reliability.png").stat().st_size > 0
    rule = json.loads((run / "final" / "decision_rule.json").read_text())
    assert rule["threshold"] == fit["threshold"] and rule["utility"]["penalty_wrong"] == 3.0
    code, out, err = cli(capsys, "eval", run / "final", "--task", "addition_conf", "--n", "20", "--device", "cpu")
    ev = _last_json(out)
    acc = ev["accuracy"]
    assert code == 0 and ev["decision_rule"]["recalibration"] == "isotonic"
    assert ev["selective/utility_answer_all"] == pytest.approx(acc * 1.0 - (1 - acc) * 3.0)
    code, out, err = cli(capsys, "eval", run / "final", "--task", "addition_conf", "--n", "20", "--device", "cpu",
                         "--no-decision-rule")
    assert code == 0 and "selective/utility" not in _last_json(out)


@pytest.mark.parametrize("args, needle", [
    (["--recalibration", "platt"], "--recalibration"),
    (["--penalty-wrong", "nan"], "--penalty-wrong"),
    (["--reward-right", "-1", "--penalty-wrong", "0"], "--reward-right"),
])
def test_calibrate_bad_flags_are_one_line(tmp_path, capsys, args, needle):
    code, _, err = cli(capsys, "calibrate", tmp_path, *args)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_calibrate_without_a_model_is_one_line(tmp_path, capsys):
    code, _, err = cli(capsys, "calibrate", tmp_path / "nothing")
    assert code == 2 and "RUN_OR_MODEL" in err and "Traceback" not in err


def test_calibrate_is_a_shell_command(tmp_path):
    res = run_cli("calibrate", tmp_path / "nothing")  # the installed entry point, once
    assert res.returncode == 2 and "RUN_OR_MODEL" in res.stderr


def test_selective_utility_reward_by_hand():
    from critique_rl.rewards.builtin import selective_utility_reward

    # utility: +1 right, -2 wrong, 0 abstain; Bayes threshold (0 + 2) / (1 + 2) = 2/3
    args = dict(reward_right=1.0, penalty_wrong=2.0, abstain_value=0.0, threshold=2 / 3, format_penalty=-2.0)
    assert selective_utility_reward(True, 0.9, **args) == 1.0
    assert selective_utility_reward(False, 0.9, **args) == -2.0
    assert selective_utility_reward(False, 0.5, **args) == 0.0  # abstains: q below the threshold
    assert selective_utility_reward(True, 0.5, **args) == 0.0
    assert selective_utility_reward(True, None, **args) == -2.0  # no confidence: a format failure


def test_selective_utility_registered_reward_uses_the_bayes_threshold():
    from critique_rl.errors import UserError
    from critique_rl.rewards.base import REWARD_FUNCS
    from critique_rl.tasks import get_task

    fn = REWARD_FUNCS["selective_utility"](get_task("addition_conf"), penalty_wrong=2.0)
    comps = ["42 <confidence>0.7</confidence>", "41 <confidence>0.7</confidence>",
             "41 <confidence>0.6</confidence>", "42", None]
    out = fn(prompts=[""] * 4, completions=comps[:4], answer=["42"] * 4)
    assert out == [1.0, -2.0, 0.0, -2.0]  # 0.7 >= 2/3 answers, 0.6 abstains, no tag = -penalty
    assert fn(prompts=[""], completions=["42 <confidence>1</confidence>"], answer=[None]) == [None]
    with pytest.raises(UserError, match="threshold"):
        REWARD_FUNCS["selective_utility"](get_task("addition_conf"), threshold=1.5)
    with pytest.raises(UserError, match="reward_right"):
        REWARD_FUNCS["selective_utility"](get_task("addition_conf"), reward_right=-1.0, penalty_wrong=0.5)
