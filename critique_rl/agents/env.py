"""The environment protocol for multi-turn agent episodes, typed tools, and an adapter for Gymnasium-style envs.

An environment is anything with::

    reset(task: dict) -> str                                   # the first observation
    step(action: str) -> (observation, reward, done, info)     # or a StepResult

either plain methods or ``async def`` ones (the runner awaits whatever is awaitable, and steps many envs of a
batch concurrently). ``task`` is a dataset row (``prompt`` plus any columns the env reads). ``info`` may hold
``success`` (bool): **the env decides whether an episode succeeded**; without it, success means a positive
return. One env object runs one episode at a time; the runner asks an ``env_factory`` for one env per episode.

Tools are typed Python callables (:class:`Tool`): ``Tool(add)`` for ``def add(a: int, b: int) -> int``
parses a call such as ``add(2, 3)`` from the policy's text with :func:`ast.literal_eval` (literals only, never
``eval``), checks the argument types against the annotations and calls the function.

Envs written for another framework with the Gymnasium API (``reset(seed=, options=) -> (obs, info)``,
``step(action) -> (obs, reward, terminated, truncated, info)``) plug in through :class:`GymnasiumTextEnv`.
"""

from __future__ import annotations

import ast
import inspect
import re
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from critique_rl.critics.base import Critique


@dataclass
class StepResult:
    """What one ``env.step(action)`` returns. ``info["success"]`` (on the last step) decides success."""

    observation: str
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    """A text environment: ``reset(task) -> observation``; ``step(action) -> StepResult`` (or a 4-tuple).

    Either method may be ``async def``."""

    def reset(self, task: dict[str, Any]) -> str | Awaitable[str]: ...

    def step(self, action: str) -> Any: ...


EnvFactory = Callable[[], Env]
"""Returns a fresh env (one per episode: episodes of a batch run concurrently)."""


def as_step_result(value: Any) -> StepResult:
    """Normalise what ``step`` returned: a :class:`StepResult`, ``(obs, reward, done, info)`` or Gymnasium's
    ``(obs, reward, terminated, truncated, info)``. Raises TypeError naming the shape otherwise."""
    if isinstance(value, StepResult):
        return value
    if isinstance(value, tuple) and len(value) == 4:
        obs, reward, done, info = value
    elif isinstance(value, tuple) and len(value) == 5:
        obs, reward, terminated, truncated, info = value
        done = bool(terminated) or bool(truncated)
        info = {**(info or {}), "truncated": bool(truncated)}
    else:
        raise TypeError(f"env.step returned {type(value).__name__}; return StepResult or (observation, reward, "
                        "done, info)")
    if not isinstance(obs, str):
        raise TypeError(f"env.step observation is {type(obs).__name__}; text envs return str observations")
    return StepResult(obs, float(reward), bool(done), dict(info or {}))


async def maybe_await(value: Any) -> Any:
    """``await value`` when it is awaitable (async env methods), else ``value``."""
    if inspect.isawaitable(value):
        return await value
    return value


# ---------------------------------------------------------------------------------------------------------
# typed tools
# ---------------------------------------------------------------------------------------------------------

_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*$", re.DOTALL)


class ToolError(ValueError):
    """A tool call the policy wrote cannot be made (unknown tool, unparsable or mistyped arguments). The
    message is meant to go back to the policy as the observation."""


def _accepts(value: Any, tp: Any) -> bool:
    if tp is inspect.Parameter.empty or tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_accepts(value, a) for a in typing.get_args(tp))
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, dict):
        return isinstance(value, origin)
    return isinstance(tp, type) and isinstance(value, tp)


