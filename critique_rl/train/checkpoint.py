"""Atomic checkpoints: written into a temp dir, then renamed into place.

A checkpoint holds the model + tokenizer (``save_pretrained``), optimizer, scheduler, RNG states, the data
cursor, the step and any extra trainer state. A crash during a save leaves only a ``.tmp-*`` dir, which
``latest_checkpoint`` ignores and the next save removes, so the previous checkpoint stays usable.

Every file is fsynced before the rename, and ``manifest.json`` (written last) records each file's size:
:func:`latest_valid_checkpoint` skips a torn or truncated checkpoint (with a warning) and falls back to the
previous one. Weights holding NaN/inf are never saved.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from critique_rl.errors import UserError

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"


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
    bad = nonfinite_parameters(model)
    if bad:
        raise UserError(f"the policy weights hold NaN/inf at step {step} ({len(bad)} tensor(s), e.g. {bad[0]}); "
                        f"not saving them over the checkpoints in {root}: lower learning_rate or check "
                        "reward_weights and the reward functions")
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
    _write_manifest(tmp, step)
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. resumed then saved again)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_path(root)
    for cp in list_checkpoints(root):  # newer steps belong to an abandoned timeline (e.g. a damaged newest one)
        m = _NAME.match(cp.name)
        if m and int(m.group(1)) > step:
            shutil.rmtree(cp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def nonfinite_parameters(model: Any) -> list[str]:
    """Names of the parameters holding NaN or inf (empty when every weight is finite)."""
    params = getattr(model, "named_parameters", None)
    if params is None:
        return []
    with torch.no_grad():
        return [name for name, p in params() if p.is_floating_point() and not bool(torch.isfinite(p).all())]


def _write_manifest(ckpt_dir: Path, step: int) -> None:
    files = {str(f.relative_to(ckpt_dir)): f.stat().st_size for f in sorted(ckpt_dir.rglob("*")) if f.is_file()}
    (ckpt_dir / MANIFEST_FILE).write_text(json.dumps({"step": step, "files": files}, indent=1))


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then the folders (so a rename never publishes unwritten data)."""
    for f in path.rglob("*"):
        if f.is_file():
            _fsync_path(f)
    for d in [*(d for d in path.rglob("*") if d.is_dir()), path]:
        _fsync_path(d)


def _fsync_path(path: Path) -> None:
    """fsync one file or folder; best effort (a filesystem without fsync on folders is not an error)."""
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


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (a missing or truncated file), or None when it looks whole.

    With a manifest, every listed file must exist with its recorded size; an older checkpoint without one must
    hold a model config and a trainer state that loads."""
    ckpt_dir = Path(checkpoint)
    manifest = ckpt_dir / MANIFEST_FILE
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError, OSError):
            return "its manifest.json is unreadable"
        for name, size in files.items():
            f = ckpt_dir / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} is truncated ({f.stat().st_size} of {size} bytes)"
        return None
    if not (ckpt_dir / "model" / "config.json").is_file():
        return "model/config.json is missing"
    try:
        load_trainer_state(ckpt_dir)
    except Exception as exc:  # torch raises RuntimeError/EOFError/UnpicklingError on a torn file
        return f"{STATE_FILE} does not load ({type(exc).__name__})"
    return None


def latest_valid_checkpoint(root: str | Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint under ``root`` that is whole (see :func:`checkpoint_problem`); each newer broken one
    is reported through ``warn`` and skipped."""
    for cp in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(cp)
        if problem is None:
            return cp
        if warn is not None:
            warn(f"checkpoint {cp} is damaged ({problem}); falling back to the previous one")
    return None


def resume_checkpoint(root: str | Path, warn: Callable[[str], None] | None = None) -> Path:
    """The checkpoint ``--resume`` continues from: :func:`latest_valid_checkpoint`, or a one-line
    :class:`UserError` when there is none (no checkpoint yet, or every one damaged) that says how to start over,
    instead of silently training from scratch."""
    root = Path(root)
    found = latest_valid_checkpoint(root, warn=warn)
    if found is not None:
        return found
    run_dir = root.parent
    damaged = list_checkpoints(root)
    if damaged:
        names = ", ".join(cp.name for cp in damaged[-3:])
        raise UserError(f"--resume: every checkpoint under {root} is damaged ({names}), so there is nothing to "
                        f"continue; to start over, delete {root} and run again without --resume, or train into "
                        "another --output-dir")
    where = "does not exist" if not run_dir.is_dir() else f"holds no checkpoint under {root.name}/"
    raise UserError(f"--resume: the run directory {run_dir} {where}, so there is nothing to continue; to start "
                    "over, run the same command without --resume (or check --output-dir / output_dir)")


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)
