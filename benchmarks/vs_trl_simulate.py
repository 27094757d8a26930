"""``benchmarks/vs_trl.py --simulate``: our update step and TRL's, traced on fake tensors at gpu-0.5b settings.

    python benchmarks/vs_trl.py --simulate --trl-python /work/venv-trl/bin/python [--sim-tokens 256,512,2048]

No GPU and no weights: each arm runs in its own subprocess, builds the Qwen2.5-0.5B-shaped model of
``benchmarks/configs/qwen2.5-0.5b/config.json`` on the meta device, moves it into a ``FakeTensorMode`` and traces
one optimizer step (every micro-batch's forward and backward, gradient clipping, AdamW) with the live-tensor
tracer of :mod:`critique_rl.gpu_memory` (tensor bytes rounded to the CUDA allocator's 512-byte blocks, the
analogue of ``torch.cuda.max_memory_allocated``). Optimizer state exists before the traced step (steady state).

* ``ours``: the trainer's ``policy_update`` (:mod:`critique_rl.gpu_memory_step`) with the gpu-0.5b settings of
  ``vs_trl.py``: fp32 weights, bf16 autocast, fused LM head (the CUDA default), AdamW foreach (torch's CUDA
  default), 128 completions per step in micro-batches of 32, prompts of 6 tokens (the addition prompts under
  the benchmark's tokenizer), every completion ``T`` tokens long.
* ``trl``: TRL's own ``GRPOTrainer._compute_loss`` (``_get_per_token_logps_and_entropies``: the model patched
  with TRL's ``add_fused_lm_head`` and called with ``fused_lm_head=True``, entropy computed), called unbound on a
  stand-in with the attributes it reads (``loss_type="dr_grpo"``, ``beta=0``, epsilon 0.2 / 0.28), ``backward``
  per micro-batch, ``clip_grad_norm_`` and ``torch.optim.AdamW(fused=True)`` (transformers' default
  ``adamw_torch_fused``); run with ``--trl-python`` (TRL is not a dependency of the project).
* ``old``: the trainer at commit ``545b089`` (before the memory work; bf16 weights on CUDA as ``load_policy``
  loaded them then, no autocast, fp32 ``log_softmax`` over the full vocabulary) from a ``git worktree``, for the
  calibration against the H100 measurement of that commit.

Calibration (the two real H100 numbers the project has): TRL 1.16 at 256 new tokens: 9.4 GB peak allocated;
this trainer at 545b089: 58.9 GB at 256, out of memory at 512. The settings of those two runs beyond the
preset (micro-batch, gradient checkpointing) were not recorded, so both TRL variants (checkpointing off, as
``vs_trl.py`` configures it, and on, TRL's default) are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "qwen2.5-0.5b"
OLD_COMMIT = "545b089"
H100 = {"trl_256_gb": 9.4, "old_256_gb": 58.9, "old_512": "out of memory (> ~79 GB usable of 80 GB)"}
PROMPT_TOKENS = 6
PROMPTS, GENERATIONS, MICRO_BATCH = 16, 8, 32
GB = 1e9
GIB = 2**30
WHAT_IF = "ours, what-if lean fused backward"


def _train_cfg(tokens: int, gc: bool) -> Any:
    from critique_rl.config import CriticConfig, TrainConfig

    return TrainConfig(
        model=str(CONFIG_DIR), task="addition", device="cpu", mixed_precision="bf16", use_chat_template="no",
        sft_steps=0, num_generations=GENERATIONS, generation_batch_size=PROMPTS * GENERATIONS,
        mini_batch_size=MICRO_BATCH, num_iterations=1, learning_rate=1e-6, weight_decay=0.0, max_grad_norm=1.0,
        temperature=1.0, top_p=1.0, max_new_tokens=tokens, advantage_estimator="dr_grpo",
        loss_aggregation="token_sum_norm", clip_eps_low=0.2, clip_eps_high=0.28, kl_beta=0.0, entropy_coef=0.0,
        critique_on="none", critic=CriticConfig(backend="none"), gradient_checkpointing=gc)


def arm_ours(tokens: int, gc: bool, chunk_rows: int | None = None, lean: bool = False) -> dict[str, Any]:
    from transformers import AutoConfig

    from critique_rl.gpu_memory_step import step_shape, target_for, trace_step
    from critique_rl.train import batching

    if chunk_rows is not None:  # what-if: the log-prob row chunk policy_update's completion_logprobs uses
        batching.completion_logprobs.__kwdefaults__["chunk_rows"] = chunk_rows
    # `lean`: the leaner fused-head backward (one float32 chunk buffer) was a what-if here until commit 8907e15
    # shipped it in critique_rl/algos/logprobs.py; the flag now only labels rows as in the saved results

    cfg = _train_cfg(tokens, gc)
    mc = AutoConfig.from_pretrained(str(CONFIG_DIR), local_files_only=True)
    return trace_step(mc, cfg, step_shape(cfg, PROMPT_TOKENS), target_for(cfg, "cuda"), fake=True)


def _meta_model(dtype: Any) -> Any:
    from transformers import AutoConfig

    from critique_rl.gpu_memory import meta_causal_lm

    return meta_causal_lm(AutoConfig.from_pretrained(str(CONFIG_DIR), local_files_only=True), dtype)


def arm_trl(tokens: int, gc: bool) -> dict[str, Any]:
    """TRL's loss step (see the module doc)."""
    from collections import defaultdict
    from types import SimpleNamespace

    import torch
    from trl import GRPOTrainer
    from trl.kernels import chunked_logprob
    from trl.trainer.utils import add_fused_lm_head

    from critique_rl.gpu_memory import LiveTensorTracker, fake_mode, materialize_fake
    from critique_rl.gpu_memory_step import Target, _Accelerator, _backbone

    # TRL's fused head on CUDA folds each [4096, chunk] logits tile in place with Triton kernels and accumulates
    # the gradients with addmm(out_dtype=float32, out=acc): none of it allocates. Off CUDA it runs torch
    # stand-ins that allocate tile-sized float32 temporaries; fake tensors carry no values, so the CUDA path's
    # memory is traced by making those three in-place steps no-ops.
    chunked_logprob._forward_tile = lambda *a, **k: None
    chunked_logprob._backward_tile = lambda *a, **k: None
    chunked_logprob._addmm_fp32 = lambda acc, a, b: None
    target = Target("cuda", torch.bfloat16, True, False)
    tracker = LiveTensorTracker(fake=True)
    model = _meta_model(torch.float32)
    add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs", "entropy"))
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    accum = PROMPTS * GENERATIONS // MICRO_BATCH
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, 1000, (PROMPTS, PROMPT_TOKENS), generator=g).repeat_interleave(GENERATIONS, 0)
    completion = torch.randint(1, 1000, (PROMPTS * GENERATIONS, tokens), generator=g)
    with fake_mode():
        model = materialize_fake(model)
        model.train()
        acc = _Accelerator(tracker, target)
        acc.gather = lambda t: t
        acc.gather_for_metrics = lambda t: t
        acc.reduce = lambda t, reduction="sum": t
        acc.sync_gradients = True
        acc.is_main_process = True
        stub = SimpleNamespace(
            accelerator=acc, aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
            importance_sampling_level="token", beta=0.0, loss_type="dr_grpo", epsilon_low=0.2, epsilon_high=0.28,
            args=SimpleNamespace(delta=None, use_bias_correction_kl=False), use_vllm=False,
            vllm_importance_sampling_correction=False, model=model, current_gradient_accumulation_steps=accum,
            max_completion_length=tokens, _entropy_bonus_enabled=False,
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
        stub._get_per_token_logps_and_entropies = GRPOTrainer._get_per_token_logps_and_entropies.__get__(stub)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, fused=True)
        with tracker:
            tracker.register(list(model.parameters()) + list(model.buffers()), "weights")
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
            for st in opt.state.values():
                for v in st.values():
                    if isinstance(v, torch.Tensor):
                        tracker.recategorize(v, "optimizer state")
            hooks = tracker.watch_gradients(params) + tracker.watch_module(_backbone(model), "activations")
            tracker.reset_peak()
            with tracker.phase("log-prob chunks"):
                for k in range(accum):
                    sl = slice(k * MICRO_BATCH, (k + 1) * MICRO_BATCH)
                    inputs = {"prompt_ids": prompt[sl], "prompt_mask": torch.ones_like(prompt[sl]),
                              "completion_ids": completion[sl], "completion_mask": torch.ones_like(completion[sl]),
                              "advantages": torch.randn(MICRO_BATCH, generator=g)}
                    loss = GRPOTrainer._compute_loss(stub, model, inputs)
                    acc.backward(loss)
                    del loss, inputs
                acc.clip_grad_norm_(params, 1.0)
                with tracker.phase("optimizer temporaries"):
                    opt.step()
                model.zero_grad(set_to_none=True)
            for h in hooks:
                h.remove()
    return tracker.report()


