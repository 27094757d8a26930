"""Rule critic: critiques rendered from the verifier's verdict and the reference answer, no model.

Templates ``critique_indicative.j2`` and ``critique_ground_truth.j2`` (the top-level ``prompts/`` folder,
packaged into the wheel; overridable file by file with ``template_dir``) are rendered in jinja2's sandbox; the response and the
reference are template variables, so their text comes back literally.
"""

from __future__ import annotations

from critique_rl.critics.base import BaseCritic


class RuleCritic(BaseCritic):
    """``indicative`` ("Your answer 84 is incorrect.") or ``ground_truth`` ("... The correct answer is 85.").

    A ``ground_truth`` request without a reference falls back to ``indicative`` (counted as a fallback).
    """

    def __init__(
        self,
        kind: str = "ground_truth",
        *,
        fallback_kind: str = "auto",
        template_dir: str | None = None,
    ) -> None:
        if kind == "cot":
            raise ValueError("the rule critic cannot write cot critiques; use HFCritic or OpenAICritic")
        super().__init__(kind, fallback_kind=fallback_kind, max_regenerations=0, template_dir=template_dir)

    def __repr__(self) -> str:
        return f"RuleCritic(kind={self.kind!r})"
