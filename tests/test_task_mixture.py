"""Several tasks in one run: the mixture task, its sampler, the task order and per-task metrics."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from critique_rl.config import TrainConfig, from_dict
from critique_rl.errors import ConfigError, UserError
from critique_rl.rewards import Verifier
from critique_rl.rewards.base import REWARD_FUNCS
from critique_rl.rewards.gates import GATES
from critique_rl.tasks import get_task, mix_tasks
from critique_rl.train import task_mix
from critique_rl.train.sampler import MixtureSampler
from critique_rl.train.trainer import CritiqueGRPOTrainer

MIX = "addition+reverse"


# --- pure helpers, by hand ------------------------------------------------------------------------------------
def test_task_blocks_by_hand():
    # a's share 1/4 of 10 steps = 2.5, rounded half up to 3
    assert task_mix.task_blocks(["a", "b"], {"a": 1.0, "b": 3.0}, 10) == [("a", 0, 3), ("b", 3, 10)]
    assert task_mix.task_blocks(["a", "b"], {"a": 1.0, "b": 4.0}, 10) == [("a", 0, 2), ("b", 2, 10)]
    # order is the given one, not the dict's; lengths add up to the total
    assert task_mix.task_blocks(["b", "a"], {"a": 1.0, "b": 1.0}, 5) == [("b", 0, 3), ("a", 3, 5)]
    blocks = task_mix.task_blocks(["x", "y", "z"], {"x": 1, "y": 1, "z": 1}, 7)
    assert blocks == [("x", 0, 2), ("y", 2, 5), ("z", 5, 7)]
    assert [task_mix.task_at(s, blocks) for s in range(8)] == ["x", "x", "y", "y", "y", "z", "z", "z"]


def test_entropy_estimate_and_order_by_hand():
    # tokens sampled with log-probs -0.5, -1.5 (task a) and -0.1 x 4 (task b): H = 1.0 and 0.1
    assert task_mix.token_entropy(0.5 + 1.5, 2) == pytest.approx(1.0)
    assert task_mix.token_entropy(0.4, 4) == pytest.approx(0.1)
    assert task_mix.entropy_order({"a": 1.0, "b": 0.1, "c": 0.5}) == ["b", "c", "a"]
    assert task_mix.entropy_order({"a": 0.2, "b": 0.2}) == ["a", "b"]  # ties keep the listed order
    with pytest.raises(ValueError):
        task_mix.token_entropy(0.0, 0)


def test_per_task_metrics_by_hand():
    m = task_mix.per_task_metrics(["a", "a", "b", "a"], [1, 0, 1, 1], [1.0, 0.0, 0.5, 1.0])
    assert m["task/a/accuracy"] == pytest.approx(2 / 3) and m["task/a/reward"] == pytest.approx(2 / 3)
    assert m["task/b/accuracy"] == 1.0 and m["task/b/reward"] == 0.5
    assert m["task/a/share"] == 0.75 and m["task/b/share"] == 0.25
    assert task_mix.per_task_metrics([None, None], [1, 0], [1.0, 0.0]) == {}
    assert task_mix.accuracy_by_task([{"task": "a"}, {"task": "b"}, {"task": "a"}], [True, False, False]) == \
        {"a": 0.5, "b": 0.0}


# --- the mixture task -----------------------------------------------------------------------------------------
def test_mixture_rows_verify_and_parts():
    mix = get_task(MIX)
    assert mix.name == MIX and set(mix.parts) == {"addition", "reverse"}
    train = mix.make_examples("train", 10, 0)
    assert Counter(r["task"] for r in train) == {"addition": 10, "reverse": 10}
    ev = mix.make_examples("eval", 5, 0)
    assert Counter(r["task"] for r in ev) == {"addition": 3, "reverse": 2}
    add = next(r for r in ev if r["task"] == "addition")
    rev = next(r for r in ev if r["task"] == "reverse")
    v = Verifier(mix.verify)  # the trainer's wrapper: dispatches on the `task` column
    assert v.check_rows([add, rev], [add["answer"], rev["answer"]]) == [True, True]
    assert v.check_rows([add, rev], [rev["answer"], add["answer"]]) == [False, False]
    # a reverse answer that is a number: judged by the reverse task (string equality), not parsed as a number
    assert mix.for_row(rev).verify(rev["answer"], rev["answer"]) and mix.for_row(add) is get_task("addition")
    assert mix.max_new_tokens == max(get_task("addition").max_new_tokens, get_task("reverse").max_new_tokens)
    assert mix.sft_completion(add) == get_task("addition").sft_completion(add)
    assert mix.mistake(rev) is None and mix.mistake(add) == get_task("addition").mistake(add)
    with pytest.raises(UserError, match="task column 'nope'"):
        mix.for_row({"prompt": "1+1=", "answer": "2", "task": "nope"})
    with pytest.raises(UserError, match="for_row"):
        mix.extract("12")
    with pytest.raises(UserError, match="at least two"):
        mix_tasks([get_task("addition")])
    with pytest.raises(UserError, match="twice"):
        mix_tasks([get_task("addition"), get_task("addition")])
    with pytest.raises(UserError, match="another mixture"):
        mix_tasks([mix, get_task("addition_carry")])
    with pytest.raises(UserError, match="unknown task"):
        get_task("addition+nope")


def test_builtin_rewards_and_gates_judge_each_row_by_its_task():
    mix = get_task(MIX)
    rows = [{"prompt": "12+30=", "answer": "42", "task": "addition"},
            {"prompt": "rev:ab=", "answer": "ba", "task": "reverse"}]
    correctness = REWARD_FUNCS["correctness"](mix)
    out = correctness(prompts=[r["prompt"] for r in rows], completions=["42", "ba"], answer=["42", "ba"],
                      task=["addition", "reverse"])
    assert out == [1.0, 1.0]
    out = correctness(prompts=[r["prompt"] for r in rows], completions=["ba", "42"], answer=["42", "ba"],
                      task=["addition", "reverse"])
    assert out == [0.0, 0.0]
    fmt = REWARD_FUNCS["format"](mix)
    # "abc" is not an addition answer (an integer), but is a well-formed reverse answer
    flags = fmt(prompts=["", ""], completions=["abc", "abc"], task=["addition", "reverse"])
    assert flags[0] == 0.0
    has_answer = GATES["has_answer"](mix)
    assert has_answer(prompts=["", ""], completions=["x", "41"], task=["addition", "addition"]) == [False, True]


# --- the sampler ----------------------------------------------------------------------------------------------
def _rows() -> list[dict]:
    return [{"prompt": f"a{i}", "answer": "1", "task": "a"} for i in range(30)] + \
           [{"prompt": f"b{i}", "answer": "1", "task": "b"} for i in range(10)]


def test_mixture_sampler_weights_resume_only_and_exclusion():
    s = MixtureSampler(_rows(), {"a": 3.0, "b": 1.0}, seed=0)
    drawn = [r["task"] for _ in range(250) for r in s.next_batch(8)]
    share = drawn.count("a") / len(drawn)
    assert 0.72 < share < 0.78  # 3:1 over 2000 slots (binomial sd 0.01)
    # rows of a task come in a permutation: the first 10 draws of task b are its 10 rows
    t = MixtureSampler(_rows(), {"a": 1.0, "b": 1.0}, seed=1)
    assert {r["prompt"] for r in t.next_batch(10, only="b")} == {f"b{i}" for i in range(10)}
    # resume: a sampler loaded from a state continues exactly like the original
    u = MixtureSampler(_rows(), {"a": 1.0, "b": 2.0}, seed=5)
    u.next_batch(7)
    state = json.loads(json.dumps(u.state_dict()))
    v = MixtureSampler(_rows(), {"a": 1.0, "b": 2.0}, seed=5)
    v.load_state_dict(state)
    assert [r["prompt"] for r in u.next_batch(9)] == [r["prompt"] for r in v.next_batch(9)]
    # exclusion by row index; a task is never emptied
    assert u.can_exclude({0, 1, 30}, 8) and not u.can_exclude(set(range(30, 40)), 8)
    u.exclude({0, 30})
    assert u.excluded == {0, 30}
    assert all(r["prompt"] not in ("a0", "b0") for _ in range(20) for r in u.next_batch(8))
    with pytest.raises(ValueError, match="task 'b'"):
        u.exclude(set(range(30, 40)))
    with pytest.raises(ValueError, match="not one of the mixture's tasks"):
        MixtureSampler(_rows() + [{"prompt": "c", "answer": "1", "task": "c"}], {"a": 1.0, "b": 1.0}, 0)


# --- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, field", [
    ({"tasks": {"addition": 1.0}}, "tasks"),
    ({"tasks": {"addition": 1.0, "reverse": -1.0}}, "tasks.reverse"),
    ({"tasks": {"addition": 1.0, "reverse": True}}, "tasks.reverse"),
    ({"task_order": "entropy"}, "task_order"),
    ({"tasks": {"addition": 1.0, "reverse": 1.0}, "task": "trap"}, "task"),
    ({"tasks": {"addition": 1.0, "reverse": 1.0}, "train_file": "x.jsonl"}, "train_file"),
    ({"tasks": {"addition": 1.0, "reverse": 1.0}, "task_order_prompts": 0}, "task_order_prompts"),
    ({"phases": [{"kind": "rl", "steps": 2, "tasks": {"addition": 1}}]}, "phases[0].tasks"),
    ({"tasks": {"addition": 1, "reverse": 1}, "phases": [{"kind": "sft", "steps": 2, "tasks": {"addition": 1}}]},
     "phases[0].tasks"),
    ({"tasks": {"addition": 1, "reverse": 1}, "phases": [{"kind": "rl", "steps": 2, "tasks": {"trap": 1}}]},
     "phases[0].tasks"),
    ({"tasks": {"addition": 1, "reverse": 1}, "phases": [{"kind": "rl", "steps": 2, "tasks": {"addition": 0}}]},
     "phases[0].tasks"),
    ({"tasks": {"addition": 1, "reverse": 1}, "phases": [{"kind": "rl", "steps": 2, "tasks": {"addition": -1}}]},
     "phases[0].tasks.addition"),
    ({"tasks": {"addition": 1, "reverse": 1}, "task_order": "entropy",
      "phases": [{"kind": "rl", "steps": 2, "tasks": {"addition": 1}}]}, "phases[0].tasks"),
])
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, data)
    assert err.value.field == field


def test_config_mixture_name_round_trips(tmp_path):
    cfg = from_dict(TrainConfig, {"tasks": {"addition": 2, "reverse": 1}, "task_order": "entropy"})
    assert cfg.task == MIX
    cfg.save_yaml(tmp_path / "c.yaml")
    from critique_rl.config import load_config

    again = load_config(str(tmp_path / "c.yaml"))
    assert again.task == MIX and again.tasks == {"addition": 2, "reverse": 1}


# --- through the trainer --------------------------------------------------------------------------------------
def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


MIXED = dict(tasks={"addition": 1.0, "reverse": 1.0}, critique_on="none", eval_n=20, max_steps=4, sft_steps=40,
             task_order_prompts=8)


def test_joint_order_logs_every_task_and_eval_per_task(fast_config, tmp_path):
    summary = CritiqueGRPOTrainer(args=fast_config(output_dir=str(tmp_path / "joint"), **MIXED)).train()
    rows = _metrics(tmp_path / "joint")
    assert set(rows[0]) >= {"eval/accuracy", "eval/addition/accuracy", "eval/reverse/accuracy"}
    rl = [r for r in rows if "loss/total" in r]
    shares = [r.get("task/addition/share", 0.0) + r.get("task/reverse/share", 0.0) for r in rl]
    assert shares == pytest.approx([1.0] * 4)
    assert sum("task/addition/share" in r and "task/reverse/share" in r for r in rl) >= 3  # mixed batches
    by_task = summary["eval_accuracy_after_rl_by_task"]
    # the overall accuracy is the per-task accuracies weighted by their 10 + 10 held-out rows
    assert summary["eval_accuracy_after_rl"] == pytest.approx((by_task["addition"] + by_task["reverse"]) / 2)
    assert "task_order" not in summary
    from rich.console import Console

    from critique_rl.train.run_setup import summary_table

    console = Console(record=True, width=120)
    console.print(summary_table(summary))
    shown = console.export_text()
    assert "addition: before -> after RL" in shown and f"{by_task['reverse']:.1%}" in shown
    # the saved policy evaluates on the mixture from the CLI, per task too (greedy and pass@k)
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "critique_rl.cli", "eval", str(tmp_path / "joint" / "final"),
                          "--task", MIX, "--n", "20", "--k", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["accuracy"] == pytest.approx(summary["eval_accuracy_after_rl"])  # the same 20 held-out rows
    assert out["by_task"] == pytest.approx(by_task) and 0.0 <= out["pass@2"] <= 1.0


def test_entropy_order_trains_tasks_in_blocks_and_resumes_exactly(fast_config, tmp_path, monkeypatch):
    kw = dict(MIXED, task_order="entropy", checkpoint_every=1, tasks={"addition": 1.0, "reverse": 1.0})
    summary = CritiqueGRPOTrainer(args=fast_config(output_dir=str(tmp_path / "straight"), **kw)).train()
    rows = _metrics(tmp_path / "straight")
    ent = {n: rows[0][f"order/entropy/{n}"] for n in ("addition", "reverse")}
    assert all(h > 0 for h in ent.values())
    first, second = sorted(ent, key=ent.get)
    assert [b["task"] for b in summary["task_order"]] == [first, second]
    assert summary["task_entropy"] == pytest.approx(ent)
    rl = [r for r in rows if "loss/total" in r]
    assert [r.get(f"task/{first}/share") for r in rl] == [1.0, 1.0, None, None]
    assert [r.get(f"task/{second}/share") for r in rl] == [None, None, 1.0, 1.0]

    # killed in the second block; the resumed run keeps the measured order and continues exactly
    out = tmp_path / "crashed"
    real_step = CritiqueGRPOTrainer._step

    def dying_step(self):
        if self.step == 3:
            raise KeyboardInterrupt("killed inside the second task's block")
        return real_step(self)

    monkeypatch.setattr(CritiqueGRPOTrainer, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        CritiqueGRPOTrainer(args=fast_config(output_dir=str(out), **kw)).train()
    monkeypatch.setattr(CritiqueGRPOTrainer, "_step", real_step)
    CritiqueGRPOTrainer(args=fast_config(output_dir=str(out), **kw)).train(resume=True)
    resumed = [r for r in _metrics(out) if "loss/total" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for x, y in zip(rl, resumed, strict=True):
        for key in ("loss/total", "reward/mean", f"task/{second}/share"):
            assert x.get(key) == pytest.approx(y.get(key), abs=1e-6), (x["step"], key)


def test_listed_order_follows_the_config(fast_config, tmp_path):
    kw = dict(MIXED, task_order="listed", tasks={"reverse": 1.0, "addition": 3.0})
    summary = CritiqueGRPOTrainer(args=fast_config(output_dir=str(tmp_path / "listed"), **kw)).train()
    assert summary["task_order"] == [{"task": "reverse", "first_step": 1, "last_step": 1},
                                     {"task": "addition", "first_step": 2, "last_step": 4}]
    rl = [r for r in _metrics(tmp_path / "listed") if "loss/total" in r]
    assert [r.get("task/addition/share") for r in rl] == [None, 1.0, 1.0, 1.0]


def test_phases_reweight_the_tasks(fast_config, tmp_path):
    phases = [{"kind": "sft", "steps": 40}, {"kind": "rl", "steps": 2, "tasks": {"addition": 1}},
              {"kind": "rl", "steps": 2, "tasks": {"addition": 0, "reverse": 1}}, {"kind": "rl", "steps": 1}]
    kw = dict(MIXED, max_steps=100, phases=phases)
    kw.pop("sft_steps")
    CritiqueGRPOTrainer(args=fast_config(output_dir=str(tmp_path / "ph"), **kw)).train()
    rl = [r for r in _metrics(tmp_path / "ph") if "loss/total" in r]
    assert [r.get("task/addition/share") for r in rl[:4]] == [1.0, 1.0, None, None]
    assert [r.get("task/reverse/share") for r in rl[:4]] == [None, None, 1.0, 1.0]
    assert len(rl) == 5 and rl[4]["phase"] == 3


def test_user_rows_must_name_the_mixtures_tasks(fast_config, tmp_path):
    rows = [{"prompt": "1+2=", "answer": "3", "task": "addition"}, {"prompt": "rev:ab=", "answer": "ba"}]
    with pytest.raises(ConfigError, match="training row 2 has task None") as err:
        CritiqueGRPOTrainer(args=fast_config(output_dir=str(tmp_path / "u"), **MIXED), train_dataset=rows).train()
    assert err.value.field == "tasks"
    only_addition = [r for r in rows if "task" in r] * 20
    with pytest.raises(ConfigError, match="no row of task") as err:
        CritiqueGRPOTrainer(args=fast_config(output_dir=str(tmp_path / "v"), **MIXED),
                            train_dataset=only_addition).train()
