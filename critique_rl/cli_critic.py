"""``critique-rl critic``: train a small local critic model, or distil an API critic's cache into one.

- ``critique-rl critic train --task addition --out DIR``: SFT on the rule critic's critiques (with verdicts) of
  correct and wrong responses on a built-in task; the prompt hides the reference answer (``--reference hidden``,
  default), so the model has to work the answer out. Use it with ``critic: {backend: hf, model: DIR, kind: cot,
  reference: hidden}``.
- ``critique-rl critic distill --cache CACHE --out DIR``: the critic cache a run filled (question, response,
  critique, verdict; ``<output_dir>/critic_cache.sqlite``) -> SFT pairs -> a local critic; prints its agreement
  with the cached critic on held-out pairs and the API tokens (and, with prices, dollars) those calls cost.

Both print one JSON report on stdout (also written to ``DIR/distill_report.json`` / ``DIR/critic_report.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

critic_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Train a local critic model, or distil an API critic's cache into one.")


def _progress(total: int, label: str):  # noqa: ANN202 - (bar, on_step)
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                   TimeRemainingColumn(), transient=True)
    task = bar.add_task(label, total=total, loss="-")
    return bar, lambda step, loss: bar.update(task, completed=step + 1, loss=f"{loss:.3f}")


@critic_app.command("train")
def train_command(
    out: Path = typer.Option(..., "--out", help="Directory to write the critic model to."),
    task: str = typer.Option("addition", "--task", help="Built-in task whose rows are critiqued."),
    examples: int = typer.Option(4000, "--examples", help="Training pairs (half right, half wrong responses)."),
    kind: str = typer.Option("ground_truth", "--kind", help="Rule critique imitated: ground_truth or indicative."),
    reference: str = typer.Option("hidden", "--reference", help="hidden: prompts without the reference answer."),
    steps: int = typer.Option(2000, "--steps", help="SFT steps (800 gave verdict accuracy 0.61, 2000 gave 0.76 on addition)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    learning_rate: float = typer.Option(1e-3, "--learning-rate"),
    hidden_size: int = typer.Option(128, "--hidden-size", help="Critic model width (heads of 32+ dims each)."),
    heads: int = typer.Option(4, "--heads"),
    working: str = typer.Option("digits", "--working",
                                help="How the critique works the answer out before its verdict: digits (column "
                                     "by column, then digit by digit, for sums), check (one line), none."),
    eval_examples: int = typer.Option(400, "--eval-examples", help="Held-out pairs (the task's eval split)."),
    seed: int = typer.Option(0, "--seed"),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """SFT a tiny critic on the rule critic's critiques of a built-in task; report its verdict accuracy."""
    from contextlib import nullcontext

    from critique_rl.critics.train_critic import rule_critique_examples, score_critic, train_critic_model
    from critique_rl.errors import UserError
    from critique_rl.train.run_setup import quiet_library_progress

    if kind not in ("ground_truth", "indicative"):
        raise UserError(f"--kind {kind!r}: use ground_truth or indicative")
    if working not in ("digits", "check", "none"):
        raise UserError(f"--working {working!r}: use digits, check or none")
    pairs = rule_critique_examples(task, examples, seed=seed, kind=kind, working=working)
    held = rule_critique_examples(task, eval_examples, seed=seed + 1, kind=kind, split="eval", working=working)
    bar, on_step = _progress(steps, "critic SFT") if not no_progress else (None, None)
    with quiet_library_progress(), bar or nullcontext():
        train_critic_model(pairs, out, reference=reference, steps=steps, batch_size=batch_size,
                           learning_rate=learning_rate, seed=seed, on_step=on_step, hidden_size=hidden_size,
                           heads=heads,
                           card={"source": f"rule {kind} critiques on {task} (train split)"})
        scores = score_critic(out, held, reference=reference, target="verdict", max_new_tokens=72)
    report = {"out": str(out), "task": task, "reference": reference, "train_pairs": len(pairs),
              "held_out_pairs": len(held), "verdict_vs_verifier": scores}
    Path(out, "critic_report.json").write_text(json.dumps(report, indent=2))
    typer.echo(json.dumps(report))


@critic_app.command("distill")
def distill_command(
    cache: Path = typer.Option(..., "--cache", help="critic_cache.sqlite a run filled (critic.cache_path)."),
    out: Path = typer.Option(..., "--out", help="Directory to write the local critic model to."),
    held_out: float = typer.Option(0.2, "--held-out", help="Share of questions held out for the agreement score."),
    steps: int = typer.Option(800, "--steps", help="SFT steps."),
    batch_size: int = typer.Option(32, "--batch-size"),
    learning_rate: float = typer.Option(1e-3, "--learning-rate"),
    hidden_size: int = typer.Option(128, "--hidden-size", help="Critic model width (heads of 32+ dims each)."),
    heads: int = typer.Option(4, "--heads"),
    reference: str | None = typer.Option(None, "--reference",
                                         help="hidden|visible; default: as the cached critic saw it."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", help="Critique length when scoring held-out pairs."),
    price_input: float | None = typer.Option(None, "--price-input", help="$ per 1M prompt tokens (for the cost)."),
    price_output: float | None = typer.Option(None, "--price-output", help="$ per 1M completion tokens."),
    seed: int = typer.Option(0, "--seed"),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Distil the critic a run paid for (its cache) into a local model; report agreement and the API cost."""
    from contextlib import nullcontext

    from critique_rl.critics.train_critic import distill
    from critique_rl.errors import UserError
    from critique_rl.train.run_setup import quiet_library_progress

    if (price_input is None) != (price_output is None):
        raise UserError("give both --price-input and --price-output (dollars per 1M tokens), or neither")
    bar, on_step = _progress(steps, "distil critic") if not no_progress else (None, None)
    with quiet_library_progress(), bar or nullcontext():
        report = distill(cache, out, held_out=held_out, seed=seed, steps=steps, batch_size=batch_size,
                         learning_rate=learning_rate, reference=reference, max_new_tokens=max_new_tokens,
                         price_input=price_input,
                         price_output=price_output, on_step=on_step, hidden_size=hidden_size, heads=heads)
    typer.echo(json.dumps(report))
