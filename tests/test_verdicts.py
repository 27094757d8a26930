"""Verdict formats of cot critiques: ``Verdict: ...``, the Critique-GRPO paper's ``Conclusion: right/wrong``,
and a user regex ``critic.verdict_pattern`` (validated at config load); replies without one still fall back."""

from __future__ import annotations

import pytest
from critic_server import CriticServer

from critique_rl.config import CriticConfig, load_config
from critique_rl.critics import CritiqueRequest, OpenAICritic, parse_verdict
from critique_rl.critics.factory import build_critic
from critique_rl.errors import ConfigError

WRONG = CritiqueRequest("47+38=", "47+38 = 84", reference="85", verdict=False, metadata={"answer": "84"})
RIGHT = CritiqueRequest("12+30=", "42", reference="42", verdict=True)
PAPER_WRONG = ("Step 1: 7 + 8 = 15, write 5 carry 1.\nStep 2: 4 + 3 + 1 = 8, but the response wrote 8 without "
               "the carry... it wrote 84.\nConclusion: wrong")


def test_paper_conclusion_form():
    assert parse_verdict(PAPER_WRONG) is False
    assert parse_verdict("All steps hold.\nConclusion: right") is True
    assert parse_verdict("**Conclusion:** Wrong") is False
    assert parse_verdict("conclusion: correct") is True
    assert parse_verdict("Verdict: correct\nOn reflection.\nConclusion: wrong") is False  # the last one wins
    assert parse_verdict("In conclusion, the answer is right.") is None  # prose is not a verdict line
    assert parse_verdict("The steps look fine.") is None


def test_custom_pattern():
    pat = r"Final grade:\s*\**(pass|fail)"
    assert parse_verdict("... Final grade: FAIL", pat) is False
    assert parse_verdict("... Final grade: **pass**", pat) is True
    assert parse_verdict("... Final grade: PASS\nFinal grade: fail", pat) is False
    assert parse_verdict("Verdict: correct", pat) is True  # no match: the built-in forms still apply
    assert parse_verdict("Final grade: maybe", r"Final grade:\s*(\w+)") is None  # unknown word, no built-in
    assert parse_verdict("Score 1/1", r"Score (\d)/1") is True


@pytest.mark.parametrize("bad, fix", [("Grade: (pass", "not a valid regular expression"),
                                      ("Grade: pass|fail", "capturing group")])
def test_verdict_pattern_validated_at_config_load(tmp_path, bad, fix):
    with pytest.raises(ConfigError, match=rf"critic\.verdict_pattern.*{fix}"):
        CriticConfig(verdict_pattern=bad)
    path = tmp_path / "run.yaml"
    path.write_text(f"critic:\n  verdict_pattern: '{bad}'\n")
    with pytest.raises(ConfigError, match=r"critic\.verdict_pattern"):
        load_config(path)
    ok = tmp_path / "ok.yaml"
    ok.write_text("critic:\n  verdict_pattern: 'Grade:\\s*(pass|fail)'\n")
    assert load_config(ok).critic.verdict_pattern == r"Grade:\s*(pass|fail)"


def test_critic_constructor_rejects_a_bad_pattern():
    with pytest.raises(ValueError, match="verdict_pattern"):
        OpenAICritic(model="m", kind="indicative", verdict_pattern="(")


def _critic(server, **kw) -> OpenAICritic:
    return OpenAICritic(model="critic-test", kind="cot", base_url=server.base_url, timeout_s=2.0, max_retries=0,
                        max_regenerations=2, **kw)


def test_paper_form_reply_is_accepted_without_regeneration(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with CriticServer([{"content": PAPER_WRONG}]) as server:
        [c] = _critic(server).critique([WRONG])
    assert c.fallback is False and c.kind == "cot" and c.verdict is False and c.regenerations == 0
    assert server.requests == 1


def test_configured_pattern_reaches_the_critic_and_no_verdict_still_falls_back(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    def respond(body):
        prompt = body["messages"][-1]["content"]
        return {"content": "Carry dropped.\nFinal grade: FAIL" if "47+38" in prompt else "Looks fine, no verdict"}

    with CriticServer(responder=respond) as server:
        cfg = CriticConfig(backend="openai", kind="cot", model="critic-test", base_url=server.base_url,
                           max_retries=0, max_regenerations=2, verdict_pattern=r"Final grade:\s*(pass|fail)")
        critic = build_critic(cfg)
        assert critic.verdict_pattern.pattern == cfg.verdict_pattern
        graded, silent = critic.critique([WRONG, RIGHT])
    assert graded.fallback is False and graded.verdict is False and graded.regenerations == 0
    assert silent.fallback is True and "no parseable verdict" in silent.error and silent.regenerations == 2
    assert critic.metrics()["critic/unparsable_verdicts"] == 3
