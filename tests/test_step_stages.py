"""The step stages over a frozen StepContext: they return new values and leave their inputs as they were, the
selection state is frozen, the trainer has no mixins, and train/ never branches on a rollout engine's name."""

from __future__ import annotations

import ast
import copy
import dataclasses
import random
from pathlib import Path

import pytest
import torch

from critique_rl.config import TrainConfig
from critique_rl.critics.base import Critique
from critique_rl.rollout.base import Completion
from critique_rl.train import critique_stage
from critique_rl.train.rollout_batch import CritiqueResult, RolloutBatch
from critique_rl.train.selection import SelectionState
from critique_rl.train.step_context import Models, PromptDraw, PromptFormat, Scorer, StepContext

TRAIN = Path(__file__).resolve().parents[1] / "critique_rl" / "train"


def _same(a, b) -> bool:
    """Deep equality over dataclasses, lists, dicts and tensors (tensors: equal values, dtype and shape)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            torch.nan_to_num(a, nan=-123.0), torch.nan_to_num(b, nan=-123.0))
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.fixture(scope="module")
def ctx():
    from accelerate import Accelerator

    from critique_rl.models import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer(["1+1=2", "2+3=5", "Feedback: carry the one"] * 20, vocab_size=300)
    model = build_tiny_model(tok, hidden_size=64, layers=1, heads=2, seed=0)
    cfg = TrainConfig(num_generations=2, generation_batch_size=4, mini_batch_size=4, refinements_per_group=1,
                      distill_weight=0.5, distill_mode="sampled_token", kl_beta=0.05, critique_on="wrong")
    models = Models(model, model, copy.deepcopy(model).eval(), None, Accelerator(cpu=True))
    scorer = Scorer([], ["r"], torch.ones(1), [], None, False, 1)
    return StepContext(cfg=cfg, engine=None, critic=None, scorer=scorer, fmt=PromptFormat(tok, False, 8),
                       models=models, rank=0, world=1, is_main=True, rng=random.Random(0), step=0, task=None,
                       draw=PromptDraw(None, None), refines=True, sft_completion=lambda r: r["answer"])


def _completion(ctx, text: str) -> Completion:
    ids = ctx.fmt.encode(text)
    return Completion(token_ids=ids, logprobs=[-0.5] * len(ids), text=text, finished=False)


def _batch_and_crit(ctx) -> tuple[RolloutBatch, CritiqueResult]:
    rows = [{"prompt": "1+1=", "answer": "2"}] * 2 + [{"prompt": "2+3=", "answer": "5"}] * 2
    comps = [_completion(ctx, t) for t in ("2", "3", "4", "6")]
    batch = RolloutBatch(rows=rows, prompts=[r["prompt"] for r in rows], completions=comps, group_size=2,
                         rewards=torch.tensor([[1.0], [0.0], [0.0], [0.0]]), passed=torch.ones(4, dtype=torch.bool),
                         correct=[True, False, False, False])
    idx = [1, 2, 3]
    crit = CritiqueResult(idx=idx, critiques=[Critique(text="carry the one", verdict=False, kind="rule")] * 3,
                          teacher_prompts=[rows[i]["prompt"] + " Feedback: carry the one" for i in idx], ref_src=[2],
                          ref_completions=[_completion(ctx, "5")], ref_rewards=torch.tensor([[1.0]]),
                          ref_passed=torch.tensor([True]), ref_correct=[True])
    return batch, crit


def test_the_stages_return_new_values_and_leave_their_inputs_unchanged(ctx):
    batch, crit = _batch_and_crit(ctx)
    before = copy.deepcopy((batch, crit))
    plan = critique_stage.advantages(ctx, batch, crit)
    assert plan.kept == [(1, 2, 0)]  # the refinement fills group 1's slot
    plan_before = copy.deepcopy(plan)
    ub, metrics = critique_stage.update_batch(ctx, batch, crit, plan)
    assert _same((batch, crit), before) and _same(plan, plan_before)
    assert metrics["distill/rows"] == 3 and ub.ref_logp is not None and ub.offpolicy.tolist() == [0, 0, 0, 0, 1]

    # directive distillation returns a new batch: the advantages of the critiqued rows change, its input's do not
    plain = dataclasses.replace(ub, advantages=ctx.cfg.eval_weight * torch.zeros_like(ub.advantages))
    plain_before = copy.deepcopy(plain)
    out, _ = critique_stage.directive_distillation(ctx, plain, crit, batch)
    assert _same(plain, plain_before) and out is not plain
    changed = (out.advantages != 0).any(-1).tolist()
    assert changed[0] is False and changed[4] is False and any(changed[1:4])


def test_the_selection_state_is_frozen_and_replaced():
    state = SelectionState(samples_total=5)
    more = state.add_samples(3)
    assert (state.samples_total, more.samples_total) == (5, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.samples_total = 9  # type: ignore[misc]
    assert SelectionState.from_dict(more.to_dict()) == more


def test_the_trainer_has_no_mixins_and_stays_small():
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    assert CritiqueGRPOTrainer.__bases__ == (object,)
    assert len((TRAIN / "trainer.py").read_text().splitlines()) < 500
    for gone in ("critique_path.py", "records.py", "prompt_selection.py"):
        assert not (TRAIN / gone).exists()


def test_train_never_branches_on_a_rollout_engine_name():
    """Engine behaviour (sleep, importance weights, self-critique routing) is asked of the engine; train/ passes
    ``rollout_backend`` to the engine registry and never compares it."""
    for path in TRAIN.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = [n for n in (node.left, *node.comparators)
                         if isinstance(n, ast.Attribute) and n.attr == "rollout_backend"]
                consts = [n.value for n in (node.left, *node.comparators) if isinstance(n, ast.Constant)]
                assert not names, f"{path.name}:{node.lineno} compares rollout_backend"
                assert "vllm" not in consts, f"{path.name}:{node.lineno} compares with 'vllm'"
