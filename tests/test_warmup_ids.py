"""The episode warm-up trains on the runner's token ids: for the same scripted episodes, every warm-up context is
token for token the context the runner builds (first prompt, then each action's ids and each observation's ids
concatenated), with and without a chat template, critique/lesson contexts included."""

from __future__ import annotations

import pytest

from critique_rl.agents import lookup_env as le
from critique_rl.agents.registry import get_env_spec
from critique_rl.agents.runner import EpisodeLimits, run_episodes
from critique_rl.agents.trajectory import TINY_CHAT_TEMPLATE, TurnRenderer
from critique_rl.agents.warmup import action_ids, scripted_episodes, sft_id_pairs, sft_pairs
from critique_rl.models import build_tiny_tokenizer
from critique_rl.rollout.base import Completion, SamplingParams


class ReplayEngine:
    """Plays given action texts: call ``t`` gets the contexts of the episodes that have a turn ``t`` (in order),
    as the runner sends them, and returns each action's ids (``encode + EOS``, a finished action)."""

    def __init__(self, renderer: TurnRenderer, actions: list[list[str]]) -> None:
        self.renderer, self.actions, self.turn = renderer, actions, 0
        self.seen: list[list[list[int]]] = []

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        live = [a[self.turn] for a in self.actions if len(a) > self.turn]
        assert len(live) == len(prompt_ids)
        self.seen.append([list(p) for p in prompt_ids])
        self.turn += 1
        out = []
        for text in live:
            ids = action_ids(self.renderer, text)
            out.append([Completion(ids, [-0.1] * len(ids), text, True)])
        return out

    def generate(self, prompts, params):  # pragma: no cover - the runner sends ids
        raise AssertionError("the runner should send token ids")


def tokenizer_for(spec, tasks, chat: bool):
    probe = build_tiny_tokenizer(["0123456789"], 300)
    probe.chat_template = TINY_CHAT_TEMPLATE
    texts = [p + c for p, c in sft_pairs(spec, TurnRenderer(probe, chat), tasks, {}, 4, 0.3, 0)]
    tok = build_tiny_tokenizer(texts, 400)
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize("chat", [True, False])
def test_warm_up_ids_equal_the_runners_ids_for_the_same_scripted_episodes(chat):
    spec = get_env_spec("price_lookup")
    tasks = le.make_tasks("train", 120, 0)
    tok = tokenizer_for(spec, tasks, chat)
    renderer = TurnRenderer(tok, use_chat=chat)
    episodes = scripted_episodes(spec, tasks, {}, 4, 0.3, 0)
    assert sum(c is not None for c, _ in episodes) > 20  # critique and lesson contexts are covered
    pairs = sft_id_pairs(spec, renderer, tasks, {}, 4, 0.3, 0)
    assert len(pairs) == sum(t.num_turns for _, t in episodes)

    engine = ReplayEngine(renderer, [[x.action_text for x in t.turns] for _, t in episodes])
    trajs = run_episodes(engine, renderer, lambda: spec.make_env(), [t.task for _, t in episodes], n=1,
                         contexts=[c for c, _ in episodes], limits=EpisodeLimits(max_turns=4, max_new_tokens=12))
    warm = iter(pairs)
    for (_, scripted), traj in zip(episodes, trajs, strict=True):
        assert [x.action_text for x in traj.turns] == [x.action_text for x in scripted.turns]
        assert traj.success == scripted.success
        comp = traj.completion_ids()
        for turn, (start, end) in zip(traj.turns, traj.action_spans(), strict=True):
            context, action = next(warm)
            assert context == traj.prompt_ids + comp[:start]  # the context the engine was given
            assert action == comp[start:end] == turn.action_ids and action[-1] == tok.eos_token_id
    assert next(warm, None) is None
    # the runner really sent those contexts to the engine (turn by turn, in order)
    sent = [c for call in engine.seen for c in call]
    assert sorted(map(tuple, sent)) == sorted(tuple(c) for c, _ in pairs)


def test_re_tokenised_chat_text_is_not_the_runners_ids():
    """Why the warm-up uses ids: with the chat template, tokenising a rendered multi-turn context as one string
    merges across turn boundaries, so many contexts differ from what the runner builds."""
    spec = get_env_spec("price_lookup")
    tasks = le.make_tasks("train", 120, 0)
    tok = tokenizer_for(spec, tasks, True)
    renderer = TurnRenderer(tok, use_chat=True)
    texts = sft_pairs(spec, renderer, tasks, {}, 4, 0.3, 0)
    ids = sft_id_pairs(spec, renderer, tasks, {}, 4, 0.3, 0)
    assert len(texts) == len(ids)
    differ = sum(tok(p, add_special_tokens=False)["input_ids"] != c for (p, _), (c, _) in zip(texts, ids, strict=True))
    assert differ > len(ids) // 4
    # the first turn has no earlier action to merge with: those agree
    firsts = [i for i, (p, _) in enumerate(texts) if p.count("A: ") == 1]
    assert all(tok(texts[i][0], add_special_tokens=False)["input_ids"] == ids[i][0] for i in firsts)
