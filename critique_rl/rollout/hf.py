"""Rollouts with ``transformers`` ``generate`` (batched, left padding, KV cache), recording logprobs."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from critique_rl.rollout.base import Completion, SamplingParams


class HFGenerator:
    """Samples from the live policy module itself, so weight sync is a no-op.

    Prompts are tokenized without special tokens (chat formatting, if any, is already in the text) and
    sampled in chunks of ``batch_size`` sequences.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 256) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def sync_weights(self) -> None:  # same module: nothing to copy
        return None

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        expanded = [p for p in prompts for _ in range(params.n)]
        flat: list[Completion] = []
        for start in range(0, len(expanded), self.batch_size):
            flat.extend(self._generate_chunk(expanded[start : start + self.batch_size], params))
        return [flat[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _generate_chunk(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        was_training = self.model.training
        self.model.eval()
        sample = not params.greedy
        gen_kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            return_dict_in_generate=True,
            output_logits=True,
            use_cache=True,
        )
        if sample:
            gen_kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(**enc, **gen_kwargs)
        if was_training:
            self.model.train()
        seqs = out.sequences[:, enc["input_ids"].shape[1] :]
        # sampling logprobs under logits / temperature (the distribution the tokens were drawn from, before top-p)
        logits = torch.stack(out.logits, dim=1).float()
        if sample and params.temperature != 1.0:
            logits = logits / params.temperature
        lp = torch.log_softmax(logits, dim=-1).gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
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
