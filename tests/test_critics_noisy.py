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


def test_constraints_misleading_spec_names_a_wrong_sum_and_flips_the_parity_rule():
    import random

    from critique_rl.tasks.constraints import misleading_spec, parse_spec, violations

    ref = "sum=15 first=3 end=odd tag=kir"
    for seed in range(30):
        spec = misleading_spec(ref, "3514", random.Random(seed))  # own sum 13, even last digit (the trap mistake)
        total, first, end, tag = parse_spec(spec)
        assert (first, end, tag) == (3, "even", "kir") and total != 13 and 12 <= total <= 18 and total != 15
        # the critique under the wrong spec calls the sum wrong and says nothing of the (real) parity problem
        assert violations("3514", spec) == [f"its digits sum to 13, not {total}"]
    # a right-parity answer is told to change its parity (a wrong fix)
    spec = misleading_spec(ref, "3615", random.Random(0))
    assert any("end in an even digit" in v for v in violations("3615", spec))


def test_hint_errors_use_the_tasks_wrong_reference_through_the_constraints_templates():
    from critique_rl.tasks.constraints import TEMPLATE_DIR, misleading_spec

    reqs = [CritiqueRequest(question=f"q{i}", response="3514", reference="sum=15 first=3 end=odd tag=kir",
                            verdict=False, metadata={"answer": "3514"}) for i in range(20)]
    inner = RuleCritic(kind="ground_truth", template_dir=str(TEMPLATE_DIR))
    truth = inner.critique(reqs[:1])[0].text
    assert "kir answers end in an odd digit" in truth  # the error-free critique names the real fix
    critic = NoisyCritic(inner, error_rate=1.0, error_kind="hint", seed=0, template_dir=str(TEMPLATE_DIR),
                         wrong_reference=misleading_spec)
    out = critic.critique(reqs)
    assert all(c.verdict is False and not c.fallback for c in out)
    assert all("end in an odd digit" not in c.text and "its digits sum to 13, not 1" in c.text for c in out)
    assert critic.metrics()["critic/errors_delivered"] == 20


def test_trainer_gives_the_noisy_critic_its_tasks_wrong_reference(fast_config):
    from critique_rl.tasks.constraints import misleading_spec
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    cfg = fast_config(task="constraints_plateau", max_steps=0, sft_steps=2, eval_n=4, eval_batch_size=4,
                      critique_on="wrong", critic=CriticConfig(backend="noisy", kind="ground_truth",
                                                                 error_rate=0.3, error_kind="hint"))
    trainer = CritiqueGRPOTrainer(args=cfg)
    trainer.train()
    assert trainer.critic.wrong_reference is misleading_spec
