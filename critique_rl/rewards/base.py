"""Reward-function protocol, registry, and scoring.

A reward function is any callable ``(prompts, completions, **dataset_columns) -> list[float | None]``
(None = not applicable to that sample), or an ``async def`` with the same signature. The registry maps a name
to a *factory* ``(task, **kwargs) -> RewardFunc`` so built-ins can bind the task's verifier and options; the
options come from the config's ``reward_kwargs`` (``{reward name: {arg: value}}``).

Calling convention for the trainer: :func:`score_rewards` (sync) or :func:`ascore_rewards` (async) turn
K functions into an ``[N, K]`` float tensor, NaN where a function returned None, after checking every function
returned exactly N numbers (errors name the function).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import math
import numbers
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import torch

from critique_rl.errors import UserError
from critique_rl.tasks import Task, load_callable

T = TypeVar("T")


class RewardFunc(Protocol):
    __name__: str

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]: ...


RewardFactory = Callable[..., RewardFunc]
"""``(task, **kwargs) -> RewardFunc``."""
REWARD_FUNCS: dict[str, RewardFactory] = {}


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Register a factory ``(task, **kwargs) -> RewardFunc`` under ``name`` (usable in ``reward_funcs``)."""

    def deco(factory: RewardFactory) -> RewardFactory:
        REWARD_FUNCS[name] = factory
        return factory

    return deco


@register_reward("correctness")
def correctness_factory(task: Task) -> RewardFunc:
    """1.0 when the task verifier accepts the completion against the reference ``answer`` column, else 0.0;
    None (not applicable) where the reference is None."""

    def correctness(
        prompts: list[str], completions: list[str], answer: list[str | None], **_: Any
    ) -> list[float | None]:
        return [
            None if a is None else (1.0 if task.verify(c, a) else 0.0)
            for c, a in zip(completions, answer, strict=True)
        ]

    return correctness


def func_name(fn: Callable[..., Any]) -> str:
    """A readable name for a reward function or gate (``__name__``, else the partial's / class's name)."""
    if isinstance(fn, functools.partial):
        return func_name(fn.func)
    return getattr(fn, "__name__", None) or type(fn).__name__


