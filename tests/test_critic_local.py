"""Defaults and `preset: paper`; a critic that never sees the answer (`critic.reference: hidden`); its verdict
accuracy against the verifier (`critique/verdict_*`); a small critic trained in-repo on rule critiques."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from critic_server import CriticServer

from critique_rl.config import DEMO_PRESET, PRESETS, CriticConfig, TrainConfig, load_config
from critique_rl.critics import OpenAICritic
from critique_rl.critics.base import CritiqueRequest, verdict_scores
from critique_rl.critics.cache import CritiqueCache
from critique_rl.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------
# defaults and the paper preset


def test_defaults_follow_the_evidence_and_the_demo_uses_them():
    cfg = TrainConfig()
    assert cfg.critique_on == "wrong" and cfg.offpolicy_gamma is None and cfg.preset is None
    demo = load_config(None)
    assert demo.critique_on == "wrong" and demo.offpolicy_gamma is None
    assert DEMO_PRESET["critique_on"] == "wrong"


def test_preset_paper_sets_the_published_form_and_file_keys_win(tmp_path: Path):
    cfg = TrainConfig(preset="paper")
    for name, value in PRESETS["paper"].items():
        assert getattr(cfg, name) == value, name
    assert cfg.critique_on == "all_wrong_groups" and cfg.offpolicy_gamma == 0.1
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"preset": "paper", "critique_on": "wrong", "max_steps": 5}))
    mixed = load_config(p)
    assert mixed.preset == "paper" and mixed.critique_on == "wrong" and mixed.offpolicy_gamma == 0.1
    # the saved config reloads to the same settings
    saved = tmp_path / "saved.yaml"
    mixed.save_yaml(saved)
    assert load_config(saved) == mixed
    with pytest.raises(ConfigError, match="preset"):
        TrainConfig(preset="papers")


# ---------------------------------------------------------------------------------------------------------
# reference: hidden


def _critic(url: str | None = None, **kw) -> OpenAICritic:
    return OpenAICritic("critic-test", base_url=url or "http://127.0.0.1:9/v1", max_retries=0, timeout_s=5, **kw)


def test_hidden_reference_never_reaches_the_prompt():
    req = CritiqueRequest(question="47+38=", response="75", reference="85", verdict=False)
    shown = _critic().messages(req)[-1]["content"]
    hidden = _critic(reference="hidden").messages(req)[-1]["content"]
    assert "Reference answer" in shown and "85" in shown
    assert "Reference answer" not in hidden and "85" not in hidden
    assert "47+38=" in hidden and "75" in hidden


def test_hidden_reference_fallback_quotes_no_answer():
    req = CritiqueRequest(question="47+38=", response="75", reference="85", verdict=False)
    with CriticServer([{"content": "Fine.\nVerdict: correct"}]) as srv:  # always contradicts the verifier
        hidden = _critic(srv.base_url, reference="hidden", max_regenerations=1).critique([req])[0]
        shown = _critic(srv.base_url, max_regenerations=1).critique([req])[0]
    assert hidden.fallback and hidden.kind == "indicative" and "85" not in hidden.text
    assert shown.fallback and shown.kind == "ground_truth" and "85" in shown.text


def test_config_rejects_hidden_reference_with_an_answer_quoting_fallback():
    with pytest.raises(ConfigError, match="fallback_kind"):
        CriticConfig(backend="openai", model="m", kind="cot", reference="hidden", fallback_kind="ground_truth")
    with pytest.raises(ConfigError, match="reference"):
        CriticConfig(backend="rule", kind="ground_truth", reference="hidden")


# ---------------------------------------------------------------------------------------------------------
# verdict accuracy against the verifier


def test_verdict_scores_by_hand():
    # 10 checked, 7 agreed; TP 4, FP 1, FN 2  -> precision 4/5, recall 4/6
    s = verdict_scores(10, 7, 4, 1, 2)
    assert s == {"accuracy": 0.7, "precision_wrong": 0.8, "recall_wrong": 4 / 6}
    assert verdict_scores(0, 0, 0, 0, 0) == {"accuracy": None, "precision_wrong": None, "recall_wrong": None}


def test_first_try_verdicts_are_scored_against_the_verifier():
    """Responses a/b are wrong, c/d right; the critic calls a and c incorrect, b and d correct:
    TP = a, FN = b, FP = c, agree = a, d -> accuracy 2/4, precision 1/2, recall 1/2. Regenerations of the
    disagreeing ones are not counted again."""
    says = {"a": "incorrect", "b": "correct", "c": "incorrect", "d": "correct"}

    def respond(body: dict) -> dict:
        prompt = body["messages"][-1]["content"]
        resp = prompt.split("Response:\n", 1)[1].split("\n", 1)[0].strip()
        return {"content": f"Checked.\nVerdict: {says[resp]}"}

    truth = {"a": False, "b": False, "c": True, "d": True}
    reqs = [CritiqueRequest(question="q", response=r, verdict=v) for r, v in truth.items()]
    with CriticServer(responder=respond) as srv:
        critic = _critic(srv.base_url, reference="hidden", max_regenerations=2)
        critic.critique(reqs)
        m = critic.metrics()
        assert srv.requests == 4 + 2 * 2  # b and c regenerated twice, then fell back
    assert m["critique/verdict_accuracy"] == 0.5
    assert m["critique/verdict_precision_wrong"] == 0.5 and m["critique/verdict_recall_wrong"] == 0.5
    assert m["critic/verdicts_checked"] == 4 and m["critic/regenerations"] == 4
    again = critic.metrics()  # per-step values cover the critiques since the previous read
    assert again["critique/verdict_accuracy"] is None and again["critique/verdicts_checked"] == 0
    assert again["critic/verdicts_agreed"] == 2  # the cumulative counters stay


def test_cache_stores_the_request_and_upgrades_old_files(tmp_path: Path):
    old = tmp_path / "old.sqlite"
    con = sqlite3.connect(old)
    con.execute("CREATE TABLE critic_cache (key TEXT PRIMARY KEY, model TEXT NOT NULL, text TEXT NOT NULL, "
                "prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0, "
                "created REAL NOT NULL)")
    con.execute("INSERT INTO critic_cache VALUES ('k', 'm', 'Verdict: correct', 3, 2, 1.0)")
    con.commit()
    con.close()
    cache = CritiqueCache(old)
    [rec] = cache.records()
    assert rec["question"] is None and rec["prompt_tokens"] == 3
    cache.close()
    path = tmp_path / "c.sqlite"
    req = CritiqueRequest(question="47+38=", response="75", reference="85", verdict=False)
    with CriticServer([{"content": "Carry.\nVerdict: incorrect", "usage": (40, 6)}]) as srv:
        critic = _critic(srv.base_url, reference="hidden", cache_path=path)
        critic.critique([req])
        critic.close()
    [rec] = CritiqueCache(path).records()
    assert (rec["question"], rec["response"], rec["reference"], rec["verdict"]) == ("47+38=", "75", "85", False)
    assert rec["regeneration"] == 0 and rec["reference_shown"] is False and rec["prompt_tokens"] == 40


# ---------------------------------------------------------------------------------------------------------
# a small critic trained in-repo, used through the trainer with the reference hidden


@pytest.fixture(scope="module")
def tiny_critic_dir(tmp_path_factory) -> Path:
    from critique_rl.critics.train_critic import rule_critique_examples, train_critic_model

    out = tmp_path_factory.mktemp("critic")
    examples = rule_critique_examples("addition", 200, seed=0)
    assert {e["verdict"] for e in examples} == {True, False}
    assert all(e["critique"].endswith("Verdict: " + ("correct" if e["verdict"] else "incorrect")) for e in examples)
    return train_critic_model(examples, out, steps=15, batch_size=16, hidden_size=64, heads=2, layers=1)


def test_trained_critic_directory_loads_as_an_hf_critic(tiny_critic_dir: Path):
    from critique_rl.critics.train_critic import CARD, rule_critique_examples, score_critic

    card = json.loads((tiny_critic_dir / CARD).read_text())
    assert card["reference"] == "hidden" and card["examples"] > 100 and card["steps"] == 15
    held = rule_critique_examples("addition", 12, seed=1, split="eval")
    scores = score_critic(tiny_critic_dir, held, max_new_tokens=8)
    assert scores["n"] == 12 and 0.0 <= scores["agreement"] <= 1.0 and 0.0 <= scores["unparsable"] <= 1.0


def test_hidden_reference_critic_logs_verdict_accuracy_every_step(fast_config, tiny_critic_dir: Path):
    from critique_rl.train.metrics import read_jsonl
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    cfg = fast_config(max_steps=2, critique_on="all", sft_refine_fraction=0.3,
                      critic=CriticConfig(backend="hf", kind="cot", model=str(tiny_critic_dir), reference="hidden",
                                          max_tokens=8, max_regenerations=1))
    trainer = CritiqueGRPOTrainer(args=cfg)
    trainer.train()
    assert trainer.critic.reference == "hidden"
    rows = [r for r in read_jsonl(f"{cfg.output_dir}/metrics.jsonl") if "loss/total" in r]
    assert len(rows) == 2
    for r in rows:
        assert 0.0 <= r["critique/verdict_accuracy"] <= 1.0
        assert "critique/verdict_recall_wrong" in r or r["train/accuracy"] == 1.0
    # every critiqued response had its first-try verdict checked against the verifier
    assert rows[-1]["critic/verdicts_checked"] == sum(r["critique/critiqued"] for r in rows)


def test_critic_train_cli_writes_a_model_and_its_report(tmp_path: Path):
    from typer.testing import CliRunner

    from critique_rl.cli import app

    out = tmp_path / "critic"
    result = CliRunner().invoke(app, ["critic", "train", "--task", "addition", "--examples", "60", "--steps", "3",
                                      "--batch-size", "8", "--eval-examples", "6", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["reference"] == "hidden" and report["held_out_pairs"] == 6
    assert report["verdict_vs_verifier"]["n"] == 6 and (out / "config.json").is_file()
    assert json.loads((out / "critic_report.json").read_text()) == report
    bad = CliRunner().invoke(app, ["critic", "train", "--kind", "cot", "--out", str(out)])
    assert bad.exit_code != 0
