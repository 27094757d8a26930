"""Held-out evaluation: greedy accuracy, pass@k by sampling, mean completion length, calibration."""

from __future__ import annotations

from collections.abc import Callable
from math import comb
from pathlib import Path
from typing import Any

from critique_rl.rollout.base import Generator, SamplingParams
from critique_rl.train.calibration import calibration_report
from critique_rl.train.task_mix import accuracy_by_task

EVAL_SEED = 12345
"""The held-out set does not depend on the run seed, so seeds compare on the same problems."""

EvalRecord = tuple[bool, int, "float | None"]
"""Per held-out row: (greedy answer correct, completion tokens, stated confidence or None)."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, arXiv:2107.03374): ``1 - C(n-c, k) / C(n, k)``."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def greedy_records(
    generator: Generator,
    rows: list[dict[str, Any]],
    prompt_fn: Callable[[dict[str, Any]], str],
    verify: Callable[[str, str], bool],
    max_new_tokens: int,
    batch_size: int = 256,
    confidence_fn: Callable[[str], float | None] | None = None,
) -> list[EvalRecord]:
    """Greedy-decode ``rows`` and score each: the raw material of :func:`summarise_records` (several
    processes each score a shard and the records are gathered before summarising)."""
    prompts = [prompt_fn(r) for r in rows]
    records: list[EvalRecord] = []
    for s in range(0, len(rows), batch_size):
        outs = generator.generate(prompts[s : s + batch_size], SamplingParams(n=1, max_new_tokens=max_new_tokens, greedy=True))
        chunk, done = rows[s : s + batch_size], [c for (c,) in outs]
        flags = _flags(verify, chunk, done)
        for c, ok in zip(done, flags, strict=True):
            conf = confidence_fn(c.text) if confidence_fn is not None else None
            records.append((bool(ok), len(c.token_ids), conf))
    return records


def _flags(verify: Callable[..., Any], rows: list[dict[str, Any]], completions: list[Any]) -> list[bool]:
    """Correctness of one completion per row: a :class:`~critique_rl.rewards.Verifier` gets one keyword call
    with every column (a task mixture reads ``task``), a plain ``verify(text, answer)`` one call per row."""
    check_rows = getattr(verify, "check_rows", None)
    if check_rows is not None:
        return check_rows(rows, [c.text for c in completions], completion_ids=[c.token_ids for c in completions])
    return [bool(verify(c.text, row["answer"])) for row, c in zip(rows, completions, strict=True)]


def summarise_records(records: list[EvalRecord], with_confidence: bool = False, bins: int = 10) -> dict[str, Any]:
    """``accuracy``, ``mean_length``, ``n`` and, ``with_confidence``, the calibration report's keys."""
    n = len(records)
    flags = [r[0] for r in records]
    result: dict[str, Any] = {"accuracy": sum(flags) / n, "mean_length": sum(r[1] for r in records) / n,
                              "n": float(n)}
    if with_confidence:
        result.update(calibration_report([r[2] for r in records], flags, bins))
    return result


