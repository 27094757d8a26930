"""Strict config validation helpers: finite numbers, ranges, pasted secrets, trackers, and typed coercion of
YAML values into the config dataclasses (``from_dict``), each error naming the field and the fix."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Literal, Union

from critique_rl.errors import ConfigError

TINY_MIN_VOCAB = 259
"""Smallest tiny-model vocabulary: the 256 byte symbols of the byte-level BPE plus pad, eos and bos."""

_KEY_PREFIXES = ("sk-", "sk_", "pk-", "pk_", "rk_", "hf_", "gsk_", "xai-", "ghp_", "gho_", "github_pat_", "AIza",
                 "glpat-", "xoxb-", "xoxp-", "nvapi-", "Bearer ")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def looks_like_secret(value: str) -> bool:
    """True when ``value`` (meant to be an environment variable *name*) looks like a pasted API key: a known
    key prefix, characters no variable name has, or a long run of mixed letters and digits with no underscore."""
    v = value.strip()
    if not v:
        return False
    if v.startswith(_KEY_PREFIXES) or not _ENV_NAME.match(v):
        return True
    return len(v) >= 20 and "_" not in v and any(c.isdigit() for c in v) and any(c.isalpha() for c in v)


def _nonfinite(value: Any, depth: int = 0) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if depth > 8:
        return False
    if isinstance(value, (list, tuple)):
        return any(_nonfinite(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_nonfinite(v, depth + 1) for v in value.values())
    return False


TRACKERS = ("tensorboard", "wandb", "trackio")


def _check_trackers(names: list[str]) -> None:
    for name in names:
        if name not in (*TRACKERS, "all"):
            raise ConfigError("report_to", names, f"'{name}' is not a tracker; use a list of {', '.join(TRACKERS)} "
                              "(or [all]), or [] for metrics.jsonl only")
    if "all" in names and len(names) > 1:
        raise ConfigError("report_to", names, "`all` stands alone; write [all] or list the trackers")


def _check_finite(obj: Any, prefix: str = "") -> None:
    """Reject NaN/inf anywhere in a config dataclass (lists and mappings included; nested configs recursed)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif _nonfinite(value):
            raise _NonFinite(f"{prefix}{f.name}", value, "must be a finite number (not .inf or .nan)")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(name, value, "must be > 0")


def _non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ConfigError(name, value, "must be >= 0")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields (key: value)"
    return getattr(tp, "__name__", str(tp))


class _NonFinite(ConfigError):
    """A NaN/inf float (kept apart so a union type reports it instead of a generic type error)."""


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(path, value, f"expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, prefix=f"{path}.")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except _NonFinite:
                raise
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, inner = typing.get_args(tp)
        return {str(k): _coerce(v, inner, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float
                raise _NonFinite(path, value, "must be a finite number") from None
        elif isinstance(value, str):  # PyYAML reads `3e-4` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(number):
            raise _NonFinite(path, value, "must be a finite number (not .inf or .nan)")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types by field name."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "config", data, "expected a mapping of field: value")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(names)}"
            raise ConfigError(f"{prefix}{key}", value, f"unknown key; {hint}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)
