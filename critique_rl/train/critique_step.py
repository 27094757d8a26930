"""The language-feedback half of a Critique-GRPO step (arXiv:2506.03106), kept apart from the loop.

Which responses get critiques, the critic requests, the refinement prompts, which refinements join the
group, and the SFT demonstrations that teach a policy the refinement format.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from critique_rl.critics.base import Critique, CritiqueRequest
from critique_rl.critics.base import render_rule as _render_rule
from critique_rl.errors import ConfigError
from critique_rl.tasks import Task
from critique_rl.templates import render


def select_for_critique(correct: list[bool], group_size: int, mode: str) -> list[int]:
    """Indices (flat, groups contiguous) of responses that get a critique.

    ``all_wrong_groups``: every response of a group with no correct answer (the groups plain GRPO gets no
    signal from); ``wrong``: every incorrect response; ``all``: every response.
    """
    if mode == "all":
        return list(range(len(correct)))
    if mode == "wrong":
        return [i for i, c in enumerate(correct) if not c]
    if mode == "all_wrong_groups":
        out = []
        for g in range(0, len(correct), group_size):
            if not any(correct[g : g + group_size]):
                out.extend(range(g, g + group_size))
        return out
    raise ValueError(f"unknown critique_on mode {mode!r}")


def critique_requests(task: Task, rows: list[dict[str, Any]], texts: list[str], correct: list[bool],
                      idx: list[int]) -> list[CritiqueRequest]:
    return [
        CritiqueRequest(question=rows[i]["prompt"], response=texts[i], reference=rows[i]["answer"],
                        verdict=correct[i],
                        metadata={"answer": task.for_row(rows[i]).extract(texts[i]) or texts[i].strip()})
        for i in idx
    ]


def refine_text(question: str, response: str, critique: str, template_dir: str | None = None) -> str:
    """The refinement prompt (before chat formatting); also the teacher context for distillation."""
    return render("refine.j2", template_dir, question=question, response=response, critique=critique)


def choose_refinements(group_of: list[int], correct: list[bool], k: int, num_groups: int,
                       rng: random.Random) -> list[list[int]]:
    """Per group, up to ``k`` refinement indices: correct ones first, else random (Critique-GRPO)."""
    by_group: list[list[int]] = [[] for _ in range(num_groups)]
    for j, g in enumerate(group_of):
        by_group[g].append(j)
    chosen = []
    for cands in by_group:
        good = [j for j in cands if correct[j]]
        bad = [j for j in cands if not correct[j]]
        rng.shuffle(good)
        rng.shuffle(bad)
        chosen.append((good + bad)[:k])
    return chosen


def refinement_demos(task: Task, rows: list[dict[str, Any]], fraction: float, seed: int,
                     completion_fn: Callable[[dict[str, Any]], str],
                     template_dir: str | None = None,
                     critique_fn: Callable[[list[CritiqueRequest]], list[Critique]] | None = None,
                     counts: dict[str, int] | None = None) -> list[tuple[str, str]]:
    """SFT demonstrations of the refinement format: (refine prompt with a wrong answer and its critique, correct
    completion). The wrong answer is the task's typical mistake where it applies, else another problem's answer.

    The critique is the rule ground-truth critique, or with ``critique_fn`` (``sft_refine_critic: run``: the run's
    critic, batched, e.g. ``critic.critique``) that critic's critique of the wrong answer, so the policy learns to
    read the critiques it will be given in RL. The requests are the run's own (question, response, reference,
    verifier verdict ``False``), so the critic's verifier check applies as in RL (a disagreeing ``cot`` critique
    is regenerated, then replaced by its fallback rule critique). A critique whose verdict still is not
    ``False`` (a critic without the check, e.g. ``noisy`` with ``error_check: false``, or no parseable verdict)
    is dropped: no demo teaches "this answer is right" -> the correct answer. The demo target stays
    ``completion_fn(row)``. ``counts`` (if given) is filled with ``critiqued``, ``kept``, ``dropped`` and
    ``fallbacks``. The rows drawn and the wrong answers do not depend on ``critique_fn``."""
    rng = random.Random(seed + 7)
    drawn: list[tuple[dict[str, Any], str, CritiqueRequest]] = []
    for row in rows:
        if rng.random() >= fraction:
            continue
        part = task.for_row(row)  # a mixture: the row's own task
        wrong = part.mistake(row) if part.mistake else None
        if wrong is None:
            other = rows[rng.randrange(len(rows))]
            wrong = other["answer"]
            if part.verify(wrong, row["answer"]):
                continue
        request = CritiqueRequest(question=row["prompt"], response=wrong, reference=row["answer"], verdict=False,
                                  metadata={"answer": part.extract(wrong) or wrong})
        drawn.append((row, wrong, request))
    if critique_fn is None:
        critiques = [_render_rule("ground_truth", request, template_dir) for _, _, request in drawn]
    else:
        got = critique_fn([request for _, _, request in drawn]) if drawn else []
        if len(got) != len(drawn):
            raise RuntimeError(f"the critic returned {len(got)} critiques for {len(drawn)} refinement demos")
        critiques = [c.text if c.verdict is False else None for c in got]
        if counts is not None:
            counts.update(critiqued=len(got), kept=sum(c is not None for c in critiques),
                          dropped=sum(c is None for c in critiques), fallbacks=sum(bool(c.fallback) for c in got))
    return [(refine_text(row["prompt"], wrong, critique, template_dir), completion_fn(row))
            for (row, wrong, _), critique in zip(drawn, critiques, strict=True) if critique is not None]


def run_critic_demo_kwargs(t: Any) -> dict[str, Any]:
    """``refinement_demos`` keyword arguments for trainer ``t``: none with ``sft_refine_critic: rule`` (the rule
    ground-truth critique); with ``run``, ``critique_fn`` = the run's critic and ``counts`` = the run summary's
    ``sft_refine_demo_critiques``. The main process asks the critic (one call per demo, counted in the critic's
    cost like any other call) and hands the critiques to every process, so all warm up on the same demos; the
    critic's per-step verdict window is then closed, so the first RL step's ``critique/verdict_*`` cover RL
    critiques only."""
    cfg = t.cfg
    if cfg.sft_refine_critic == "rule":
        return {}
    if t.critic is None:
        raise ConfigError("sft_refine_critic", cfg.sft_refine_critic,
                          "the run has no critic to write the refinement demos (critic.backend none, critique_on "
                          "none or refinement_source reference); use sft_refine_critic: rule")
    from critique_rl.train import distributed as dist

    critic = t.critic

    def critique_fn(requests: list[CritiqueRequest]) -> list[Critique]:
        got = critic.critique(requests) if t.is_main else None
        if t.is_main:
            critic.metrics()  # close the per-step verdict window (the cumulative counters keep these calls)
        return dist.broadcast_object(got)

    return {"critique_fn": critique_fn, "counts": t.summary.setdefault("sft_refine_demo_critiques", {})}
