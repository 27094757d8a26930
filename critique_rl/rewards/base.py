"""Reward-function protocol, registry, and scoring.

A reward function is called the way TRL's ``GRPOTrainer`` calls one, with keyword arguments only::

    fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., <every dataset column>=...)
    -> list[float | None]                      # None = not applicable to that sample; async def allowed

so a function written for TRL (``def correct(completions, answer, **kwargs)``) drops in unchanged. Every
argument is a list of N values except ``trainer_state`` (a :class:`TrainerState`). With a chat template
(conversational data) ``prompts`` and ``completions`` are lists of messages
(``[{"role": "assistant", "content": "..."}]``), else strings; :func:`completion_text` reads either. The
trainer also passes ``completion_lengths`` (generated tokens) and ``truncated`` (stopped by the token limit).
A function without ``**kwargs`` receives only the arguments it names; one whose first two parameters are
positional and named otherwise (the old ``(prompts, completions, **columns)`` form under other names) is
still called positionally. Gates (:mod:`critique_rl.rewards.gates`) and TRL-style verifiers
(:class:`Verifier`) follow the same convention.

The registry maps a name to a *factory* ``(task, **kwargs) -> RewardFunc`` so built-ins can bind the task's
verifier and options; the options come from the config's ``reward_kwargs`` (``{reward name: {arg: value}}``).

Calling convention for the trainer: :func:`score_rewards` (sync) or :func:`ascore_rewards` (async) turn
K functions into an ``[N, K]`` float tensor, NaN where a function returned None, after checking every function
returned exactly N numbers (errors name the function).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import inspect
import math
import numbers
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import torch

from critique_rl.errors import UserError
from critique_rl.primitives import Message, completion_text  # noqa: F401 (re-exported)
from critique_rl.registry import Registry
from critique_rl.tasks import Task
from critique_rl.user_code import (
    defined_at,
    is_user_callable,
    load_user_callable,
    mark_user_exception,
    signature_error,
)

T = TypeVar("T")


class RewardFunc(Protocol):
    __name__: str

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]: ...


@dataclasses.dataclass(frozen=True)
class TrainerState:
    """What the trainer passes as ``trainer_state=`` (TRL passes its ``TrainerState``; these are the fields a
    reward schedule reads from it)."""

    global_step: int = 0
    """RL steps completed so far."""
    max_steps: int = 0
    """RL steps the run will take."""


def reward_inputs(
    rows: list[dict[str, Any]],
    texts: list[str],
    completion_ids: list[list[int]] | None = None,
    *,
    conversational: bool = False,
    trainer_state: TrainerState | None = None,
    extra: dict[str, list[Any]] | None = None,
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """``(prompts, completions, columns)`` for N rollouts, as TRL builds them.

    ``prompts`` are the rows' ``prompt`` values; ``completions`` the texts. ``conversational`` (a chat
    template is in use) wraps them as messages: ``[{"role": "user", "content": prompt}]`` (a prompt that is
    already a list of messages stays as is) and ``[{"role": "assistant", "content": text}]``. ``columns``:
    every other dataset column by name (a list of N values), ``completion_ids``, ``trainer_state`` and
    ``extra`` (e.g. ``completion_lengths``).
    """
    if len(rows) != len(texts):
        raise ValueError(f"{len(rows)} rows but {len(texts)} completions")
    prompts: list[Any] = [r.get("prompt") for r in rows]
    completions: list[Any] = list(texts)
    if conversational:
        prompts = [p if isinstance(p, list) else list(p.messages) if getattr(p, "messages", None)
                   else [{"role": "user", "content": p}] for p in prompts]  # a conversational row: its messages
        completions = [[{"role": "assistant", "content": t}] for t in texts]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    columns: dict[str, Any] = {k: [r.get(k) for r in rows] for k in keys if k not in _RESERVED}
    columns["completion_ids"] = [list(ids) for ids in completion_ids] if completion_ids is not None else None
    columns["trainer_state"] = trainer_state
    columns.update(extra or {})
    return prompts, completions, columns


_RESERVED = ("prompt", "prompts", "completions")


RewardFactory = Callable[..., RewardFunc]
"""``(task, **kwargs) -> RewardFunc``."""
REWARD_FUNCS: Registry[RewardFactory] = Registry("reward function", "reward_funcs")


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Register a factory ``(task, **kwargs) -> RewardFunc`` under ``name`` (usable in ``reward_funcs``)."""

    return REWARD_FUNCS.decorator(name)


