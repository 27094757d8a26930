"""One training update on the GPU, measured, against the estimate of ``critique-rl estimate-memory``.

    python scripts/gpu_step_check.py --tokens 2048 --gc [--lora] [--out result.json]     # on a CUDA machine
    python scripts/gpu_step_check.py --device cpu --config-dir DIR --tokens 16 ...      # CPU (tests)

Builds the model of ``--config-dir`` (default: the Qwen2.5-0.5B shape in ``benchmarks/configs/qwen2.5-0.5b``,
random weights, nothing downloaded), then for the gpu-0.5b batch (16 prompts x 8, micro-batch 32, 6-token
prompts, every completion ``--tokens`` long; bf16 autocast with fp32 weights on CUDA):

* ``estimate``: the update traced on fake tensors on the CPU (:func:`critique_rl.gpu_memory_step.trace_step`),
* ``measured``: the same update run for real on ``--device`` (``torch.cuda.max_memory_allocated`` over the update
  on CUDA; on the CPU the live-tensor tracer's peak on the real tensors),
* ``traced_real``: the tracer's peak on the real tensors (on CUDA: how much of the allocator's peak the tracer sees).

Writes one JSON object and prints ``PASS``/``FAIL`` with the estimate's error (target: within ``--tolerance``,
15%). Exit status 0 on PASS, 1 on FAIL, 2 when the step could not run (e.g. out of memory: reported as such).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "benchmarks" / "configs" / "qwen2.5-0.5b"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--config-dir", default=str(DEFAULT_CONFIG))
    p.add_argument("--tokens", type=int, default=256, help="completion tokens per row")
    p.add_argument("--prompt-tokens", type=int, default=6)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--gc", action="store_true", help="gradient checkpointing")
    p.add_argument("--lora", action="store_true", help="LoRA adapters (peft), r=16, all linear layers")
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--name", default=None, help="check name in the JSON and the PASS/FAIL line")
    p.add_argument("--out", default=None, help="write the JSON here (default: stdout only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from critique_rl.config import CriticConfig, LoraConfig, TrainConfig
    from critique_rl.gpu_memory_step import step_shape, target_for, trace_step

    name = a.name or f"step_{a.tokens}{'_gc' if a.gc else ''}{'_lora' if a.lora else ''}"
    cfg = TrainConfig(
        model=a.config_dir, task="addition", device=a.device, mixed_precision="bf16" if a.device == "cuda" else "no",
        num_generations=a.generations, generation_batch_size=a.prompts * a.generations, mini_batch_size=a.micro_batch,
        max_new_tokens=a.tokens, learning_rate=1e-6, weight_decay=0.0, advantage_estimator="dr_grpo",
        loss_aggregation="token_sum_norm", kl_beta=0.0, entropy_coef=0.0, critique_on="none",
        critic=CriticConfig(backend="none"), gradient_checkpointing=a.gc, lora=LoraConfig(enabled=a.lora))
    mc = AutoConfig.from_pretrained(a.config_dir, local_files_only=True)
    shape = step_shape(cfg, a.prompt_tokens)
    target = target_for(cfg, a.device)
    out: dict = {"check": name, "device": a.device, "tokens": a.tokens, "gradient_checkpointing": a.gc,
                 "lora": a.lora, "shape": shape.__dict__, "tolerance": a.tolerance}
    t = time.perf_counter()
    est = trace_step(mc, cfg, shape, target, fake=True)
    out.update(estimate_bytes=est["peak_bytes"], estimate_parts=est["peak_parts"],
               estimate_s=round(time.perf_counter() - t, 1))
    if a.device == "cuda":
        if not torch.cuda.is_available():
            out.update(status="ERROR", error="no CUDA device visible")
            return finish(out, a, 2)
        out["gpu"] = torch.cuda.get_device_name(0)
    t = time.perf_counter()
    try:
        torch.manual_seed(0)
        with torch.device(a.device):
            model = AutoModelForCausalLM.from_config(mc, attn_implementation="sdpa", dtype=torch.float32)
        real = trace_step(mc, cfg, shape, target, fake=False, model=model, device=a.device)
    except torch.OutOfMemoryError as exc:
        out.update(status="FAIL", error=f"out of memory: {str(exc).splitlines()[0]}")
        return finish(out, a, 1)
    out["measure_s"] = round(time.perf_counter() - t, 1)
    measured = real.get("cuda_max_allocated_bytes", real["peak_bytes"])
    out.update(measured_bytes=measured, traced_real_bytes=real["peak_bytes"], traced_real_parts=real["peak_parts"],
               measured_kind="torch.cuda.max_memory_allocated" if a.device == "cuda" else "tracer on real tensors")
    err = (est["peak_bytes"] - measured) / measured
    out.update(estimate_error=err, status="PASS" if abs(err) <= a.tolerance else "FAIL")
    return finish(out, a, 0 if out["status"] == "PASS" else 1)


def finish(out: dict, a: argparse.Namespace, code: int) -> int:
    text = json.dumps(out, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    gb = lambda k: f"{out[k] / 1e9:.2f} GB" if isinstance(out.get(k), int) else "n/a"  # noqa: E731
    detail = (f"estimate {gb('estimate_bytes')}, measured {gb('measured_bytes')}, error "
              f"{out['estimate_error']:+.1%}" if "estimate_error" in out else out.get("error", ""))
    print(f"{out.get('status', 'ERROR')} {out['check']}: {detail}")
    return code


if __name__ == "__main__":
    sys.exit(main())