@dataclass
class Tool:
    """A typed Python callable the policy may call by writing ``name(arg, ...)`` (literals only).

    ``name``/``description`` default to the function's name and docstring; the parameter types come from its
    annotations and are checked before the call."""

    fn: Callable[..., Any]
    name: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.fn.__name__
        self.description = self.description or inspect.getdoc(self.fn) or ""
        self.signature = inspect.signature(self.fn)
        try:
            self.hints = typing.get_type_hints(self.fn)
        except Exception:  # unresolvable annotations: no type checks
            self.hints = {}

    def spec(self) -> str:
        """``name(a: int, b: int) -> int: description`` (what a prompt lists)."""
        params = ", ".join(f"{p}: {getattr(self.hints.get(p), '__name__', 'any')}" for p in self.signature.parameters)
        ret = self.hints.get("return")
        out = f"{self.name}({params})" + (f" -> {getattr(ret, '__name__', ret)}" if ret is not None else "")
        return out + (f": {self.description}" if self.description else "")

    def call(self, args_text: str) -> Any:
        """Parse ``args_text`` (what is inside the parentheses) as literals, type-check, call."""
        try:
            node = ast.parse(f"f({args_text})", mode="eval").body
            assert isinstance(node, ast.Call)
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
        except (SyntaxError, ValueError, AssertionError, TypeError, MemoryError, RecursionError):
            raise ToolError(f"{self.name}: arguments must be literals, e.g. {self.spec().split(':')[0]}") from None
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ToolError(f"{self.name}: {exc}") from None
        for pname, value in bound.arguments.items():
            tp = self.hints.get(pname, inspect.Parameter.empty)
            if not _accepts(value, tp):
                raise ToolError(f"{self.name}: argument {pname}={value!r} is not {getattr(tp, '__name__', tp)}")
        return self.fn(*bound.args, **bound.kwargs)


def parse_tool_call(text: str, tools: Mapping[str, Tool]) -> tuple[Tool, str] | None:
    """``(tool, args_text)`` when ``text`` (stripped) is a call ``name(...)`` of one of ``tools``; None when
    it is not a call. Raises :class:`ToolError` for a call of an unknown tool."""
    m = _CALL.match(text.strip())
    if not m:
        return None
    name = m.group(1)
    if name not in tools:
        raise ToolError(f"unknown tool '{name}'; tools: {', '.join(sorted(tools))}")
    return tools[name], m.group(2)


# ---------------------------------------------------------------------------------------------------------
# Gymnasium-style adapter
# ---------------------------------------------------------------------------------------------------------


class GymnasiumTextEnv:
    """Adapter for a text env with the Gymnasium API (e.g. from TextArena, BALROG, SkyRL-style frameworks).

    The wrapped env must have ``reset(seed=None, options=None) -> (observation, info)`` and
    ``step(action) -> (observation, reward, terminated, truncated, info)`` with string observations and string
    actions (set ``to_text``/``from_text`` to convert other spaces). The task row is passed to reset as
    ``options={"task": task}`` and its ``seed`` column (if any) as ``seed``. Success is read from
    ``info[success_key]`` when present, else ``terminated and reward > 0``::

        env_factory = lambda: GymnasiumTextEnv(make_their_env())
    """

    def __init__(self, env: Any, *, success_key: str = "success",
                 to_text: Callable[[Any], str] = str, from_text: Callable[[str], Any] = lambda a: a) -> None:
        self.env = env
        self.success_key = success_key
        self.to_text = to_text
        self.from_text = from_text

    def reset(self, task: dict[str, Any]) -> str:
        out = self.env.reset(seed=task.get("seed"), options={"task": task})
        obs = out[0] if isinstance(out, tuple) else out
        return self.to_text(obs)

    def step(self, action: str) -> StepResult:
        obs, reward, terminated, truncated, info = self.env.step(self.from_text(action))
        info = dict(info or {})
        if self.success_key in info:
            info["success"] = bool(info[self.success_key])
        elif terminated or truncated:
            info["success"] = bool(terminated) and float(reward) > 0
        info["truncated"] = bool(truncated)
        return StepResult(self.to_text(obs), float(reward), bool(terminated) or bool(truncated), info)


class EpisodeRuleCritic:
    """An episode-level rule critic: sees each whole trajectory and writes one critique with
    :meth:`critique_text` (an environment subclasses it with its own text); the verdict is the episode's success."""

    kind = "env_rule"

    @staticmethod
    def critique_text(traj: Any) -> str:
        raise NotImplementedError

    def critique_episodes(self, trajectories: list[Any]) -> list[Critique]:
        return [Critique(text=self.critique_text(t), verdict=t.success, kind=self.kind) for t in trajectories]

    def metrics(self) -> dict[str, float]:
        return {}