def arm_old(tokens: int, gc: bool) -> dict[str, Any]:
    """The trainer at 545b089 (``PYTHONPATH`` = its worktree); the tracer modules are loaded from this tree."""
    import importlib.util

    import torch

    for name in ("gpu_memory", "gpu_memory_step"):
        spec = importlib.util.spec_from_file_location(f"critique_rl.{name}", REPO / "critique_rl" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"critique_rl.{name}"] = mod
        spec.loader.exec_module(mod)
    from critique_rl.config import TrainConfig
    from critique_rl.gpu_memory import LiveTensorTracker, fake_mode, materialize_fake
    from critique_rl.gpu_memory_step import Target, run_update
    from critique_rl.train.batching import pack
    from critique_rl.train.update import UpdateBatch, policy_update

    cfg = TrainConfig(model="tiny", num_generations=GENERATIONS, generation_batch_size=PROMPTS * GENERATIONS,
                      mini_batch_size=MICRO_BATCH, num_iterations=1, learning_rate=1e-6, max_new_tokens=tokens,
                      kl_beta=0.0, entropy_coef=0.0, critique_on="none", mixed_precision="no")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 1000, (PROMPT_TOKENS,), generator=g).tolist() for _ in range(PROMPTS)]
    rows = [p for p in prompts for _ in range(GENERATIONS)]
    comps = [torch.randint(1, 1000, (tokens,), generator=g).tolist() for _ in rows]
    N = len(rows)
    ub = UpdateBatch(tokens=pack(rows, comps, 0), advantages=torch.randn(N, 1, generator=g).expand(N, tokens),
                     offpolicy=torch.zeros(N, dtype=torch.bool))
    target = Target("cuda", None, False, True)
    model = _meta_model(torch.bfloat16)  # load_policy on CUDA then: bf16 weights, mixed_precision "no"
    tracker = LiveTensorTracker(fake=True)

    def update(m: Any, o: Any, s: Any, a: Any, b: Any, c: Any) -> Any:
        return policy_update(m, None, o, s, a, b, c, norm_constant=float(tokens))

    with fake_mode():
        model = materialize_fake(model)
        model.train()
        with tracker:
            return run_update(model, cfg, ub, tracker, target, update=update)


