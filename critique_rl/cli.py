"""The `critique-rl` command: train, eval, critique, memory.

Any :class:`UserError` (bad config, flag, file) is printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import typer
from rich.console import Console

from critique_rl.errors import UserError
from critique_rl.user_code import UserCodeError, user_code_error

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="RL post-training of language models with language feedback.")
err = Console(stderr=True)


@app.command()
def train(
    config: Path | None = typer.Argument(None, help="YAML run config; omit for the embedded CPU demo."),
    config_opt: Path | None = typer.Option(None, "--config", help="YAML run config (same as the argument)."),
    output_dir: str | None = typer.Option(None, "--output-dir", help="Run directory (overrides the config)."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="RL steps (overrides the config)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the run directory."),
    seed: int | None = typer.Option(None, "--seed", help="Run seed (overrides the config)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (logs only)."),
) -> None:
    """Train. With no CONFIG: the embedded demo (tiny model, addition, SFT warm-up, Critique-GRPO on CPU)."""
    from critique_rl.config import load_config

    if config is not None and config_opt is not None and config != config_opt:
        raise UserError(f"two configs given ({config} and --config {config_opt}); pass one")
    config = config if config is not None else config_opt
    overrides = {"output_dir": output_dir, "max_steps": max_steps, "seed": seed}
    if no_progress:
        overrides["progress"] = False
    cfg = load_config(config, **overrides)  # before the heavy imports: a bad config fails in about a second
    from critique_rl.train.run_setup import summary_table
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    trainer = CritiqueGRPOTrainer(args=cfg)  # with an agent: section, on multi-turn episodes of its env
    summary = trainer.train(resume=resume)
    if not trainer.is_main:  # under accelerate launch, one process reports
        return
    Console().print(summary_table(summary))
    Console().print(f"run directory: {cfg.output_dir} (metrics.jsonl, rollouts.jsonl, curves.png, summary.json)")


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="A model directory (run_dir/final or a checkpoint-*/model)."),
    task: str = typer.Option("addition", "--task", help="Built-in or registered task; 'a+b' evaluates the "
                             "mixture of tasks a and b (n split evenly, accuracy also per task)."),
    k: int = typer.Option(1, "--k", help="pass@k from k samples per problem (k=1: greedy accuracy only)."),
    n: int = typer.Option(200, "--n", help="Held-out problems."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature for pass@k."),
    device: str = typer.Option("auto", "--device"),
    no_decision_rule: bool = typer.Option(False, "--no-decision-rule",
                                          help="Ignore a decision_rule.json saved beside the model."),
) -> None:
    """Evaluate a saved policy: accuracy (greedy), pass@k, mean completion length. Prints JSON. With a
    decision_rule.json beside the model (`critique-rl calibrate`), also the rule's utility, coverage and
    accuracy on the answered problems (`selective/*`)."""
    if k < 1:
        raise UserError(f"--k {k}: must be >= 1")
    if n < 1:
        raise UserError(f"--n {n}: evaluate at least 1 held-out problem")
    if not math.isfinite(temperature) or temperature <= 0:
        raise UserError(f"--temperature {temperature}: use a finite value > 0 (sampling temperature for pass@k)")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device!r}: choose auto, cpu or cuda")

    from critique_rl.models import format_prompt, load_policy, wants_chat_template
    from critique_rl.rollout.factory import build_generator
    from critique_rl.tasks import get_task
    from critique_rl.train.evaluate import EVAL_SEED, check_model_dir, evaluate
    path = checkpoint / "model" if (checkpoint / "model" / "config.json").is_file() else checkpoint
    check_model_dir(path, "checkpoint")  # config.json and weights, or one line and exit 2
    t = get_task(task)
    model, tok = load_policy(path, device=device)
    use_chat = wants_chat_template(tok)
    rows = t.make_examples("eval", n, EVAL_SEED)
    from critique_rl.train.decision import RULE_FILE

    rule_path = path / RULE_FILE
    use_rule = rule_path.is_file() and not no_decision_rule
    records: list = []
    conf_fn = None
    if use_rule:
        from critique_rl.rewards.builtin import parse_confidence

        conf_fn = parse_confidence
    from critique_rl.rewards import Verifier

    verify = Verifier(t.verify) if t.parts else t.verify  # a mixture judges each row by its `task` column
    result = evaluate(build_generator("hf", model, tok), rows, lambda r: format_prompt(tok, r["prompt"], use_chat), verify,
                      t.max_new_tokens, k=k, temperature=temperature, confidence_fn=conf_fn, records_out=records)
    if use_rule:
        from critique_rl.cli_calibrate import apply_rule

        result.update(apply_rule(rule_path, records))
    result["task"] = task
    typer.echo(json.dumps(result))


def _register_optional() -> None:
    """Subcommands that live in their own modules."""
    try:
        from critique_rl.cli_critique import CritiqueCommand, critique_command
    except ImportError:  # pragma: no cover - module always shipped
        pass
    else:
        app.command("critique", cls=CritiqueCommand)(critique_command)
    try:
        from critique_rl.cli_calibrate import calibrate_command
    except ImportError:  # pragma: no cover
        pass
    else:
        app.command("calibrate")(calibrate_command)
    try:
        from critique_rl.cli_memory import memory_app
    except ImportError:  # pragma: no cover
        pass
    else:
        app.add_typer(memory_app, name="memory")
    from critique_rl.cli_estimate import estimate_memory_command

    app.command("estimate-memory")(estimate_memory_command)
    from critique_rl.cli_push import push_command

    app.command("push")(push_command)
    from critique_rl.cli_critic import critic_app  # critique-rl critic train | distill

    app.add_typer(critic_app, name="critic")
    from critique_rl.cli_serve import serve_command  # critique-rl serve CONFIG (train behind an OpenAI API)

    app.command("serve")(serve_command)


_register_optional()


MAX_ERROR_CHARS = 500
"""Longest error line printed (a 25 MB value in a message is cut, never printed whole)."""


def one_line(message: object, max_chars: int = MAX_ERROR_CHARS) -> str:
    """``message`` as one line of at most ``max_chars`` characters."""
    text = " ".join(str(message)[: max_chars * 4].split())
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def main() -> None:
    try:
        # standalone_mode=False: click *returns* the code of a typer.Exit (e.g. `memory`/`critique` errors
        # exit with 2) instead of raising it, so the return value is the exit status.
        code = app(standalone_mode=False)
    except UserCodeError as exc:  # the user's reward/verifier failed: one block, their frames only
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # click usage errors (typer vendors click, so match by shape)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            message = one_line(exc.format_message())
            if message:  # no-args help has already been shown; there is no error text to add
                print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        if (block := user_code_error(exc)) is not None:  # raised inside the user's reward function / verifier
            print(f"error: {block}", file=sys.stderr)
            sys.exit(2)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
