"""Memory on vs off on a task where lessons transfer (``critique_rl/tasks/trap.py``).

The task: tagged addition (``"kav:47+38="``); some tags want the sum written backwards. The SFT demonstrator
does not know the trap tags and gives the plain sum there, so after the warm-up the policy falls into the
trap on the reversed trap tags. A lesson about a tag ("When a question is tagged kav, write the digits of the
total backwards") carries exactly the missing information and applies to every later question with that tag.

Why the warm-up includes contexts: a tiny model trained from scratch has never seen a memory context, so text
prepended at RL time would be out of distribution and could only hurt. Like an instruction-following LM, the
policy first learns to *read* a lesson: a fraction of the SFT prompts carry the rendered lesson of their tag
(known tags, and fresh random tags whose rule only the lesson tells). No trap tag ever appears with a lesson
during SFT; whatever the policy knows about them after RL comes from RL and, in the memory arm, from lessons
the bank abstracted from its own failures during RL.

Both arms share the same SFT checkpoint per seed, the same RL prompts and the same hyper-parameters; only
``memory.enabled`` differs. Eval: greedy accuracy on held-out operand pairs of the same tags, overall and
per tag group; the memory arm is evaluated with retrieval from the bank built during training (read-only)
and, to see what the weights alone learnt, also without it.

Usage: ``python benchmarks/memory_on_off.py --seeds 0 1 2 --out benchmarks/results/memory_on_off``
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from critique_rl.config import MemoryConfig, TrainConfig
from critique_rl.rollout import HFGenerator, SamplingParams
from critique_rl.tasks import register_task
from critique_rl.tasks.trap import TRAP, lesson_draft, reading_rows, render_lessons
from critique_rl.train.memory_hook import MemoryHook, memory_eval_prompts, sft_context_fn
from critique_rl.train.trainer import CritiqueGRPOTrainer

register_task(TRAP)

GROUPS = ("known", "trap_rev", "trap_sum")


def group_of(row: dict[str, Any]) -> str:
    if not row.get("trap"):
        return "known"
    return "trap_rev" if row["rule"] == "rev" else "trap_sum"


class MemoryBenchTrainer(CritiqueGRPOTrainer):
    """The trainer plus: SFT prompts with lesson contexts, evaluation with retrieval, per-group accuracy.

    Memory goes through the trainer's own wiring (``memory_hook``, built when ``memory.enabled``). The numbers
    in benchmarks/results/memory_on_off.* were measured before the trainer had it, with a hook this class wired
    around its sampling itself (same MemoryHook, same retrieval)."""

    def __init__(self, *args: Any, sft_context_rate: float = 0.3, reading_n: int = 2000,
                 eval_memory: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sft_context_rate = sft_context_rate
        self.reading_n = reading_n
        self.eval_memory = eval_memory
        self.eval_history: list[dict[str, Any]] = []
        self._hook: MemoryHook | None = None

    # ---- setup ------------------------------------------------------------------------------------------
    def _setup(self, resume: bool):
        out = super()._setup(resume)
        self._hook = self.memory_hook
        if self._hook is not None:
            self._hook.min_score = 0.0  # lexical: no top-up with lessons about other tags
        known_ctx = sft_context_fn(lambda row, rng: render_lessons([lesson_draft(row["tag"], row["rule"])]),
                                   self.sft_context_rate, self.cfg.seed)
        self.sft_rows = [dict(r, context="" if r.get("trap") else known_ctx(r)) for r in self.train_rows]
        self.sft_rows += reading_rows(self.reading_n, self.cfg.seed)
        return out

    def _load_model(self, resume_from: Any):
        if self._model_arg != "tiny" or resume_from is not None:
            return super()._load_model(resume_from)
        # the tiny tokenizer also learns the lesson texts, so a context costs ~40 tokens instead of ~150
        from critique_rl.models import build_tiny_model, build_tiny_tokenizer

        cfg = self.cfg
        texts = [r["prompt"] + self.task.sft_completion(r) for r in self.train_rows[:4000]]
        texts += [r["context"] + "\n" + r["prompt"] + r["answer"] for r in reading_rows(2000, cfg.seed)
                  if r["context"]]
        tok = build_tiny_tokenizer(texts, cfg.tiny_vocab_size)
        model = build_tiny_model(tok, cfg.tiny_hidden_size, cfg.tiny_layers, cfg.tiny_heads, seed=cfg.seed)
        return model.to(self.accelerator.device), tok

    def prompt_text(self, row: dict[str, Any], context: str | None = None) -> str:
        if context is None:
            context = row.get("context") or None  # SFT rows carry their lesson context
        return super().prompt_text(row, context)

    def _warmup(self, progress: Any) -> None:
        rl_rows, self.train_rows = self.train_rows, self.sft_rows
        try:
            super()._warmup(progress)
        finally:
            self.train_rows = rl_rows

    # ---- evaluation -------------------------------------------------------------------------------------
    def evaluate_groups(self, with_memory: bool) -> dict[str, Any]:
        """Greedy accuracy overall and per tag group; retrieval from the bank when ``with_memory``."""
        rows = self.eval_rows
        if with_memory and self._hook is not None:
            table = memory_eval_prompts(self._hook, rows, self.prompt_text)
            prompts = [table[r["prompt"]] for r in rows]
        else:
            prompts = [self.prompt_text(r) for r in rows]
        gen = HFGenerator(self.accelerator.unwrap_model(self.model), self.tokenizer,
                          batch_size=self.cfg.eval_batch_size)
        ok: list[bool] = []
        lengths = 0
        bs = self.cfg.eval_batch_size
        for s in range(0, len(rows), bs):
            outs = gen.generate(prompts[s:s + bs], SamplingParams(n=1, max_new_tokens=self.max_new_tokens,
                                                                  greedy=True))
            for row, (c,) in zip(rows[s:s + bs], outs, strict=True):
                ok.append(bool(self.verify(c.text, row["answer"])))
                lengths += len(c.token_ids)
        res: dict[str, Any] = {"accuracy": sum(ok) / len(ok), "mean_length": lengths / len(ok),
                               "n": float(len(ok)),
                               "with_context": sum(p != self.prompt_text(r) for p, r in zip(prompts, rows,
                                                                                            strict=True)) / len(ok)}
        for g in GROUPS:
            sel = [o for o, r in zip(ok, rows, strict=True) if group_of(r) == g]
            res[f"acc/{g}"] = sum(sel) / len(sel) if sel else None
        return res

    def _evaluate(self) -> dict[str, float]:
        res = self.evaluate_groups(with_memory=self.eval_memory)
        self.eval_history.append({"step": self.step, **res})
        return res


# ---------------------------------------------------------------------------------------------------------

def base_config(seed: int, out: Path, args: argparse.Namespace) -> TrainConfig:
    kw: dict[str, Any] = dict(
        task="trap", seed=seed, output_dir=str(out), progress=False,
        tiny_hidden_size=128, tiny_heads=4, tiny_layers=2, tiny_vocab_size=512,
        sft_steps=args.sft_steps, sft_batch_size=64, sft_examples=args.sft_examples, sft_learning_rate=1e-3,
        sft_mistake_rate=1.0,
        max_steps=args.rl_steps, num_generations=8, generation_batch_size=128, mini_batch_size=64,
        learning_rate=args.lr, eval_n=args.eval_n, eval_batch_size=args.eval_n, checkpoint_every=10_000,
        keep_checkpoints=1, log_rollouts=0,
    )
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for k, v in (("critique_on", "none"), ("sft_refine_fraction", 0.0), ("distill_weight", 0.0)):
        if k in fields:
            kw[k] = v  # memory is the only feedback channel compared here
    return TrainConfig(**kw)


def memory_config(bank: Path) -> MemoryConfig:
    # lexical retrieval: the tag is a nonsense word, exact token match is what finds its lesson; one lesson
    # per prompt and no demonstrations, so the tiny model's prompt stays short (it sees what SFT showed it)
    return MemoryConfig(enabled=True, bank_path=str(bank), top_k_demos=0, top_k_lessons=1, token_budget=64,
                        embeddings="lexical", dedup_threshold=0.9, abstraction="rule")


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    shutil.rmtree(work / f"seed{seed}", ignore_errors=True)  # a re-run starts over: no old bank, no checkpoints
    sft_cfg = dataclasses.replace(base_config(seed, work / f"seed{seed}" / "sft", args), max_steps=0)
    sft = MemoryBenchTrainer(args=sft_cfg, sft_context_rate=args.sft_context_rate, reading_n=args.reading_n)
    sft.train()
    model = sft.accelerator.unwrap_model(sft.model)
    before = sft.eval_history[0]
    t_sft = time.perf_counter() - t0
    out: dict[str, Any] = {"seed": seed, "before_rl": before, "sft_seconds": t_sft}
    for arm in ("off", "on"):
        t1 = time.perf_counter()
        cfg = base_config(seed, work / f"seed{seed}" / arm, args)
        cfg = dataclasses.replace(cfg, sft_steps=0)
        if arm == "on":
            cfg.memory = memory_config(work / f"seed{seed}" / "on" / "memory.sqlite")
        tr = MemoryBenchTrainer(model=copy.deepcopy(model), tokenizer=sft.tokenizer, args=cfg,
                                eval_memory=(arm == "on"))
        tr.train()
        res = {"after_rl": tr.eval_history[-1], "seconds": time.perf_counter() - t1}
        if arm == "on":
            res["after_rl_no_retrieval"] = tr.evaluate_groups(with_memory=False)
            stats = tr._hook.bank.stats()
            res["bank"] = {"lessons": stats["lessons"]["count"], "demonstrations": stats["demonstrations"]["count"],
                           "lesson_merges": stats["lessons"]["merged"]}
            res["train_metrics"] = _memory_curve(Path(cfg.output_dir) / "metrics.jsonl")
        out[arm] = res
        print(f"seed {seed} {arm}: {json.dumps(res['after_rl'])} ({res['seconds']:.0f}s)", file=sys.stderr)
    return out


def _memory_curve(path: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "memory/size" in r]
    if not rows:
        return {}
    hit = [r["memory/hit_success_rate"] for r in rows if r.get("memory/hit_success_rate") is not None]
    miss = [r["memory/miss_success_rate"] for r in rows if r.get("memory/miss_success_rate") is not None]
    half = len(rows) // 2
    return {"final_size": rows[-1]["memory/size"], "final_lessons": rows[-1]["memory/lessons"],
            "context_rate_2nd_half": statistics.fmean(r["memory/context_rate"] for r in rows[half:]),
            "hit_success_rate": statistics.fmean(hit) if hit else None,
            "miss_success_rate": statistics.fmean(miss) if miss else None,
            "train_accuracy_2nd_half": statistics.fmean(r["train/accuracy"] for r in rows[half:])}


def _ms(xs: list[float | None], scale: float = 100.0) -> str:
    """``mean ± std`` of the values that are not None (times ``scale``), or ``-`` when there are none."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{scale * statistics.fmean(xs):.1f} ± {scale * sd:.1f}"


