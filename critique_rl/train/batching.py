"""Pack (prompt, completion) token lists into tensors and score completion tokens under a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def completion_logprobs(
    model: torch.nn.Module, batch: TokenBatch, temperature: float = 1.0, with_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities ``[B, T]`` of the completion tokens under ``model`` (logits / temperature).

    Only the last ``T + 1`` positions' logits are materialised (``logits_to_keep``), which matters for
    150k-token vocabularies. Returns ``(logprobs, logits or None)``.
    """
    T = batch.completion_len
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=T + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1, :].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    return logp, (logits if with_logits else None)
