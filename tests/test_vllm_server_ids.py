"""The vLLM server engine takes token-id prompts (``generate_ids``): episode contexts reach ``/v1/completions`` as
the exact ids the runner built, and request seeds follow torch's generator (so ``agent.seed_per_task`` holds in
server mode). Against a loopback OpenAI-compatible completions server on 127.0.0.1 that answers with ids derived
from the prompt ids and the seed; the real ``vllm serve`` is exercised in tests/test_vllm_engine.py (marker vllm)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from critique_rl.agents.episode_seeds import seeded
from critique_rl.agents.guess import GuessNumberEnv, make_tasks
from critique_rl.agents.runner import EpisodeLimits, run_episodes
from critique_rl.agents.trajectory import TINY_CHAT_TEMPLATE, TurnRenderer
from critique_rl.config import VLLMConfig
from critique_rl.models import build_tiny_model, build_tiny_tokenizer
from critique_rl.rollout import SamplingParams
from critique_rl.rollout.vllm import VLLMServerGenerator


class _Completions(BaseHTTPRequestHandler):
    bodies: list[dict] = []
    eos = 2

    def log_message(self, *args) -> None:  # quiet
        return None

    def _send(self, data: dict) -> None:
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:  # noqa: N802
        self._send({"data": [{"id": "tiny"}]})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
        if not self.path.endswith("/completions"):
            return self._send({})
        type(self).bodies.append(body)
        choices = []
        for i, ids in enumerate(body["prompt"]):
            for j in range(body["n"]):
                tok = 3 + (sum(ids) + body["seed"] + j) % 40  # a digit-ish token, then EOS
                choices.append({"index": i * body["n"] + j, "token_ids": [tok, self.eos], "finish_reason": "stop",
                                "logprobs": {"token_logprobs": [-0.25, -0.5]}})
        self._send({"choices": choices})


@pytest.fixture()
def engine():
    tok = build_tiny_tokenizer(["Guess my number from 1 to 8.", "Higher. Lower. 12345678"] * 10, vocab_size=120)
    tok.chat_template = TINY_CHAT_TEMPLATE
    _Completions.bodies = []
    _Completions.eos = tok.eos_token_id
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Completions)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    model = build_tiny_model(tok, hidden_size=32, layers=1, heads=1, seed=0)
    gen = VLLMServerGenerator(model, tok, VLLMConfig(mode="server", base_url=f"http://127.0.0.1:{srv.server_port}/v1"),
                              batch_size=2, push_on_start=False)
    try:
        yield gen, tok
    finally:
        gen.close()
        srv.shutdown()
        srv.server_close()


def test_generate_ids_sends_the_ids_as_they_are(engine):
    gen, tok = engine
    prompts = [[5, 9, 9, 5], [7], [11, 12, 13]]  # not what tokenizing any text would give back
    groups = gen.generate_ids(prompts, SamplingParams(n=2, max_new_tokens=4))
    assert [b["prompt"] for b in _Completions.bodies] == [prompts[:2], prompts[2:]]  # batch_size 2 per request
    assert [len(g) for g in groups] == [2, 2, 2]
    for g in groups:
        for c in g:
            assert c.finished and c.token_ids[-1] == tok.eos_token_id and c.logprobs == [-0.25, -0.5]


def test_request_seeds_follow_torch_so_seeded_blocks_repeat(engine):
    gen, _ = engine
    params = SamplingParams(n=1, max_new_tokens=2)
    with seeded(123):
        a = gen.generate_ids([[4, 4]], params)
    with seeded(123):
        b = gen.generate_ids([[4, 4]], params)
    with seeded(124):
        gen.generate_ids([[4, 4]], params)
    seeds = [body["seed"] for body in _Completions.bodies]
    assert seeds[0] == seeds[1] != seeds[2]
    assert a[0][0].token_ids == b[0][0].token_ids


def test_episodes_through_the_server_are_token_exact(engine):
    gen, tok = engine
    renderer = TurnRenderer(tok, True)
    tasks = make_tasks("train", 2, 0, lo=1, hi=8)
    trajs = run_episodes(gen, renderer, lambda: GuessNumberEnv(max_guesses=3), tasks, n=1,
                         limits=EpisodeLimits(max_turns=3, max_new_tokens=4))
    sent = [p for body in _Completions.bodies for p in body["prompt"]]
    for x in trajs:  # every turn's context went out as the runner's ids: first prompt, then action + observation
        ctx = list(x.turns[0].obs_ids)
        for k, turn in enumerate(x.turns):
            assert ctx in sent
            ctx = ctx + turn.action_ids + (x.turns[k + 1].obs_ids if k + 1 < len(x.turns) else [])
    assert any(x.num_turns > 1 for x in trajs)
