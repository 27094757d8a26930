"""Worker for tests/test_distributed.py, run by ``torchrun`` (or ``accelerate launch``) as several CPU processes.

Modes:
  train CONFIG_JSON OUT_JSON [--resume]   train with the trainer; every rank writes its parameter checksum
  update OUT_JSON                         one policy_update on a fixed batch, each rank on its shard
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def checksum(model: torch.nn.Module) -> list[float]:
    return [float(p.detach().double().sum()) for p in model.parameters()]


def train(config_json: str, out_json: str, resume: bool) -> None:
    from critique_rl.config import TrainConfig, from_dict
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    cfg = from_dict(TrainConfig, json.loads(Path(config_json).read_text()))
    trainer = CritiqueGRPOTrainer(args=cfg)
    summary = trainer.train(resume=resume)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    Path(f"{out_json}.rank{trainer.rank}").write_text(json.dumps(
        {"rank": trainer.rank, "world": trainer.world, "checksum": checksum(policy), "summary": summary}))


def fixed_update_batch(n: int, vocab: int, seed: int = 0):
    from critique_rl.train.batching import pack
    from critique_rl.train.update import UpdateBatch

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    comps = [torch.randint(3, vocab, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n)]
    tokens = pack(prompts, comps, pad_id=0)
    adv = torch.randn(n, 1, generator=g).expand(-1, tokens.completion_len).clone()
    off = torch.zeros(n, dtype=torch.bool)
    off[::5] = True  # some refinement rows too
    return UpdateBatch(tokens=tokens, advantages=adv, offpolicy=off)


def update(out_json: str) -> None:
    """The same global batch of 16 rows: one process updates on all of it, or each of W processes on 16/W
    rows (uneven token counts per shard). The weights after the step must agree."""
    from accelerate import Accelerator

    from critique_rl.config import TrainConfig
    from critique_rl.models import build_tiny_model, build_tiny_tokenizer
    from critique_rl.train import distributed as dist
    from critique_rl.train.update import Normalisation, policy_update

    acc = Accelerator(cpu=True)
    tok = build_tiny_tokenizer(["12+34=46", "7+8=15", "100+1=101"] * 20, vocab_size=300)
    model = build_tiny_model(tok, hidden_size=64, layers=1, heads=2, seed=0)
    results = {}
    for agg in ("token_sum_norm", "token_mean", "seq_mean_token_mean"):
        m = build_tiny_model(tok, hidden_size=64, layers=1, heads=2, seed=0)
        m.load_state_dict(model.state_dict())
        cfg = TrainConfig(loss_aggregation=agg, mini_batch_size=4, generation_batch_size=16, num_generations=4,
                          learning_rate=1e-2, max_grad_norm=1e9)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        m, opt, sched = acc.prepare(m, opt, sched)
        ub = fixed_update_batch(16, len(tok))
        per = 16 // acc.num_processes
        mine = ub.tokens.select(slice(acc.process_index * per, (acc.process_index + 1) * per))
        from critique_rl.train.update import UpdateBatch

        sl = slice(acc.process_index * per, (acc.process_index + 1) * per)
        local = UpdateBatch(tokens=mine, advantages=ub.advantages[sl], offpolicy=ub.offpolicy[sl])
        seqs, toks = dist.all_reduce_sum([float(per), float(mine.completion_mask.sum())])
        micro = dist.all_reduce_max(-(-per // cfg.mini_batch_size))
        norm = Normalisation(seqs / acc.num_processes, toks / acc.num_processes, micro)
        stats = policy_update(m, opt, sched, acc, local, cfg, norm_constant=8.0, norm=norm)
        results[agg] = {"checksum": checksum(acc.unwrap_model(m)), "loss": stats["loss/total"]}
    all_results = dist.gather_objects(results)
    if acc.is_main_process:
        Path(out_json).write_text(json.dumps({"world": acc.num_processes, "ranks": all_results}))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "train":
        train(sys.argv[2], sys.argv[3], "--resume" in sys.argv)
    elif mode == "update":
        update(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode}")
    # leave the process group before exit: gloo's threads torn down at interpreter exit abort the process now and
    # then ("terminate called without an active exception", SIGABRT) after the work is done
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # and skip the interpreter's teardown: the abort above was seen once more with the barrier in place (a C++
    # thread still joinable when static objects are destroyed); the work and its files are done by now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
