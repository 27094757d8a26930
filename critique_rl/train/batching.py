"""Pack (prompt, completion) token lists into tensors and score completion tokens under a model."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch

from critique_rl.algos.logprobs import chunked_entropy, linear_selective_log_softmax, selective_log_softmax
from critique_rl.train.prefix_sharing import PackedGroups, packed_mask, shared_plan


@dataclass
class TokenBatch:
    """Left-padded prompts followed by right-padded completions.

    ``input_ids``/``attention_mask``/``position_ids``: ``[B, P + T]``; ``completion_mask``: ``[B, T]``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    @property
    def completion_len(self) -> int:
        return self.completion_ids.shape[1]

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                     self.completion_ids, self.completion_mask)))

    def select(self, idx: slice | torch.Tensor) -> TokenBatch:
        return TokenBatch(self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx],
                          self.completion_ids[idx], self.completion_mask[idx])


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> TokenBatch:
    """Build a :class:`TokenBatch`. Position ids count real tokens only, as ``generate`` does."""
    P = max(len(p) for p in prompt_ids)
    T = max(1, max(len(c) for c in completion_ids))
    B = len(prompt_ids)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p) : P] = 1
        if c:
            ids[i, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[i, P : P + len(c)] = 1
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    return TokenBatch(ids, attn, pos, ids[:, P:].clone(), attn[:, P:].clone())


@dataclass
class CompletionScores:
    """What :func:`completion_logprobs` computed for a :class:`TokenBatch`.

    ``logp``: ``[B, T]`` float32 log-probs of the completion tokens, differentiable if the model forward had
    grad. ``entropy``: ``[B, T]`` float32 per-token entropy (with grad only when asked for ``"grad"``) or None.
    ``logits``: ``[B, T, V]`` in the model's dtype, already divided by the temperature, or None.
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None
    logits: torch.Tensor | None


def completion_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    temperature: float = 1.0,
    *,
    entropy: Literal["none", "detached", "grad"] = "none",
    keep_logits: bool = False,
    chunk_rows: int = 1024,
) -> CompletionScores:
    """Score the completion tokens ``a_t`` of ``batch`` under ``model`` at temperature ``tau``:

        logp_t = log softmax(z_t / tau)[a_t] = z_t[a_t] / tau - logsumexp(z_t / tau)
        H_t    = logsumexp(z_t / tau) - sum_v softmax(z_t / tau)_v z_t[v] / tau

    where ``z_t`` are the logits predicting ``a_t``. Only the last ``T + 1`` positions' logits are
    materialised (``logits_to_keep``), and no full-vocabulary float32 tensor is built: both quantities are
    computed in row chunks of ``chunk_rows`` (:func:`critique_rl.algos.logprobs.selective_log_softmax`,
    :func:`critique_rl.algos.logprobs.chunked_entropy`). ``entropy``: ``"none"`` (not computed),
    ``"detached"`` (no grad, for stats) or ``"grad"`` (differentiable, for an entropy bonus). ``keep_logits``
    also returns the temperature-scaled logits ``[B, T, V]`` in the model's dtype (a copy only when
    ``tau != 1``), e.g. for :func:`critique_rl.algos.distill.topk_reverse_kl` or
    :func:`critique_rl.algos.logprobs.topk_logprobs`.
    """
    if entropy not in ("none", "detached", "grad"):
        raise ValueError(f"entropy must be 'none', 'detached' or 'grad', got {entropy!r}")
    T = batch.completion_len
    packed = shared_plan(model, batch)
    if packed is not None:
        return _shared_prefix_logprobs(model, batch, packed, temperature, entropy, keep_logits, chunk_rows)
    if not keep_logits and fused_head_enabled(model):
        install_rows_forward(model)  # no-op unless the module is a copy of a patched one
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    use_cache=False, critique_rl_fused=(batch.completion_ids, temperature, entropy != "none",
                                                        chunk_rows))
        ent = out["entropy"]
        if ent is not None and entropy == "detached":
            ent = ent.detach()
        return CompletionScores(logp=out["logp"], entropy=ent, logits=None)
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=T + 1,
        use_cache=False,
    )
    return _scores_from_logits(out.logits[:, :-1, :], batch.completion_ids, temperature, entropy, keep_logits,
                               chunk_rows)


def _scores_from_logits(raw: torch.Tensor, ids: torch.Tensor, temperature: float, entropy: str,
                        keep_logits: bool, chunk_rows: int) -> CompletionScores:
    logp = token_logprobs(raw, ids, chunk_rows, temperature=temperature)
    ent = None
    if entropy != "none":
        ent = chunked_entropy(raw, chunk_rows, grad=entropy == "grad", temperature=temperature)
    logits = None
    if keep_logits:
        logits = raw if temperature == 1.0 else raw / temperature
    return CompletionScores(logp=logp, entropy=ent, logits=logits)


def _shared_prefix_logprobs(model: torch.nn.Module, batch: TokenBatch, packed: PackedGroups, temperature: float,
                            entropy: str, keep_logits: bool, chunk_rows: int) -> CompletionScores:
    """:func:`completion_logprobs` through one packed sequence per prompt group
    (:mod:`critique_rl.train.prefix_sharing`): the backbone runs on ``[G, L]`` with the block mask, the hidden
    states predicting each completion token are gathered to ``[B, T, H]``, then the same head as the plain path
    (fused, or logits + selective log-softmax)."""
    install_rows_forward(model)
    kw = dict(input_ids=packed.input_ids, attention_mask=packed_mask(model, packed),
              position_ids=packed.position_ids, use_cache=False, critique_rl_gather=packed.gather)
    if not keep_logits and fused_head_enabled(model):
        out = model(**kw, critique_rl_fused=(batch.completion_ids, temperature, entropy != "none", chunk_rows))
        ent = out["entropy"]
        if ent is not None and entropy == "detached":
            ent = ent.detach()
        return CompletionScores(logp=out["logp"], entropy=ent, logits=None)
    out = model(**kw)
    return _scores_from_logits(out["logits"], batch.completion_ids, temperature, entropy, keep_logits, chunk_rows)


# ---------------------------------------------------------------------------------------------------------
# fused LM head
# ---------------------------------------------------------------------------------------------------------

_FUSED_FLAG = "_critique_rl_fused_head"


def _innermost(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model below DDP/FSDP (``.module``), torch.compile (``._orig_mod``) and peft wrappers."""
    m = model
    for _ in range(8):
        if hasattr(m, "module") and isinstance(m.module, torch.nn.Module):
            m = m.module
        elif hasattr(m, "_orig_mod"):
            m = m._orig_mod
        elif hasattr(m, "get_base_model") and callable(m.get_base_model):
            m = m.get_base_model()
        else:
            break
    return m


