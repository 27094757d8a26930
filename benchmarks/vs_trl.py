"""Our trainer vs TRL's ``GRPOTrainer``, side by side, at identical settings.

    python benchmarks/vs_trl.py --preset cpu-tiny --trl-python /work/venv-trl/bin/python [--threads 1]
    python benchmarks/vs_trl.py --preset cpu-long-prompt --trl-python /work/venv-trl/bin/python
    python benchmarks/vs_trl.py --preset gpu-0.5b [--max-new-tokens 512]        # on a CUDA machine
    python benchmarks/vs_trl.py --simulate --trl-python /work/venv-trl/bin/python  # no GPU: traced memory

Presets: ``cpu-tiny`` and ``cpu-medium`` train on the bare 6-token questions; ``cpu-long-prompt`` is
cpu-medium's model with every prompt padded to 256 tokens by a context of worked additions (4 prompts x 8
samples, 32 new tokens): the long prompt shared by a group's samples, as refinement prompts, memory contexts and
episode histories are.

TRL is never a dependency of the project: it lives in a separate environment outside the repository whose
interpreter is passed as ``--trl-python``::

    python3 -m venv /work/venv-trl
    /work/venv-trl/bin/pip install torch==2.13.0      # the project's torch first (plain `torch` pulls CUDA)
    /work/venv-trl/bin/pip install -e . trl datasets  # trl 1.16.0 with transformers 5.23.0 when recorded

(on a CUDA machine install the CUDA build of the same torch instead). ``--arms ours`` runs our arm alone
(no TRL needed). ``--threads N`` sets torch's intra-op threads in both arms: on a small machine shared with
other work, two threads per arm make step times swing several-fold; the recorded CPU results used 1.

How it runs
-----------
The parent process builds one randomly initialised model (seeded) plus a tiny byte-level BPE tokenizer
(``critique_rl.models.build_tiny_tokenizer``) and saves both with ``save_pretrained`` into a temporary folder.
Then, for ``--rounds`` rounds, it launches one subprocess per arm, alternating (ours, trl, ours, trl, ...):
``python benchmarks/vs_trl.py --arm ours|trl --preset P --model-dir D --result-file F``. Each arm loads the
same folder, trains plain GRPO for ``--warmup`` untimed steps and ``--steps`` timed steps on the same prompts
(the built-in ``addition`` task) with the same reward (the task's verifier: 1 if the answer is right) and
writes its numbers as JSON. The parent prints a table of the rounds, the medians over rounds and the two
lines that scripts read::

    samples/s ratio (ours/TRL): X      (> 1: we are faster)
    memory ratio (ours/TRL): Y         (our peak / TRL's peak; > 1: we use more)

and writes ``benchmarks/results/vs_trl_<preset>.json`` (machine, versions, settings, every round, ratios).
X is the ratio of the two arms' medians over rounds; a second, "paired" estimate (the median over rounds of
each round's ours/TRL, whose two runs ran back to back) is printed and saved beside it, because load from
other processes drifting during the benchmark moves the per-arm medians but largely cancels within a pair.

What is measured
----------------
* step time -- ours: ``time/step`` of each RL step from ``<output_dir>/metrics.jsonl`` (measured inside the
  step: sampling, scoring, advantages, packing, the optimizer update; not the metrics gathering and the
  JSONL write after it). TRL: a ``TrainerCallback``, ``on_step_begin`` -> ``on_step_end`` of each optimizer
  step (generation of the whole generation batch, scoring, every micro-batch forward/backward, clipping,
  ``optimizer.step``; not the dataloader fetch before it nor the logging after it). On CUDA the callback
  synchronises the device at both ends.
* generation time -- ours: ``time/generate`` (prompt sampling, tokenising, ``model.generate`` with the
  sampled-token log-prob recorder, decoding). TRL: the wall time of ``trainer._generate`` (tokenising,
  ``model.generate``, decoding, completion-length bookkeeping). "rest" = step - generation: for ours
  ``time/score`` + ``time/prepare`` + ``time/train`` (+ tiny overheads); for TRL the rewards, advantages,
  padding (the rest of ``_generate_and_score_completions``, reported as ``score_prepare``) and the update.
* samples/s = completions per step (prompts x num_generations) / median step time.
* memory -- CPU: peak RSS of the arm's process (``getrusage(RUSAGE_SELF).ru_maxrss``, over the whole process:
  imports, model load, every step, and for ours the evaluation and final save after RL), the RSS right
  after the model is loaded, their difference, and the peak RSS during the timed steps alone (the kernel's
  ``VmHWM`` reset through ``/proc/self/clear_refs`` at the first timed step). CUDA: the same with
  ``torch.cuda.max_memory_allocated`` / ``memory_allocated`` (peak stats reset at the first timed step).
  The ``memory ratio`` line uses the whole-process peaks; at tiny model sizes they are dominated by the
  libraries each arm imports (TRL pulls in datasets/pyarrow/pandas), so read the delta and timed-window
  ratios printed beside it too.

Settings: ours -> TRL (trl 1.16 ``GRPOConfig`` field names)
-----------------------------------------------------------
* model directory ``--model-dir`` (fp32 weights)         -> the same path, ``model_init_kwargs={"dtype": "float32"}``
* ``critique_on: none``, ``critic.backend: none``        -> plain GRPO (TRL's only mode)
* ``kl_beta: 0`` (no reference model)                    -> ``beta=0.0`` (no reference model)
* ``sft_steps: 0``, memory off, ``progress: false``      -> (n/a), ``disable_tqdm=True``
* ``num_generations``                                    -> ``num_generations``
* ``generation_batch_size`` = prompts x num_generations  -> ``per_device_train_batch_size`` x
  ``gradient_accumulation_steps`` (``steps_per_generation`` defaults to the latter, so one optimizer step =
  one generation of the whole batch, as ours)
* ``mini_batch_size`` (completions per micro-batch)      -> ``per_device_train_batch_size``;
  ``gradient_accumulation_steps`` = generation batch / micro-batch
* ``num_iterations: 1``                                  -> ``num_iterations=1`` (neither computes pi_old
  with an extra forward: both use the detached current log-probs, ratio 1)
* ``max_new_tokens``                                     -> ``max_completion_length``
* ``temperature 1.0``, ``top_p 1.0``, top-k off          -> ``temperature=1.0``, ``top_p=1.0``, ``top_k=0``
* ``learning_rate``, constant schedule, no warm-up       -> ``learning_rate``, ``lr_scheduler_type="constant"``,
  ``warmup_steps=0``
* AdamW(betas 0.9/0.999, eps 1e-8), ``weight_decay 0``   -> ``adam_beta1/2``, ``adam_epsilon`` defaults,
  ``weight_decay=0.0``
* ``max_grad_norm 1.0``                                  -> ``max_grad_norm=1.0``
* ``advantage_estimator: dr_grpo`` (A = R - group mean)  -> ``scale_rewards="none"``
* ``loss_aggregation: token_sum_norm`` (sum / (B x T_max))-> ``loss_type="dr_grpo"`` (sum / (B x
  max_completion_length), divided by the accumulation steps: the same total)
* ``clip_eps_low 0.2``, ``clip_eps_high 0.28``           -> ``epsilon=0.2``, ``epsilon_high=0.28``
* no gradient checkpointing                              -> ``gradient_checkpointing=False`` (TRL's default is
  True: it would trade speed for memory)
* fp32 on CPU / ``mixed_precision: bf16`` (fp32 master
  weights, bf16 autocast) on GPU                         -> ``use_cpu=True, bf16=False`` / ``bf16=True``
  (TRL's default is bf16=True even on CPU)
* ``eval_n: 1`` (before/after eval, outside the steps)   -> ``eval_strategy="no"``
* ``checkpoint_every`` > steps (final save after RL)     -> ``save_strategy="no"``
* ``log_rollouts: 0``                                    -> ``log_completions=False``, ``report_to=[]``,
  ``logging_steps=1``
* prompts: plain strings, no chat template               -> a ``datasets.Dataset`` of plain-string ``prompt`` +
  ``answer`` (non-conversational: no template either)

Not identical (also listed in the JSON under ``not_identical``)
* optimizer implementation: ours ``torch.optim.AdamW`` with torch's default (foreach on CUDA, for-loop on
  CPU); TRL uses transformers' default ``optim="adamw_torch_fused"`` (``--trl-optim adamw_torch`` to match).
* prompt order: both draw the same rows, each with its own seeded shuffler (same lengths: "ab+cd=").
* the update's log-prob pass: TRL calls the model with ``fused_lm_head=True`` and always computes the
  entropy; ours gathers log-probs with a selective log-softmax and computes a detached entropy (metrics).
* generation: ours records the sampled tokens' log-probs with a logits processor (one [B, V] copy per
  decode step); TRL does not record them (with num_iterations=1 it does not need them).
* ours scores each completion twice with the verifier (reward + correctness metric); microseconds.
* TRL 1.16 has no ``max_prompt_length`` (prompts are never truncated in either arm).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ARMS = ("ours", "trl")
SEED = 0


@dataclass(frozen=True)
class Preset:
    """Model shape and the GRPO batch of one benchmark preset."""

    name: str
    arch: str
    """``llama`` (the tiny in-repo shape) or ``qwen2`` (Qwen2.5-shaped)."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    prompts: int
    """Prompts per step."""
    num_generations: int
    max_new_tokens: int
    micro_batch: int
    """Completions per forward/backward micro-batch."""
    learning_rate: float
    device: str
    """``cpu``: fp32; ``cuda``: fp32 master weights, bf16 autocast."""
    steps: int
    """Default timed steps per arm run."""
    warmup: int
    """Default untimed warm-up steps per arm run."""
    tie_embeddings: bool = True
    prompt_tokens: int | None = None
    """Pad every prompt to exactly this many tokens with a context of worked additions before the question
    (``None``: the bare question, 6 tokens). The n samples of a group share the whole prompt."""

    @property
    def completions_per_step(self) -> int:
        return self.prompts * self.num_generations

    @property
    def grad_accum(self) -> int:
        return self.completions_per_step // self.micro_batch


