"""The error-injecting critic (`critic.backend: noisy`): flipped verdicts, misleading hints, the verifier check."""

from __future__ import annotations

import pytest

from critique_rl.config import CriticConfig
from critique_rl.critics import RuleCritic, build_critic
from critique_rl.critics.base import CritiqueRequest
from critique_rl.critics.noisy import NoisyCritic
from critique_rl.errors import ConfigError, UserError


def _wrong(i: int = 0) -> CritiqueRequest:
    return CritiqueRequest(question=f"{40 + i}+45=", response=str(75 + i), reference=str(85 + i), verdict=False,
                           metadata={"answer": str(75 + i)})


def _right() -> CritiqueRequest:
    return CritiqueRequest(question="40+45=", response="85", reference="85", verdict=True, metadata={"answer": "85"})


def test_zero_error_rate_is_the_inner_critic_word_for_word():
    reqs = [_wrong(i) for i in range(5)] + [_right()]
    plain = RuleCritic(kind="ground_truth").critique(reqs)
    noisy = NoisyCritic(RuleCritic(kind="ground_truth"), error_rate=0.0).critique(reqs)
    assert [c.text for c in noisy] == [c.text for c in plain]
    m = NoisyCritic(RuleCritic(kind="ground_truth"), error_rate=0.0)
    m.critique(reqs)
    assert m.metrics()["critic/errors_injected"] == 0


def test_flipped_verdicts_pass_without_the_check_and_are_replaced_with_it():
    reqs = [_wrong(i) for i in range(200)]
    unchecked = NoisyCritic(RuleCritic(kind="ground_truth"), error_rate=0.3, check=False, seed=1)
    out = unchecked.critique(reqs)
    flipped = [c for c in out if c.verdict is True]
    assert 40 <= len(flipped) <= 80  # ~30% of 200
    assert all(c.text == f"Your answer {r.response} is correct." for r, c in zip(reqs, out, strict=True)
               if c.verdict is True)
    m = unchecked.metrics()
    assert m["critic/errors_delivered"] == len(flipped) == m["critic/errors_injected"]
    assert m["critique/verdict_accuracy"] == pytest.approx(1 - len(flipped) / 200)
    assert m["critique/verdict_recall_wrong"] == pytest.approx(1 - len(flipped) / 200)

    checked = NoisyCritic(RuleCritic(kind="ground_truth"), error_rate=0.3, check=True, max_regenerations=2, seed=1)
    out = checked.critique(reqs)
    assert all(c.verdict is False for c in out)  # nothing the verifier contradicts gets through
    m = checked.metrics()
    assert m["critic/errors_delivered"] == 0 and m["critic/errors_injected"] > 40
    # a draw is wrong with p=0.3 three times in a row for ~2.7% of requests: those fall back to the rule critique
    assert 0 < m["critic/fallbacks"] < 20
    assert all(c.text == f"Your answer {r.response} is incorrect. The correct answer is {r.reference}."
               for r, c in zip(reqs, out, strict=True))
    # per-step (windowed) counters reset on read, the cumulative ones do not
    again = checked.metrics()
    assert again["critique/errors_injected"] == 0 and again["critic/errors_injected"] == m["critic/errors_injected"]


def test_misleading_hints_keep_the_verdict_name_a_wrong_fix_and_pass_the_check():
    reqs = [_wrong(i) for i in range(100)] + [_right()] * 20
    critic = NoisyCritic(RuleCritic(kind="ground_truth"), error_rate=0.5, error_kind="hint", check=True, seed=3)
    out = critic.critique(reqs)
    misled = 0
    for r, c in zip(reqs, out, strict=True):
        assert c.verdict is r.verdict and not c.fallback
        if r.verdict:
            assert c.text == "Your answer 85 is correct."  # a right answer has no fix to mislead with
            continue
        fix = c.text.rsplit("The correct answer is ", 1)[1].rstrip(".")
        assert fix != r.response
        misled += fix != r.reference
    assert 30 <= misled <= 70
    m = critic.metrics()
    assert m["critic/errors_delivered"] == misled and m["critic/regenerations"] == 0


def test_same_seed_same_errors():
    reqs = [_wrong(i) for i in range(50)]
    a = NoisyCritic(RuleCritic(kind="ground_truth"), error_rate=0.3, check=False, seed=7).critique(reqs)
    b = NoisyCritic(RuleCritic(kind="ground_truth"), error_rate=0.3, check=False, seed=7).critique(reqs)
    c = NoisyCritic(RuleCritic(kind="ground_truth"), error_rate=0.3, check=False, seed=8).critique(reqs)
    assert [x.text for x in a] == [x.text for x in b] != [x.text for x in c]


def test_built_from_config_with_the_inner_backend_and_clear_errors():
    critic = build_critic(CriticConfig(backend="noisy", kind="ground_truth", error_rate=0.1, error_kind="hint",
                                       error_check=False, error_seed=4))
    assert isinstance(critic, NoisyCritic) and isinstance(critic.inner, RuleCritic)
    assert critic.error_rate == 0.1 and critic.error_kind == "hint" and not critic.check
    with pytest.raises(ConfigError, match="critic.error_rate"):
        CriticConfig(backend="noisy", error_rate=1.5)
    with pytest.raises(UserError, match="error_inner"):
        build_critic(CriticConfig(backend="noisy", error_inner="noisy"))
