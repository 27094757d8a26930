"""The one place a rollout engine is chosen: ``build_generator(cfg, model, tokenizer)``.

The trainer never constructs an engine itself; it asks this factory for a :class:`Generator` and calls
``generator.sync_weights()`` after every optimizer step. Engines that share the policy's memory
(transformers ``generate``) make that a no-op; engines with their own copy of the weights (vLLM) load the
new weights there.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from critique_rl.errors import ConfigError
from critique_rl.rollout.base import Generator

ROLLOUT_BACKENDS = ("hf", "vllm")


def build_generator(
    backend: str,
    model: Any,
    tokenizer: Any,
    *,
    batch_size: int = 256,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
    synced_gpus: bool = False,
) -> Generator:
    """A :class:`Generator` for ``backend`` sampling from ``model`` (the unwrapped policy module).

    ``autocast``: a context factory entered around generation (bf16 autocast over fp32 master weights);
    ``synced_gpus``: keep ranks generating in lock-step (needed when parameters are sharded: FSDP, ZeRO-3).
    """
    if backend == "hf":
        from critique_rl.rollout.hf import HFGenerator

        return HFGenerator(model, tokenizer, batch_size=batch_size, autocast=autocast, synced_gpus=synced_gpus)
    if backend == "vllm":
        raise ConfigError("rollout_backend", backend, "the vLLM rollout engine is not in this release yet; use hf "
                          "(transformers generate)")
    raise ConfigError("rollout_backend", backend, f"choose one of {list(ROLLOUT_BACKENDS)}")
