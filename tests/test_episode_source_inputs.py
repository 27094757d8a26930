"""The episode source gets what it needs as typed inputs and returns what it changes: nothing in
``critique_rl/agents`` holds, reads or assigns the trainer (the config at ``setup_data``, an ``EpisodeRun`` at
``setup_model``, an ``EpisodeStep`` per step through ``for_step``; a new selection state and the phases' samplers
come back as values). Checked twice: on the source text (no trainer-typed parameter, no ``setattr``, no ``.t``
handle), and on a run whose trainer records every attribute access made from an ``agents/`` frame."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from critique_rl.agents.server_source import ServerSource
from critique_rl.agents.source import EpisodeSource
from critique_rl.train.trainer import CritiqueGRPOTrainer
from tests.test_episode_pipeline import config

ROOT = Path(__file__).resolve().parents[1] / "critique_rl"
AGENTS = sorted((ROOT / "agents").glob("*.py"))
TAKE_NO_TRAINER = AGENTS + [ROOT / "train" / name for name in ("policy_setup.py", "phase_state.py", "step_context.py")]


def _annotation_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[tuple[str, str]]:
    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs + [a for a in (fn.args.vararg, fn.args.kwarg) if a]
    return [(a.arg, ast.unparse(a.annotation)) for a in args if a.annotation is not None]


def test_no_function_in_agents_or_the_setup_helpers_takes_the_trainer():
    offenders = []
    for path in TAKE_NO_TRAINER:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                offenders += [f"{path.name}:{node.lineno} {node.name}({arg}: {ann})"
                              for arg, ann in _annotation_names(node) if "Trainer" in ann]
    assert offenders == []


def test_agents_assign_no_attribute_of_another_object_by_name_and_keep_no_trainer_handle():
    offenders = []
    for path in AGENTS:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
                offenders.append(f"{path.name}:{node.lineno} {node.func.id}")
            if isinstance(node, ast.Attribute) and node.attr == "t":  # the old ``self.t`` (the trainer)
                offenders.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
        # the trainer class is named only where the EpisodeTrainer factory builds one
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "EpisodeTrainer":
                body = ast.Module(body=node.body, type_ignores=[])
                offenders += [f"{path.name}:{n.lineno} {n.id} in {node.name}" for n in ast.walk(body)
                              if isinstance(n, ast.Name) and n.id == "CritiqueGRPOTrainer"]
    assert offenders == []


def test_no_module_but_the_trainer_reads_or_sets_a_private_trainer_attribute():
    """The single-turn setup helpers (``prompt_setup``, still functions of the trainer ``t``) and every other module
    use the trainer's public attributes only; what was private (constructor arguments, the wall clock) is passed."""
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == ROOT / "train" / "trainer.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in
                    ("t", "tr", "trainer") and node.attr.startswith("_") and not node.attr.startswith("__")):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert offenders == []


class _Watched(CritiqueGRPOTrainer):
    """The trainer, recording every attribute read or write made directly from a frame in critique_rl/agents."""

    touched: list[str] = []

    @staticmethod
    def _note(kind: str, name: str) -> None:
        caller = sys._getframe(2)
        if "critique_rl/agents/" in caller.f_code.co_filename.replace("\\", "/"):
            _Watched.touched.append(f"{kind} {name} from {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")

    def __setattr__(self, name: str, value: object) -> None:
        _Watched._note("set", name)
        super().__setattr__(name, value)

    def __getattribute__(self, name: str) -> object:
        if not name.startswith("__"):
            _Watched._note("get", name)
        return super().__getattribute__(name)


def test_an_episode_run_never_touches_the_trainer_from_agents(tmp_path):
    """Critiques, refinements, top-K distillation from the EMA teacher, the KL reference, memory, the pass-rate
    filter (before RL, on refresh and when a phase with its own tasks starts) and checkpoints: every stage's input
    comes from the step's context, and the trainer keeps what comes back."""
    _Watched.touched = []
    phases = [{"kind": "sft", "steps": 10}, {"kind": "rl", "steps": 1},
              {"kind": "rl", "steps": 2, "task_kwargs": {"lo": 2, "hi": 6}}]
    cfg = config(tmp_path, critique_on="all", distill_weight=0.5, distill_mode="topk_logits", distill_topk=4,
                 distill_teacher="ema", kl_beta=0.05, checkpoint_every=1, phases=phases, max_steps=3,
                 memory={"enabled": True, "embeddings": "lexical", "top_k_lessons": 1, "token_budget": 40},
                 pass_rate_filter={"enabled": True, "samples": 2, "max_prompts": 6, "refresh_every": 2,
                                   "too_hard_at_most": None, "too_easy_at_least": None})
    tr = _Watched(args=cfg)
    tr.train()
    assert _Watched.touched == []
    assert isinstance(tr.episodes, EpisodeSource) and not hasattr(tr.episodes, "t")
    # what came back is kept: the selection state (measured before RL, at step 1 as the phase's own tasks start,
    # and on refresh at step 2) and the phase's own sampler in the checkpoints
    assert tr.selection.pass_rate and "agent:phases[2]" in tr._phase_samplers
    measured = sorted(p.name for p in (tmp_path / "run" / "selection").glob("pass_rates_step*.jsonl"))
    assert measured == ["pass_rates_step000000.jsonl", "pass_rates_step000001.jsonl", "pass_rates_step000002.jsonl"]


def test_the_step_view_leaves_the_source_unchanged(tmp_path):
    """``for_step`` returns a copy reading the step's context; the source the trainer holds never gets one (so a
    stale context cannot leak into a later step), and a server source's view keeps its own episode ids."""
    from critique_rl.agents.episode_hub import EpisodeHub
    from critique_rl.agents.registry import get_env_spec

    src = ServerSource(get_env_spec("guess_number"), EpisodeHub())
    ctx = object()
    view = src.for_step(ctx)  # type: ignore[arg-type]
    assert view is not src and view.ctx is ctx and view.hub is src.hub
    assert src._ctx is None and view._ids is not src._ids
    try:
        src.ctx  # noqa: B018 - the property raises without a step
    except RuntimeError as exc:
        assert "for_step" in str(exc)
    else:
        raise AssertionError("the source itself has no step context")
