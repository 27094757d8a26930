"""Episodes that do not depend on the number of processes (``agent.seed_per_task``).

By default a step's episodes are sampled in one batched engine call per turn, from the process's own RNG stream
(each rank seeded ``seed + 1000 * rank``), so a run under ``accelerate launch`` samples other episodes than the
1-process run of the same global batch. With ``seed_per_task`` each task's group is sampled in its own engine
calls under a seed derived from ``(seed, step, the task's place in the global batch, purpose)``, and refinement
slots are chosen with a per-group RNG of the same kind: the episodes, and so the run, are the same whatever the
process count (up to the float rounding of gradient all-reduce). The run's RNG streams are left as they were
(:func:`seeded` forks them).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def task_seed(seed: int, step: int, key: int, purpose: str) -> int:
    """A 63-bit seed from ``(run seed, RL step, key, purpose)`` (BLAKE2b; the same on every process and run)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{key}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's generators (CPU and the current CUDA device) seeded by ``seed``; the caller's
    RNG states come back afterwards."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def group_rng(seed: int, step: int, group: int) -> random.Random:
    """The refinement-choice RNG of global group ``group`` at ``step``."""
    return random.Random(task_seed(seed, step, group, "choose"))
