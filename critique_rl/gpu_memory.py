"""Accelerator memory of a training step without an accelerator: a live-tensor tracer and a fake-tensor model.

:class:`LiveTensorTracker` is a ``TorchDispatchMode`` that sees every tensor an operator returns (forward,
autograd's backward, the optimizer), keys it by its storage and adds the storage's bytes to a running total
until the storage is freed (a weak reference's callback), keeping the peak and what the live bytes were made
of at the peak. Sizes are rounded up to the CUDA caching allocator's 512-byte blocks, so the total tracks
``torch.cuda.memory_allocated`` (not ``memory_reserved``: the allocator's cache and fragmentation are outside).
Kernel-internal workspaces (cuBLAS, attention kernels) that never become tensors are outside as well.

With ``fake=True`` it runs on :class:`~torch._subclasses.fake_tensor.FakeTensorMode` tensors: shapes, dtypes
and storage sizes, no data, so a 0.5B model's training step traces in seconds on a CPU. Fake tensors have no
values, so ``.item()`` on one returns a fixed stand-in (:data:`STAND_IN`; the loss and gradient norm read as
finite), and an operator whose tensor inputs are all real (the small integer token tensors the batching code
inspects with ``tolist()``) runs for real, so data-dependent bookkeeping (which rows share a prompt) sees the
true token ids. The model is built from a ``config.json`` on the ``meta`` device and moved with ``to_empty``
into the fake mode (:func:`fake_causal_lm`); fake CUDA tensors cannot run autograd on a CPU-only torch, so
tensors are fake *CPU* tensors and bf16 autocast is the CPU autocast (the same lower-precision op list for
matmuls/linear/attention).

Categories: every live storage carries the category of the moment it was allocated: ``weights`` (registered
parameters and buffers), ``autocast weight copies`` (a parameter cast by autocast), ``activations`` (inside
the decoder stack's forward), ``log-prob chunks`` (the rest of the loss forward: LM head, log-softmax chunks,
loss terms), ``backward temporaries``, ``gradients`` (moved there when autograd stores ``param.grad``),
``optimizer state`` and ``optimizer temporaries``.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

ALLOC_BLOCK = 512
"""The CUDA caching allocator rounds every allocation up to a multiple of 512 bytes."""

STAND_IN = {"float": 1.0, "int": 1, "bool": True}
"""What ``.item()`` returns on a fake tensor (by dtype kind)."""

CATEGORIES = ("weights", "autocast weight copies", "gradients", "optimizer state", "activations",
              "log-prob chunks", "backward temporaries", "optimizer temporaries", "other")

SMALL_REAL_NUMEL = 1 << 22
"""Integer/bool tensors made from nothing (``arange``, ``zeros(..., dtype=long)``) up to this many elements are
real under ``fake=True`` (bookkeeping read back in Python); float tensors and larger ones are always fake."""

_aten = torch.ops.aten
_SCALAR_OPS = (_aten._local_scalar_dense.default, _aten.equal.default, _aten.is_nonzero.default)
_INT_DEFAULT_FACTORIES = (_aten.arange.default, _aten.arange.start, _aten.arange.start_step)


def rounded(nbytes: int, block: int = ALLOC_BLOCK) -> int:
    """``nbytes`` rounded up to the allocator block (0 stays 0)."""
    return -(-int(nbytes) // block) * block if nbytes > 0 else 0


def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _stand_in(dtype: torch.dtype) -> Any:
    if dtype == torch.bool:
        return STAND_IN["bool"]
    return STAND_IN["float"] if dtype.is_floating_point or dtype.is_complex else STAND_IN["int"]


class LiveTensorTracker(TorchDispatchMode):
    """Live tensor bytes (by storage) over a traced region, with the peak and its make-up by category.

    Use as a context manager around the region; register tensors that already exist with :meth:`register`
    (weights, optimizer state). ``fake=True``: the region runs under a ``FakeTensorMode`` (see the module doc).
    """

    def __init__(self, fake: bool = False, block: int = ALLOC_BLOCK) -> None:
        super().__init__()
        self.fake = fake
        self.block = block
        self._live: dict[int, list[Any]] = {}  # id(storage) -> [bytes, category, weakref]
        self.by_category: dict[str, int] = defaultdict(int)
        self.current = 0
        self.peak = 0
        self.peak_parts: dict[str, int] = {}
        self._phase: list[str] = ["other"]
        self._param_storages: set[int] = set()

    # ---- bookkeeping ------------------------------------------------------------------------------------
    def _free(self, key: int, _ref: Any) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]
            self.by_category[entry[1]] -= entry[0]

    def _track(self, t: Any, category: str) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / nested tensors: no plain storage
            return
        key = id(st)
        size = rounded(st.nbytes(), self.block)
        entry = self._live.get(key)
        if entry is not None:
            if entry[0] != size:  # resized in place (resize_, out= kernels)
                self.current += size - entry[0]
                self.by_category[entry[1]] += size - entry[0]
                entry[0] = size
                self._check_peak()
            return
        self._live[key] = [size, category, weakref.ref(st, partial(self._free, key))]
        self.current += size
        self.by_category[category] += size
        self._check_peak()

    def _check_peak(self) -> None:
        if self.current > self.peak:
            self.peak = self.current
            self.peak_parts = {k: v for k, v in self.by_category.items() if v}

    def register(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Count tensors that exist already (or move them to ``category`` if they are counted)."""
        for t in tensors:
            self.recategorize(t, category)
            if category == "weights":
                self._param_storages.add(id(t.untyped_storage()))

    def recategorize(self, t: torch.Tensor | None, category: str) -> None:
        if t is None:
            return
        entry = self._live.get(id(t.untyped_storage()))
        if entry is None:
            self._track(t, category)
            return
        if entry[1] != category:
            self.by_category[entry[1]] -= entry[0]
            self.by_category[category] += entry[0]
            entry[1] = category

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        self.peak = self.current
        self.peak_parts = {k: v for k, v in self.by_category.items() if v}

    @contextmanager
    def phase(self, category: str) -> Iterator[None]:
        """Tensors allocated inside get ``category``."""
        self._phase.append(category)
        try:
            yield
        finally:
            self._phase.pop()

    def watch_gradients(self, params: Iterable[torch.nn.Parameter]) -> list[Any]:
        """Move each parameter's ``.grad`` to ``gradients`` when autograd stores it; returns the hook handles."""
        def hook(p: torch.Tensor) -> None:
            self.recategorize(p.grad, "gradients")

        return [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]

    def watch_module(self, module: torch.nn.Module, category: str) -> list[Any]:
        """Tensors allocated while ``module``'s forward runs get ``category``."""
        def pre(_m: Any, _a: Any) -> None:
            self._phase.append(category)

        def post(_m: Any, _a: Any, _o: Any) -> None:
            if len(self._phase) > 1:
                self._phase.pop()

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    # ---- dispatch ---------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:
            return func(*args, **kwargs)
        if self.fake:
            if func in _SCALAR_OPS and any(_is_fake(a) for a in args if isinstance(a, torch.Tensor)):
                return _stand_in(args[0].dtype) if func is not _aten.equal.default else True
            if self._runs_real(func, args, kwargs):
                with _disable_current_modes():  # small integer bookkeeping tensors: computed for real
                    out = func(*args, **kwargs)
                for t in pytree.tree_leaves(out):
                    self._track(t, self._phase[-1])
                return out
        try:
            out = func(*args, **kwargs)
        except ValueError as exc:  # fake view ops raise ValueError where real ones raise RuntimeError
            if func is _aten.view.default:
                raise RuntimeError(str(exc)) from exc
            raise
        category = self._phase[-1]
        if (func is _aten._to_copy.default and isinstance(args[0], torch.Tensor)
                and id(args[0].untyped_storage()) in self._param_storages):
            category = "autocast weight copies" if category != "optimizer temporaries" else category
        for t in pytree.tree_leaves(out):
            self._track(t, category)
        return out

    @staticmethod
    def _runs_real(func: Any, args: tuple, kwargs: dict) -> bool:
        """Real when every tensor input is real, or (a factory) when it makes a small integer/bool tensor:
        index and mask bookkeeping that Python code reads back (``tolist``, ``torch.equal``)."""
        tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if tensors:
            return not any(_is_fake(a) for a in tensors)
        dtype = kwargs.get("dtype")
        if func in _INT_DEFAULT_FACTORIES and dtype is None:
            dtype = torch.int64 if all(isinstance(a, int) for a in pytree.tree_leaves(args)) else torch.float32
        if dtype is None or dtype.is_floating_point or dtype.is_complex:
            return False
        sizes = [a for a in pytree.tree_leaves(args) if isinstance(a, int)]
        numel = 1
        for x in sizes:
            numel *= max(int(x), 1)
        return numel <= SMALL_REAL_NUMEL

    def report(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak, "current_bytes": self.current,
                "peak_parts": {k: self.peak_parts.get(k, 0) for k in CATEGORIES if self.peak_parts.get(k)}}


@contextmanager
def fake_mode() -> Iterator[Any]:
    """A ``FakeTensorMode`` that accepts real inputs (they are converted on use)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        yield mode


def meta_causal_lm(config: Any, dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = "sdpa") -> torch.nn.Module:
    """A causal LM of ``config`` (a transformers config) on the ``meta`` device: shapes, no memory."""
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kw)
    return model


def materialize_fake(model: torch.nn.Module) -> torch.nn.Module:
    """Move a meta model into the active fake mode (call inside :func:`fake_mode`): fake CPU storage of the
    same sizes, tied weights kept tied."""
    tied = getattr(model, "tie_weights", None)
    model = model.to_empty(device="cpu")
    if callable(tied):
        model.tie_weights()
    return model


def parameter_bytes(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Bytes of the model's distinct parameter storages (tied weights once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        seen[id(p.untyped_storage())] = p.untyped_storage().nbytes()
    return sum(seen.values())
