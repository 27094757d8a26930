"""Imitation warm-up (SFT): teach a random tiny model the task format before RL.

Sequencing imitation then exploration is the standard recipe (e.g. DeepSeek-R1 cold start,
arXiv:2501.12948): RL needs a policy that already puts some probability on correct answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from critique_rl.train.batching import pack


def sft_warmup(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    prompt_fn: Callable[[dict[str, Any]], str],
    completion_fn: Callable[[dict[str, Any]], str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Cross-entropy on completion tokens (+EOS) only. Returns the per-step losses."""
    if steps <= 0:
        return []
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    prompt_ids = [tokenizer(prompt_fn(r), add_special_tokens=False)["input_ids"] for r in rows]
    comp_ids = [tokenizer(completion_fn(r), add_special_tokens=False)["input_ids"] + [eos] for r in rows]
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(len(rows), (batch_size,), generator=gen).tolist()
        batch = pack([prompt_ids[i] for i in idx], [comp_ids[i] for i in idx], tokenizer.pad_token_id).to(device)
        T = batch.completion_len
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), batch.completion_ids.reshape(-1), reduction="none"
        ).view_as(batch.completion_mask)
        mask = batch.completion_mask.float()
        loss = (nll * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, loss.item())
    return losses
