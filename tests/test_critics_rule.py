"""RuleCritic, shared critic machinery (verdict parsing, fallback, metrics, sync/async) and the factory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from critique_rl.config import CriticConfig
from critique_rl.critics import (
    Critic,
    Critique,
    CritiqueRequest,
    OpenAICritic,
    RuleCritic,
    build_critic,
    parse_verdict,
)
from critique_rl.critics.base import resolve_fallback_kind
from critique_rl.errors import UserError
from critique_rl.templates import render

METRIC_KEYS = {
    "critic/requests", "critic/errors", "critic/fallbacks", "critic/cache_hits", "critic/latency_p50",
    "critic/latency_p95", "critic/verdict_disagreements", "critic/regenerations", "critic/prompt_tokens",
    "critic/completion_tokens",
}


def req(response="84", reference="85", verdict=False, **meta) -> CritiqueRequest:
    return CritiqueRequest("47+38=", response, reference=reference, verdict=verdict, metadata=meta)


def test_ground_truth_texts_are_short_and_useful():
    critic = RuleCritic("ground_truth")
    wrong, right, unknown = critic.critique([req(), req("85", verdict=True), req("86", verdict=None)])
    assert wrong.text == "Your answer 84 is incorrect. The correct answer is 85."
    assert wrong.verdict is False and wrong.kind == "ground_truth" and not wrong.fallback
    assert right.text == "Your answer 85 is correct." and right.verdict is True
    assert "The correct answer is 85." in unknown.text and unknown.verdict is None
    assert all(len(c.text) < 120 for c in (wrong, right, unknown))


def test_indicative_has_verdict_only():
    critic = RuleCritic("indicative")
    [wrong, right] = critic.critique([req(), req("85", verdict=True)])
    assert wrong.text.startswith("Your answer 84 is incorrect.") and "85" not in wrong.text
    assert right.text == "Your answer 85 is correct."
    assert wrong.kind == right.kind == "indicative"


def test_answer_comes_from_metadata_or_final_answer_span():
    critic = RuleCritic("ground_truth")
    [a, b, c] = critic.critique([
        req("I think 40+40=80 and 7+8=15 so \\boxed{95}"),
        req("long reasoning ... 84", answer="84"),
        req(""),
    ])
    assert a.text.startswith("Your answer 95 is incorrect.")
    assert b.text.startswith("Your answer 84 is incorrect.")
    assert c.text == "Your answer is incorrect. The correct answer is 85."


def test_ground_truth_without_reference_falls_back_to_indicative():
    critic = RuleCritic("ground_truth")
    [c] = critic.critique([req(reference=None)])
    assert c.fallback and c.kind == "indicative" and "reference" in c.error
    assert c.text.startswith("Your answer 84 is incorrect.")
    m = critic.metrics()
    assert m["critic/fallbacks"] == 1 and m["critic/errors"] == 0 and m["critic/requests"] == 1


def test_fallback_kind_resolution():
    with_ref, without = req(), req(reference=None)
    assert resolve_fallback_kind("auto", with_ref) == "ground_truth"
    assert resolve_fallback_kind("auto", without) == "indicative"
    assert resolve_fallback_kind("indicative", with_ref) == "indicative"
    assert resolve_fallback_kind("ground_truth", without) == "indicative"


def test_parse_verdict():
    assert parse_verdict("step 1 ok\nstep 2 wrong carry\nVerdict: incorrect") is False
    assert parse_verdict("All good.\nVerdict: correct") is True
    assert parse_verdict("**Verdict:** Incorrect") is False
    assert parse_verdict("verdict = right") is True
    assert parse_verdict("Verdict: correct\n...on second thought\nVerdict: wrong") is False  # last one wins
    assert parse_verdict("The answer is correct.") is None  # no verdict line
    assert parse_verdict("") is None


def test_protocol_metrics_and_to_dict():
    critic = RuleCritic()
    assert isinstance(critic, Critic)
    assert critic.critique([]) == []
    critic.critique([req(), req(verdict=True)])
    m = critic.metrics()
    assert METRIC_KEYS <= set(m)
    assert m["critic/requests"] == 2 and m["critic/latency_p95"] >= m["critic/latency_p50"] >= 0
    assert critic.metrics(reset=True)["critic/requests"] == 2
    assert critic.metrics()["critic/requests"] == 0
    d = Critique("t", False, "indicative", latency_s=0.5).to_dict()
    assert {"text", "verdict", "kind", "fallback", "latency", "error"} <= set(d)


def test_sync_and_async_apis():
    critic = RuleCritic()
    out = asyncio.run(critic.acritique([req()]))
    assert out[0].verdict is False

    async def inside_loop():
        return critic.critique([req()])  # sync call while a loop is running

    assert asyncio.run(inside_loop())[0].text == out[0].text


def test_critique_text_is_data_not_code(tmp_path: Path):
    evil = "{{ 7*7 }} {% for x in range(3) %}x{% endfor %} $(rm -rf ~); `id` | cat /etc/passwd && echo ../../etc"
    critic = RuleCritic("ground_truth")
    [c] = critic.critique([req(reference=evil, answer="{{ 7*7 }}")])
    assert "{{ 7*7 }}" in c.text and "49" not in c.text
    assert evil in c.text  # the reference comes back literally
    # a critique rendered into a (user) template stays literal text
    (tmp_path / "refine_test.j2").write_text("Feedback: {{ critique }}\nTry again.")
    rendered = render("refine_test.j2", str(tmp_path), critique=c.text)
    assert rendered == f"Feedback: {c.text}\nTry again."
    assert "49" not in rendered and "xxx" not in rendered
    # and into the packaged cot prompt
    cot = render("critique_cot.j2", question=evil, response=evil, reference=None)
    assert cot.count(evil) == 2


def test_user_template_dir_overrides_and_sandbox(tmp_path: Path):
    (tmp_path / "critique_indicative.j2").write_text("WRONG: {{ answer }}{% if verdict %} (ok){% endif %}")
    critic = RuleCritic("indicative", template_dir=str(tmp_path))
    assert critic.critique([req()])[0].text == "WRONG: 84"
    (tmp_path / "critique_ground_truth.j2").write_text("{{ answer.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(UserError, match="forbidden by the sandbox"):  # the sandbox holds; one line, no stack
        RuleCritic("ground_truth", template_dir=str(tmp_path)).critique([req()])


def test_rule_critic_rejects_cot():
    with pytest.raises(ValueError, match="cot"):
        RuleCritic("cot")


def test_build_critic(tmp_path: Path, monkeypatch):
    assert build_critic(CriticConfig(backend="none")) is None
    rule = build_critic(CriticConfig(backend="rule", kind="indicative", fallback_kind="indicative"))
    assert isinstance(rule, RuleCritic) and rule.kind == "indicative" and rule.fallback_kind == "indicative"

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UserError, match="OPENAI_API_KEY"):
        build_critic(CriticConfig(backend="openai", model="gpt-4o-mini", kind="cot"))
    cfg = CriticConfig(backend="openai", model="m", kind="cot", base_url="http://127.0.0.1:8000/v1",
                       max_concurrency=2, timeout_s=1.5, max_retries=1, max_regenerations=1)
    api = build_critic(cfg, output_dir=tmp_path)
    assert isinstance(api, OpenAICritic)
    assert (api.max_concurrency, api.timeout_s, api.max_retries, api.max_regenerations) == (2, 1.5, 1, 1)
    assert (tmp_path / "critic_cache.sqlite").exists()
    api.close()
    cfg.cache_path = str(tmp_path / "elsewhere.sqlite")
    build_critic(cfg, output_dir=tmp_path).close()
    assert (tmp_path / "elsewhere.sqlite").exists()
    with pytest.raises(UserError, match="critic.model"):
        build_critic(CriticConfig(backend="hf", kind="cot"))


def test_free_form_prompt_needs_a_model():
    [c] = RuleCritic().critique([req(prompt="Summarise the failure as JSON")])
    assert c.text == "" and c.fallback and "cannot answer free-form prompts" in c.error