def _paired(diffs: list[float]) -> str:
    """mean ± std of paired differences, then each seed's in points: ``+5.0 ± 2.0 (+3.0, +7.0)``."""
    return f"{_ms(diffs)} ({', '.join(f'{100 * d:+.1f}' for d in diffs)})"


def table(results: list[dict[str, Any]]) -> str:
    cols = ["accuracy", *[f"acc/{g}" for g in GROUPS]]
    head = "| stage | all | known tags | trap tags, reversed | trap tags, plain sum |"
    lines = [head, "|" + "---|" * 5]
    rows = [("after SFT (before RL)", lambda r: r["before_rl"]),
            ("RL, memory off", lambda r: r["off"]["after_rl"]),
            ("RL, memory on (eval with retrieval)", lambda r: r["on"]["after_rl"]),
            ("RL, memory on (eval without retrieval)", lambda r: r["on"]["after_rl_no_retrieval"])]
    for name, get in rows:
        lines.append(f"| {name} | " + " | ".join(_ms([get(r)[c] for r in results]) for c in cols) + " |")
    return "\n".join(lines)


def write_results(results: list[dict[str, Any]], args: argparse.Namespace, t0: float) -> str:
    md = table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"args": vars(args), "seeds": results, "wall_seconds": time.perf_counter() - t0,
               "table_markdown": md}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    mem = [r["on"].get("train_metrics", {}) for r in results]
    notes = [
        f"# Memory on vs off: tagged addition with a trap ({len(results)} seeds, mean ± std, %)",
        "",
        "Greedy accuracy on held-out questions. `trap tags, reversed`: tags the SFT demonstrator never knew "
        "whose answer is the sum written backwards (the trap); `trap tags, plain sum`: unknown tags whose "
        "answer is the plain sum (control); `known tags`: the demonstrator knew their rule.",
        "",
        md,
        "",
        f"Setup: {args.sft_steps} SFT steps ({args.sft_context_rate:.0%} of known-tag prompts and half of "
        f"{args.reading_n} fresh-tag prompts carry a lesson), {args.rl_steps} RL steps x 16 prompts x 8 samples, "
        "lexical retrieval, 1 lesson per prompt, rule abstraction, no critiques. Both arms start from the same "
        "SFT checkpoint per seed.",
        "",
        "Memory arm, during RL (mean over seeds): "
        + ", ".join(f"{k} {statistics.fmean(m[k] for m in mem if m.get(k) is not None):.3g}"
                    for k in ("final_lessons", "final_size", "context_rate_2nd_half", "hit_success_rate",
                              "miss_success_rate") if any(m.get(k) is not None for m in mem)),
        "",
        f"Wall time: {payload['wall_seconds'] / 60:.1f} min. Raw numbers: `{out.with_suffix('.json').name}`.",
    ]
    out.with_suffix(".md").write_text("\n".join(notes) + "\n")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/results/memory_on_off")
    ap.add_argument("--work", default="runs/bench_memory_on_off", help="run directories (checkpoints, banks)")
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--sft-examples", type=int, default=3000)
    ap.add_argument("--reading-n", type=int, default=2000, help="SFT rows with fresh tags (half with a lesson)")
    ap.add_argument("--sft-context-rate", type=float, default=0.3, help="known-tag SFT rows with their lesson")
    ap.add_argument("--rl-steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-n", type=int, default=400)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = Path(args.work)
    results: list[dict[str, Any]] = []
    for s in args.seeds:
        results.append(run_seed(s, args, work))
        md = write_results(results, args, t0)  # after every seed: a stopped run keeps what it measured
    print(md)


if __name__ == "__main__":
    main()
