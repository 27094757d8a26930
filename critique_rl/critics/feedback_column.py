"""Critiques from the data: ``feedback_column`` (``critic.backend: feedback``).

A row's feedback text (test output, an environment's message, a human note: what TRL's self-distillation
trainers call privileged context) is the critique of that row's wrong answers, verbatim, with no critic call.
It then conditions the refinement prompt and the directive-distillation teacher like any critique.

The text travels with the row: the data loader puts the ``feedback_column`` value on the row's prompt
(:attr:`critique_rl.data.Prompt.feedback`), which reaches the critic as :attr:`CritiqueRequest.question`.
Requests that get no feedback critique (a right answer, an unknown verdict, a row whose feedback is empty or
null, a free-form prompt such as lesson abstraction) get the rule critique of ``kind`` (``indicative`` or
``ground_truth``), exactly as :class:`~critique_rl.critics.rule.RuleCritic` writes it.
"""

from __future__ import annotations

from typing import Any

from critique_rl.critics.base import BaseCritic, Critique, CritiqueRequest, custom_prompt
from critique_rl.errors import UserError


def row_feedback(request: CritiqueRequest) -> str | None:
    """The feedback text of the request's row (None when the row has none)."""
    text = getattr(request.question, "feedback", None)
    if not isinstance(text, str) or not text.strip():
        return None
    return text.strip()


class FeedbackColumnCritic(BaseCritic):
    """Wrong answers to rows with feedback get the row's feedback as their critique (kind ``feedback``,
    verdict False, no model call); everything else gets the rule critique of ``kind``."""

    FEEDBACK_KIND = "feedback"

    def __init__(self, kind: str = "indicative", *, fallback_kind: str = "auto",
                 template_dir: str | None = None) -> None:
        if kind == "cot":
            raise ValueError("the feedback critic writes no model critiques; use kind indicative or ground_truth "
                             "for the answers that get no feedback")
        super().__init__(kind, fallback_kind=fallback_kind, max_regenerations=0, template_dir=template_dir)
        self.feedback_used = 0
        """Critiques taken from the feedback column so far."""

    def __repr__(self) -> str:
        return f"FeedbackColumnCritic(kind={self.kind!r})"

    def uses_feedback(self, request: CritiqueRequest) -> bool:
        return request.verdict is False and custom_prompt(request) is None and row_feedback(request) is not None

    async def acritique(self, requests: list[CritiqueRequest]) -> list[Critique]:
        requests = list(requests)
        out: list[Critique | None] = [None] * len(requests)
        rest = []
        for i, request in enumerate(requests):
            if custom_prompt(request) is None and not hasattr(request.question, "feedback"):
                raise UserError("critic.backend 'feedback': a critique request whose row was not loaded with "
                                "feedback_column (its prompt carries no feedback); load the rows with "
                                "critique_rl.data.load_split(cfg, 'train') or load_rows(..., options=DataOptions("
                                "feedback_column=...)) and pass them as train_dataset")
            if self.uses_feedback(request):
                critique = Critique(text=row_feedback(request) or "", verdict=False, kind=self.FEEDBACK_KIND)
                self.stats.record(critique)
                self.feedback_used += 1
                out[i] = critique
            else:
                rest.append(i)
        if rest:
            for i, critique in zip(rest, await super().acritique([requests[i] for i in rest]), strict=True):
                out[i] = critique
        return out  # type: ignore[return-value]

    def metrics(self, reset: bool = False) -> dict[str, Any]:
        """:meth:`BaseCritic.metrics` plus ``critic/feedback_used``: critiques taken from the data."""
        out = super().metrics(reset)
        out["critic/feedback_used"] = float(self.feedback_used)
        if reset:
            self.feedback_used = 0
        return out
