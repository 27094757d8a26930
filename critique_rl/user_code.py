"""Errors raised by code the user brings (reward functions, verifiers, gates): one block, the user's frames only.

A user's ``file.py:fn`` that fails to import (a syntax error, an exception at import time) or has a signature the
trainer cannot call is a :class:`UserCodeError`: a :class:`UserError` whose message is one block. An exception
the user's function raises while scoring propagates unchanged (Python callers keep their own exception and
traceback), marked with the function that raised it (:func:`mark_user_exception`); the CLI prints it as the same
kind of block (:func:`user_code_error`)::

    reward function 'bad_reward' (/path/rewards.py:4) raised ZeroDivisionError: division by zero
      File "/path/rewards.py", line 5, in bad_reward
        return [helper(0) for _ in completions]
      File "/path/rewards.py", line 2, in helper
        return 1 / x

naming the function, where it is defined and the exception, with only the frames in the user's own files (none
of critique-rl's, the standard library's or installed packages', and no chained "no running event loop"). The
CLI prints it after ``error:`` and exits with code 2.
"""

from __future__ import annotations

import functools
import inspect
import os
import sysconfig
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from critique_rl.errors import UserError

MAX_FRAMES = 8
"""Most user frames shown (the innermost ones)."""
MAX_BLOCK_CHARS = 4000
"""Longest block (a huge exception message is cut)."""

_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep


def _library_dirs() -> tuple[str, ...]:
    dirs = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(str(Path(path).resolve()) + os.sep)
    return tuple(sorted(dirs))


_LIBRARY_DIRS = _library_dirs()


def is_user_file(filename: str) -> bool:
    """True for a frame in the user's own code: not critique-rl, not the standard library, not an installed
    package, not a frozen/internal module."""
    if not filename or filename.startswith("<"):
        return False
    resolved = _resolved(filename)
    return not resolved.startswith(_PACKAGE_DIR) and not resolved.startswith(_LIBRARY_DIRS)


def _resolved(filename: str) -> str:
    try:
        return str(Path(filename).resolve())
    except (OSError, RuntimeError):
        return filename


def defined_at(fn: Callable[..., Any]) -> str | None:
    """``file:line`` where ``fn`` (a function, a ``functools.partial`` of one, or a callable object) is defined;
    None when Python cannot tell (a builtin)."""
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    target = inspect.unwrap(target) if callable(target) else target
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        call = type(target).__call__ if callable(target) else None
        target = call if inspect.isfunction(call) else target
    code = getattr(getattr(target, "__func__", target), "__code__", None)
    if code is None:
        return None
    return f"{code.co_filename}:{code.co_firstlineno}"