ARMS = {"ours": arm_ours, "trl": arm_trl, "old": arm_old}


def _run(python: str, arm: str, tokens: int, gc: bool, extra_path: str | None = None,
         chunk_rows: int | None = None, lean: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vs_trl_sim_") as tmp:
        out = Path(tmp) / "r.json"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore",
                   TOKENIZERS_PARALLELISM="false")
        path = [p for p in (extra_path, str(REPO), os.environ.get("PYTHONPATH")) if p]
        env["PYTHONPATH"] = os.pathsep.join(path)
        cmd = [python, str(Path(__file__).resolve()), "--sim-arm", arm, "--tokens", str(tokens),
               "--result-file", str(out)] + (["--gc"] if gc else [])
        if chunk_rows is not None:
            cmd += ["--chunk-rows", str(chunk_rows)]
        if lean:
            cmd += ["--lean"]
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            return {"error": tail[-1] if tail else f"exit {proc.returncode}", "stderr_tail": tail}
        return json.loads(out.read_text())


def old_worktree(commit: str = OLD_COMMIT) -> Path:
    """A git worktree of ``commit`` (created once under the temp folder)."""
    path = Path(tempfile.gettempdir()) / f"critique_rl_{commit}"
    if not (path / "critique_rl").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit], check=True,
                       capture_output=True)
    return path


