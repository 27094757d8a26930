"""Single-turn prompts: what the trainer sets up for them (the task and its verifier, the training and held-out
rows, reward functions and gates, the critic and the memory hook) and the summary they end with. Functions of the
trainer (``t``); the per-step stages are :class:`~critique_rl.train.prompt_source.PromptSource`'s."""

from __future__ import annotations

import copy
import dataclasses
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from critique_rl.data import load_split
from critique_rl.errors import ConfigError, UserError
from critique_rl.models import build_tiny_model, build_tiny_tokenizer, wants_chat_template
from critique_rl.rewards import Verifier, build_gates, build_reward_funcs, func_name
from critique_rl.rewards.builtin import parse_confidence
from critique_rl.tasks import Task, get_task, load_callable
from critique_rl.templates import check_templates
from critique_rl.train import distributed as dist
from critique_rl.train import task_mix
from critique_rl.train.critique_step import refinement_demos, run_critic_demo_kwargs
from critique_rl.train.evaluate import EVAL_SEED, greedy_records, summarise_records
from critique_rl.train.run_setup import console
from critique_rl.train.sampler import MixtureSampler, PromptSampler
from critique_rl.train.sft import refine_added_steps

if TYPE_CHECKING:
    from critique_rl.train.trainer import CritiqueGRPOTrainer


