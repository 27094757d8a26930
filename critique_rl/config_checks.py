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


REFERENCE_REWARDS = ("correctness", "brier", "selective_utility", "math")
"""Built-in rewards that compare a completion with the reference answer."""


def check_data_fields(cfg: Any) -> None:
    """Validate the data fields of a run config (``dataset_*``, ``*_column``) against what needs a reference,
    the feedback critic and the math extra. Each error names the field and the fix."""
    if cfg.dataset_name is not None:
        if not str(cfg.dataset_name).strip():
            raise ConfigError("dataset_name", cfg.dataset_name, "give a dataset id or folder, or leave it out")
        if cfg.train_file:
            raise ConfigError("dataset_name", cfg.dataset_name, "training rows come from train_file or dataset_name; "
                              "keep one of the two")
    else:
        if cfg.dataset_config is not None:
            raise ConfigError("dataset_config", cfg.dataset_config, "names a configuration of dataset_name; set "
                              "dataset_name too, or leave dataset_config out")
        if cfg.dataset_split != "train":
            raise ConfigError("dataset_split", cfg.dataset_split, "names a split of dataset_name; set dataset_name "
                              "too, or leave dataset_split out")
    for name in ("prompt_column", "reference_column", "feedback_column"):
        value = getattr(cfg, name)
        if value is not None and not str(value).strip():
            raise ConfigError(name, value, "give a column name" + ("" if name == "prompt_column" else ", or null"))
    columns = {"prompt_column": cfg.prompt_column, "reference_column": cfg.reference_column,
               "feedback_column": cfg.feedback_column}
    named = [(k, v) for k, v in columns.items() if v is not None]
    for i, (k, v) in enumerate(named):
        for k2, v2 in named[i + 1:]:
            if v == v2:
                raise ConfigError(k2, v2, f"is also {k}; one column cannot be both")
    _check_feedback(cfg)
    if cfg.reference_column is None:
        _check_reference_free(cfg)
    _check_math_extra(cfg)


def _check_feedback(cfg: Any) -> None:
    backend = cfg.critic.backend
    if cfg.feedback_column is not None and backend != "feedback":
        raise ConfigError("feedback_column", cfg.feedback_column, f"the feedback is the critique only with "
                          f"critic.backend: feedback (it is {backend!r}); set it, or leave feedback_column out")
    if backend == "feedback":
        if cfg.feedback_column is None:
            raise ConfigError("critic.backend", backend, "the feedback backend reads each row's feedback_column; set "
                              "feedback_column to the column that holds it")
        if cfg.critic.kind == "cot":
            raise ConfigError("critic.kind", cfg.critic.kind, "the feedback backend writes no model critiques; use "
                              "indicative or ground_truth (the critique of answers with no feedback)")


def _check_reference_free(cfg: Any) -> None:
    """``reference_column: null``: refuse what compares with the reference, naming the fix."""
    fix = "set reference_column to the column that holds the reference, or"
    phases = [("reward_funcs", cfg.reward_funcs)] + [
        (f"phases[{i}].reward_funcs", ph.reward_funcs) for i, ph in enumerate(cfg.phases) if ph.reward_funcs]
    for field, funcs in phases:
        needy = [f for f in funcs if f in REFERENCE_REWARDS]
        if needy:
            raise ConfigError(field, funcs, f"{needy[0]!r} compares completions with the reference and "
                              f"reference_column is null (no reference); {fix} use reward functions that need none "
                              "(your own, file.py:function)")
    critiques = cfg.critic.backend != "none" and cfg.critique_on != "none"
    if critiques and cfg.critic.kind == "ground_truth":
        raise ConfigError("critic.kind", cfg.critic.kind, f"a ground_truth critique quotes the reference and "
                          f"reference_column is null; {fix} use indicative, or cot with backend openai or hf")
    if critiques and cfg.critic.fallback_kind == "ground_truth":
        raise ConfigError("critic.fallback_kind", cfg.critic.fallback_kind, f"quotes the reference and "
                          f"reference_column is null; {fix} use auto or indicative")
    if cfg.verifier is None:
        raise ConfigError("verifier", None, f"reference_column is null, so the task's verifier has no reference to "
                          f"compare with; {fix} set verifier to a function that needs none, e.g. your reward "
                          "function (file.py:function; correct where its value > reward_threshold)")
    if cfg.refinement_source == "reference":
        raise ConfigError("refinement_source", cfg.refinement_source, f"injects the reference answer and "
                          f"reference_column is null; {fix} use refinement_source: critique")
    sft = [ph for ph in cfg.schedule() if ph.kind == "sft" and (ph.steps or 0) > 0]
    if sft:
        field = "sft_steps" if not cfg.phases else "phases"
        raise ConfigError(field, sft[0].steps, f"SFT imitates the reference answers and reference_column is null; "
                          f"{fix} use sft_steps: 0 (no sft phase)")
    if cfg.model == "tiny":
        raise ConfigError("model", cfg.model, f"the tiny model (and its tokenizer) is trained from scratch on the "
                          f"reference answers and reference_column is null; {fix} give a local model directory")


def _check_math_extra(cfg: Any) -> None:
    import importlib.util

    uses = [("task", cfg.task)] if cfg.task == "math" or "math" in str(cfg.task).split("+") else []
    if "math" in cfg.reward_funcs:
        uses.append(("reward_funcs", cfg.reward_funcs))
    if uses and importlib.util.find_spec("math_verify") is None:
        field, value = uses[0]
        raise ConfigError(field, value, "the math reward and task check answers with math-verify, which is not "
                          'installed; pip install "critique-rl[math]" (or pip install math-verify)')
