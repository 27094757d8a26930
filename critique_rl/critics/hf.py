"""Local transformers critic: a causal LM writes ``cot`` critiques (``critique_cot.j2``).

The model is a local path (loaded with :func:`critique_rl.models.load_policy`, never downloaded) or a
model + tokenizer already in memory, so the training policy can critique its own rollouts (self-critique,
Critique-GRPO arXiv:2506.03106). Generation is batched with left padding; the chat template is used when the
tokenizer has one. The model's train/eval mode, the tokenizer's padding side and the global torch RNG are
restored afterwards, so critiquing does not perturb training.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

from critique_rl.critics.base import (
    BaseCritic,
    CritiqueFailure,
    CritiqueRequest,
    Generation,
    custom_prompt,
    short_error,
)
from critique_rl.templates import render

logger = logging.getLogger("critique_rl.critics")


class HFCritic(BaseCritic):
    """Critiques from a local causal LM.

    Args:
        model: a local directory saved with ``save_pretrained``, or a loaded ``PreTrainedModel``.
        tokenizer: the tokenizer (required when ``model`` is an object).
        kind: ``cot`` (default) or ``indicative``/``ground_truth`` (rule templates, no generation).
        max_new_tokens: critique length bound.
        temperature: 0 = greedy for the first try; regenerations sample at ``regen_temperature`` then.
        batch_size: prompts per ``generate`` call.
        device: for a path: ``auto``, ``cpu``, ``cuda``; an in-memory model stays where it is.
        seed: base seed for sampled regenerations (the global RNG state is restored afterwards).
        verdict_pattern: extra verdict regex with one group (``critic.verdict_pattern``), see
            :func:`critique_rl.critics.base.parse_verdict`.
        generator: a rollout engine (:class:`critique_rl.rollout.base.Generator`) sampling from this same
            model, used instead of ``model.generate`` (self-critique with ``rollout_backend: vllm``: the trainer
            sets it, so critiques come from the engine that holds the synced policy weights). Prompts are
            tokenized and truncated exactly as on the transformers path.
        reference: ``visible`` (the prompt shows the reference answer when the request has one) or ``hidden``
            (question and response only: a critic that never sees the answer; ``critic.reference``).

    A model directory holding a ``critique_cot.j2`` (a critic trained with ``critique-rl critic train|distill``
    saves the prompt it was trained on there) uses that prompt unless ``template_dir`` is given.
    """

    def __init__(
        self,
        model: str | Path | Any,
        tokenizer: Any | None = None,
        *,
        kind: str = "cot",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        regen_temperature: float = 0.7,
        batch_size: int = 8,
        max_regenerations: int = 2,
        fallback_kind: str = "auto",
        template_dir: str | None = None,
        verdict_pattern: str | None = None,
        device: str = "auto",
        seed: int = 0,
        generator: Any | None = None,
        reference: str = "visible",
    ) -> None:
        super().__init__(
            kind, fallback_kind=fallback_kind, max_regenerations=max_regenerations, template_dir=template_dir,
            verdict_pattern=verdict_pattern, reference=reference,
        )
        if isinstance(model, (str, Path)):
            from critique_rl.models import load_policy

            if template_dir is None and (Path(model).expanduser() / "critique_cot.j2").is_file():
                self.template_dir = str(Path(model).expanduser())  # the prompt the critic was trained on

            model, loaded_tok = load_policy(model, device=device)
            tokenizer = tokenizer or loaded_tok
        if tokenizer is None:
            raise ValueError("HFCritic needs a tokenizer when given a model object")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.regen_temperature = float(regen_temperature)
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self._calls = 0
        self._lock = threading.Lock()  # one generate at a time on a shared model
        self.generator = generator
        self.shares_policy = False  # set by build_critic for `model: policy` (self-critique)

    def __repr__(self) -> str:
        return f"HFCritic(model={type(self.model).__name__}, kind={self.kind!r})"

    # -- prompting -------------------------------------------------------------------------------------
    def prompt(self, request: CritiqueRequest) -> str:
        """The text fed to the model: ``critique_cot.j2`` (or the request's own ``metadata["prompt"]``),
        wrapped in the chat template when the tokenizer has one."""
        content = custom_prompt(request) or render(
            "critique_cot.j2",
            self.template_dir,
            question=request.question,
            response=request.response,
            reference=self.critic_reference(request),
        )
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        return content + "\n"

    def prompt_key(self, request: CritiqueRequest) -> str:
        """The prompt text itself (see :meth:`BaseCritic.remember`)."""
        return self.prompt(request)

    def _max_prompt_tokens(self) -> int | None:
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if not limit:
            return None
        return max(1, int(limit) - self.max_new_tokens)

    # -- generation ------------------------------------------------------------------------------------
    async def _generate(self, items: list[tuple[CritiqueRequest, int]]) -> list[Generation | CritiqueFailure]:
        if self.generator is not None:  # a colocated vLLM engine runs in the thread that built it
            return self._generate_sync(items)
        return await asyncio.to_thread(self._generate_sync, items)

    def _generate_sync(self, items: list[tuple[CritiqueRequest, int]]) -> list[Generation | CritiqueFailure]:
        out: list[Generation | CritiqueFailure] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            t0 = time.perf_counter()
            try:
                gens = self._generate_batch([self.prompt(r) for r, _ in chunk], sample=any(g > 0 for _, g in chunk))
            except Exception as exc:  # e.g. CUDA OOM: fall back, never raise into training
                logger.warning("hf critic generation failed: %s", type(exc).__name__)
                reason = short_error(f"generation failed: {type(exc).__name__}: {exc}")
                out.extend(CritiqueFailure(reason, time.perf_counter() - t0) for _ in chunk)
                continue
            out.extend(gens)
        return out

    def _generate_batch(self, prompts: list[str], sample: bool) -> list[Generation]:
        import torch

        tok, model = self.tokenizer, self.model
        with self._lock:
            old_side, old_trunc = tok.padding_side, getattr(tok, "truncation_side", "right")
            was_training = bool(getattr(model, "training", False))
            tok.padding_side = "left"
            tok.truncation_side = "left"  # keep the end of an over-long prompt (the "Critique:" cue)
            try:
                max_len = self._max_prompt_tokens()
                enc = tok(
                    prompts,
                    return_tensors="pt",
                    padding=True,
                    truncation=max_len is not None,
                    max_length=max_len,
                    add_special_tokens=not getattr(tok, "chat_template", None),
                )
                temperature = self.temperature if self.temperature > 0 else self.regen_temperature
                if self.generator is not None:
                    return self._generate_engine(prompts, enc["input_ids"], enc["attention_mask"], sample, temperature)
                device = next(model.parameters()).device
                enc = {k: v.to(device) for k, v in enc.items()}
                kwargs: dict[str, Any] = {
                    "max_new_tokens": self.max_new_tokens,
                    "pad_token_id": tok.pad_token_id,
                    "eos_token_id": tok.eos_token_id,
                    "do_sample": bool(sample or self.temperature > 0),
                }
                if kwargs["do_sample"]:
                    kwargs["temperature"] = temperature
                model.eval()
                t0 = time.perf_counter()
                devices = [device.index or 0] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices), torch.no_grad():
                    self._calls += 1
                    torch.manual_seed(self.seed + self._calls)
                    out = model.generate(**enc, **kwargs)
                elapsed = time.perf_counter() - t0
            finally:
                tok.padding_side, tok.truncation_side = old_side, old_trunc
                if was_training:
                    model.train()
        prompt_len = enc["input_ids"].shape[1]
        new_tokens = out[:, prompt_len:]
        gens = []
        for row, mask in zip(new_tokens, enc["attention_mask"], strict=True):
            ids = row.tolist()
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id) + 1]
            ids = [i for i in ids if i != tok.pad_token_id or i == tok.eos_token_id]
            text = tok.decode(ids, skip_special_tokens=True)
            gens.append(
                Generation(
                    text=text,
                    prompt_tokens=int(mask.sum()),
                    completion_tokens=len(ids),
                    latency_s=elapsed,
                )
            )
        return gens

    def _generate_engine(self, prompts: list[str], ids: Any, mask: Any, sample: bool,
                         temperature: float) -> list[Generation]:
        """The same critiques from :attr:`generator` (called with the lock held). ``ids``: the prompts as the
        transformers path tokenizes them (left padded, truncated, special tokens per the template rule); a prompt
        whose engine tokenization (no special tokens) would differ is passed as the decoded ids instead."""
        import torch

        from critique_rl.rollout.base import SamplingParams

        tok = self.tokenizer
        texts, lengths = [], []
        for prompt, row, m in zip(prompts, ids, mask, strict=True):
            row = row[m.bool()].tolist()  # without the left padding
            lengths.append(len(row))
            same = tok(prompt, add_special_tokens=False)["input_ids"] == row
            texts.append(prompt if same else tok.decode(row, skip_special_tokens=False))
        params = SamplingParams(n=1, temperature=temperature, top_p=1.0, max_new_tokens=self.max_new_tokens,
                                greedy=not (sample or self.temperature > 0))
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # a colocated engine samples from the global generator
            self._calls += 1
            torch.manual_seed(self.seed + self._calls)
            groups = self.generator.generate(texts, params)
        elapsed = time.perf_counter() - t0
        return [Generation(text=g[0].text, prompt_tokens=n, completion_tokens=len(g[0].token_ids), latency_s=elapsed)
                for g, n in zip(groups, lengths, strict=True)]
