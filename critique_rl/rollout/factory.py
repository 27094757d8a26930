"""The one place a rollout engine is chosen: ``build_generator(backend, model, tokenizer, ...)``.

The trainer never constructs an engine itself; it asks this factory for a :class:`Generator` and calls
``generator.sync_weights()`` after every optimizer step. Engines that share the policy's memory
(transformers ``generate``) make that a no-op; engines with their own copy of the weights (vLLM, colocated or a
server) load the new weights there.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from critique_rl.registry import Registry
from critique_rl.rollout.base import Generator

EngineBuilder = Callable[..., Generator]
"""``builder(model, tokenizer, *, batch_size, autocast, synced_gpus, vllm_config, seed, workdir, is_main,
weights_fn) -> Generator`` (see :func:`build_generator` for the arguments)."""

ROLLOUT_ENGINES: Registry[EngineBuilder] = Registry("rollout engine", "rollout_backend")


def register_engine(name: str) -> Callable[[EngineBuilder], EngineBuilder]:
    """Register a rollout engine builder under ``name`` (``rollout_backend: <name>`` in a config)."""
    return ROLLOUT_ENGINES.decorator(name)


@register_engine("hf")
def _build_hf(model: Any, tokenizer: Any, *, batch_size: int, autocast: Any, synced_gpus: bool,
              **_: Any) -> Generator:
    from critique_rl.rollout.hf import HFGenerator

    return HFGenerator(model, tokenizer, batch_size=batch_size, autocast=autocast, synced_gpus=synced_gpus)


@register_engine("vllm")
def _build_vllm(model: Any, tokenizer: Any, *, batch_size: int, vllm_config: Any, seed: int,
                workdir: str | Path | None, is_main: bool, weights_fn: Any, run_dir: str | Path | None = None,
                **_: Any) -> Generator:
    from critique_rl.config import VLLMConfig

    cfg = vllm_config or VLLMConfig()
    if cfg.mode == "server":
        from critique_rl.rollout.vllm import VLLMServerGenerator

        folder = workdir if workdir is not None else run_dir  # the pushed weights (unless vllm.sync_dir is set)
        sync_dir = cfg.sync_dir or (Path(folder) / "vllm_sync" if folder is not None else None)
        return VLLMServerGenerator(model, tokenizer, cfg, sync_dir=sync_dir, seed=seed, is_main=is_main,
                                   weights_fn=weights_fn, batch_size=max(1, min(batch_size, 64)))
    from critique_rl.rollout.vllm import VLLMGenerator

    return VLLMGenerator(model, tokenizer, cfg, seed=seed, workdir=workdir, weights_fn=weights_fn)


def build_generator(
    backend: str,
    model: Any,
    tokenizer: Any,
    *,
    batch_size: int = 256,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
    synced_gpus: bool = False,
    vllm_config: Any = None,
    seed: int = 0,
    workdir: str | Path | None = None,
    is_main: bool = True,
    weights_fn: Callable[[], dict[str, Any]] | None = None,
    run_dir: str | Path | None = None,
) -> Generator:
    """A :class:`Generator` for ``backend`` sampling from ``model`` (the unwrapped policy module).

    ``autocast``: a context factory entered around generation (bf16 autocast over fp32 master weights);
    ``synced_gpus``: keep ranks generating in lock-step (needed when parameters are sharded: FSDP, ZeRO-3).

    ``model`` may also be a zero-argument function returning the policy module, read at every use (generation,
    weight sync), so an engine built before the policy is wrapped (LoRA) samples from the wrapped one. ``run_dir``:
    the run directory, where an engine that keeps files keeps them (the vLLM server's pushed weights).

    vLLM (``backend="vllm"``): ``vllm_config`` is the ``vllm:`` section (:class:`critique_rl.config.VLLMConfig`:
    colocate or server); ``seed`` seeds sampling; ``workdir`` holds the engine's config folder (colocate) or the
    pushed weights (server, unless ``vllm.sync_dir`` is set); ``is_main``: the process that pushes weights to a
    server; ``weights_fn``: returns the full weights to load (default: the policy's, LoRA merged).
    """
    builder = ROLLOUT_ENGINES.get_or_raise(backend)
    return builder(model, tokenizer, batch_size=batch_size, autocast=autocast, synced_gpus=synced_gpus,
                   vllm_config=vllm_config, seed=seed, workdir=workdir, is_main=is_main, weights_fn=weights_fn,
                   run_dir=run_dir)