def kwargs_for(names: list[Any], reward_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of ``reward_kwargs`` that belongs to ``names`` (the run's kwargs may name functions a phase
    or a single build does not include)."""
    picked = {k: v for k, v in (reward_kwargs or {}).items() if k in names}
    return picked or None


def setup_prompt_data(t: CritiqueGRPOTrainer, train_dataset: Any, eval_dataset: Any) -> None:
    """Single-turn prompts: the task, its verifier, the training and held-out rows. Refuses the episode-only phase
    fields (the config cannot: ``EpisodeTrainer(env_spec=...)`` trains on episodes with ``agent.env`` unset)."""
    cfg = t.cfg
    for i, ph in enumerate(cfg.phases):
        for name in ("task_kwargs", "env_kwargs"):
            if getattr(ph, name) is not None:
                raise ConfigError(f"phases[{i}].{name}", getattr(ph, name), "only episode training (agent.env) "
                                  "has env task/constructor arguments; set agent.env or remove it")
    t.task = get_task(cfg.task)
    t.verify = Verifier(load_callable(cfg.verifier) if cfg.verifier else t.task.verify, cfg.reward_threshold)
    if cfg.verifier:  # built-in rewards, gates and critiques judge by the user's verifier too
        t.task = copy.copy(t.task)
        t.task.verify = t.verify
        t.task.parts = {k: dataclasses.replace(part, verify=t.verify) for k, part in t.task.parts.items()}
    t.train_rows = load_split_rows(t, train_dataset, cfg.train_file, "train", cfg.sft_examples)
    t.eval_rows = load_split_rows(t, eval_dataset, cfg.eval_file, "eval", cfg.eval_n)[: cfg.eval_n]
    for split, rows in (("training", t.train_rows), ("held-out", t.eval_rows)) if cfg.tasks else ():
        i = next((i for i, r in enumerate(rows) if r.get("task") not in cfg.tasks), None)
        if i is not None:
            raise ConfigError("tasks", cfg.tasks, f"{split} row {i + 1} has task {rows[i].get('task')!r}; with "
                              "`tasks` every row needs a `task` column naming one of them")
    # task-specific SFT helpers (the task's mistake, its completion format) only on the task's own rows
    t.task_rows = train_dataset is None and not cfg.train_file and not cfg.dataset_name
    check_templates(cfg.critic.template_dir)


def setup_prompt_objectives(t: CritiqueGRPOTrainer, reward_funcs: list[Any] | None) -> None:
    """Single-turn: chat template, lengths, reward functions, gates, the prompt sampler."""
    cfg = t.cfg
    t.use_chat = wants_chat_template(t.tokenizer, cfg.use_chat_template)
    t.verify.conversational = t.use_chat
    t.max_new_tokens = cfg.max_new_tokens or t.task.max_new_tokens
    check_lengths(t)
    funcs = reward_funcs if reward_funcs is not None else cfg.reward_funcs
    t.reward_funcs = [
        f if callable(f) else build_reward_funcs([f], t.task, kwargs_for([f], cfg.reward_kwargs))[0] for f in funcs
    ]
    t.reward_names = [func_name(f) for f in t.reward_funcs]
    t.gates = build_gates(cfg.gates, t.task, cfg.gate_kwargs)
    weights = cfg.reward_weights or [1.0] * len(t.reward_funcs)
    t.reward_weights = torch.tensor(weights, dtype=torch.float32)

    # same state on every rank: global batches
    try:
        t.sampler = MixtureSampler(t.train_rows, cfg.tasks, cfg.seed) if cfg.tasks else \
            PromptSampler(t.train_rows, cfg.seed)
    except ValueError as exc:  # a task without training rows
        raise ConfigError("tasks", cfg.tasks, f"{exc}; give every task some rows, or leave it out") from None


def setup_prompt_critic_memory(t: CritiqueGRPOTrainer, resume_from: Path | None) -> None:
    cfg = t.cfg
    if cfg.refinement_source == "reference":  # the control arm: reference answers, no critic at all
        t.critic = None
    elif t.critic is None and cfg.critic.backend != "none" and cfg.critique_on != "none":
        from critique_rl.critics import build_critic

        t.critic = build_critic(cfg.critic, policy=t.model, tokenizer=t.tokenizer, output_dir=t.out)
        if getattr(t.critic, "wrong_reference", False) is None and not t.task.parts:
            t.critic.wrong_reference = t.task.wrong_reference  # hint errors name this task's kind of wrong fix
    if cfg.critique_on == "none":
        t.critic = None
    # groups get an off-policy sample: a refinement from a critique, or (control) the reference answer
    t.refines = t.critic is not None or (cfg.refinement_source == "reference" and cfg.critique_on != "none")
    t.memory_on = t.memory is not None or cfg.memory.enabled
    t.memory_hook = build_memory(t, resume_from) if t.is_main else None


def build_memory(t: CritiqueGRPOTrainer, resume_from: Path | None) -> Any:
    cfg = t.cfg
    if not t.memory_on:
        return None
    from critique_rl.memory import MemoryBank
    from critique_rl.train.memory_hook import MemoryHook

    bank_path = Path(cfg.memory.bank_path or t.out / "memory.sqlite")
    given = t.memory is not None
    if resume_from is not None and not given:  # bank and model go back to the same step
        MemoryHook.restore(resume_from / "memory.sqlite", bank_path)
    elif not given and MemoryHook.begin_fresh_run(bank_path, t.out):
        console.print(f"[bold yellow]warning: {t.out} was started before and has no checkpoint to resume; "
                      f"the memory bank {bank_path} was put back to how it was when the run first started[/]",
                      soft_wrap=True)
    if not given:
        t.memory = MemoryBank(bank_path, config=cfg.memory, critic=t.critic)
    mem_cfg = cfg.memory if cfg.memory.enabled else dataclasses.replace(cfg.memory, enabled=True)  # memory= given
    hook = MemoryHook(t.memory, mem_cfg, t.task.name, run_name=t.out.name, critic=t.critic,
                      min_score=mem_cfg.min_score)
    if resume_from is not None and given:
        hook.restore_open(resume_from)
    return hook


def load_split_rows(t: CritiqueGRPOTrainer, given: Any, path: str | None, split: str, n: int) -> list[dict[str, Any]]:
    """The split's rows: given rows, train/eval_file, dataset_name (the *_column fields), else the task's own."""
    rows = load_split(t.cfg, split, given)
    if rows is not None:
        return rows
    seed = EVAL_SEED if split == "eval" else t.cfg.seed
    return t.task.make_examples(split, n, seed)


def check_lengths(t: CritiqueGRPOTrainer) -> None:
    """Every prompt plus ``max_new_tokens`` must fit the model's positions (a 1 MB prompt is a one-line error,
    not an allocator failure in the middle of a step)."""
    limit = getattr(getattr(t.model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    field = "max_new_tokens" if t.cfg.max_new_tokens else "task"
    if t.max_new_tokens >= limit:
        raise ConfigError(field, t.cfg.max_new_tokens or t.cfg.task,
                          f"completions of {t.max_new_tokens} tokens do not fit the model's {limit} positions; "
                          f"use max_new_tokens < {limit}")
    for split, rows, source in (("train", t.train_rows, t.cfg.train_file or "train_dataset"),
                                ("eval", t.eval_rows, t.cfg.eval_file or "eval_dataset")):
        for start in range(0, len(rows), 1024):
            chunk = rows[start:start + 1024]
            ids = t.tokenizer([t.prompt_text(r) for r in chunk], add_special_tokens=False)["input_ids"]
            for i, x in enumerate(ids):
                if len(x) + t.max_new_tokens > limit:
                    raise UserError(
                        f"{split} data ({source}) row {start + i + 1}: the prompt is {len(x)} tokens; with "
                        f"max_new_tokens {t.max_new_tokens} it does not fit the model's {limit} positions; "
                        "shorten or drop the row (or lower max_new_tokens)")


def prompt_summary(t: CritiqueGRPOTrainer, final: dict[str, Any], wall_seconds: float) -> None:
    t.summary.update({
        "eval_accuracy_after_rl": final["accuracy"],
        **({"eval_accuracy_after_rl_by_task": final["by_task"]} if final.get("by_task") else {}),
        "eval_mean_length_after_rl": final["mean_length"],
        **({"eval_ece_after_rl": final["ece"]} if "ece" in final else {}),
        "eval_n": len(t.eval_rows),
        "steps": t.step,
        "task": t.cfg.task,
        "wall_seconds": wall_seconds,
    })


def demonstration(t: CritiqueGRPOTrainer, row: dict[str, Any]) -> str:
    """SFT target: the task's completion, or its typical mistake at ``sft_mistake_rate`` (seeded per row)."""
    rate, mistake = t.cfg.sft_mistake_rate, sft_task(t).mistake
    if rate > 0 and mistake is not None:
        wrong = mistake(row)
        if wrong is not None and random.Random(f"{t.cfg.seed}:{row['prompt']}").random() < rate:
            return wrong
    return t.sft_completion(row)


