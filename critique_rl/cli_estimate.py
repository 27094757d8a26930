"""`critique-rl estimate-memory CONFIG`: peak GPU memory of one training step, by part, without a GPU.

The model is built from its ``config.json`` on fake tensors (no weights are read) and the trainer's own update
step is traced (:mod:`critique_rl.gpu_memory_estimate`); generation memory comes from the KV-cache shape.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import typer

from critique_rl.errors import UserError


def estimate_memory_command(
    config: Path = typer.Argument(..., help="YAML run config (its model: must be a local folder with config.json)."),
    gpu_gb: float = typer.Option(80.0, "--gpu-gb", help="Memory of the GPU to fit (GB, 1e9 bytes)."),
    prompt_tokens: int = typer.Option(256, "--prompt-tokens", help="Prompt length to assume (tokens; refinement "
                                      "prompts: question + answer + critique)."),
    completion_tokens: int | None = typer.Option(None, "--completion-tokens",
                                                 help="Completion length (default: the config's max_new_tokens)."),
    no_suggest: bool = typer.Option(False, "--no-suggest", help="Do not re-estimate alternative settings."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
) -> None:
    """Estimate the peak GPU memory of one training step of CONFIG and whether it fits --gpu-gb."""
    from critique_rl.config import load_config
    from critique_rl.gpu_memory_estimate import estimate_memory, format_estimate

    if not math.isfinite(gpu_gb) or gpu_gb <= 0:
        raise UserError(f"--gpu-gb {gpu_gb}: use a positive number of GB")
    if prompt_tokens < 1:
        raise UserError(f"--prompt-tokens {prompt_tokens}: use >= 1")
    if completion_tokens is not None and completion_tokens < 1:
        raise UserError(f"--completion-tokens {completion_tokens}: use >= 1")
    cfg = load_config(config)
    if not cfg.max_new_tokens and completion_tokens is None:
        raise UserError("max_new_tokens is not set in the config (the task decides it); pass --completion-tokens")

    def progress(msg: str) -> None:
        print(f"[estimate-memory] {msg}", file=sys.stderr, flush=True)

    progress("tracing one update step on fake tensors")
    est = estimate_memory(cfg, gpu_gb=gpu_gb, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          suggest=not no_suggest, progress=progress)
    typer.echo(json.dumps(est.to_json(), indent=2) if as_json else format_estimate(est))
