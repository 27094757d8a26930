"""Rubric gates: hard accept/reject checks (DRO, arXiv:2506.13351), not reward points.

A gate is a callable ``(prompts, completions, **dataset_columns) -> list[bool]`` (sync or async), called with
keyword arguments the way TRL calls reward functions (see :mod:`critique_rl.rewards.base`). The registry
maps a name to a factory ``(task, **kwargs) -> Gate``; user gates load from ``pkg.module:fn`` / ``file.py:fn``.
The trainer combines the results with :func:`critique_rl.algos.gates.apply_gates`: a rejected rollout gets no
gradient and leaves its group's baseline; a group with no passing rollout is dropped.

Config (fields the trainer reads)::

    gates: [has_answer, max_length]
    gate_kwargs: {max_length: {max_length: 12}}
"""

from __future__ import annotations

import asyncio
import numbers
from collections.abc import Callable
from typing import Any, Protocol

import torch

from critique_rl.errors import UserError
from critique_rl.registry import Registry
from critique_rl.rewards.base import (
    _as_list,
    _check_inputs,
    _invoke,
    completion_text,
    func_name,
    resolve_named,
    run_sync,
)
from critique_rl.rewards.builtin import format_flags, token_lengths
from critique_rl.tasks import Task


class Gate(Protocol):
    __name__: str

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[bool]: ...


GateFactory = Callable[..., Gate]
GATES: Registry[GateFactory] = Registry("gate", "gates")


def register_gate(name: str) -> Callable[[GateFactory], GateFactory]:
    """Register a factory ``(task, **kwargs) -> Gate`` under ``name`` (usable in the ``gates`` config list)."""

    return GATES.decorator(name)


@register_gate("has_answer")
def has_answer_factory(task: Task) -> Gate:
    """Pass iff the task can extract a final answer (``task.extract(completion) is not None``)."""

    def has_answer(prompts: list[Any], completions: list[Any], **columns: Any) -> list[bool]:
        judges = task.for_rows(len(completions), columns.get("task"))
        return [t.extract(completion_text(c)) is not None for t, c in zip(judges, completions, strict=True)]

    return has_answer


@register_gate("max_length")
def max_length_factory(task: Task, max_length: int | None = None) -> Gate:
    """Pass iff ``length <= max_length`` and the rollout was not truncated.

    Length: the ``completion_lengths`` column (generated tokens) when given, else whitespace tokens; default
    ``max_length = task.max_new_tokens``. When a ``truncated`` column (bool per rollout: stopped by the token
    limit, not EOS) is given, truncated rollouts fail too.
    """
    limit = int(task.max_new_tokens if max_length is None else max_length)
    if limit < 1:
        raise UserError(f"config field 'gate_kwargs' max_length: max_length must be >= 1; got {limit}")

    def max_length_gate(
        prompts: list[Any],
        completions: list[Any],
        completion_lengths: list[int] | None = None,
        truncated: list[bool] | None = None,
        **_: Any,
    ) -> list[bool]:
        lengths = token_lengths(completions, completion_lengths)
        cut = [False] * len(completions) if truncated is None else [bool(t) for t in truncated]
        return [n <= limit and not t for n, t in zip(lengths, cut, strict=True)]

    max_length_gate.__name__ = "max_length"
    return max_length_gate


@register_gate("format")
def format_gate_factory(task: Task, pattern: str | None = None) -> Gate:
    """Pass iff the completion has the task's format (same rules as the ``format`` reward)."""
    flags = format_flags(task, pattern)

    def format(prompts: list[Any], completions: list[Any], **columns: Any) -> list[bool]:
        return flags(completions, columns)

    return format


def build_gates(names: list[str], task: Task, gate_kwargs: dict[str, dict[str, Any]] | None = None) -> list[Gate]:
    """Resolve gate names from :data:`GATES`, or ``pkg.module:fn`` / ``file.py:fn`` user gates."""
    return resolve_named(names, task, GATES, gate_kwargs, what="gate", field="gates")


def validate_gate(out: Any, n: int, fn: Callable[..., Any]) -> list[bool]:
    """Check ``out`` is N booleans (bool, or the integers 0/1). Errors name ``fn``."""
    values = _as_list(out, n, "gate", fn)
    clean: list[bool] = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or (isinstance(v, numbers.Integral) and int(v) in (0, 1)):
            clean.append(bool(v))
        elif type(v).__name__ == "bool_":  # numpy.bool_
            clean.append(bool(v))
        else:
            raise UserError(f"gate function {func_name(fn)!r} returned {v!r} at index {i}; return True/False")
    return clean


async def aevaluate_gates(
    gates: list[Callable[..., Any]],
    prompts: list[Any],
    completions: list[Any],
    columns: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Async :func:`evaluate_gates`."""
    cols = _check_inputs(prompts, completions, columns)
    n = len(completions)
    outs = await asyncio.gather(*(_invoke(g, "gate", prompts, completions, cols) for g in gates))
    passed = torch.ones(n, dtype=torch.bool)
    rates: dict[str, float] = {}
    for g, out in zip(gates, outs, strict=True):
        ok = torch.tensor(validate_gate(out, n, g), dtype=torch.bool)
        name = func_name(g)
        key, i = name, 2
        while key in rates:
            key, i = f"{name}_{i}", i + 1
        rates[key] = float(ok.float().mean()) if n else 1.0
        passed &= ok
    return passed, rates


def evaluate_gates(
    gates: list[Callable[..., Any]],
    prompts: list[Any],
    completions: list[Any],
    columns: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Run every gate on N completions -> ``(passed [N] bool = AND over gates, {gate name: pass rate})``.

    Reshape ``passed`` to ``[G, n]`` and call :func:`critique_rl.algos.gates.apply_gates`. No gates: all pass.
    """
    return run_sync(aevaluate_gates(gates, prompts, completions, columns))