def sft_task(t: CritiqueGRPOTrainer) -> Task:
    """The task for SFT helpers: itself on its own generated rows; without its typical mistake on user rows
    (a train_file or train_dataset need not hold the columns the mistake reads, e.g. addition's `a`, `b`)."""
    if t.task_rows:
        return t.task
    parts = {k: dataclasses.replace(t, mistake=None) for k, t in t.task.parts.items()}  # a mixture's too
    return dataclasses.replace(t.task, mistake=None, parts=parts)


def sft_pairs(t: CritiqueGRPOTrainer, steps: int, first: bool) -> tuple[list[tuple[str, str]], int]:
    """The warm-up pairs on the run's rows (the task's demonstrations, its mistakes, refinement demos) and the
    steps to run (``sft_refine_steps: added`` lengthens the first phase in proportion to the refinement demos)."""
    cfg = t.cfg
    pairs = [(t.prompt_text(r), demonstration(t, r)) for r in t.train_rows]
    if cfg.sft_refine_fraction > 0:
        plain = len(pairs)
        pairs += [(t.prompt_text({"prompt": p}), c) for p, c in refinement_demos(
            sft_task(t), t.train_rows, cfg.sft_refine_fraction, cfg.seed, t.sft_completion,
            cfg.critic.template_dir, **run_critic_demo_kwargs(t))]  # sft_refine_critic: run -> the run's critic
        if cfg.sft_refine_steps == "added" and first:  # batches are drawn in proportion to the pairs
            steps = refine_added_steps(steps, plain, len(pairs) - plain)
            t.summary["sft_steps_run"] = steps
    return pairs, steps


def build_tiny(t: CritiqueGRPOTrainer) -> tuple[Any, Any]:
    """The tiny policy: a tokenizer learned from the task's demonstrations and refinement prompts, a fresh model."""
    cfg = t.cfg
    texts = [r["prompt"] + t.sft_completion(r) for r in t.train_rows[:4000]]
    texts += [p + c for p, c in refinement_demos(sft_task(t), t.train_rows[:500], 1.0, cfg.seed,
                                                 t.sft_completion, cfg.critic.template_dir)]
    tok = build_tiny_tokenizer(texts, cfg.tiny_vocab_size)
    return build_tiny_model(tok, cfg.tiny_hidden_size, cfg.tiny_layers, cfg.tiny_heads, seed=cfg.seed), tok


def evaluate(t: CritiqueGRPOTrainer, gen: Any) -> dict[str, Any]:
    """Greedy held-out accuracy; with a ``brier`` reward in use, also calibration (ECE, Brier score, AUROC).
    Each process decodes its share of the held-out rows; the records are gathered before summarising."""
    conf = parse_confidence if "brier" in t.reward_names else None
    n = len(t.eval_rows)
    mine = t.eval_rows[t.rank * n // t.world : (t.rank + 1) * n // t.world]
    records = greedy_records(gen, mine, t.prompt_text, t.verify, t.max_new_tokens,
                             batch_size=t.cfg.eval_batch_size, confidence_fn=conf)
    records = [r for part in dist.gather_objects(records) for r in part]  # rank order = eval_rows order
    result = summarise_records(records, conf is not None)
    by_task = task_mix.accuracy_by_task(t.eval_rows, [r[0] for r in records])
    if by_task:
        result["by_task"] = by_task
    return result
