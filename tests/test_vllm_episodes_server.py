"""Episodes through a real ``vllm serve`` (``vllm.mode: server``; marker ``vllm``, run in the vLLM CPU venv)::

    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_episodes_server.py

The runner sends every turn's context to ``/v1/completions`` as token ids (``VLLMServerGenerator.generate_ids``);
the server's log-probs of the sampled action tokens equal the trainer's scoring of the same episode tokens, which
only holds when the contexts the server saw are exactly the ids the trajectory keeps.
"""

from __future__ import annotations

import pytest
import torch
from test_vllm_engine import CHAT_TEMPLATE, LOGPROB_ATOL, _load, plain_dir, server  # noqa: F401 - fixtures

from critique_rl.agents.guess import GuessNumberEnv, make_tasks
from critique_rl.agents.runner import EpisodeLimits, run_episodes
from critique_rl.agents.trajectory import TurnRenderer
from critique_rl.config import VLLMConfig
from critique_rl.rollout.factory import build_generator
from critique_rl.train.batching import pack
from critique_rl.train.update import score_tokens

pytestmark = pytest.mark.vllm


def test_episodes_through_vllm_serve_are_token_exact(server, plain_dir, tmp_path):  # noqa: F811
    model, tok = _load(plain_dir)
    tok.chat_template = CHAT_TEMPLATE
    gen = build_generator("vllm", model, tok, vllm_config=VLLMConfig(mode="server", base_url=server), workdir=tmp_path)
    assert callable(getattr(gen, "generate_ids", None))
    renderer = TurnRenderer(tok, True)
    tasks = make_tasks("train", 3, 0, lo=1, hi=8)
    trajs = run_episodes(gen, renderer, lambda: GuessNumberEnv(max_guesses=3), tasks, n=2,
                         limits=EpisodeLimits(max_turns=3, max_new_tokens=6), temperature=1.0)
    assert any(x.num_turns > 1 for x in trajs)
    rows = [x for x in trajs if x.turns]
    batch = pack([x.prompt_ids for x in rows], [x.completion_ids() for x in rows], tok.pad_token_id)
    train = score_tokens(model, batch, 1.0, 16)[0]
    eng = torch.zeros_like(train)
    act = torch.zeros_like(train, dtype=torch.bool)
    for r, x in enumerate(rows):
        eng[r, : len(x.sampling_logprobs())] = torch.tensor(x.sampling_logprobs())
        act[r, : len(x.action_mask())] = torch.tensor(x.action_mask())
    assert act.sum() > 0
    assert torch.allclose(train[act], eng[act], atol=LOGPROB_ATOL), (train[act] - eng[act]).abs().max()
