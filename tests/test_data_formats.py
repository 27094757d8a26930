"""TRL dataset formats: standard and conversational prompts, prompt/reference/feedback columns, extra columns by
name (reward functions, gates, critic templates), datasets.load_dataset offline, and the config checks."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import yaml

from critique_rl.config import TrainConfig, from_dict
from critique_rl.critics.base import CritiqueRequest, render_rule
from critique_rl.data import DataOptions, Prompt, load_hf_rows, load_rows, load_split, validate_rows
from critique_rl.errors import ConfigError, UserError
from critique_rl.models import build_tiny_tokenizer, format_prompt
from critique_rl.rewards import build_gates, evaluate_gates, reward_inputs, score_rewards
from critique_rl.tasks import get_task
from critique_rl.templates import check_templates, render

CONVERSATION = [{"role": "system", "content": "Answer with a number."},
                {"role": "user", "content": "What is 2+3?"}]


def one_line(exc: BaseException, *needles: str) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------------
# prompts: standard and conversational


def test_standard_and_conversational_rows(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": "1+1=", "answer": 2, "difficulty": "easy"},
        {"prompt": CONVERSATION, "answer": "5", "difficulty": "hard"},
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "3+4?"}]}], "answer": "7"},
    ])
    rows = load_rows(path)
    plain, chat, parts = (r["prompt"] for r in rows)
    assert isinstance(plain, Prompt) and plain == "1+1=" and plain.messages is None
    assert chat.messages == CONVERSATION
    assert chat == "System: Answer with a number.\n\nUser: What is 2+3?"  # the text critics and logs see
    assert parts == "3+4?"  # a single user message reads as its content
    assert [r["answer"] for r in rows] == ["2", "5", "7"]
    assert rows[1]["difficulty"] == "hard" and chat.columns["difficulty"] == "hard"


def test_conversational_prompt_goes_through_the_chat_template():
    from tiny_chat_model import CHATML_TEMPLATE

    tok = build_tiny_tokenizer(["What is 2+3? Answer with a number."], 300)
    tok.chat_template = CHATML_TEMPLATE
    (row,) = validate_rows([{"prompt": CONVERSATION, "answer": "5"}], "train_dataset")
    text = format_prompt(tok, row["prompt"], use_chat=True)
    assert text == ("<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # a string prompt keeps its one-user-message wrapping
    assert format_prompt(tok, "What is 2+3?", use_chat=True) == (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    # memory context goes at the start of the first user message; the system message stays first
    with_ctx = row["prompt"].with_context("Lesson: add carefully.")
    assert with_ctx.messages[0] == CONVERSATION[0]
    assert with_ctx.messages[1]["content"] == "Lesson: add carefully.\nWhat is 2+3?"
    assert row["prompt"].messages == CONVERSATION  # unchanged


def test_conversational_prompt_without_chat_template_is_one_line_error():
    tok = build_tiny_tokenizer(["What is 2+3?"], 300)  # no chat template
    (row,) = validate_rows([{"prompt": CONVERSATION, "answer": "5"}], "train_dataset")
    with pytest.raises(UserError) as info:
        format_prompt(tok, row["prompt"], use_chat=False)
    one_line(info.value, "train_dataset row 1", "conversational", "no chat template")
    tok.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(UserError) as info:
        format_prompt(tok, row["prompt"], use_chat=False)  # use_chat_template: no
    one_line(info.value, "use_chat_template is 'no'")


def test_chat_template_that_refuses_the_messages_is_one_line_error():
    tok = build_tiny_tokenizer(["x"], 300)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    (row,) = validate_rows([{"prompt": CONVERSATION, "answer": "5"}], "train_dataset")
    with pytest.raises(UserError) as info:
        format_prompt(tok, row["prompt"], use_chat=True)
    one_line(info.value, "train_dataset row 1", "System role not supported")


BAD_CONVERSATIONS = [
    ([], ["row 1", "'prompt'", "empty list"]),
    (["hello"], ["message 1", "role"]),
    ([{"role": "user"}], ["message 1"]),
    ([{"role": "wizard", "content": "x"}], ["message 1", "role 'wizard'"]),
    ([{"role": "user", "content": 5}], ["message 1", "content must be a string"]),
    ([{"role": "user", "content": "  "}], ["every message is empty"]),
]


@pytest.mark.parametrize("prompt, needles", BAD_CONVERSATIONS, ids=[str(i) for i in range(len(BAD_CONVERSATIONS))])
def test_bad_conversational_prompts_name_row_column_and_message(prompt, needles):
    with pytest.raises(UserError) as info:
        validate_rows([{"prompt": prompt, "answer": "1"}], "train_dataset")
    one_line(info.value, "train_dataset row 1", *needles)


def test_prompt_pickles_with_its_attributes():
    (row,) = validate_rows([{"prompt": CONVERSATION, "answer": "5", "fb": "carry the 1"}], "x",
                           options=DataOptions(feedback_column="fb"))
    back = pickle.loads(pickle.dumps(row["prompt"]))
    assert back == row["prompt"] and back.messages == CONVERSATION and back.feedback == "carry the 1"
    assert back.columns["fb"] == "carry the 1" and json.loads(json.dumps(back)) == str(back)


# ---------------------------------------------------------------------------------------------------------
# columns: prompt, reference, the rest


def test_reference_and_prompt_columns_are_mapped(tmp_path):
    path = write_jsonl(tmp_path / "trl.jsonl", [{"question": "Q1", "solution": "\\frac{1}{2}", "level": 3}])
    (row,) = load_rows(path, options=DataOptions(prompt_column="question", reference_column="solution"))
    assert row["prompt"] == "Q1" and row["answer"] == "\\frac{1}{2}"
    assert row["solution"] == "\\frac{1}{2}" and row["question"] == "Q1" and row["level"] == 3  # kept by name


def test_missing_reference_names_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "Q1", "solution": "4"}])
    with pytest.raises(UserError) as info:
        load_rows(path)
    one_line(info.value, "trl.jsonl line 1", "missing column 'answer'", "reference_column", "reference_column: null")
    with pytest.raises(UserError) as info:
        load_rows(write_jsonl(tmp_path / "q.jsonl", [{"question": "Q", "answer": "1"}]))
    one_line(info.value, "missing column 'prompt'", "prompt_column")


def test_reference_free_rows_have_answer_none(tmp_path):
    path = write_jsonl(tmp_path / "open.jsonl", [{"prompt": "Write a haiku.", "rubric": "5-7-5"}])
    (row,) = load_rows(path, options=DataOptions(reference_column=None))
    assert row["answer"] is None and row["rubric"] == "5-7-5"


def test_column_clashes_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "Q", "answer": "42", "solution": "x = 42"}])
    with pytest.raises(UserError) as info:
        load_rows(path, options=DataOptions(reference_column="solution"))
    one_line(info.value, "line 1", "'answer'", "reference_column: answer")
    with pytest.raises(UserError) as info:
        load_rows(path, options=DataOptions(reference_column=None))
    one_line(info.value, "line 1", "'answer'")
    with pytest.raises(UserError) as info:
        load_rows(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "question": "b", "answer": "1"}]),
                  options=DataOptions(prompt_column="question"))
    one_line(info.value, "'prompt'", "prompt_column: prompt")


def test_feedback_column_checks(tmp_path):
    opts = DataOptions(feedback_column="feedback")
    with pytest.raises(UserError) as info:
        validate_rows([{"prompt": "Q", "answer": "1"}], "train_dataset", options=opts)
    one_line(info.value, "row 1", "missing column 'feedback'")
    with pytest.raises(UserError) as info:
        validate_rows([{"prompt": "Q", "answer": "1", "feedback": 3}], "train_dataset", options=opts)
    one_line(info.value, "row 1", "'feedback'", "string or null")
    rows = validate_rows([{"prompt": "Q", "answer": "1", "feedback": " use 7 "},
                          {"prompt": "R", "answer": "2", "feedback": None}], "train_dataset", options=opts)
    assert [r["prompt"].feedback for r in rows] == ["use 7", None]


def test_extra_columns_reach_reward_functions_and_gates(tmp_path):
    rows = validate_rows([{"prompt": CONVERSATION, "solution": "5", "difficulty": "easy"},
                          {"prompt": "6+1=", "solution": "7", "difficulty": "hard"}],
                         "train_dataset", options=DataOptions(reference_column="solution"))
    seen = {}

    def accuracy(completions, solution, difficulty, **kwargs):  # a TRL reward function, unchanged
        seen.update(completions=completions, solution=solution, difficulty=difficulty, answer=kwargs["answer"])
        return [1.0 if c[0]["content"].strip() == s else 0.0 for c, s in zip(completions, solution, strict=True)]

    R = score_rewards([accuracy], *reward_inputs(rows, ["5", "8"], conversational=True))
    assert R[:, 0].tolist() == [1.0, 0.0]
    assert seen["solution"] == ["5", "7"] and seen["difficulty"] == ["easy", "hard"] and seen["answer"] == ["5", "7"]
    assert seen["completions"][0] == [{"role": "assistant", "content": "5"}]
    gate_file = tmp_path / "gates.py"
    gate_file.write_text("def easy_only(completions, difficulty, **kw):\n"
                         "    return [d == 'easy' for d in difficulty]\n")
    gates = build_gates([f"{gate_file}:easy_only"], get_task("addition"))
    passed, _ = evaluate_gates(gates, *reward_inputs(rows, ["5", "8"]))
    assert passed.tolist() == [True, False]


def test_extra_columns_reach_critic_templates(tmp_path):
    (row,) = validate_rows([{"prompt": "Write a haiku.", "rubric": "three lines, 5-7-5"}], "train_dataset",
                           options=DataOptions(reference_column=None))
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "critique_cot.j2").write_text("Grade by the rubric: {{ rubric }}\nQ: {{ question }}\nA: {{ response }}")
    (folder / "critique_indicative.j2").write_text("{{ answer }} misses the rubric ({{ rubric }}).")
    check_templates(str(folder))  # the columns of the rows loaded pass the up-front check
    check_templates(str(folder), columns=["rubric"])
    with pytest.raises(UserError) as info:  # a name that is no column stays an error before training
        check_templates(str(folder), columns=["difficulty"])
    one_line(info.value, "critique_cot.j2", "undefined variable", "rubric")
    text = render("critique_cot.j2", str(folder), question=row["prompt"], response="An old pond", reference=None)
    assert text == "Grade by the rubric: three lines, 5-7-5\nQ: Write a haiku.\nA: An old pond"
    request = CritiqueRequest(question=row["prompt"], response="An old pond", verdict=False)
    assert render_rule("indicative", request, str(folder)) == "An old pond misses the rubric (three lines, 5-7-5)."
    with pytest.raises(UserError) as info:  # a plain-string question has no columns: the missing name is named
        render("critique_cot.j2", str(folder), question="Write a haiku.", response="x", reference=None)
    one_line(info.value, "critique_cot.j2", "rubric")


# ---------------------------------------------------------------------------------------------------------
# datasets.load_dataset (offline)


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return tmp_path


def test_dataset_name_local_folder_and_splits(offline_datasets):
    folder = offline_datasets / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)])
    write_jsonl(folder / "test.jsonl", [{"question": "t", "answer": "#### 9"}])
    cfg = from_dict(TrainConfig, {"dataset_name": str(folder), "prompt_column": "question", "eval_file": None})
    rows = load_split(cfg, "train")
    assert [r["prompt"] for r in rows] == [f"q{i}" for i in range(5)] and rows[0]["answer"] == "#### 0"
    assert load_split(cfg, "eval") is None  # held-out rows: eval_file, else the task's generator
    assert [r["question"] for r in load_hf_rows(str(folder), split="test")] == ["t"]
    assert len(load_hf_rows(str(folder), split="train[:2]")) == 2
    with pytest.raises(UserError) as info:
        load_hf_rows(str(folder), split="validation")
    one_line(info.value, "dataset_split", "validation", "train", "test")
    with pytest.raises(UserError) as info:
        load_hf_rows(str(folder), config="nope")
    one_line(info.value, "dataset_config", "nope")


def test_dataset_name_parquet_files(offline_datasets):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = offline_datasets / "pq" / "data"
    folder.mkdir(parents=True)
    rows = [{"prompt": [{"role": "user", "content": f"{i}+1?"}], "solution": str(i + 1), "tag": "t"} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows[:3]), str(folder / "train-00000-of-00001.parquet"))
    pq.write_table(pa.Table.from_pylist(rows[3:]), str(folder / "test-00000-of-00001.parquet"))
    cfg = from_dict(TrainConfig, {"dataset_name": str(folder.parent), "dataset_split": "test",
                                  "reference_column": "solution"})
    (row,) = load_split(cfg, "train")
    assert row["prompt"].messages == [{"role": "user", "content": "3+1?"}] and row["answer"] == "4"
    assert row["tag"] == "t"
    # the other split of the same folder of parquet files
    got = load_hf_rows(str(folder.parent), split="train")
    assert [r["solution"] for r in got] == ["1", "2", "3"]


def test_dataset_loading_script_is_refused_with_the_fix(offline_datasets):
    import datasets

    folder = offline_datasets / "scripted"
    folder.mkdir()
    (folder / "scripted.py").write_text("import datasets\n\nclass Scripted(datasets.GeneratorBasedBuilder):\n    pass\n")
    assert int(datasets.__version__.split(".")[0]) >= 4  # scripts were removed in datasets 4.0
    with pytest.raises(UserError) as info:
        load_hf_rows(str(folder))
    one_line(info.value, "dataset_name", "script", "parquet")


def test_uncached_hub_dataset_offline_is_one_line_error(offline_datasets):
    with pytest.raises(UserError) as info:
        load_hf_rows("someone/not-cached-anywhere", split="train")
    one_line(info.value, "dataset_name", "someone/not-cached-anywhere", "HF_DATASETS_OFFLINE")


def test_bad_row_from_a_dataset_names_row_and_column(offline_datasets):
    folder = offline_datasets / "bad"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "ok", "answer": "1"}, {"prompt": "ok", "answer": None}])
    cfg = from_dict(TrainConfig, {"dataset_name": str(folder)})
    with pytest.raises(UserError) as info:
        load_split(cfg, "train")
    one_line(info.value, "dataset_name", "split train row 2", "'answer'")


# ---------------------------------------------------------------------------------------------------------
# config fields


CONFIG_ERRORS = [
    ({"dataset_name": "x", "train_file": "y.jsonl"}, "dataset_name", "keep one"),
    ({"dataset_config": "main"}, "dataset_config", "dataset_name"),
    ({"dataset_split": "test"}, "dataset_split", "dataset_name"),
    ({"reference_column": ""}, "reference_column", "column name"),
    ({"reference_column": "x", "feedback_column": "x", "critic": {"backend": "feedback"}}, "feedback_column",
     "also reference_column"),
    ({"feedback_column": "fb"}, "feedback_column", "critic.backend: feedback"),
    ({"critic": {"backend": "feedback"}}, "critic.backend", "feedback_column"),
    ({"feedback_column": "fb", "critic": {"backend": "feedback", "kind": "cot"}}, "critic.kind", "indicative"),
    ({"reference_column": None}, "reward_funcs", "reference_column"),
    ({"reference_column": None, "reward_funcs": ["f.py:r"]}, "critic.kind", "indicative"),
    ({"reference_column": None, "reward_funcs": ["f.py:r"], "critic": {"kind": "indicative"}}, "verifier",
     "reward function"),
    ({"reference_column": None, "reward_funcs": ["f.py:r"], "verifier": "f.py:r", "critic": {"kind": "indicative"}},
     "sft_steps", "sft_steps: 0"),
    ({"reference_column": None, "reward_funcs": ["f.py:r"], "verifier": "f.py:r", "sft_steps": 0,
      "critic": {"kind": "indicative"}}, "model", "local model directory"),
    ({"reference_column": None, "reward_funcs": ["f.py:r"], "verifier": "f.py:r", "sft_steps": 0,
      "critic": {"kind": "indicative", "fallback_kind": "ground_truth"}}, "critic.fallback_kind", "indicative"),
    ({"reference_column": None, "reward_funcs": ["f.py:r"], "verifier": "f.py:r", "sft_steps": 0,
      "critic": {"kind": "indicative"}, "refinement_source": "reference"}, "refinement_source", "critique"),
]


@pytest.mark.parametrize("fields, field, fix", CONFIG_ERRORS, ids=[c[1] + str(i) for i, c in enumerate(CONFIG_ERRORS)])
def test_data_config_errors_name_field_and_fix(fields, field, fix):
    with pytest.raises(ConfigError) as info:
        from_dict(TrainConfig, fields)
    assert info.value.field == field, str(info.value)
    one_line(info.value, fix)


def test_reference_free_config_is_accepted(tmp_path):
    cfg = from_dict(TrainConfig, yaml.safe_load(f"""
        model: {tmp_path}
        reference_column: null
        reward_funcs: [my_rewards.py:judge]
        verifier: my_rewards.py:judge
        sft_steps: 0
        critic: {{backend: openai, kind: cot, model: grader}}
    """))
    assert cfg.reference_column is None and cfg.critic.kind == "cot"


# ---------------------------------------------------------------------------------------------------------
# docs/data.md: its snippets run and its configs are valid


def test_docs_data_page_snippets(tmp_path, monkeypatch):
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "data.md").read_text(encoding="utf-8")
    monkeypatch.chdir(root)
    pythons = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(pythons) >= 3
    for block in pythons:
        exec(compile(block, "docs/data.md", "exec"), {})
    yamls = re.findall(r"^```yaml\n(.*?)^```", text, flags=re.S | re.M)
    assert len(yamls) >= 4
    for block in yamls:
        data = yaml.safe_load(block)
        if "model" in data:
            data["model"] = str(tmp_path)  # a local directory that exists only where the user trains
        if "template_dir" in data.get("critic", {}):
            data["critic"]["template_dir"] = str(tmp_path)
        from_dict(TrainConfig, data)


def test_conversational_rows_reach_reward_functions_as_their_messages():
    from critique_rl.data import Prompt
    from critique_rl.rewards.base import reward_inputs

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    rows = [{"prompt": Prompt("S: Be brief.\nU: 2+2?", messages=msgs), "answer": "4"},
            {"prompt": "3+3?", "answer": "6"}]
    prompts, completions, _ = reward_inputs(rows, ["4", "6"], conversational=True)
    assert prompts[0] == msgs and prompts[0] is not msgs  # TRL: the row's conversation, not the rendered text
    assert prompts[1] == [{"role": "user", "content": "3+3?"}]
    assert completions[0] == [{"role": "assistant", "content": "4"}]