def evaluate(
    generator: Generator,
    rows: list[dict[str, Any]],
    prompt_fn: Callable[[dict[str, Any]], str],
    verify: Callable[[str, str], bool],
    max_new_tokens: int,
    k: int = 1,
    temperature: float = 1.0,
    batch_size: int = 256,
    confidence_fn: Callable[[str], float | None] | None = None,
    bins: int = 10,
    records_out: list[EvalRecord] | None = None,
) -> dict[str, Any]:
    """``accuracy`` (greedy), ``mean_length`` (tokens, greedy) and, when ``k > 1``, ``pass@k`` from
    ``k`` samples per problem at ``temperature``.

    With ``confidence_fn`` (completion text -> stated confidence in [0, 1] or None), the greedy answers are
    also scored for calibration: every key of :func:`critique_rl.train.calibration.calibration_report`
    (``ece`` with ``bins`` bins, ``brier_score``, ``auroc``, ``mean_confidence``, ``unparsable_rate``, ...).
    """
    records = greedy_records(generator, rows, prompt_fn, verify, max_new_tokens, batch_size, confidence_fn)
    if records_out is not None:  # the per-row records, for a caller that applies a decision rule
        records_out.extend(records)
    result = summarise_records(records, confidence_fn is not None, bins)
    by_task = accuracy_by_task(rows, [r[0] for r in records])
    if by_task:  # rows of several tasks (a mixture's `task` column)
        result["by_task"] = by_task
    if k > 1:
        total = 0.0
        for s in range(0, len(rows), max(1, batch_size // k)):
            chunk = rows[s : s + max(1, batch_size // k)]
            outs = generator.generate([prompt_fn(r) for r in chunk],
                                      SamplingParams(n=k, temperature=temperature, max_new_tokens=max_new_tokens))
            for row, group in zip(chunk, outs, strict=True):
                c = sum(_flags(verify, [row] * len(group), group))
                total += pass_at_k(k, c, k)
        result[f"pass@{k}"] = total / len(rows)
    return result


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""Files of which a saved model directory holds at least one (``save_pretrained``'s names, sharded or not)."""
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
"""The weights of a LoRA adapter saved alone (``lora.merge_final: false``), beside ``adapter_config.json``."""


def check_model_dir(path: str | Path, what: str = "model directory", allow_adapter: bool = False) -> Path:
    """``path`` must be a folder saved with ``save_pretrained``: a ``config.json`` and weights (with
    ``allow_adapter``, an ``adapter_config.json`` and adapter weights also do). Otherwise a one-line
    :class:`UserError` naming what is missing. Returns the path."""
    from critique_rl.errors import UserError

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} '{path}' does not exist; pass a folder saved with save_pretrained (config.json and "
                        "weights): a run's final/ or a checkpoint-*/model")
    if not p.is_dir():
        raise UserError(f"{what} '{path}' is a file; pass the folder saved with save_pretrained (e.g. RUN/final)")
    if allow_adapter and (p / "adapter_config.json").is_file() and any((p / n).is_file() for n in ADAPTER_FILES):
        return p
    if not (p / "config.json").is_file():
        hint = " (a run directory: pass RUN/final)" if (p / "final").is_dir() else ""
        raise UserError(f"{what} '{path}' has no config.json{hint}; pass a folder saved with save_pretrained")
    if not any((p / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"{what} '{path}' has a config.json but no weights (none of {', '.join(WEIGHT_FILES[:3])}, "
                        "...); the save did not finish or the weights were moved: pass a folder that holds them")
    return p


def evaluate_saved(
    model_dir: str | Path,
    task: str,
    n: int = 200,
    batch_size: int = 256,
    device: str = "cpu",
    rows: list[dict[str, Any]] | None = None,
    confidence_fn: Callable[[str], float | None] | None = None,
    bins: int = 10,
    records_out: list[EvalRecord] | None = None,
) -> dict[str, Any]:
    """Greedy-decode the held-out set of ``task`` with the model saved in ``model_dir``: :func:`evaluate`'s dict.

    The held-out rows are the trainer's (``task.make_examples("eval", n, EVAL_SEED)``) unless ``rows`` is
    given; correctness is the task verifier; ``records_out`` receives the per-row records.
    """
    from critique_rl.models import format_prompt, load_policy, wants_chat_template
    from critique_rl.rollout.factory import build_generator
    from critique_rl.tasks import get_task

    t = get_task(task)
    rows = rows if rows is not None else t.make_examples("eval", n, EVAL_SEED)[:n]
    check_model_dir(model_dir)
    model, tok = load_policy(model_dir, device=device)
    use_chat = wants_chat_template(tok, "auto")
    gen = build_generator("hf", model, tok, batch_size=batch_size)
    return evaluate(gen, rows, lambda r: format_prompt(tok, r["prompt"], use_chat), t.verify, t.max_new_tokens,
                    batch_size=batch_size, confidence_fn=confidence_fn, bins=bins, records_out=records_out)


def evaluate_calibration(
    model_dir: str | Path,
    task: str = "addition_conf",
    n: int = 200,
    bins: int = 10,
    batch_size: int = 256,
    device: str = "cpu",
    rows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """:func:`evaluate_saved` with the confidence of each greedy completion read by
    :func:`~critique_rl.rewards.builtin.parse_confidence`: the dict also holds
    :func:`~critique_rl.train.calibration.calibration_report`'s keys.
    """
    from critique_rl.rewards.builtin import parse_confidence

    return evaluate_saved(model_dir, task, n, batch_size, device, rows, confidence_fn=parse_confidence, bins=bins)
