"""Memory-lean log-probabilities, log-normalisers, entropies and top-K over a large vocabulary (pure functions).

With a 150k-token vocabulary, ``log_softmax(logits.float())`` over every completion token materialises a
``[B, T, V]`` float32 copy (plus another for its gradient). The functions here never do: they walk the
flattened rows ``[N, V]`` in chunks of ``chunk_rows`` rows and upcast one chunk at a time to float32, so the
extra memory is ``O(chunk_rows * V)`` float32 plus ``O(N)`` per-row results. The differentiable ones use a
custom backward that writes ``d/d logits`` chunk by chunk straight into one gradient tensor of the logits'
own dtype (autograd of the naive formula would keep a float32 copy of every chunk alive until backward).

References: TRL ``trl.trainer.utils.selective_log_softmax`` (gather minus logsumexp, row by row) and verl
``verl.utils.torch_functional.entropy_from_logits_with_chunking`` (entropy in row chunks).

All functions accept bf16 / fp16 / fp32 (or fp64) logits of shape ``[..., V]``; results are float32 (math is
done in float32, or float64 for float64 input). An optional keyword ``temperature`` ``tau`` scales the logits
inside each chunk, in float32: ``x = logits / tau``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["chunked_entropy", "linear_selective_log_softmax", "logsumexp_chunked", "selective_log_softmax",
           "topk_logprobs"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _row_blocks(x: torch.Tensor, chunk_rows: int) -> Iterator[torch.Tensor]:
    """Consecutive ``[n, V]`` blocks (n <= max(chunk_rows, rows of one x[i])) of ``x`` flattened to
    ``[N, V]``, in row-major order. Views when ``x``'s layout allows, otherwise small copies of one block
    (e.g. ``out.logits[:, :-1]`` cannot be flattened without copying everything, but each ``x[b]`` can)."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    V = x.shape[-1]
    if x.dim() <= 2:
        flat = x.reshape(-1, V)  # a view for any 1-D/2-D tensor with a unit stride on V
        for s in range(0, flat.shape[0], chunk_rows):
            yield flat[s : s + chunk_rows]
        return
    try:
        flat = x.view(-1, V)
    except RuntimeError:
        inner = 1
        for d in x.shape[1:-1]:
            inner *= d
        step = max(1, chunk_rows // max(inner, 1))
        for s in range(0, x.shape[0], step):
            block = x[s : s + step].reshape(-1, V)  # at most max(chunk_rows, inner) rows copied
            for t in range(0, block.shape[0], chunk_rows):
                yield block[t : t + chunk_rows]
        return
    for s in range(0, flat.shape[0], chunk_rows):
        yield flat[s : s + chunk_rows]


def _scaled(block: torch.Tensor, temperature: float) -> torch.Tensor:
    """``block / temperature`` in the compute dtype, always a fresh tensor (safe to modify in place)."""
    x = block.to(_compute_dtype(block.dtype), copy=True)
    if temperature != 1.0:
        x.div_(temperature)
    return x


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


class _LogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, chunk_rows: int, temperature: float) -> torch.Tensor:  # type: ignore[override]
        lse = torch.empty(logits.shape[:-1].numel(), dtype=torch.float32, device=logits.device)
        s = 0
        for block in _row_blocks(logits, chunk_rows):
            n = block.shape[0]
            lse[s : s + n] = torch.logsumexp(_scaled(block, temperature), dim=-1)
            s += n
        ctx.save_for_backward(logits, lse)
        ctx.chunk_rows, ctx.temperature = chunk_rows, temperature
        return lse.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        # d lse / d logits_v = softmax(x)_v / tau
        logits, lse = ctx.saved_tensors
        tau = ctx.temperature
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        gflat, g = grad.view(-1, logits.shape[-1]), grad_out.reshape(-1).float()
        s = 0
        for block in _row_blocks(logits, ctx.chunk_rows):
            n = block.shape[0]
            x = _scaled(block, tau)
            p = x.sub_(lse[s : s + n, None].to(x.dtype)).exp_()
            gflat[s : s + n] = p.mul_(g[s : s + n, None].to(x.dtype) / tau)
            s += n
        return grad, None, None


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, chunk_rows: int, temperature: float) -> torch.Tensor:  # type: ignore[override]
        flat_ids = ids.reshape(-1)
        out = torch.empty(flat_ids.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        s = 0
        for block in _row_blocks(logits, chunk_rows):
            n = block.shape[0]
            x = _scaled(block, temperature)
            lse[s : s + n] = torch.logsumexp(x, dim=-1)
            out[s : s + n] = x.gather(-1, flat_ids[s : s + n, None]).squeeze(-1) - lse[s : s + n]
            s += n
        ctx.save_for_backward(logits, flat_ids, lse)
        ctx.chunk_rows, ctx.temperature = chunk_rows, temperature
        return out.view(ids.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        # d logp_a / d logits_v = (1[v = a] - softmax(x)_v) / tau
        logits, flat_ids, lse = ctx.saved_tensors
        tau = ctx.temperature
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        gflat, g = grad.view(-1, logits.shape[-1]), grad_out.reshape(-1).float()
        s = 0
        for block in _row_blocks(logits, ctx.chunk_rows):
            n = block.shape[0]
            x = _scaled(block, tau)
            gs = g[s : s + n, None].to(x.dtype) / tau
            d = x.sub_(lse[s : s + n, None].to(x.dtype)).exp_().mul_(-gs)
            d.scatter_add_(-1, flat_ids[s : s + n, None], gs)
            gflat[s : s + n] = d
            s += n
        return grad, None, None, None


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, chunk_rows: int, temperature: float) -> torch.Tensor:  # type: ignore[override]
        rows = logits.shape[:-1].numel()
        ent = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(ent)
        mean_x = torch.empty_like(ent)
        s = 0
        for block in _row_blocks(logits, chunk_rows):
            n = block.shape[0]
            x = _scaled(block, temperature)
            # shift by the row max (y <= 0, small where p is large) and normalise by the same computed sum, so
            # float32 rounding stays ~1e-6 even for 150k-token rows
            mx = x.max(dim=-1, keepdim=True).values
            y = x.sub_(mx).clamp_min_(torch.finfo(x.dtype).min)  # -inf logits (p = 0): avoid 0 * -inf = nan
            e = torch.exp(y)
            z = e.sum(-1)
            ey = e.mul_(y).sum(-1) / z  # E_p[y]
            log_z = torch.log(z)
            mx = mx.squeeze(-1)
            lse[s : s + n], mean_x[s : s + n] = mx + log_z, mx + ey
            ent[s : s + n] = log_z - ey
            s += n
        ctx.save_for_backward(logits, lse, mean_x)
        ctx.chunk_rows, ctx.temperature = chunk_rows, temperature
        return ent.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        # H = lse(x) - sum_v p_v x_v  =>  dH / d logits_v = -p_v (x_v - E_p[x]) / tau
        logits, lse, mean_x = ctx.saved_tensors
        tau = ctx.temperature
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        gflat, g = grad.view(-1, logits.shape[-1]), grad_out.reshape(-1).float()
        s = 0
        for block in _row_blocks(logits, ctx.chunk_rows):
            n = block.shape[0]
            x = _scaled(block, tau)
            x.clamp_min_(torch.finfo(x.dtype).min)
            p = torch.exp(x - lse[s : s + n, None].to(x.dtype))
            d = x.sub_(mean_x[s : s + n, None].to(x.dtype)).mul_(p).mul_(-g[s : s + n, None].to(x.dtype) / tau)
            gflat[s : s + n] = d
            s += n
        return grad, None, None


def logsumexp_chunked(logits: torch.Tensor, chunk_rows: int = 1024, *, temperature: float = 1.0) -> torch.Tensor:
    """Log-normaliser ``[...]`` (float32) of ``x = logits / tau`` over the last dimension:

        lse(x) = log sum_v exp(x_v)

    computed over the flattened rows in chunks of ``chunk_rows``, each chunk upcast to float32 only inside the
    chunk. Differentiable: ``d lse / d logits_v = softmax(x)_v / tau``, written chunk by chunk into a gradient
    of the logits' dtype. (The normaliser half of TRL's ``selective_log_softmax``.)
    """
    _check_temperature(temperature)
    if logits.shape[:-1].numel() == 0:
        return logits.sum(-1).float() * 0
    return _LogSumExp.apply(logits, chunk_rows, float(temperature))


def selective_log_softmax(
    logits: torch.Tensor, ids: torch.Tensor, chunk_rows: int = 1024, *, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities ``[...]`` (float32) of the token ids ``ids`` ``[...]`` under ``softmax(logits / tau)``:

        log p(a) = x_a - log sum_v exp(x_v),   x = logits / tau

    i.e. ``log_softmax(x).gather(-1, ids)`` without the full ``[..., V]`` log_softmax copy (TRL
    ``selective_log_softmax``). Computed over flattened rows in chunks of ``chunk_rows``, each upcast to float32
    only inside the chunk. Differentiable w.r.t. ``logits``: ``d log p(a) / d logits_v = (1[v=a] - p_v) / tau``,
    computed chunk by chunk in the backward pass (nothing of size ``V`` per row is saved besides ``logits``).
    """
    _check_temperature(temperature)
    if ids.shape != logits.shape[:-1]:
        raise ValueError(f"ids shape {tuple(ids.shape)} must equal logits.shape[:-1] {tuple(logits.shape[:-1])}")
    if ids.numel() == 0:
        return logits.sum(-1).float() * 0
    return _SelectiveLogSoftmax.apply(logits, ids.long(), chunk_rows, float(temperature))


def chunked_entropy(
    logits: torch.Tensor, chunk_rows: int = 1024, grad: bool = False, *, temperature: float = 1.0
) -> torch.Tensor:
    """Per-row entropy ``[...]`` (float32) of ``p = softmax(x)``, ``x = logits / tau``:

        H = -sum_v p_v log p_v = logsumexp(x) - sum_v p_v x_v

    in row chunks of ``chunk_rows``, each upcast to float32 only inside the chunk (verl
    ``entropy_from_logits_with_chunking``). ``grad=False`` runs under ``torch.no_grad()`` and returns a
    detached tensor; ``grad=True`` is differentiable, ``dH / d logits_v = -p_v (x_v - E_p[x]) / tau``,
    computed chunk by chunk in the backward pass. Tokens with ``-inf`` logits contribute 0.
    """
    _check_temperature(temperature)
    if logits.shape[:-1].numel() == 0:
        out = logits.sum(-1).float() * 0
        return out if grad else out.detach()
    if not grad:
        with torch.no_grad():
            return _Entropy.apply(logits.detach(), chunk_rows, float(temperature))
    return _Entropy.apply(logits, chunk_rows, float(temperature))


@torch.no_grad()
def topk_logprobs(
    logits: torch.Tensor, k: int, chunk_rows: int = 1024, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` log-probabilities of ``softmax(logits / tau)`` and their token ids, ``([..., k] float32,
    [..., k] long)``, sorted descending:

        values = topk(x).values - logsumexp(x),   x = logits / tau

    (dividing by ``tau > 0`` keeps the order, so the top-k is taken on the raw logits). No full log_softmax
    copy; rows in chunks of ``chunk_rows``; ``k`` is capped at ``V``. No gradient.
    """
    _check_temperature(temperature)
    V = logits.shape[-1]
    k = min(int(k), V)
    lead = logits.shape[:-1]
    rows = lead.numel()
    values = torch.empty(rows, k, dtype=torch.float32, device=logits.device)
    indices = torch.empty(rows, k, dtype=torch.long, device=logits.device)
    s = 0
    for block in _row_blocks(logits.detach(), chunk_rows):
        n = block.shape[0]
        x = _scaled(block, temperature)
        v, i = x.topk(k, dim=-1)
        values[s : s + n] = v - torch.logsumexp(x, dim=-1, keepdim=True)
        indices[s : s + n] = i
        s += n
    return values.view(*lead, k), indices.view(*lead, k)


# ---------------------------------------------------------------------------------------------------------
# fused LM head: hidden states -> per-token log-prob (and entropy) without the [N, V] logits
# ---------------------------------------------------------------------------------------------------------

FUSED_CHUNK_BYTES = 160 << 20
"""Largest float32 logits chunk (bytes) the fused head holds at once; ``chunk_rows`` is capped to fit it."""


_ENT_SLICE = 16384
"""Vocabulary columns per step of the entropy term's in-place backward (one [rows, 16384] float32 temporary
instead of a second [rows, V] buffer)."""

FUSED_WEIGHT_SLICE_BYTES = 32 << 20
"""Under autocast, the output embedding is cast to the low-precision dtype this many bytes of rows at a time
(a vocabulary slice), never as one whole copy (272 MB for a 151,936 x 896 bf16 head)."""


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, autocast: tuple[str, bool, torch.dtype]) -> torch.Tensor:
    """Float32 ``[rows, V]`` logits ``h W^T`` of one row chunk, computed as autocast would (inputs cast to its
    dtype, product in that dtype, then float32), but with ``W`` cast one vocabulary slice at a time: autocast
    itself would hold a cast copy of the whole ``W`` (and a whole low-precision ``[rows, V]`` product) beside
    the float32 chunk. Without autocast (or when it would not cast), one ``linear`` as before."""
    dev, enabled, dtype = autocast
    if not enabled or not h.is_floating_point() or (h.dtype == dtype and weight.dtype == dtype):
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            return torch.nn.functional.linear(h, weight).float()
    V, H = weight.shape
    step = max(1024, FUSED_WEIGHT_SLICE_BYTES // (H * torch.finfo(dtype).bits // 8))
    hc = h.to(dtype)
    z = torch.empty(h.shape[0], V, dtype=torch.float32, device=h.device)
    for a in range(0, V, step):
        z[:, a : a + step] = torch.nn.functional.linear(hc, weight[a : a + step].to(dtype))
    return z


class _LinearLogProb(torch.autograd.Function):
    """``z = h W^T / tau`` in row chunks; returns ``z[a] - logsumexp(z)`` and (optionally) the entropy of
    ``softmax(z)``. Saves only ``h``, ``W``, the ids and two numbers per row; the backward recomputes each
    chunk's logits (under the autocast state of the forward) and accumulates ``dh`` and ``dW``."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, temperature, chunk_rows, with_entropy):  # type: ignore[override]
        dev = hidden.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else None
        for s in range(0, n, chunk_rows):
            z = _chunk_logits(hidden[s : s + chunk_rows], weight, ctx.autocast)
            if temperature != 1.0:
                z.div_(temperature)
            lse_c = torch.logsumexp(z, dim=-1)
            lse[s : s + chunk_rows] = lse_c
            logp[s : s + chunk_rows] = z.gather(-1, ids[s : s + chunk_rows].unsqueeze(-1)).squeeze(-1) - lse_c
            if ent is not None:
                p = torch.exp(z - lse_c.unsqueeze(-1))
                ent[s : s + chunk_rows] = lse_c - (p * z).sum(-1)
        ctx.save_for_backward(hidden, weight, ids, lse, ent if ent is not None else lse)
        ctx.temperature, ctx.chunk_rows, ctx.with_entropy = temperature, chunk_rows, with_entropy
        if ent is None:
            return logp, torch.zeros(0, device=hidden.device)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):  # type: ignore[override]
        # One float32 [chunk_rows, V] buffer per chunk: the recomputed logits become d(out)/dz in place
        # (d logp_a/dz = onehot(a) - p; dH/dz_j = -p_j (log p_j + H)), and dW accumulates with addmm_.
        hidden, weight, ids, lse, ent = ctx.saved_tensors
        tau, rows = ctx.temperature, ctx.chunk_rows
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        use_ent = ctx.with_entropy and g_ent is not None and g_ent.numel() > 0 and bool(g_ent.ne(0).any())
        w32 = weight.float()
        for s in range(0, hidden.shape[0], rows):
            h = hidden[s : s + rows]
            z = _chunk_logits(h, weight, ctx.autocast)
            if tau != 1.0:
                z.div_(tau)
            z.sub_(lse[s : s + rows].unsqueeze(-1))  # log p
            g = g_logp[s : s + rows].float().unsqueeze(-1)
            if use_ent:  # dz = -p * (g + g_ent * (log p + H)), in place, a vocabulary slice of p at a time
                h_ent, ge = ent[s : s + rows].unsqueeze(-1), g_ent[s : s + rows].float().unsqueeze(-1)
                for a in range(0, z.shape[-1], _ENT_SLICE):
                    zs = z[:, a : a + _ENT_SLICE]
                    p = zs.exp()
                    zs.add_(h_ent).mul_(ge).add_(g).mul_(p).neg_()
                    del p
                del zs  # a view of the buffer: it would keep it alive past ``del dz``
            else:  # dz = -p * g
                z.exp_().mul_(-g)
            dz = z
            del z  # one name for the buffer: ``del dz`` below frees it before the next chunk allocates its own
            dz.scatter_add_(-1, ids[s : s + rows].unsqueeze(-1), g)
            if tau != 1.0:
                dz.div_(tau)
            if grad_h is not None:
                grad_h[s : s + rows] = (dz @ w32).to(grad_h.dtype)
            if grad_w is not None:
                grad_w.addmm_(dz.t(), h.float())
            del dz
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None, None


def linear_selective_log_softmax(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    chunk_rows: int = 1024,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropy) straight from the last hidden states, never holding ``[N, V]`` logits
    (a fused LM head, as TRL's ``add_fused_lm_head`` and Liger's fused linear cross-entropy do)::

        z_i = h_i W^T / tau,   logp_i = z_i[a_i] - logsumexp(z_i),   H_i = logsumexp(z_i) - sum_v softmax(z_i)_v z_iv

    ``hidden``: ``[..., H]``; ``weight``: ``[V, H]`` (the output embedding, no bias); ``ids``: ``[...]``.
    Differentiable in ``hidden`` and ``weight`` (both ``logp`` and the entropy); extra memory is
    ``O(chunk_rows * V)`` float32 in the forward and the backward. Returns float32 ``(logp, entropy or None)``.
    """
    _check_temperature(temperature)
    # a [chunk_rows, V] float32 buffer at most ~160 MiB (256 rows at a 150k vocabulary; small vocabularies keep
    # chunk_rows): the head's forward and backward peak scales with it
    chunk_rows = min(chunk_rows, max(64, FUSED_CHUNK_BYTES // (4 * weight.shape[0])))
    shape = ids.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    logp, ent = _LinearLogProb.apply(h, weight, ids.reshape(-1), temperature, chunk_rows, with_entropy)
    return logp.view(shape), (ent.view(shape) if with_entropy else None)
