"""Atomic checkpoints: written into a temp dir, then renamed into place.

A checkpoint holds the model + tokenizer (``save_pretrained``), optimizer, scheduler, RNG states, the data
cursor, the step and any extra trainer state. A crash during a save leaves only a ``.tmp-*`` dir, which
``latest_checkpoint`` ignores and the next save removes, so the previous checkpoint stays usable.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: str | Path,
    step: int,
    model: Any,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    keep: int = 2,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/checkpoint-{step}`` atomically and keep the newest ``keep`` checkpoints.

    ``extra_files`` maps a file name inside the checkpoint to a callable ``(path) -> None`` that writes it
    (used for the memory-bank snapshot).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"checkpoint-{step:06d}"
    tmp = root / f".tmp-checkpoint-{step:06d}"
    tmp.mkdir()
    model.save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "model")
    for name, writer in (extra_files or {}).items():
        writer(tmp / name)
    state = dict(trainer_state)
    state["step"] = step
    state["rng"] = rng_state()
    torch.save(state, tmp / STATE_FILE)
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. resumed then saved again)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    cps = list_checkpoints(root)
    return cps[-1] if cps else None


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)