def fused_head_enabled(model: torch.nn.Module) -> bool:
    return bool(getattr(_innermost(model), _FUSED_FLAG, False))


def fused_head_supported(model: torch.nn.Module) -> bool:
    """A causal LM whose logits are exactly ``last_hidden_state @ W_out^T``: an output embedding without bias,
    no logit soft-capping or scaling in its config, and a backbone under ``base_model_prefix``."""
    m = _innermost(model)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    cfg = getattr(m, "config", None)
    if head is None or getattr(head, "bias", None) is not None or cfg is None:
        return False
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text, name, None) not in (None, 1, 1.0):
            return False
    return isinstance(getattr(m, getattr(m, "base_model_prefix", ""), None), torch.nn.Module)


def enable_fused_head(model: torch.nn.Module) -> torch.nn.Module:
    """Patch ``model.forward`` so that ``model(..., critique_rl_fused=(completion_ids, tau, entropy, chunk))``
    runs the backbone and scores the last ``T`` positions with
    :func:`~critique_rl.algos.logprobs.linear_selective_log_softmax` (no ``[B, T, V]`` logits); any other call
    is the original forward (generation is unchanged). Patch before wrapping (DDP, peft): the wrappers pass
    the keyword through to this forward, so gradient hooks stay intact. Raises ValueError when the model is
    not :func:`fused_head_supported`."""
    m = _innermost(model)
    if getattr(m, _FUSED_FLAG, False):
        return install_rows_forward(model)
    if not fused_head_supported(m):
        raise ValueError(f"{type(m).__name__}: logits are not a plain projection of the last hidden state; "
                         "the fused LM head does not apply")
    setattr(m, _FUSED_FLAG, True)
    install_rows_forward(m)
    return model


