"""Imitation warm-up (SFT): teach a random tiny model the task format before RL.

Sequencing imitation then exploration is the standard recipe (e.g. DeepSeek-R1 cold start,
arXiv:2501.12948): RL needs a policy that already puts some probability on correct answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from critique_rl.errors import UserError
from critique_rl.train.batching import pack, token_logprobs


def length_buckets(lengths: list[int], num_buckets: int = 4) -> list[list[int]]:
    """Indices grouped into up to ``num_buckets`` buckets of similar length, so a batch of short rows is
    not padded to the longest row in the dataset (uniform sampling overall: a bucket is drawn with
    probability proportional to its size, then rows uniformly within it)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    size = -(-len(order) // num_buckets)
    return [order[i : i + size] for i in range(0, len(order), size)]


def refine_added_steps(steps: int, plain: int, refine: int) -> int:
    """SFT steps that give ``plain`` demonstrations the ``steps`` batches they would get alone when ``refine``
    refinement demos are mixed in (rows are drawn uniformly): ``ceil(steps * (plain + refine) / plain)``.

    >>> refine_added_steps(1000, 2000, 600)
    1300
    """
    if plain <= 0:
        raise ValueError("no plain demonstrations")
    return -(-steps * (plain + refine) // plain)


def sft_warmup(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: list[tuple[str, str]] | list[tuple[list[int], list[int]]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    max_nonfinite: int = 3,
) -> list[float]:
    """Cross-entropy on completion tokens (+EOS) only, over (prompt text, completion text) ``pairs``, or over
    (prompt ids, completion ids) pairs used as they are (an id completion already ends with EOS: episode
    warm-ups pass the runner's exact ids, see ``agents.warmup.sft_id_pairs``).
    Returns the per-step losses. A step whose loss or gradient norm is NaN/inf is skipped (no optimizer step);
    ``max_nonfinite`` such steps in a row stop the warm-up with a :class:`UserError`."""
    if steps <= 0:
        return []
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    prompt_ids = [list(p) if isinstance(p, list) else tokenizer(p, add_special_tokens=False)["input_ids"]
                  for p, _ in pairs]
    comp_ids = [list(c) if isinstance(c, list) else tokenizer(c, add_special_tokens=False)["input_ids"] + [eos]
                for _, c in pairs]
    buckets = length_buckets([len(p) + len(c) for p, c in zip(prompt_ids, comp_ids, strict=True)])
    sizes = torch.tensor([len(b) for b in buckets], dtype=torch.float)
    losses = []
    in_a_row = 0
    model.train()
    for step in range(steps):
        bucket = buckets[int(torch.multinomial(sizes, 1, generator=gen))]
        idx = [bucket[i] for i in torch.randint(len(bucket), (batch_size,), generator=gen).tolist()]
        batch = pack([prompt_ids[i] for i in idx], [comp_ids[i] for i in idx], tokenizer.pad_token_id).to(device)
        T = batch.completion_len
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
        # cross entropy -log softmax(z)[a] (in row chunks past PLAIN_FP32_BYTES: no [B, T, V] float32 copy)
        nll = -token_logprobs(logits, batch.completion_ids)
        mask = batch.completion_mask.float()
        loss = (nll * mask).sum() / mask.sum()
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        if not (torch.isfinite(loss) and torch.isfinite(torch.tensor(grad_norm))):
            opt.zero_grad(set_to_none=True)
            in_a_row += 1
            if in_a_row >= max(1, max_nonfinite):
                raise UserError(f"SFT warm-up: the loss or gradient norm was NaN/inf in {in_a_row} steps in a row "
                                f"(step {step + 1}); lower sft_learning_rate or check the data")
            losses.append(loss.item())
            continue
        in_a_row = 0
        opt.step()
        opt.zero_grad(set_to_none=True)  # after the step: no stale gradient outlives the warm-up
        sched.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, loss.item())
    return losses