def bind_factory(
    factory: Callable[..., T], task: Task, kwargs: dict[str, Any], what: str, name: str
) -> T:
    """Call ``factory(task, **kwargs)``; unknown keyword arguments become a :class:`UserError`."""
    params = inspect.signature(factory).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [p for p in list(params)[1:] if params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown and not accepts_any:
        raise UserError(
            f"config field '{what}_kwargs' for {what} {name!r} has unknown argument(s) {unknown}; "
            f"it accepts {allowed or 'no arguments'}"
        )
    return factory(task, **kwargs)


def _bind_user(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Callable[..., Any]:
    if not kwargs:
        return fn
    bound = functools.partial(fn, **kwargs)
    functools.update_wrapper(bound, fn)  # keeps __name__ for logs
    return bound


def resolve_named(
    names: list[str],
    task: Task,
    registry: dict[str, Callable[..., Any]],
    kwargs_by_name: dict[str, dict[str, Any]] | None,
    what: str,
    field: str,
) -> list[Any]:
    """Shared resolver for reward functions and gates: registry names or ``pkg.module:fn`` / ``file.py:fn``."""
    kwargs_by_name = dict(kwargs_by_name or {})
    stray = sorted(set(kwargs_by_name) - set(names))
    if stray:
        raise UserError(f"config field '{what}_kwargs' names {stray}, which are not in '{field}' ({names})")
    out: list[Any] = []
    for name in names:
        kw = dict(kwargs_by_name.get(name) or {})
        if name in registry:
            out.append(bind_factory(registry[name], task, kw, what, name))
        elif ":" in name:
            out.append(_bind_user(load_callable(name, what=f"{what} function"), kw))
        else:
            raise UserError(
                f"config field '{field}' has unknown {what} {name!r}; choose from {sorted(registry)} "
                "or give 'package.module:function' / 'file.py:function'"
            )
    return out


def build_reward_funcs(
    names: list[str], task: Task, reward_kwargs: dict[str, dict[str, Any]] | None = None
) -> list[RewardFunc]:
    """Resolve names from the registry, or ``pkg.module:fn`` / ``file.py:fn`` user functions.

    ``reward_kwargs`` maps a name from ``names`` to keyword arguments: for a built-in they go to its
    factory (e.g. ``{"format": {"pattern": r"\\d+"}, "overlong": {"max_length": 16, "cache_length": 4}}``),
    for a user function they are bound with ``functools.partial``.
    """
    return resolve_named(names, task, REWARD_FUNCS, reward_kwargs, what="reward", field="reward_funcs")


# ---------------------------------------------------------------------------------------------------------
# calling (sync or async) and validation
# ---------------------------------------------------------------------------------------------------------

def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from sync code, also when an event loop is already running here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _invoke(fn: Callable[..., Any], what: str, *args: Any, **kwargs: Any) -> Any:
    try:
        out = fn(*args, **kwargs)
        if inspect.isawaitable(out):
            out = await out
    except Exception as exc:
        exc.add_note(f"(raised by {what} function {func_name(fn)!r})")
        raise
    return out


def _as_list(out: Any, n: int, what: str, fn: Callable[..., Any]) -> list[Any]:
    if hasattr(out, "tolist") and not isinstance(out, list | tuple):
        out = out.tolist()
    if not isinstance(out, Sequence) or isinstance(out, str | bytes):
        raise UserError(f"{what} function {func_name(fn)!r} must return a list of {n} values; got {type(out).__name__}")
    if len(out) != n:
        raise UserError(f"{what} function {func_name(fn)!r} returned {len(out)} values for {n} completions")
    return list(out)


def validate_rewards(out: Any, n: int, fn: Callable[..., Any]) -> list[float | None]:
    """Check ``out`` is N numbers-or-None; NaN becomes None. Errors name ``fn``."""
    values = _as_list(out, n, "reward", fn)
    clean: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            clean.append(None)
        elif isinstance(v, numbers.Real):
            f = float(v)
            clean.append(None if math.isnan(f) else f)
        else:
            raise UserError(
                f"reward function {func_name(fn)!r} returned {v!r} ({type(v).__name__}) at index {i}; "
                "return a float, or None when the reward does not apply"
            )
    return clean


async def acall_reward(
    fn: Callable[..., list[float | None] | Awaitable[list[float | None]]],
    prompts: list[str],
    completions: list[str],
    **columns: Any,
) -> list[float | None]:
    """Call a sync or async reward function and validate its output (N values, float or None)."""
    out = await _invoke(fn, "reward", prompts, completions, **columns)
    return validate_rewards(out, len(completions), fn)


def call_reward(
    fn: Callable[..., list[float | None] | Awaitable[list[float | None]]],
    prompts: list[str],
    completions: list[str],
    **columns: Any,
) -> list[float | None]:
    """Sync entry point of :func:`acall_reward`: coroutine functions are awaited in an event loop."""
    return run_sync(acall_reward(fn, prompts, completions, **columns))


def _check_inputs(prompts: list[str], completions: list[str], columns: dict[str, Any] | None) -> dict[str, Any]:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return dict(columns or {})


async def ascore_rewards(
    funcs: list[Callable[..., Any]],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Score N completions with K reward functions concurrently -> float32 ``[N, K]``, NaN where None."""
    cols = _check_inputs(prompts, completions, columns)
    results = await asyncio.gather(*(acall_reward(f, prompts, completions, **cols) for f in funcs))
    table = [[math.nan if v is None else v for v in col] for col in results]
    if not funcs:
        return torch.empty(len(completions), 0)
    return torch.tensor(table, dtype=torch.float32).T.contiguous()


def score_rewards(
    funcs: list[Callable[..., Any]],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Sync :func:`ascore_rewards`: ``[N, K]`` rewards (column k = ``funcs[k]``), NaN for None.

    ``columns`` are the dataset columns of the N samples (each a list of N values, e.g. ``answer``) plus
    extras such as ``completion_lengths``; every function receives them as keyword arguments.
    """
    return run_sync(ascore_rewards(funcs, prompts, completions, columns))