def _gb(r: dict[str, Any]) -> float | None:
    return None if r.get("error") else r["peak_bytes"] / GB


def simulate(trl_python: str, tokens_list: list[int], with_old: bool = True, results_dir: Path | None = None,
             what_if_chunk_rows: int | None = 256, jobs: int = 3) -> dict[str, Any]:
    """Trace every arm (``jobs`` subprocesses at a time), print the ratios and the calibration, write the JSON."""
    from concurrent.futures import ThreadPoolExecutor

    specs: list[dict[str, Any]] = []

    def add(label: str, python: str, arm: str, tokens: int, gc: bool, extra: str | None = None,
            chunk_rows: int | None = None, lean: bool = False) -> None:
        specs.append(dict(label=label, python=python, arm=arm, tokens=tokens, gc=gc, extra=extra,
                          chunk_rows=chunk_rows, lean=lean))

    for T in tokens_list:
        add("ours", sys.executable, "ours", T, False)
        add("trl", trl_python, "trl", T, False)
        if what_if_chunk_rows:
            add(WHAT_IF, sys.executable, "ours", T, False, None, what_if_chunk_rows, True)
        if T >= 1024:
            add("ours", sys.executable, "ours", T, True)
            add("trl", trl_python, "trl", T, True)
    if 256 in tokens_list:
        add("trl", trl_python, "trl", 256, True)
    if with_old:
        wt = str(old_worktree())
        for T in (256, 512):
            add(f"trainer@{OLD_COMMIT}", sys.executable, "old", T, False, wt)

    def one(sp: dict[str, Any]) -> dict[str, Any]:
        r = _run(sp["python"], sp["arm"], sp["tokens"], sp["gc"], sp["extra"], sp["chunk_rows"], sp["lean"])
        r.update({"arm": sp["label"], "tokens": sp["tokens"], "gradient_checkpointing": sp["gc"],
                  "chunk_rows": sp["chunk_rows"], "lean_fused_backward": sp["lean"]})
        msg = r["error"] if r.get("error") else f"{_gb(r):.2f} GB " + ", ".join(
            f"{k} {v / GB:.2f}" for k, v in sorted(r["peak_parts"].items(), key=lambda kv: -kv[1]))
        print(f"  {sp['label']}, {sp['tokens']} new tokens, checkpointing {'on' if sp['gc'] else 'off'}: {msg}",
              flush=True)
        return r

    print(f"tracing {len(specs)} steps on fake tensors, {jobs} at a time ...", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        rows = list(pool.map(one, specs))

    def find(arm: str, T: int, gc: bool) -> float | None:
        return next((_gb(r) for r in rows if r["arm"] == arm and r["tokens"] == T and r["gradient_checkpointing"] == gc), None)

    print("\nsimulated peak memory of one optimizer step, gpu-0.5b (16 prompts x 8, micro-batch 32, bf16 autocast):")
    ratios: dict[str, float | None] = {}
    for T in tokens_list:
        o, t = find("ours", T, False), find("trl", T, False)
        ratio = None if o is None or t is None else o / t
        ratios[str(T)] = ratio
        print(f"  {T} new tokens: ours {_fmt(o)} GB, TRL {_fmt(t)} GB")
        print(f"memory ratio (ours/TRL, simulated): {_fmt(ratio, '.3f')}   [{T} new tokens]")
        if what_if_chunk_rows:
            w = find(WHAT_IF, T, False)
            print(f"  (the lean fused-head backward (shipped since 8907e15) with "
                  f"{what_if_chunk_rows}-row chunks: ours {_fmt(w)} GB, ratio "
                  f"{_fmt(None if w is None or t is None else w / t, '.3f')})")
    for T in tokens_list:
        if T >= 1024:
            o, t = find("ours", T, True), find("trl", T, True)
            print(f"  {T} new tokens with gradient checkpointing: ours {_fmt(o)} GB, TRL {_fmt(t)} GB; "
                  f"ratio {_fmt(None if o is None or t is None else o / t, '.3f')}; fits 80 GB: "
                  f"{o is not None and o <= 80}")
    old_gen = {T: old_generation_bytes(T) / GB for T in (256, 512)}
    calib = {"h100_as_reported": H100, "trl_256_sim_gb": find("trl", 256, False),
             "trl_256_gc_sim_gb": find("trl", 256, True),
             "old_update_256_sim_gb": find(f"trainer@{OLD_COMMIT}", 256, False),
             "old_update_512_sim_gb": find(f"trainer@{OLD_COMMIT}", 512, False),
             "old_generation_256_gb": old_gen[256], "old_generation_512_gb": old_gen[512]}
    gib = lambda x: None if x is None else x * GB / GIB  # noqa: E731
    print("\ncalibration against the H100 measurements (their unit was not recorded: torch's bytes / 2**30 make "
          "GiB; simulated figures in GB and GiB):")
    print(f"  TRL 1.16, 256 tokens: measured {H100['trl_256_gb']}; simulated {_fmt(calib['trl_256_sim_gb'])} GB = "
          f"{_fmt(gib(calib['trl_256_sim_gb']))} GiB (checkpointing off), {_fmt(calib['trl_256_gc_sim_gb'])} GB = "
          f"{_fmt(gib(calib['trl_256_gc_sim_gb']))} GiB (on, TRL's default)")
    print(f"  trainer@{OLD_COMMIT}, 256 tokens: measured {H100['old_256_gb']}; simulated update "
          f"{_fmt(calib['old_update_256_sim_gb'])} GB, generation {old_gen[256]:.2f} GB = {gib(old_gen[256]):.2f} GiB "
          "(its generate kept every step's float32 logits: output_logits, stack, log_softmax)")
    print(f"  trainer@{OLD_COMMIT}, 512 tokens: measured {H100['old_512']}; simulated update "
          f"{_fmt(calib['old_update_512_sim_gb'])} GB, generation {old_gen[512]:.2f} GB")
    record = {"settings": {"prompts": PROMPTS, "num_generations": GENERATIONS, "micro_batch": MICRO_BATCH,
                           "prompt_tokens": PROMPT_TOKENS, "config": str(CONFIG_DIR.relative_to(REPO))},
              "rows": rows, "ratios": ratios, "calibration": calib}
    out_dir = results_dir or (Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vs_trl_simulated_gpu-0.5b.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out_dir / 'vs_trl_simulated_gpu-0.5b.json'}")
    return record


def old_generation_bytes(tokens: int) -> int:
    """Peak of generation at 545b089 (``rollout/hf.py`` then): ``generate(output_logits=True)`` keeps each step's
    float32 ``[B, V]`` logits (transformers copies them to float32), then ``torch.stack(...).float()`` and
    ``log_softmax`` make two more ``[B, T, V]`` float32 tensors, all alive at once; plus bf16 weights, bf16 AdamW
    state (two copies) and the bf16 KV cache."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(str(CONFIG_DIR), local_files_only=True)
    params = 494_032_768  # Qwen2.5-0.5B, tied embeddings
    B = PROMPTS * GENERATIONS
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * B * (
        PROMPT_TOKENS + tokens) * 2
    return 3 * B * tokens * c.vocab_size * 4 + params * 2 * 3 + kv


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sim-arm", choices=sorted(ARMS), required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--gc", action="store_true")
    p.add_argument("--chunk-rows", type=int, default=None)
    p.add_argument("--lean", action="store_true")
    p.add_argument("--result-file", required=True)
    a = p.parse_args(argv)
    rep = arm_ours(a.tokens, a.gc, a.chunk_rows, a.lean) if a.sim_arm == "ours" else ARMS[a.sim_arm](a.tokens, a.gc)
    Path(a.result_file).write_text(json.dumps(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
