"""Named settings: ``preset:`` values (``PRESETS``) and the embedded demo (``DEMO_PRESET``, what `critique-rl train`
runs with no config file). Plain data: :mod:`critique_rl.config` applies them."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "critique_on": "all_wrong_groups",
        "offpolicy_gamma": 0.1,
        "refinements_per_group": 1,
        "refinement_source": "critique",
        "offpolicy_weighting": "none",
        "advantage_estimator": "dr_grpo",
        "kl_beta": 0.0,
        "distill_weight": 0.0,
    },
}
"""Named settings (`preset:`). `paper`: Critique-GRPO as published (arXiv:2506.03106): critiques for the groups
with no correct answer, shaping gamma 0.1 (Eq. of the shaping function f(p) = p/(p+gamma)), n initial + 1 refinement
per group (the paper samples 7 + 1: add `num_generations: 7` and a `generation_batch_size` divisible by 7), Dr.GRPO
advantages, no KL, no distillation."""

DEMO_PRESET: dict[str, Any] = {
    "output_dir": "runs/demo",
    "task": "addition",
    "sft_mistake_rate": 0.6,
    "sft_refine_fraction": 0.3,
    "max_steps": 300,
    "lr_scheduler": "cosine",
    "eval_every": 50,
    "critique_on": "wrong",
    "offpolicy_gamma": None,
    "distill_weight": 0.0,
    "critic": {"backend": "rule", "kind": "ground_truth"},
    "memory": {"enabled": True, "top_k_demos": 0, "top_k_lessons": 0},
}
"""The embedded demo (`critique-rl train` with no config): tiny model, addition, an imperfect demonstrator
that drops the carry 60% of the time on carry problems, SFT warm-up, then RL with critiques and memory."""
