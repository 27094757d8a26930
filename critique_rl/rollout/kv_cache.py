"""A decode KV cache that writes each new position into a buffer instead of re-concatenating the whole cache.

``transformers``' ``DynamicLayer.update`` runs ``keys = torch.cat([keys, new], dim=-2)`` at every decode step,
so generating ``T`` tokens after a ``P``-token prompt copies ``sum_t (P + t)`` positions per layer, for keys
and values: on ``cpu-medium`` of ``benchmarks/vs_trl.py`` (32 rows, 6 layers, 8 heads x 64, 6 + 32 positions)
that is about 0.5 GB of copying and 80-140 ms of one CPU core per ``generate`` call of about 1 s.
:class:`BlockKVLayer` keeps keys and values in buffers ``[B, H, capacity, D]`` and exposes the filled part as
views ``buffer[:, :, :length]``; a step writes one slot. The buffer grows by ``block`` positions (copying what
is there) only when a step would overflow it, and its first size is the prompt plus ``min(block, max new
tokens)``: the cache holds at most ``block`` unused positions per layer, and a completion of ``T`` tokens
regrows ``ceil(T / block) - 1`` times instead of copying at every step.

The attention kernels read the same numbers at the same positions (a strided view instead of a contiguous
tensor), so logits and sampled tokens equal those of the default cache (tests: ``tests/test_kv_cache_block.py``).

:func:`block_cache` builds a ``DynamicCache`` for a model whose full-attention layers are :class:`BlockKVLayer`
(sliding-window and other special layers keep their own type); :func:`gather_rows` fills such a cache from
another cache's rows (the shared-prompt prefill of :mod:`critique_rl.rollout.hf`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["BlockKVLayer", "block_cache", "gather_rows"]

DEFAULT_BLOCK = 256


class BlockKVLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys`` / ``values`` are views of preallocated buffers (see the module doc).

    ``capacity_hint``: the positions the generation will need at most (prompt + max new tokens), or 0 when
    unknown; ``block``: the growth step and the most unused positions reserved ahead."""

    def __init__(self, capacity_hint: int = 0, block: int = DEFAULT_BLOCK) -> None:
        super().__init__()
        if block < 1:
            raise ValueError(f"BlockKVLayer: block must be >= 1, got {block}")
        self.capacity_hint = int(capacity_hint)
        self.block = int(block)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._length = 0

    # -- buffer management -------------------------------------------------------------------------------
    def _capacity_for(self, need: int) -> int:
        if need > self.capacity_hint:  # past the hint (or no hint): grow a block beyond what is needed
            return need + self.block
        return min(self.capacity_hint, need + self.block)

    def _set_views(self) -> None:
        assert self._kbuf is not None and self._vbuf is not None
        self.keys = self._kbuf[:, :, : self._length]
        self.values = self._vbuf[:, :, : self._length]

    def _reserve(self, need: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
        """Make the buffers hold ``need`` positions (a new buffer with the filled part copied when they can't)."""
        if self._kbuf is not None and need <= self._kbuf.shape[-2]:
            return
        cap = self._capacity_for(need)
        B, H, _, Dk = key_like.shape
        kbuf = key_like.new_empty((B, H, cap, Dk))
        vbuf = value_like.new_empty((B, H, cap, value_like.shape[-1]))
        if self._kbuf is not None and self._length:
            kbuf[:, :, : self._length] = self._kbuf[:, :, : self._length]
            vbuf[:, :, : self._length] = self._vbuf[:, :, : self._length]  # type: ignore[index]
        self._kbuf, self._vbuf = kbuf, vbuf

    def load(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Start from ``keys`` / ``values`` ``[B, H, L, D]`` (copied into fresh buffers)."""
        self.device = keys.device
        self.is_initialized = True
        self._kbuf = self._vbuf = None
        self._length = 0
        self._reserve(keys.shape[-2], keys, values)
        assert self._kbuf is not None and self._vbuf is not None
        L = keys.shape[-2]
        self._kbuf[:, :, :L] = keys
        self._vbuf[:, :, :L] = values
        self._length = L
        self._set_views()

    # -- CacheLayerMixin ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._kbuf is not None and key_states.shape[0] != self._kbuf.shape[0]:
            raise ValueError(f"BlockKVLayer.update: {key_states.shape[0]} rows for a cache of {self._kbuf.shape[0]}")
        n = key_states.shape[-2]
        self._reserve(self._length + n, key_states, value_states)
        assert self._kbuf is not None and self._vbuf is not None
        self._kbuf[:, :, self._length : self._length + n] = key_states
        self._vbuf[:, :, self._length : self._length + n] = value_states
        self._length += n
        self._set_views()
        return self.keys, self.values  # type: ignore[return-value]

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        self._length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"BlockKVLayer.crop takes a negative count of positions to drop, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized or self._kbuf is None:
            return
        self._length = max(0, self._length + tokens_to_remove)
        self._set_views()

    def _select_rows(self, fn: Any) -> None:
        if self._kbuf is None:
            return
        self._kbuf, self._vbuf = fn(self._kbuf), fn(self._vbuf)
        self._set_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def offload(self) -> None:
        if self._kbuf is not None:
            self._kbuf, self._vbuf = self._kbuf.to("cpu", non_blocking=True), self._vbuf.to("cpu", non_blocking=True)  # type: ignore[union-attr]
            self._set_views()

    def prefetch(self) -> None:
        if self._kbuf is not None and self._kbuf.device != self.device:
            self._kbuf = self._kbuf.to(self.device, non_blocking=True)
            self._vbuf = self._vbuf.to(self.device, non_blocking=True)  # type: ignore[union-attr]
            self._set_views()


def block_cache(model: Any, capacity_hint: int, block: int = DEFAULT_BLOCK) -> DynamicCache | None:
    """An empty ``DynamicCache`` for ``model`` (its config's layer types) with every plain ``DynamicLayer`` replaced
    by a :class:`BlockKVLayer`, or None when the model does not take a default dynamic cache (recurrent and
    other special caches) or none of its layers is a plain full-attention layer."""
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    config = getattr(model, "config", None)
    if config is None or (supports is not None and not supports()) or getattr(config, "is_encoder_decoder", False):
        return None
    cache = DynamicCache(config=config.get_text_config(decoder=True))
    replaced = 0
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = BlockKVLayer(capacity_hint, block)
            replaced += 1
    return cache if replaced else None


def gather_rows(target: DynamicCache, source: Any, rows: torch.Tensor) -> None:
    """Fill the empty cache ``target`` with ``source``'s layers' rows ``rows`` (``[B]`` indices into the source's
    batch): a :class:`BlockKVLayer` copies them straight into its buffers, any other layer type takes the
    source's own layer with ``batch_select_indices``. Raises when the two caches' layer counts differ."""
    src_layers = source.layers
    if len(src_layers) != len(target.layers):
        raise ValueError(f"gather_rows: source cache has {len(src_layers)} layers, target {len(target.layers)}")
    for i, (dst, src) in enumerate(zip(target.layers, src_layers, strict=True)):
        if not getattr(src, "is_initialized", False) or src.keys is None or src.keys.numel() == 0:
            continue  # a layer the forward did not fill (e.g. KV sharing): left empty, as in the source
        if isinstance(dst, BlockKVLayer):
            dst.load(src.keys[rows], src.values[rows])
        else:
            src.batch_select_indices(rows)
            target.layers[i] = src
