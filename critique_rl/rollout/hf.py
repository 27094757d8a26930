"""Rollouts with ``transformers`` ``generate`` (batched, left padding, KV cache), recording logprobs."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from critique_rl.rollout.base import Completion, SamplingParams
from critique_rl.rollout.kv_cache import DEFAULT_BLOCK, block_cache, gather_rows
from critique_rl.train.prefix_sharing import innermost_module, prefix_sharing_mode

KV_CACHES = ("block", "dynamic")


class SampledLogprobRecorder(LogitsProcessor):
    """Records ``log softmax(s_t / tau)[a_t]`` for each sampled token ``a_t`` while ``generate`` runs, keeping
    only one step's scores ``s_t`` ``[B, V]`` at a time (``output_logits=True`` would keep all T of them).

    ``generate`` calls a user logits processor after its own non-sampling processors (none unless the model's
    generation config sets e.g. ``repetition_penalty``) and before the sampling warpers (temperature, top-k,
    top-p), so ``s_t`` are the logits before temperature and truncation. At call ``t`` it computes
    ``x_t = s_t / tau`` (float32) and its log-normaliser ``logsumexp(x_t)`` ``[B]``, keeps both, and (``input_ids``
    ending with the token ``a_{t-1}`` drawn from the previous step) records ``x_{t-1}[a_{t-1}] -
    logsumexp(x_{t-1})``: the same float32 numbers as :func:`~critique_rl.algos.logprobs.selective_log_softmax`
    on a copy of ``s_{t-1}``, with one pass over ``[B, V]`` per step and no copy at ``tau = 1`` (``x_t`` is then
    ``generate``'s own fresh float32 ``s_t``; the warpers after this processor build new tensors, and a warper
    that masked ``s_t`` in place would leave the sampled token's entry untouched). :meth:`finish` scores the
    last token from the last kept step. Extra decode steps that ``generate`` later undoes (deferred stop
    checks) are dropped by :meth:`finish`.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"SampledLogprobRecorder: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None
        self._logprobs: list[torch.Tensor] = []

    def _gather(self, ids: torch.Tensor) -> torch.Tensor:
        assert self._prev is not None
        x, lse = self._prev
        return x.gather(-1, ids.reshape(-1, 1).to(x.device)).squeeze(-1) - lse

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prev is not None:
            self._logprobs.append(self._gather(input_ids[:, -1]))
        x = scores.detach().float()
        if self.temperature != 1.0:
            x = x / self.temperature  # a new tensor: ``scores`` stays as generate gave it
        self._prev = (x, torch.logsumexp(x, dim=-1))
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """Log-probs ``[B, T]`` (float32) of the generated tokens ``new_tokens`` ``[B, T]``; frees the state."""
        T = new_tokens.shape[1]
        if T and len(self._logprobs) < T:
            if self._prev is None or len(self._logprobs) != T - 1:
                raise RuntimeError(f"logits processor saw {len(self._logprobs) + 1} steps for {T} tokens")
            self._logprobs.append(self._gather(new_tokens[:, -1]))
        lp = (torch.stack(self._logprobs[:T], dim=1) if T
              else torch.zeros(new_tokens.shape, dtype=torch.float32, device=new_tokens.device))
        self._prev, self._logprobs = None, []
        return lp


# ``LogitsProcessorList`` reads each processor's signature at every decode step; a stored one is returned as is
SampledLogprobRecorder.__call__.__signature__ = inspect.signature(SampledLogprobRecorder.__call__)  # type: ignore[attr-defined]


class HFGenerator:
    """Samples from the live policy module itself, so weight sync is a no-op. ``model`` may be the module or a
    zero-argument function returning it (read at every use).

    Prompts are tokenized without special tokens (chat formatting, if any, is already in the text) and
    sampled in chunks of ``batch_size`` sequences. Within a chunk, each distinct prompt is encoded once (all
    but its last token, in one forward) and its KV cache is copied to its samples before ``generate`` continues
    from it (:func:`prefill_shared_prompts`; shared-prefix generation, unless the model's prefix-sharing mode
    is ``off``, :func:`critique_rl.train.prefix_sharing.set_prefix_sharing`): the same chunks, the same random
    draws and the same logits up to float rounding as encoding every sample's prompt. ``autocast``: a context factory entered around ``generate``
    (e.g. ``accelerator.autocast``); ``synced_gpus``: passed to ``generate`` (ranks decode in lock-step, needed
    when parameters are sharded). ``kv_cache``: ``block`` (default) decodes into a
    :class:`~critique_rl.rollout.kv_cache.BlockKVLayer` cache (one slot written per step instead of the default
    cache's concatenation of the whole cache; same logits and tokens), ``dynamic`` leaves ``generate`` its
    default cache; either way a ``cache_implementation`` set in the model's generation config is respected.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 256,
        *,
        autocast: Callable[[], AbstractContextManager[Any]] | None = None,
        synced_gpus: bool = False,
        kv_cache: str = "block",
    ) -> None:
        if kv_cache not in KV_CACHES:
            raise ValueError(f"HFGenerator: kv_cache must be one of {list(KV_CACHES)}, got {kv_cache!r}")
        self._model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.autocast = autocast
        self.synced_gpus = synced_gpus
        self.kv_cache = kv_cache

    @property
    def model(self) -> PreTrainedModel:
        """The policy module (read through the function given in its place, if one was: a later wrap is seen)."""
        m = self._model
        return m if isinstance(m, torch.nn.Module) or not callable(m) else m()

    @model.setter
    def model(self, model: Any) -> None:
        self._model = model

    def sync_weights(self) -> None:  # same module: nothing to copy
        return None

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        expanded = [p for p in prompts for _ in range(params.n)]
        flat: list[Completion] = []
        for start in range(0, len(expanded), self.batch_size):
            flat.extend(self._generate_chunk(expanded[start : start + self.batch_size], params))
        return [flat[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """:meth:`generate` from token ids (token in / token out: multi-turn contexts are never re-tokenized)."""
        expanded = [p for p in prompt_ids for _ in range(params.n)]
        flat: list[Completion] = []
        for start in range(0, len(expanded), self.batch_size):
            chunk = expanded[start : start + self.batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):  # left padding, as the tokenizer pads
                ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
                attn[i, width - len(p):] = 1
            flat.extend(self._generate_encoded({"input_ids": ids, "attention_mask": attn}, params))
        return [flat[i * params.n : (i + 1) * params.n] for i in range(len(prompt_ids))]

    def _generate_chunk(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return self._generate_encoded(dict(enc), params)

    def _generate_encoded(self, enc: dict[str, torch.Tensor], params: SamplingParams) -> list[Completion]:
        tok, model = self.tokenizer, self.model
        device = next(model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        was_training = model.training
        model.eval()
        sample = not params.greedy
        # sampling logprobs under logits / temperature (the distribution the tokens were drawn from, before
        # top-p); greedy decoding records them at temperature 1
        recorder = SampledLogprobRecorder(params.temperature if sample else 1.0)
        gen_kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            logits_processor=LogitsProcessorList([recorder]),
            return_dict_in_generate=False,  # nor output_logits/output_scores: no [B, T, V] kept, no cache returned
            use_cache=True,
        )
        if self.synced_gpus:
            gen_kwargs["synced_gpus"] = True
        if sample:
            gen_kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        try:
            with self.autocast() if self.autocast is not None else nullcontext():
                cache = self._new_cache(model, enc["input_ids"].shape[1] + params.max_new_tokens)
                if not self.synced_gpus and prefix_sharing_mode(model) != "off":
                    shared = prefill_shared_prompts(model, enc["input_ids"], enc["attention_mask"], into=cache)
                    if shared is not None:
                        cache = shared
                if cache is not None:
                    gen_kwargs[_cache_keyword(model)] = cache
                out = model.generate(**enc, **gen_kwargs)
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
        finally:
            if was_training:
                model.train()
        seqs = sequences[:, enc["input_ids"].shape[1] :]
        lp = recorder.finish(seqs)
        results = []
        eos = tok.eos_token_id
        for row, row_lp in zip(seqs.tolist(), lp.tolist(), strict=True):
            length = len(row)
            finished = False
            if eos in row:
                length = row.index(eos) + 1
                finished = True
            ids = row[:length]
            text = tok.decode(ids[:-1] if finished else ids, skip_special_tokens=True)
            results.append(Completion(token_ids=ids, logprobs=row_lp[:length], text=text, finished=finished))
        return results

    def _new_cache(self, model: PreTrainedModel, capacity: int) -> Any | None:
        """An empty block KV cache for ``capacity`` positions (prompt + new tokens), or None where ``generate``
        should build its own (``kv_cache='dynamic'``, a ``cache_implementation`` in the generation config, or a
        model without a default dynamic cache)."""
        if self.kv_cache != "block":
            return None
        inner = innermost_module(model)
        gen_config = getattr(inner, "generation_config", None)
        if getattr(gen_config, "cache_implementation", None) is not None:
            return None
        return block_cache(inner, capacity, DEFAULT_BLOCK)


_PARAMETER_NAMES: dict[Any, frozenset[str]] = {}


def _parameter_names(fn: Callable[..., Any]) -> frozenset[str]:
    """The parameter names of ``fn``, read once per underlying function (``inspect.signature`` takes ~0.1 ms)."""
    key = getattr(fn, "__func__", fn)
    names = _PARAMETER_NAMES.get(key)
    if names is None:
        if len(_PARAMETER_NAMES) > 256:  # functions made per call (closures) would otherwise accumulate
            _PARAMETER_NAMES.clear()
        names = _PARAMETER_NAMES[key] = frozenset(inspect.signature(fn).parameters)
    return names


def _cache_keyword(model: PreTrainedModel) -> str:
    """``generate``'s keyword for a prefilled cache: ``cache`` (transformers >= 5.2x), else ``past_key_values``."""
    return "cache" if "cache" in _parameter_names(model.prepare_inputs_for_generation) else "past_key_values"


@torch.no_grad()
def prefill_shared_prompts(model: PreTrainedModel, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor, into: Any | None = None) -> Any | None:
    """A KV cache of every row's prompt but its last token, each distinct row encoded once, or None when no two
    rows are equal (nothing to share), a prompt is one column wide, or the model returns no batch-indexable cache.

    The distinct rows ``U`` (``torch.unique`` over the left-padded ``[B, P]`` ids and mask) run one forward over
    their first ``P - 1`` columns with the position ids ``generate`` would give them (``cumsum(mask) - 1``, 0 on
    padding); the cache is then gathered back to the ``B`` rows (``batch_select_indices``, a copy per row as
    ``generate``'s own prefill would hold). ``generate`` given this cache and the full ``[B, P]`` input encodes
    only the last prompt column and samples from there: the first step's logits equal the full prefill's up to
    float rounding, and the random draws are the same. ``into``: an empty cache (:func:`block_cache`) that
    receives the ``B`` rows instead (:func:`~critique_rl.rollout.kv_cache.gather_rows`) and is returned."""
    B, P = input_ids.shape
    if P < 2 or B < 2:
        return None
    key = torch.cat([input_ids.masked_fill(attention_mask == 0, -1), attention_mask.long()], dim=1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    if uniq.shape[0] == B:
        return None
    rows = torch.arange(B, device=input_ids.device)
    first = torch.full((uniq.shape[0],), B, device=input_ids.device).scatter_reduce_(0, inverse, rows, "amin")
    ids, mask = input_ids[first], attention_mask[first]
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    inner = innermost_module(model)  # wrappers (peft) pass the keyword through to the causal LM's forward
    extra = {"logits_to_keep": 1} if "logits_to_keep" in _parameter_names(inner.forward) else {}
    out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], use_cache=True,
                **extra)
    cache = out["cache"] if "cache" in out else out.get("past_key_values")
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    if into is not None and hasattr(cache, "layers"):
        gather_rows(into, cache, inverse.to(input_ids.device))
        return into
    cache.batch_select_indices(inverse.to(input_ids.device))
    return cache
