"""Experiment trackers (TensorBoard, Weights & Biases, trackio) through accelerate, beside metrics.jsonl.

``report_to`` names the trackers; each gets exactly the numeric scalars of a metrics.jsonl row, under the same
names, at the same step. accelerate creates and feeds the trackers on the main process only.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from critique_rl.config import TRACKERS
from critique_rl.errors import UserError

_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def resolve_trackers(names: list[str]) -> list[str]:
    """``report_to`` -> tracker names, checking each tracker's package is installed (a one-line error if not)."""
    wanted = list(TRACKERS) if names == ["all"] else list(dict.fromkeys(names))
    for name in wanted:
        if importlib.util.find_spec(_PACKAGE[name]) is None:
            raise UserError(f"report_to names {name} but the '{_PACKAGE[name]}' package is not installed; "
                            f"pip install \"critique-rl[trackers]\" (or pip install {_PACKAGE[name]}), or drop it "
                            "from report_to")
    return wanted


def tracker_init_kwargs(names: list[str], out: Path, run_name: str) -> dict[str, dict[str, Any]]:
    """Per-tracker ``init_kwargs`` for ``Accelerator.init_trackers``: files under the run directory."""
    kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in names:
        kwargs["wandb"] = {"dir": str(out), "name": run_name}
        if os.environ.get("WANDB_MODE") is None and not os.environ.get("WANDB_API_KEY"):
            kwargs["wandb"]["mode"] = "offline"  # no key in the environment: never prompt for a login
    if "trackio" in names:
        kwargs["trackio"] = {"name": run_name}
    return kwargs


def flat_config(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as flat ``a/b`` keys with str/int/float/bool values (what every tracker accepts)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:  # None, lists: as text (TensorBoard's hparams take scalars and strings only)
            flat[name] = str(value)
    return flat


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a metrics row (bools as 0/1), ``step`` and text left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in ("step", "final") or isinstance(value, str) or value is None:
            continue
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            out[key] = float(value)
    return out