@register_reward("correctness")
def correctness_factory(task: Task) -> RewardFunc:
    """1.0 when the task verifier accepts the completion against the reference ``answer`` column, else 0.0;
    None (not applicable) where the reference is None."""

    def correctness(
        prompts: list[Any], completions: list[Any], answer: list[str | None], **columns: Any
    ) -> list[float | None]:
        judges = task.for_rows(len(completions), columns.get("task"))  # a mixture: each row's own task
        return [
            None if a is None else (1.0 if t.verify(completion_text(c), a) else 0.0)
            for t, c, a in zip(judges, completions, answer, strict=True)
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
            out.append(_bind_user(load_user_callable(name, what=f"{what} function"), kw))
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
    """Run ``coro`` to completion from sync code, also when an event loop is already running here.

    ``asyncio.run`` is called outside any ``except`` block, so an error raised inside ``coro`` is not chained to
    the "no running event loop" probe."""
    try:
        asyncio.get_running_loop()
        running = True
    except RuntimeError:
        running = False
    if not running:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def call_arguments(
    fn: Callable[..., Any], what: str, prompts: list[Any], completions: list[Any], columns: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` to call ``fn`` with, TRL's keyword convention first (see the module docstring).

    - a function naming ``prompts`` / ``completions`` as keyword-capable parameters, or with no required
      positional parameter (``def f(**kwargs)``), is called with keywords only: ``prompts=``,
      ``completions=``, then every column;
    - otherwise (the old positional form, ``def f(p, c, **cols)``) ``fn(prompts, completions, **columns)``;
    - without ``**kwargs`` only the arguments it names are passed; a required one nobody provides is a
      :class:`UserError` naming the function, the argument and the columns there are.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature (some builtins / C callables): TRL's call
        return (), {"prompts": prompts, "completions": completions, **columns}
    values = dict(columns)
    values.pop("prompts", None)
    values.pop("completions", None)
    by_keyword = {"prompts": prompts, "completions": completions, **values}
    keyword_ok = [p for p in params.values() if p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    names_io = any(p.name in ("prompts", "completions") for p in keyword_ok)
    required_pos = [p for p in params.values() if p.kind in _POSITIONAL and p.default is inspect.Parameter.empty]
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if names_io or not required_pos:
        args: tuple[Any, ...] = ()
        offered = by_keyword
        taken = {p.name for p in keyword_ok}
    else:  # legacy positional (prompts, completions, **columns)
        args = (prompts, completions)
        offered = values
        skip = {p.name for p in list(params.values())[:2] if p.kind in _POSITIONAL}
        taken = {p.name for p in keyword_ok} - skip
    kwargs = offered if var_kw else {k: v for k, v in offered.items() if k in taken}
    positional_names = {p.name for p in list(params.values())[: len(args)]}
    for p in params.values():
        if (p.default is inspect.Parameter.empty and p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                     inspect.Parameter.VAR_KEYWORD)
                and p.name not in kwargs and p.name not in positional_names):
            cols = sorted(values)
            raise UserError(
                f"{what} function {func_name(fn)!r} needs argument {p.name!r}, which is not given; it is "
                f"called with prompts, completions and {cols} (add the column to the dataset, or give the "
                "parameter a default)"
            )
    return args, kwargs


async def _invoke(
    fn: Callable[..., Any], what: str, prompts: list[Any], completions: list[Any], columns: dict[str, Any]
) -> Any:
    args, kwargs = call_arguments(fn, what, prompts, completions, columns)
    user = is_user_callable(fn)
    if user:
        _check_binds(fn, what, args, kwargs)
    try:
        out = fn(*args, **kwargs)
        if inspect.isawaitable(out):
            out = await out
    except UserError:
        raise
    except Exception as exc:
        exc.add_note(f"(raised by {what} function {func_name(fn)!r})")
        if user:  # the CLI prints it as one block with the user's frames only, exit 2
            mark_user_exception(exc, f"{what} function", func_name(fn), fn)
        raise
    return out


def _check_binds(fn: Callable[..., Any], what: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A user function whose signature cannot take the call becomes a :class:`UserCodeError` (instead of a
    ``TypeError`` from inside our call)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        how = ("it is called positionally as (prompts, completions, **columns)" if args else
               "it is called with keyword arguments prompts=, completions= and every dataset column")
        raise signature_error(f"{what} function", func_name(fn), fn, f"{exc} ({how})",
                              f"write it as def {func_name(fn)}(completions, **kwargs) returning "
                              + ("one bool per completion" if what == "verifier" else "one float per completion")
                              ) from None


def _as_list(out: Any, n: int, what: str, fn: Callable[..., Any]) -> list[Any]:
    if hasattr(out, "tolist") and not isinstance(out, list | tuple):
        out = out.tolist()
    if not isinstance(out, Sequence) or isinstance(out, str | bytes):
        raise UserError(f"{what} function {func_name(fn)!r} must return a list of {n} values; got {type(out).__name__}")
    if len(out) != n:
        raise UserError(f"{what} function {func_name(fn)!r} returned {len(out)} values for {n} completions")
    return list(out)


def validate_rewards(out: Any, n: int, fn: Callable[..., Any]) -> list[float | None]:
    """Check ``out`` is N numbers-or-None; NaN becomes None. Errors name ``fn``. An infinite value is kept
    (the step's loss turns non-finite and its update is skipped), and the first time ``fn`` returns one a
    warning names it (:func:`warn_infinite_reward`)."""
    values = _as_list(out, n, "reward", fn)
    clean: list[float | None] = []
    infinite: list[int] = []
    for i, v in enumerate(values):
        if v is None:
            clean.append(None)
        elif isinstance(v, numbers.Real):
            f = float(v)
            clean.append(None if math.isnan(f) else f)
            if math.isinf(f):
                infinite.append(i)
        else:
            raise UserError(
                f"reward function {func_name(fn)!r} returned {v!r} ({type(v).__name__}) at index {i}; "
                "return a float, or None when the reward does not apply"
            )
    if infinite:
        warn_infinite_reward(fn, infinite, clean)
    return clean


_INFINITE_WARNED: set[tuple[str, str | None]] = set()
"""Reward functions already named in an infinite-reward warning (by name and definition site)."""


def infinite_reward_message(fn: Callable[..., Any], indices: list[int], values: list[float | None]) -> str:
    """The warning text for ``fn`` returning +-inf at ``indices`` of ``values``."""
    where = defined_at(fn)
    first = values[indices[0]]
    return (f"reward function {func_name(fn)!r}" + (f" ({where})" if where else "")
            + f" returned {first} for {len(indices)} of {len(values)} completions (first at index {indices[0]}); "
            "the step's loss is then NaN/inf and its update is skipped (max_nonfinite_steps such steps in a row "
            "stop training). Return a finite float, or None where the reward does not apply")


def warn_infinite_reward(
    fn: Callable[..., Any], indices: list[int], values: list[float | None],
    warn: Callable[[str], None] | None = None,
) -> bool:
    """Name ``fn`` in a warning the first time (per process) it returns +-inf; returns True when it warned.
    ``warn`` receives the text (default: ``warning: ...`` on stderr)."""
    key = (func_name(fn), defined_at(fn))
    if key in _INFINITE_WARNED:
        return False
    _INFINITE_WARNED.add(key)
    message = infinite_reward_message(fn, indices, values)
    if warn is not None:
        warn(message)
    else:
        print(f"warning: {message}", file=sys.stderr, flush=True)
    return True


def infinite_reward_names(rewards: torch.Tensor, names: Sequence[str]) -> list[str]:
    """Names of the columns of an ``[N, K]`` reward matrix that hold +-inf (for a skipped step's message)."""
    if rewards.numel() == 0:
        return []
    bad = torch.isinf(rewards).any(dim=0).tolist()
    return [name for name, b in zip(names, bad, strict=True) if b]


class Verifier:
    """Correctness of completions, from a user's ``verifier`` in either form:

    - per sample, ``verify(completion: str, answer: str) -> bool`` (the tasks' form), called positionally
      with the completion's text;
    - batched, TRL-style (a function with a ``completions`` parameter, e.g. ``def correct(completions,
      answer, **kwargs)``): called like a reward function (:func:`call_arguments`), returning one bool or
      number per completion; correct iff the value is not None and ``> threshold`` (default 0.5, the
      trainer passes ``reward_threshold``).

    ``verifier(completion, answer)`` answers for one completion in both cases; :meth:`check` for a batch.
    """

    def __init__(self, fn: Callable[..., Any], threshold: float = 0.5, conversational: bool = False) -> None:
        self.fn = fn
        self.threshold = float(threshold)
        self.conversational = conversational
        """Default of :meth:`check_rows`: pass prompts and completions as messages (a chat template is used)."""
        self.batched = is_batched(fn)
        self.__name__ = func_name(fn)

    def check(self, prompts: list[Any], completions: list[Any], columns: dict[str, Any] | None = None) -> list[bool]:
        cols = _check_inputs(prompts, completions, columns)
        if not self.batched:
            answers = cols.get("answer") or [None] * len(completions)
            return [self._one(completion_text(c), a) for c, a in zip(completions, answers, strict=True)]
        out = run_sync(_invoke(self.fn, "verifier", prompts, completions, cols))
        values = validate_rewards(out, len(completions), self.fn)
        return [v is not None and v > self.threshold for v in values]

    def _one(self, text: str, answer: Any) -> bool:
        """The per-sample form ``fn(text, answer)``. A user's function that cannot take two arguments is a
        :class:`~critique_rl.user_code.UserCodeError`; one that raises is marked for the CLI's block."""
        try:
            return bool(self.fn(text, answer))
        except UserError:
            raise
        except Exception as exc:
            if not is_user_callable(self.fn):
                raise
            if isinstance(exc, TypeError) and _signature_mismatch(self.fn, 2):
                raise signature_error("verifier", self.__name__, self.fn, f"{exc}",
                                      f"write it as def {self.__name__}(completion, answer) -> bool, or TRL-style "
                                      f"def {self.__name__}(completions, answer, **kwargs)") from None
            exc.add_note(f"(raised by verifier {self.__name__!r})")
            mark_user_exception(exc, "verifier", self.__name__, self.fn)
            raise

    def check_rows(self, rows: list[dict[str, Any]], texts: list[str], **inputs: Any) -> list[bool]:
        """:meth:`check` for dataset rows and completion texts (``inputs`` go to :func:`reward_inputs`)."""
        inputs.setdefault("conversational", self.conversational)
        return self.check(*reward_inputs(rows, texts, **inputs))

    def __call__(self, completion: Any, answer: Any, **columns: Any) -> bool:
        """One completion (text or messages) against its reference; ``columns``: that row's other values."""
        if not self.batched:
            return self._one(completion_text(completion), answer)
        if self.conversational and isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        cols = {k: [v] for k, v in columns.items()}
        return self.check([None], [completion], {**cols, "answer": [answer]})[0]


def _signature_mismatch(fn: Callable[..., Any], n_args: int) -> bool:
    """True when ``fn`` cannot be called with ``n_args`` positional arguments."""
    try:
        inspect.signature(fn).bind(*([None] * n_args))
    except TypeError:
        return True
    except ValueError:
        return False
    return False


def is_batched(fn: Callable[..., Any]) -> bool:
    """True for a TRL-style batch function (it names a ``completions`` or ``prompts`` parameter)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return any(p in params for p in ("completions", "prompts"))


async def acall_reward(
    fn: Callable[..., list[float | None] | Awaitable[list[float | None]]],
    prompts: list[Any],
    completions: list[Any],
    **columns: Any,
) -> list[float | None]:
    """Call a sync or async reward function TRL's way (:func:`call_arguments`) and validate its output
    (N values, float or None)."""
    out = await _invoke(fn, "reward", prompts, completions, columns)
    return validate_rewards(out, len(completions), fn)


def call_reward(
    fn: Callable[..., list[float | None] | Awaitable[list[float | None]]],
    prompts: list[Any],
    completions: list[Any],
    **columns: Any,
) -> list[float | None]:
    """Sync entry point of :func:`acall_reward`: coroutine functions are awaited in an event loop."""
    return run_sync(acall_reward(fn, prompts, completions, **columns))


def _check_inputs(prompts: list[Any], completions: list[Any], columns: dict[str, Any] | None) -> dict[str, Any]:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return dict(columns or {})


async def ascore_rewards(
    funcs: list[Callable[..., Any]],
    prompts: list[Any],
    completions: list[Any],
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
    prompts: list[Any],
    completions: list[Any],
    columns: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Sync :func:`ascore_rewards`: ``[N, K]`` rewards (column k = ``funcs[k]``), NaN for None.

    ``columns`` are the dataset columns of the N samples (each a list of N values, e.g. ``answer``) plus
    ``completion_ids``, ``trainer_state`` and extras such as ``completion_lengths`` (see
    :func:`reward_inputs`); every function receives them as keyword arguments, TRL's way.
    """
    return run_sync(ascore_rewards(funcs, prompts, completions, columns))