def is_user_callable(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` is defined in the user's code (see :func:`is_user_file`)."""
    where = defined_at(fn)
    return where is not None and is_user_file(where.rsplit(":", 1)[0])


def user_frames(exc: BaseException) -> list[str]:
    """The traceback lines of ``exc`` that lie in the user's files below our innermost frame (innermost
    :data:`MAX_FRAMES`), formatted like Python's own ``File "...", line N, in fn`` + source line."""
    frames = list(traceback.extract_tb(exc.__traceback__))
    ours = [i for i, f in enumerate(frames) if _resolved(f.filename).startswith(_PACKAGE_DIR)]
    if ours:  # only what ran inside the user's code (not the user script that called us, further out)
        frames = frames[ours[-1] + 1:]
    frames = [f for f in frames if is_user_file(f.filename)]
    lines = []
    for f in frames[-MAX_FRAMES:]:
        lines.append(f'  File "{f.filename}", line {f.lineno}, in {f.name}')
        if f.line:
            lines.append(f"    {f.line.strip()}")
    return lines


def _exception_line(exc: BaseException) -> str:
    """``Type: message`` on one line (as the last line of a traceback, without notes)."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    message = " ".join(str(exc).split())
    return f"{name}: {message}" if message else name


class UserCodeError(UserError):
    """The user's own code failed. ``str()`` is the whole block; ``headline`` its first line."""

    def __init__(self, headline: str, details: list[str] | None = None) -> None:
        self.headline = headline
        self.details = list(details or [])
        block = "\n".join([headline, *self.details])
        if len(block) > MAX_BLOCK_CHARS:
            block = block[: MAX_BLOCK_CHARS - 3] + "..."
        super().__init__(block)


def _label(what: str, name: str, where: str | None) -> str:
    return f"{what} {name!r}" + (f" ({where})" if where else "")


def call_error(what: str, name: str, fn: Callable[..., Any], exc: BaseException) -> UserCodeError:
    """A :class:`UserCodeError` for ``exc`` raised by the user's ``fn`` while it was called."""
    return UserCodeError(f"{_label(what, name, defined_at(fn))} raised {_exception_line(exc)}", user_frames(exc))


_MARK = "__critique_rl_user_code__"


def mark_user_exception(exc: BaseException, what: str, name: str, fn: Callable[..., Any]) -> None:
    """Record on ``exc`` (raised by the user's ``fn``) which function raised it. The exception itself propagates
    unchanged (a Python caller sees their own exception and traceback); the CLI turns a marked exception into
    one block with :func:`user_code_error`."""
    try:
        setattr(exc, _MARK, (what, name, defined_at(fn)))
    except AttributeError:  # an exception type with __slots__: the note alone names the function
        pass


def user_code_error(exc: BaseException) -> UserCodeError | None:
    """The :class:`UserCodeError` block for an exception marked by :func:`mark_user_exception`; None for any
    other exception (a bug of ours keeps its traceback)."""
    mark = getattr(exc, _MARK, None)
    if not (isinstance(mark, tuple) and len(mark) == 3):
        return None
    what, name, where = mark
    return UserCodeError(f"{_label(what, name, where)} raised {_exception_line(exc)}", user_frames(exc))


def signature_error(what: str, name: str, fn: Callable[..., Any], problem: str, fix: str) -> UserCodeError:
    """A :class:`UserCodeError` for a function the trainer cannot call as written."""
    try:
        sig = f"{name}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        sig = name
    return UserCodeError(f"{_label(what, name, defined_at(fn))} has the wrong signature: def {sig}: {problem}; "
                         f"{fix}")


def import_error(spec: str, what: str, exc: BaseException) -> UserCodeError:
    """A :class:`UserCodeError` for ``spec`` (``file.py:fn`` / ``pkg.module:fn``) whose module failed to import."""
    module = spec.rsplit(":", 1)[0]
    if isinstance(exc, SyntaxError):
        where = f"{exc.filename}:{exc.lineno}" if exc.filename else module
        details = []
        if exc.filename:
            details.append(f'  File "{exc.filename}", line {exc.lineno}')
        if exc.text:
            details.append(f"    {exc.text.rstrip()}")
            if exc.offset:
                indent = len(exc.text) - len(exc.text.lstrip())
                details.append("    " + " " * max(0, exc.offset - 1 - indent) + "^")
        return UserCodeError(f"{what} '{spec}': cannot import '{module}' ({where}): "
                             f"{type(exc).__name__}: {exc.msg}", details)
    frames = user_frames(exc)
    return UserCodeError(f"{what} '{spec}': importing '{module}' raised {_exception_line(exc)}", frames)


def load_user_callable(spec: str, what: str = "verifier") -> Callable[..., Any]:
    """:func:`critique_rl.tasks.load_callable` whose failures at import time (a syntax error, any exception the
    module raises while it is imported) become a :class:`UserCodeError` instead of a traceback."""
    from critique_rl.tasks import load_callable

    try:
        return load_callable(spec, what=what)
    except UserError:
        raise
    except (Exception, SystemExit) as exc:  # the user's module ran and failed (SystemExit: a stray exit())
        raise import_error(spec, what, exc) from None


__all__ = ["MAX_FRAMES", "UserCodeError", "call_error", "defined_at", "import_error", "is_user_callable",
           "is_user_file", "load_user_callable", "mark_user_exception", "signature_error", "user_code_error",
           "user_frames"]
