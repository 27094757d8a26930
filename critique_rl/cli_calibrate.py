"""`critique-rl calibrate RUN_OR_MODEL`: fit a post-hoc abstention rule on a validation split.

Greedy-decodes a validation split with the saved policy, reads each answer's verbalised confidence, fits an
optional recalibration map and the threshold that maximises the user's utility
(:mod:`critique_rl.train.decision`), prints threshold / utility / coverage as JSON, writes a reliability diagram
PNG into the run directory and saves the rule beside the model (``decision_rule.json``), where
`critique-rl eval` finds and applies it.

The validation split is drawn from the task's held-out pool, disjoint from the problems `critique-rl eval` and
the trainer score (the first ``--eval-n`` held-out problems), or read from ``--val-file``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer
import yaml

from critique_rl.errors import UserError

VALIDATION_SEED = 54321
"""Seed of the validation draw from the held-out pool (the test draw uses ``EVAL_SEED``)."""


def resolve_run_or_model(path: Path) -> tuple[Path, Path, str | None]:
    """``(model_dir, run_dir, task)`` for a run directory (its ``final/``), a checkpoint (its ``model/``) or a
    model directory. ``task`` is the run's configured task when a ``config.yaml`` is found, else None."""
    p = Path(path)
    if (p / "final" / "config.json").is_file():
        model, run = p / "final", p
    elif (p / "model" / "config.json").is_file():  # checkpoints/checkpoint-N
        model, run = p / "model", (p.parent.parent if p.parent.name == "checkpoints" else p)
    elif (p / "config.json").is_file():
        model = p
        run = p.parent if (p.parent / "config.yaml").is_file() else p
    else:
        raise UserError(f"RUN_OR_MODEL '{path}' holds no model: pass a run directory (with final/), a checkpoint "
                        "directory or a model directory saved with save_pretrained")
    task = None
    cfg_file = run / "config.yaml"
    if cfg_file.is_file():
        try:
            task = (yaml.safe_load(cfg_file.read_text()) or {}).get("task")
        except yaml.YAMLError:
            task = None
    return model, run, task if isinstance(task, str) else None


def validation_rows(task: Any, n: int, eval_n: int) -> list[dict[str, Any]]:
    """``n`` held-out problems of ``task`` not among the ``eval_n`` test problems (``EVAL_SEED``)."""
    from critique_rl.train.evaluate import EVAL_SEED

    test = {r["prompt"] for r in task.make_examples("eval", eval_n, EVAL_SEED)}
    pool = [r for r in task.make_examples("eval", n + eval_n, VALIDATION_SEED) if r["prompt"] not in test]
    if not pool:
        raise UserError(f"task '{task.name}': its held-out pool has no problems outside the {eval_n} test ones; "
                        "lower --eval-n or pass --val-file")
    return pool[:n]