class _RowsForward:
    """The patched ``forward`` of :func:`install_rows_forward`: a callable bound to its module that a deep copy
    of the module rebinds to the copy (a closure would keep running the original module's weights)."""

    def __init__(self, module: torch.nn.Module, original: Any) -> None:
        self.module = module
        self.original = original
        functools.update_wrapper(self, original)  # inspect.signature(model.forward) stays the original's

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        twin = memo.get(id(self.module))
        if twin is None:  # copied on its own, not as part of its module
            return self
        return _RowsForward(twin, copy.deepcopy(self.original, memo))  # a bound method rebinds to the twin

    def __call__(self, *args: Any, critique_rl_fused: tuple | None = None,
                 critique_rl_gather: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if critique_rl_fused is None and critique_rl_gather is None:
            return self.original(*args, **kwargs)
        m = self.module
        kwargs.pop("logits_to_keep", None)
        hidden = getattr(m, m.base_model_prefix)(*args, **kwargs).last_hidden_state
        if critique_rl_gather is not None:
            h = hidden.reshape(-1, hidden.shape[-1])[critique_rl_gather]
        else:
            T = critique_rl_fused[0].shape[1]  # type: ignore[index]
            h = hidden[:, -(T + 1) : -1]
        if critique_rl_fused is None:
            return {"logits": m.get_output_embeddings()(h)}
        ids, tau, with_entropy, chunk_rows = critique_rl_fused
        logp, ent = linear_selective_log_softmax(h, m.get_output_embeddings().weight, ids, chunk_rows,
                                                 temperature=tau, with_entropy=with_entropy)
        return {"logp": logp, "entropy": ent}


def install_rows_forward(model: torch.nn.Module) -> torch.nn.Module:
    """Patch the innermost module's ``forward`` (once) with two extra keywords; calls without them run the
    original forward (generation is unchanged):

    * ``critique_rl_gather``: ``[B, T]`` indices into the flattened ``[G * L]`` positions of the input; the
      backbone's last hidden states at those positions are the rows scored (the shared-prefix layout of
      :mod:`critique_rl.train.prefix_sharing`). Without it: the ``T`` positions before the last one.
    * ``critique_rl_fused``: ``(completion_ids, tau, entropy, chunk_rows)``: score the rows with the fused head
      and return ``{"logp", "entropy"}``; without it (but with a gather) return ``{"logits": head(rows)}``.

    The wrappers above (DDP, FSDP, peft) pass keywords through to this forward, so their hooks stay intact; a
    ``copy.deepcopy`` of the module gets a forward bound to the copy."""
    m = _innermost(model)
    fwd = m.__dict__.get("forward")
    if isinstance(fwd, _RowsForward) and fwd.module is m:
        return model
    m.forward = _RowsForward(m, m.forward)
    return model


PLAIN_FP32_BYTES = 64 * 2**20
"""Score tensors whose float32 copy is at most this size (tiny vocabularies, CPU runs) take the plain
``log_softmax(logits.float() / tau)`` path: bit-identical to earlier releases, so runs on the same machine
reproduce; larger ones (a 150k vocabulary: gigabytes) take the chunked path. Both compute the same quantity."""


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, chunk_rows: int = 1024, *,
                   temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / tau)[ids]`` as float32 ``[...]``: plain for small inputs (see
    :data:`PLAIN_FP32_BYTES`), else :func:`~critique_rl.algos.logprobs.selective_log_softmax` in row chunks."""
    if logits.numel() * 4 > PLAIN_FP32_BYTES:
        return selective_log_softmax(logits, ids, chunk_rows, temperature=temperature)
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