PRESETS: dict[str, Preset] = {
    "cpu-tiny": Preset("cpu-tiny", "llama", layers=2, hidden=128, heads=4, kv_heads=4, intermediate=256,
                       vocab=512, prompts=4, num_generations=8, max_new_tokens=8, micro_batch=16,
                       learning_rate=1e-5, device="cpu", steps=10, warmup=2),
    "cpu-medium": Preset("cpu-medium", "llama", layers=6, hidden=512, heads=8, kv_heads=8, intermediate=1024,
                         vocab=2048, prompts=4, num_generations=8, max_new_tokens=32, micro_batch=16,
                         learning_rate=1e-5, device="cpu", steps=6, warmup=2),
    "cpu-long-prompt": Preset("cpu-long-prompt", "llama", layers=6, hidden=512, heads=8, kv_heads=8,
                              intermediate=1024, vocab=2048, prompts=4, num_generations=8, max_new_tokens=32,
                              micro_batch=16, learning_rate=1e-5, device="cpu", steps=6, warmup=2,
                              prompt_tokens=256),
    "gpu-0.5b": Preset("gpu-0.5b", "qwen2", layers=24, hidden=896, heads=14, kv_heads=2, intermediate=4864,
                       vocab=151_936, prompts=16, num_generations=8, max_new_tokens=256, micro_batch=32,
                       learning_rate=1e-6, device="cuda", steps=5, warmup=2),
}