def calibrate_command(
    run_or_model: Path = typer.Argument(..., help="A run directory (uses final/), a checkpoint or a model directory."),
    task: str | None = typer.Option(None, "--task", help="Task (default: the run's config.yaml, else addition_conf)."),
    n: int = typer.Option(300, "--n", help="Validation problems."),
    eval_n: int = typer.Option(200, "--eval-n", help="Test problems the validation split must avoid."),
    val_file: Path | None = typer.Option(None, "--val-file", help="JSONL/parquet/CSV validation rows instead."),
    reward_right: float = typer.Option(1.0, "--reward-right", help="Utility of a right answer."),
    penalty_wrong: float = typer.Option(1.0, "--penalty-wrong", help="Penalty (positive) of a wrong answer."),
    abstain_value: float = typer.Option(0.0, "--abstain-value", help="Utility of abstaining."),
    recalibration: str = typer.Option("none", "--recalibration", help="none, temperature or isotonic."),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Fit an abstention threshold on verbalised confidence for a utility; save it beside the model."""
    for name, value in (("--reward-right", reward_right), ("--penalty-wrong", penalty_wrong),
                        ("--abstain-value", abstain_value)):
        if not math.isfinite(value):
            raise UserError(f"{name} {value}: use a finite number")
    if reward_right + penalty_wrong <= 0:
        raise UserError(f"--reward-right {reward_right} / --penalty-wrong {penalty_wrong}: their sum must be > 0 "
                        "(a right answer must be worth more than a wrong one)")
    if recalibration not in ("none", "temperature", "isotonic"):
        raise UserError(f"--recalibration {recalibration!r}: choose none, temperature or isotonic")
    if n < 2:
        raise UserError(f"--n {n}: fit on at least 2 validation problems")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device!r}: choose auto, cpu or cuda")
    model_dir, run_dir, run_task = resolve_run_or_model(run_or_model)

    from critique_rl.models import format_prompt, load_policy, wants_chat_template
    from critique_rl.rewards.builtin import parse_confidence
    from critique_rl.rollout.factory import build_generator
    from critique_rl.tasks import get_task
    from critique_rl.train.decision import RULE_FILE, Utility, fit_rule, plot_reliability
    from critique_rl.train.evaluate import greedy_records

    t = get_task(task or run_task or "addition_conf")
    if val_file is not None:
        from critique_rl.data import load_rows

        rows = load_rows(str(val_file), field="--val-file")[:n]
    else:
        rows = validation_rows(t, n, eval_n)
    model, tok = load_policy(model_dir, device=device)
    use_chat = wants_chat_template(tok)
    records = greedy_records(build_generator("hf", model, tok), rows,
                             lambda r: format_prompt(tok, r["prompt"], use_chat), t.verify, t.max_new_tokens,
                             confidence_fn=parse_confidence)
    conf = [r[2] for r in records]
    correct = [r[0] for r in records]
    if all(q is None for q in conf):
        raise UserError(f"the model at {model_dir} stated no parsable <confidence>q</confidence> on any of the "
                        f"{len(rows)} validation problems; calibrate a model trained on a confidence task "
                        "(e.g. task addition_conf)")
    u = Utility(reward_right, penalty_wrong, abstain_value)
    rule = fit_rule(conf, correct, u, recalibration)  # type: ignore[arg-type]
    rule.fit.update({"task": t.name, "unparsable_rate": sum(q is None for q in conf) / len(conf)})
    rule_path = rule.save(model_dir / RULE_FILE)
    png = plot_reliability(conf, correct, rule, run_dir / "reliability.png")
    out = {"threshold": rule.threshold, "utility": rule.fit["utility"], "coverage": rule.fit["coverage"],
           "selective_accuracy": rule.fit["selective_accuracy"], "utility_answer_all": rule.fit["utility_answer_all"],
           "bayes_threshold": rule.fit["bayes_threshold"], "recalibration": recalibration,
           "temperature": rule.temperature, "n": len(rows), "task": t.name, "rule": str(rule_path),
           "reliability_diagram": str(png)}
    typer.echo(json.dumps(out))


def apply_rule(rule_path: Path, records: list[tuple[bool, int, float | None]]) -> dict[str, Any]:
    """``selective/*`` metrics of the rule saved at ``rule_path`` on greedy ``records`` (for `critique-rl eval`)."""
    from critique_rl.train.decision import DecisionRule, selective_scores

    try:
        rule = DecisionRule.load(rule_path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UserError(f"decision rule {rule_path} is unreadable ({type(exc).__name__}); rerun `critique-rl "
                        "calibrate`, or pass --no-decision-rule") from None
    cal = [rule.recalibrate(r[2]) for r in records]
    flags = [r[0] for r in records]
    s = selective_scores(cal, flags, rule.threshold, rule.utility)
    everything = selective_scores(cal, flags, min(cal), rule.utility)
    return {"decision_rule": {"threshold": rule.threshold, "recalibration": rule.recalibration,
                              "utility": rule.utility.__dict__},
            "selective/utility": s["utility"], "selective/coverage": s["coverage"],
            "selective/accuracy": s["selective_accuracy"], "selective/utility_answer_all": everything["utility"]}
