"""What the trainer needs to run as several processes under ``accelerate launch``.

Each process samples its own whole groups: every rank draws the same global prompt batch (one seeded
sampler, identical state everywhere) and keeps its contiguous shard. Group statistics therefore stay inside
a process; batch statistics (GDPO whitening, metrics) are computed on gathered tensors. Only the main
process writes files. With one process every function here is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from critique_rl.errors import ConfigError

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Contiguous shard ``rank`` of ``world`` equal parts (``len(items)`` must be divisible by ``world``)."""
    if len(items) % world:
        raise ValueError(f"cannot shard {len(items)} items into {world} equal parts")
    per = len(items) // world
    return list(items[rank * per : (rank + 1) * per])


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` with one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The main process's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0 (CPU or the process device)."""
    if not is_distributed():
        return t
    backend = dist.get_backend()
    dev = t.device
    work = t.cuda() if backend == "nccl" and dev.type != "cuda" else t
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, work.contiguous())
    return torch.cat(parts).to(dev)


def all_reduce_max(value: int) -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.long)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    if not is_distributed():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


SUMMED_METRICS = ("critique/critiqued", "critique/refinements", "critique/kept", "critique/groups_rescued",
                  "critique/all_wrong_groups", "critique/fallbacks", "distill/rows", "critique/verdicts_checked")
"""Per-step counts that add up over processes (so do the critic's cumulative ``critic/*`` counters, all but
latencies); every other metric is averaged over the processes that have
it (for ``*_rate`` metrics of counts, :func:`merge_metrics` weights by the count they are a rate of)."""

WEIGHTED_RATES = {"critique/refine_success_rate": "critique/refinements",
                  "critique/verdict_accuracy": "critique/verdicts_checked"}


def merge_metrics(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One metrics row from each process's row: counts summed, rates and means averaged (None ignored)."""
    if len(per_rank) == 1:
        return per_rank[0]
    keys: list[str] = []
    for m in per_rank:
        keys += [k for k in m if k not in keys]
    out: dict[str, Any] = {}
    for k in keys:
        vals = [m.get(k) for m in per_rank]
        nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)
                and not (isinstance(v, float) and math.isnan(v))]
        if k == "step" or not nums:
            out[k] = next((v for v in vals if v is not None), None)
        elif k in SUMMED_METRICS or (k.startswith("critic/") and "latency" not in k):
            out[k] = sum(nums)
        elif k in WEIGHTED_RATES:
            w = [m.get(WEIGHTED_RATES[k]) or 0 for m in per_rank if m.get(k) is not None]
            v = [m[k] for m in per_rank if m.get(k) is not None]
            out[k] = sum(a * b for a, b in zip(v, w, strict=True)) / sum(w) if sum(w) else None
        else:
            out[k] = sum(nums) / len(nums)
    return out


def validate_world(generation_batch_size: int, num_generations: int, mini_batch_size: int, world: int) -> None:
    """One-line errors when the batch sizes cannot be split over ``world`` processes in whole groups."""
    if world <= 1:
        return
    prompts = generation_batch_size // num_generations
    if prompts % world:
        good = num_generations * world * max(1, math.ceil(prompts / world))
        raise ConfigError("generation_batch_size", generation_batch_size,
                          f"{prompts} prompts per step cannot be split in whole groups over {world} processes; "
                          f"use a multiple of num_generations x processes, e.g. {good}")
    local = generation_batch_size // world
    if local % mini_batch_size:
        raise ConfigError("mini_batch_size", mini_batch_size,
                          f"must divide the per-process generation batch ({generation_batch_size} / {world} "
                          f"processes = {local})")