NOT_IDENTICAL = [
    "optimizer implementation: ours torch.optim.AdamW (torch default: foreach on CUDA, for-loop on CPU); TRL "
    "transformers' default optim (see settings.trl_optim); same hyperparameters",
    "prompt order: same rows, each trainer shuffles them with its own seeded sampler (all prompts 'ab+cd=')",
    "update log-probs: TRL uses the model's fused_lm_head path and always computes entropy; ours a selective "
    "log-softmax plus a detached entropy",
    "generation: ours records sampled-token log-probs with a logits processor; TRL does not",
    "TRL 1.16 has no max_prompt_length; neither arm truncates prompts",
]


# ---------------------------------------------------------------------------------------------------------
# pure helpers (tested without TRL)
# ---------------------------------------------------------------------------------------------------------

def summarize(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """Median, min, max and count of the non-None values (all None when there are none)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _mean(values: Iterable[float | None]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def safe_ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def ratio_lines(ours: dict[str, Any], trl: dict[str, Any]) -> list[str]:
    """The two lines scripts read, from each arm's summary (``samples_per_s`` and ``peak_mem_bytes``)."""
    sps = safe_ratio(ours.get("samples_per_s"), trl.get("samples_per_s"))
    mem = safe_ratio(ours.get("peak_mem_bytes"), trl.get("peak_mem_bytes"))
    return [f"samples/s ratio (ours/TRL): {_num(sps)}", f"memory ratio (ours/TRL): {_num(mem)}"]


def paired_ratio(rows: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """Median over rounds of ours/TRL within each round (the two runs of a round ran back to back, so load
    drifting over the benchmark cancels out of each pair)."""
    by_round: dict[Any, dict[str, float]] = {}
    for r in rows:
        if not r.get("error") and r.get(key) is not None:
            by_round.setdefault(r["round"], {})[r["arm"]] = r[key]
    per_round = [safe_ratio(v.get("ours"), v.get("trl")) for _, v in sorted(by_round.items())]
    per_round = [x for x in per_round if x is not None]
    return {"median": summarize(per_round)["median"], "per_round": per_round}


def arm_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of one arm (each round is one subprocess's JSON)."""
    ok = [r for r in runs if not r.get("error")]

    def med(key: str) -> float | None:
        return summarize(r.get(key) for r in ok)["median"]

    step = med("median_step_s")
    per_step = ok[0]["completions_per_step"] if ok else None
    return {
        "rounds": len(ok),
        "failed_rounds": len(runs) - len(ok),
        "median_step_s": step,
        "median_generate_s": med("median_generate_s"),
        "median_rest_s": med("median_rest_s"),
        "samples_per_s": (per_step / step) if step else None,
        "peak_mem_bytes": med("peak_mem_bytes"),
        "after_load_mem_bytes": med("after_load_mem_bytes"),
        "delta_mem_bytes": med("delta_mem_bytes"),
        "timed_peak_mem_bytes": med("timed_peak_mem_bytes"),
        "mean_completion_length": med("mean_completion_length"),
    }


def run_summary(step_times: Sequence[float], gen_times: Sequence[float | None],
                completions_per_step: int) -> dict[str, Any]:
    """Per-run medians: step, generation, rest (= step - generation, per step) and samples/s."""
    step = summarize(step_times)["median"]
    rest = [s - g for s, g in zip(step_times, gen_times, strict=True) if g is not None]
    return {
        "median_step_s": step,
        "median_generate_s": summarize(gen_times)["median"],
        "median_rest_s": summarize(rest)["median"],
        "samples_per_s": (completions_per_step / step) if step else None,
    }


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.1f}"


def _num(x: float | None, spec: str = ".3f", missing: str = "n/a") -> str:
    return missing if x is None else format(x, spec)


def rounds_table(rows: Sequence[dict[str, Any]], mem_kind: str) -> str:
    """Plain-text table of every arm run (one line each)."""
    head = ["round", "arm", "step s", "gen s", "rest s", "samples/s", f"peak {mem_kind} MiB",
            "after load MiB", "peak-load MiB", "timed peak MiB", "compl len"]
    body = []
    for r in rows:
        if r.get("error"):
            body.append([str(r["round"]), r["arm"], "FAILED"] + ["-"] * (len(head) - 3))
            continue
        body.append([str(r["round"]), r["arm"], _num(r["median_step_s"], missing="-"),
                     _num(r["median_generate_s"], missing="-"), _num(r["median_rest_s"], missing="-"),
                     _num(r["samples_per_s"], ".1f", "-"), _mib(r["peak_mem_bytes"]),
                     _mib(r["after_load_mem_bytes"]), _mib(r["delta_mem_bytes"]),
                     _mib(r["timed_peak_mem_bytes"]), _num(r.get("mean_completion_length"), ".2f", "-")])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


# ---------------------------------------------------------------------------------------------------------
# memory probes (run inside an arm's process)
# ---------------------------------------------------------------------------------------------------------

def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _ru_maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


class MemProbe:
    """Memory after model load, over the timed steps and over the whole process (RSS on CPU, CUDA
    allocator on GPU). Step indices are 0-based; timed steps are ``warmup .. total-1``."""

    def __init__(self, warmup: int, total: int, cuda: bool) -> None:
        self.warmup, self.total, self.cuda = warmup, total, cuda
        self.after_load: int | None = None
        self.pre_reset_peak: int | None = None
        self.timed_peak: int | None = None
        self._reset_ok = False

    def _current(self) -> int | None:
        if self.cuda:
            import torch

            return int(torch.cuda.memory_allocated())
        kib = _proc_status_kib("VmRSS")
        return None if kib is None else kib * 1024

    def _peak(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated())
        return _ru_maxrss_bytes()

    def loaded(self) -> None:
        if self.after_load is None:
            self.after_load = self._current()

    def step_begin(self, i: int) -> None:
        if i != self.warmup:
            return
        self.pre_reset_peak = self._peak()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._reset_ok = True
            return
        try:  # "5" resets the process's peak RSS (VmHWM) on Linux >= 4.0
            Path("/proc/self/clear_refs").write_text("5")
            self._reset_ok = True
        except OSError:
            self._reset_ok = False

    def step_end(self, i: int) -> None:
        if i != self.total - 1 or not self._reset_ok:
            return
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.timed_peak = int(torch.cuda.max_memory_allocated())
        else:
            kib = _proc_status_kib("VmHWM")
            self.timed_peak = None if kib is None else kib * 1024

    def report(self) -> dict[str, Any]:
        peak = max(self._peak(), self.pre_reset_peak or 0, self.timed_peak or 0)
        if not self.cuda:  # VmHWM and ru_maxrss are sampled differently; take the larger
            peak = max(peak, (_proc_status_kib("VmHWM") or 0) * 1024)
        return {
            "mem_kind": "cuda_allocated" if self.cuda else "rss",
            "peak_mem_bytes": peak,
            "after_load_mem_bytes": self.after_load,
            "delta_mem_bytes": None if self.after_load is None else peak - self.after_load,
            "timed_peak_mem_bytes": self.timed_peak,
        }


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------------------------------------

def prompt_rows(n: int, seed: int = SEED, prompt_tokens: int | None = None,
                model_dir: str | Path | None = None) -> list[dict[str, str]]:
    """``n`` addition problems (``prompt``, ``answer``) from the task's train split.

    With ``prompt_tokens`` (the long-prompt preset) each question is preceded by a context of worked
    additions ("12+34=46" lines, seeded per row, then leading spaces) so that the prompt is exactly
    ``prompt_tokens`` tokens under the tokenizer saved in ``model_dir``; both arms build the same rows."""
    import random

    from critique_rl.tasks import get_task

    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in get_task("addition").make_examples("train", n, seed)]
    if prompt_tokens is None:
        return rows
    if model_dir is None:
        raise ValueError("prompt_rows: prompt_tokens needs model_dir (the tokenizer that counts the tokens)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))

    def length(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    rng = random.Random(seed + 1)
    for row in rows:
        context = ""
        while True:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            line = f"{a}+{b}={a + b}\n"
            if length(context + line + row["prompt"]) > prompt_tokens:
                break
            context += line
        text = context + row["prompt"]
        while length(text) < prompt_tokens:
            text = " " + text
        if length(text) != prompt_tokens:
            raise RuntimeError(f"prompt_rows: could not pad a prompt to exactly {prompt_tokens} tokens "
                               f"(got {length(text)}); the tokenizer merges the padding")
        row["prompt"] = text
    return rows


def build_model(preset: Preset, path: str | Path, seed: int = SEED) -> dict[str, Any]:
    """Random-init model of ``preset``'s shape + a tiny BPE tokenizer, saved (fp32) into ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from critique_rl.models import build_tiny_tokenizer
    from critique_rl.tasks import get_task

    tok = build_tiny_tokenizer(get_task("addition").texts_for_tokenizer(2000, seed), vocab_size=min(preset.vocab, 512))
    common = dict(
        vocab_size=preset.vocab,  # >= the tokenizer's size; ids past it decode to nothing
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        tie_word_embeddings=preset.tie_embeddings,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    if preset.arch == "qwen2":
        cfg, cls = Qwen2Config(max_position_embeddings=32768, rms_norm_eps=1e-6, **common), Qwen2ForCausalLM
    else:
        positions = max(256, (preset.prompt_tokens or 0) + preset.max_new_tokens + 64)
        cfg, cls = LlamaConfig(max_position_embeddings=positions, **common), LlamaForCausalLM
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return {"parameters": sum(p.numel() for p in model.parameters()), "tokenizer_size": len(tok),
            "model_vocab": preset.vocab}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "accelerate", "trl", "datasets"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing package is reported as None
            out[mod] = None
    return out


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine skews both arms' timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "gpu": None}
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return out


# ---------------------------------------------------------------------------------------------------------
# the arms (each in its own subprocess)
# ---------------------------------------------------------------------------------------------------------

def _n_rows(preset: Preset, total_steps: int) -> int:
    return max(256, 2 * preset.prompts * total_steps)


def run_ours(preset: Preset, model_dir: str, warmup: int, steps: int) -> dict[str, Any]:
    import torch

    from critique_rl import CritiqueGRPOTrainer
    from critique_rl.config import CriticConfig, TrainConfig
    from critique_rl.train.metrics import read_jsonl

    cuda = preset.device == "cuda"
    total = warmup + steps
    probe = MemProbe(warmup, total, cuda)
    wrapped: list[float] = []

    class Trainer(CritiqueGRPOTrainer):  # hooks for the memory probe only; the timing is the trainer's own
        def _load_model(self, *a: Any, **k: Any) -> Any:
            out = super()._load_model(*a, **k)
            probe.loaded()
            return out

        def _step(self) -> Any:
            i = self.step
            probe.step_begin(i)
            _sync(cuda)
            t = time.perf_counter()
            out = super()._step()
            _sync(cuda)
            wrapped.append(time.perf_counter() - t)
            probe.step_end(i)
            return out

    with tempfile.TemporaryDirectory(prefix="vs_trl_ours_") as out_dir:
        cfg = TrainConfig(
            model=model_dir, task="addition", output_dir=out_dir, seed=SEED, device="cuda" if cuda else "cpu",
            mixed_precision="bf16" if cuda else "no", use_chat_template="no", sft_steps=0,
            max_steps=total, num_generations=preset.num_generations,
            generation_batch_size=preset.completions_per_step, mini_batch_size=preset.micro_batch,
            num_iterations=1, learning_rate=preset.learning_rate, lr_scheduler="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, temperature=1.0, top_p=1.0, max_new_tokens=preset.max_new_tokens,
            advantage_estimator="dr_grpo", loss_aggregation="token_sum_norm", clip_eps_low=0.2, clip_eps_high=0.28,
            kl_beta=0.0, entropy_coef=0.0, reward_funcs=["correctness"], critique_on="none",
            critic=CriticConfig(backend="none"), eval_n=1, eval_batch_size=1, log_rollouts=0,
            checkpoint_every=total + 1, progress=False,
        )
        trainer = Trainer(train_dataset=prompt_rows(_n_rows(preset, total), prompt_tokens=preset.prompt_tokens,
                                                       model_dir=model_dir), args=cfg)
        trainer.train()
        rows = [r for r in read_jsonl(Path(out_dir) / "metrics.jsonl") if "time/step" in r]
    timed = [r for r in rows if r["step"] > warmup]
    if len(timed) != steps:
        raise RuntimeError(f"expected {steps} timed steps in metrics.jsonl, found {len(timed)}")
    step_t = [r["time/step"] for r in timed]
    gen_t = [r.get("time/generate") for r in timed]
    out = run_summary(step_t, gen_t, preset.completions_per_step)
    stages = sorted({k for r in timed for k in r if k.startswith("time/")})
    out.update({
        "step_times_s": step_t,
        "generate_times_s": gen_t,
        "stage_medians_s": {k: summarize(r.get(k) for r in timed)["median"] for k in stages},
        "wrapper_step_times_s": wrapped[warmup:],
        "mean_completion_length": _mean(r.get("completions/mean_length") for r in timed),
        "torch_threads": torch.get_num_threads(),
        **probe.report(),
    })
    return out


def run_trl(preset: Preset, model_dir: str, warmup: int, steps: int, trl_optim: str | None) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from critique_rl.tasks import get_task

    cuda = preset.device == "cuda"
    total = warmup + steps
    probe = MemProbe(warmup, total, cuda)
    verify = get_task("addition").verify

    def correctness(completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
        return [1.0 if verify(c, a) else 0.0 for c, a in zip(completions, answer, strict=True)]

    step_t: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            probe.step_begin(state.global_step)
            _sync(cuda)
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync(cuda)
            step_t.append(time.perf_counter() - self.t0)
            probe.step_end(state.global_step - 1)

    extra = {"optim": trl_optim} if trl_optim else {}
    with tempfile.TemporaryDirectory(prefix="vs_trl_trl_") as out_dir:
        args = GRPOConfig(
            output_dir=out_dir, seed=SEED, model_init_kwargs={"dtype": "float32"},
            per_device_train_batch_size=preset.micro_batch, gradient_accumulation_steps=preset.grad_accum,
            num_generations=preset.num_generations, max_completion_length=preset.max_new_tokens,
            temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1,
            learning_rate=preset.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, loss_type="dr_grpo", scale_rewards="none", epsilon=0.2, epsilon_high=0.28,
            mask_truncated_completions=False, gradient_checkpointing=False,
            use_cpu=not cuda, bf16=cuda, fp16=False, max_steps=total,
            report_to=[], logging_steps=1, save_strategy="no", eval_strategy="no", disable_tqdm=True,
            log_completions=False, dataloader_num_workers=0, **extra,
        )
        if args.generation_batch_size != preset.completions_per_step or args.steps_per_generation != preset.grad_accum:
            raise RuntimeError(f"TRL generation batch {args.generation_batch_size} / steps_per_generation "
                               f"{args.steps_per_generation} do not match one generation per optimizer step")
        dataset = datasets.Dataset.from_list(prompt_rows(_n_rows(preset, total), prompt_tokens=preset.prompt_tokens,
                                                              model_dir=model_dir))
        trainer = GRPOTrainer(model=model_dir, reward_funcs=correctness, args=args, train_dataset=dataset,
                              callbacks=[StepTimer()])
        probe.loaded()
        gen_t: list[float] = []
        gs_t: list[float] = []

        def timed(fn: Any, sink: list[float]) -> Any:
            def wrapper(*a: Any, **k: Any) -> Any:
                _sync(cuda)
                t = time.perf_counter()
                out = fn(*a, **k)
                _sync(cuda)
                sink.append(time.perf_counter() - t)
                return out

            return wrapper

        trainer._generate = timed(trainer._generate, gen_t)
        trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, gs_t)
        trainer.train()
        optim = getattr(trainer.args.optim, "value", str(trainer.args.optim))
        lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    if len(step_t) != total or len(gen_t) != total:
        raise RuntimeError(f"expected {total} optimizer steps and generations, got {len(step_t)} and {len(gen_t)} "
                           "(one generation per optimizer step is the setting being compared)")
    out = run_summary(step_t[warmup:], gen_t[warmup:], preset.completions_per_step)
    out.update({
        "step_times_s": step_t[warmup:],
        "generate_times_s": gen_t[warmup:],
        "stage_medians_s": {"generate": out["median_generate_s"],
                            "score_prepare": summarize(g - t for g, t in zip(gs_t[warmup:], gen_t[warmup:],
                                                                               strict=True))["median"]},
        "mean_completion_length": _mean(lengths[warmup:]),
        "trl_optim": optim,
        "torch_threads": torch.get_num_threads(),
        **probe.report(),
    })
    return out


def arm_main(args: argparse.Namespace) -> int:
    preset = resolve_preset(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    warmup, steps = args.warmup, args.steps
    if args.arm == "ours":
        result = run_ours(preset, args.model_dir, warmup, steps)
    else:
        result = run_trl(preset, args.model_dir, warmup, steps, args.trl_optim)
    result.update({"arm": args.arm, "completions_per_step": preset.completions_per_step, "warmup": warmup,
                   "steps": steps, "versions": versions()})
    Path(args.result_file).write_text(json.dumps(result, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------------
# the parent
# ---------------------------------------------------------------------------------------------------------

def resolve_preset(args: argparse.Namespace) -> Preset:
    preset = PRESETS[args.preset]
    if args.max_new_tokens:
        preset = replace(preset, max_new_tokens=args.max_new_tokens)
    if args.steps is None:
        args.steps = preset.steps
    if args.warmup is None:
        args.warmup = preset.warmup
    return preset


def _arm_cmd(args: argparse.Namespace, arm: str, model_dir: str, result_file: str) -> list[str]:
    python = args.ours_python if arm == "ours" else args.trl_python
    cmd = [python, str(Path(__file__).resolve()), "--arm", arm, "--preset", args.preset, "--model-dir", model_dir,
           "--result-file", result_file, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.max_new_tokens:
        cmd += ["--max-new-tokens", str(args.max_new_tokens)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if arm == "trl" and args.trl_optim:
        cmd += ["--trl-optim", args.trl_optim]
    return cmd


def _run_arm(args: argparse.Namespace, arm: str, rnd: int, model_dir: str, tmp: str) -> dict[str, Any]:
    result_file = str(Path(tmp) / f"{arm}_{rnd}.json")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = _arm_cmd(args, arm, model_dir, result_file)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not Path(result_file).is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-25:]
        print(f"[{arm} round {rnd}] FAILED (exit {proc.returncode}):\n  " + "\n  ".join(tail), file=sys.stderr)
        return {"arm": arm, "round": rnd, "error": tail[-1] if tail else f"exit {proc.returncode}",
                "stderr_tail": tail, "process_wall_s": wall}
    res = json.loads(Path(result_file).read_text())
    res.update({"round": rnd, "process_wall_s": wall})
    return res


def parent_main(args: argparse.Namespace) -> int:
    preset = resolve_preset(args)
    arms = [a for a in args.arms.split(",") if a]
    if not arms or any(a not in ARMS for a in arms):
        raise SystemExit(f"--arms: a comma list of {ARMS}")
    if preset.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"preset {preset.name} needs a CUDA GPU (none visible); use cpu-tiny or cpu-medium")
    print(f"preset {preset.name}: {preset.layers} layers x {preset.hidden} ({preset.arch}), vocab {preset.vocab}, "
          f"{preset.prompts} prompts ({preset.prompt_tokens or 'bare'} tokens) x {preset.num_generations} samples, "
          f"{preset.max_new_tokens} new tokens, "
          f"micro-batch {preset.micro_batch}; {args.rounds} rounds x ({args.warmup} warm-up + {args.steps} timed "
          f"steps) per arm; arms {arms}; torch threads {args.threads or 'default'}", flush=True)
    rows: list[dict[str, Any]] = []
    load_start = _loadavg()
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        model_dir = str(Path(tmp) / "model")
        t = time.perf_counter()
        model_info = build_model(preset, model_dir)
        print(f"built model: {model_info['parameters']:,} parameters in {time.perf_counter() - t:.1f} s", flush=True)
        for rnd in range(1, args.rounds + 1):
            for arm in arms:
                res = _run_arm(args, arm, rnd, model_dir, tmp)
                rows.append(res)
                if not res.get("error"):
                    print(f"  round {rnd} {arm:4s}: step {res['median_step_s']:.3f} s, "
                          f"{res['samples_per_s']:.1f} samples/s, peak {_mib(res['peak_mem_bytes'])} MiB "
                          f"({res['process_wall_s']:.0f} s wall)", flush=True)
    load_end = _loadavg()
    mem_kind = "CUDA alloc" if preset.device == "cuda" else "RSS"
    print(f"\nload average (1/5/15 min) at start {load_start}, at end {load_end}; {os.cpu_count()} cores")
    print(rounds_table(rows, mem_kind))
    summary = {arm: arm_summary([r for r in rows if r["arm"] == arm]) for arm in arms}
    print()
    print("medians over rounds:")
    print(rounds_table([{"round": "med", "arm": arm, **s} for arm, s in summary.items()], mem_kind))
    for arm, s in summary.items():
        print(f"  {arm}: step split (median) generate {_num(s['median_generate_s'])} s + rest "
              f"{_num(s['median_rest_s'])} s")
    ratios: dict[str, float | None] = {}
    if set(arms) == set(ARMS) and all(summary[a]["rounds"] for a in ARMS):
        o, r = summary["ours"], summary["trl"]
        ratios = {
            "samples_per_s": safe_ratio(o["samples_per_s"], r["samples_per_s"]),
            "memory": safe_ratio(o["peak_mem_bytes"], r["peak_mem_bytes"]),
            "memory_delta": safe_ratio(o["delta_mem_bytes"], r["delta_mem_bytes"]),
            "memory_timed_steps": safe_ratio(o["timed_peak_mem_bytes"], r["timed_peak_mem_bytes"]),
            "generate_time": safe_ratio(o["median_generate_s"], r["median_generate_s"]),
            "rest_time": safe_ratio(o["median_rest_s"], r["median_rest_s"]),
            "samples_per_s_paired": paired_ratio(rows, "samples_per_s"),
            "memory_paired": paired_ratio(rows, "peak_mem_bytes"),
        }
        print()
        for line in ratio_lines(o, r):
            print(line)
        print(f"(peak-minus-after-load memory ratio: {_num(ratios['memory_delta'])}; timed-steps peak ratio: "
              f"{_num(ratios['memory_timed_steps'])}; generation time ratio: {_num(ratios['generate_time'])}; "
              f"rest-of-step time ratio: {_num(ratios['rest_time'])})")
        pr = ratios["samples_per_s_paired"]
        print(f"(paired: median over rounds of each round's ours/TRL samples/s: {_num(pr['median'])}; per round "
              f"{', '.join(_num(x) for x in pr['per_round'])})")
    else:
        print("\n(no ratios: both arms must run at least one round)")
    arm_versions = {a: next((r["versions"] for r in rows if r["arm"] == a and "versions" in r), None) for a in arms}
    trl_optim = next((r.get("trl_optim") for r in rows if r["arm"] == "trl" and r.get("trl_optim")), None)
    record = {
        "preset": preset.name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {**machine(), "load_avg_1_5_15_start": load_start, "load_avg_1_5_15_end": load_end},
        "versions": {"parent": versions(), **arm_versions},
        "settings": {**asdict(preset), "completions_per_step": preset.completions_per_step,
                     "grad_accum": preset.grad_accum, "rounds": args.rounds, "warmup_steps": args.warmup,
                     "timed_steps": args.steps, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "beta": 0.0,
                     "num_iterations": 1, "loss": "dr_grpo / token_sum_norm", "advantage": "R - group mean",
                     "precision": "bf16 autocast, fp32 weights" if preset.device == "cuda" else "fp32",
                     "trl_optim": trl_optim, "gradient_checkpointing": False, "seed": SEED, "model": model_info,
                     "torch_threads": args.threads or "torch default"},
        "not_identical": NOT_IDENTICAL,
        "measures": {
            "ours_step": "time/step from metrics.jsonl (inside the RL step)",
            "ours_generate": "time/generate (prompt sampling + HF generate + decode)",
            "trl_step": "TrainerCallback on_step_begin -> on_step_end (one optimizer step incl. generation)",
            "trl_generate": "wall time of trainer._generate (tokenise + HF generate + decode)",
            "rest": "step - generate, per step",
            "memory": "CPU: ru_maxrss of the arm process; CUDA: torch.cuda.max_memory_allocated",
        },
        "rounds": rows,
        "summary": summary,
        "ratios": ratios,
    }
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"vs_trl_{preset.name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    failed = sum(s["failed_rounds"] for s in summary.values())
    return 1 if failed else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours, trl) per arm (default 3)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per arm run (default: the preset's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per arm run (default: preset's)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the preset's completion length")
    p.add_argument("--arms", default="ours,trl", help="comma list of arms to run (default ours,trl)")
    p.add_argument("--ours-python", default=sys.executable, help="interpreter for our arm (default: this one)")
    p.add_argument("--trl-python", default=sys.executable,
                   help="interpreter of the environment that has trl installed (default: this one)")
    p.add_argument("--trl-optim", default=None,
                   help="TRL optimizer name (default: transformers' default, adamw_torch_fused)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads in both arms (default: torch's own, one per core); 1 keeps the "
                        "timings steadier on a machine shared with other work")
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    p.add_argument("--simulate", action="store_true",
                   help="no GPU: trace our update step and TRL's on fake tensors at gpu-0.5b settings "
                        "(benchmarks/vs_trl_simulate.py) and print the simulated memory ratios")
    p.add_argument("--sim-tokens", default="256,512,2048", help="--simulate: comma list of new-token counts")
    p.add_argument("--sim-no-old", action="store_true",
                   help="--simulate: skip tracing the trainer at commit 545b089 (the H100 calibration)")
    p.add_argument("--arm", choices=ARMS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or (args.steps is not None and args.steps < 1) or (args.warmup is not None and args.warmup < 0):
        p.error("--rounds and --steps must be >= 1, --warmup >= 0")
    if args.arm and not (args.model_dir and args.result_file):
        p.error("--arm needs --model-dir and --result-file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.simulate:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from vs_trl_simulate import simulate

        simulate(args.trl_python, [int(x) for x in args.sim_tokens.split(",") if x], with_old=not args.sim_no_old,
                 results_dir=Path(args.results_dir))
        return 0
    return arm_main(args) if args.arm else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
