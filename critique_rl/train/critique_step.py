"""The language-feedback half of a Critique-GRPO step (arXiv:2506.03106), kept apart from the loop.

Which responses get critiques, the critic requests, the refinement prompts, which refinements join the
group, and the SFT demonstrations that teach a policy the refinement format.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from critique_rl.critics.base import CritiqueRequest
from critique_rl.critics.base import render_rule as _render_rule
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
                     template_dir: str | None = None) -> list[tuple[str, str]]:
    """SFT demonstrations of the refinement format: (refine prompt with a wrong answer and its ground-truth
    critique, correct completion). The wrong answer is the task's typical mistake where it applies, else
    another problem's answer."""
    rng = random.Random(seed + 7)
    demos = []
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
        critique = _render_rule("ground_truth", request, template_dir)
        demos.append((refine_text(row["prompt"], wrong, critique, template_dir), completion_fn(row)))
    return demos

