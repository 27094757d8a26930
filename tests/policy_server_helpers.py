"""Shared pieces of the policy-server tests: the tiny in-repo policy, a hub wired to it, a served batch."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from critique_rl.agents.episode_hub import EpisodeHub
from critique_rl.agents.guess import GuessNumberEnv
from critique_rl.agents.runner import EpisodeLimits
from critique_rl.agents.server import PolicyServer, ServeOptions
from critique_rl.agents.trajectory import TINY_CHAT_TEMPLATE, Trajectory, TurnRenderer
from critique_rl.models import build_tiny_model, build_tiny_tokenizer
from critique_rl.rollout.base import Completion, SamplingParams
from critique_rl.rollout.hf import HFGenerator

TEXTS = (["U: Guess my number from 1 to 16.\nA: 4<|eos|>\nU: Higher. It is from 5 to 16.\nA: 8<|eos|>\n"] * 30
         + ["Lower. Correct! Say one number. Out of guesses. It was 12."] * 10)


@dataclass
class Policy:
    tokenizer: Any
    model: Any
    engine: Any
    renderer: TurnRenderer


def tiny_policy(seed: int = 3, hidden_size: int = 64, layers: int = 1) -> Policy:
    torch.set_num_threads(1)
    tok = build_tiny_tokenizer(TEXTS, vocab_size=300)
    tok.chat_template = TINY_CHAT_TEMPLATE
    model = build_tiny_model(tok, hidden_size=hidden_size, layers=layers, heads=hidden_size // 32,
                             max_positions=512, seed=seed)
    return Policy(tok, model, HFGenerator(model, tok), TurnRenderer(tok, use_chat=True))


class RecordingEngine:
    """The real engine, logging every call: (prompt ids, completion) per row, and each call's batch size."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lock = threading.Lock()
        self.rows: list[tuple[tuple[int, ...], Completion]] = []
        self.batch_sizes: list[int] = []

    def sync_weights(self) -> None:
        return None

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        raise AssertionError("the server must call generate_ids (token in / token out)")

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        out = self.inner.generate_ids(prompt_ids, params)
        with self.lock:
            self.batch_sizes.append(len(prompt_ids))
            self.rows.extend((tuple(p), g[0]) for p, g in zip(prompt_ids, out, strict=True))
        return out


def make_hub(policy: Policy, limits: EpisodeLimits | None = None, engine: Any = None, **kw: Any) -> EpisodeHub:
    hub = EpisodeHub(**kw)
    hub.engine = engine if engine is not None else policy.engine
    hub.tokenizer = policy.tokenizer
    hub.renderer = policy.renderer
    hub.limits = limits or EpisodeLimits(max_turns=4, max_new_tokens=6)
    hub.model_name = "tiny-policy"
    return hub


@dataclass
class Played:
    """A batch handed out by ``hub.play`` in a background thread (its trajectories once finished)."""

    thread: threading.Thread
    results: list[Trajectory] = field(default_factory=list)
    error: list[BaseException] = field(default_factory=list)

    def join(self, timeout: float = 30.0) -> list[Trajectory]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "hub.play did not return: an episode was never finished"
        if self.error:
            raise self.error[0]
        return self.results


def play_in_background(hub: EpisodeHub, tasks: Sequence[dict[str, Any]], n: int = 1, **kw: Any) -> Played:
    played = Played(threading.Thread(target=lambda: None))

    def run() -> None:
        try:
            played.results.extend(hub.play(list(tasks), n, poll_s=0.05, **kw))
        except BaseException as exc:  # surfaced by join()
            played.error.append(exc)

    played.thread = threading.Thread(target=run, daemon=True)
    played.thread.start()
    return played


@contextmanager
def serving(hub: EpisodeHub, **options: Any) -> Iterator[PolicyServer]:
    server = PolicyServer(hub, ServeOptions(port=0, **options))
    with server:
        yield server
    hub.close()


def play_guess(chat: Any, task: dict[str, Any], max_turns: int = 4,
               system: str | None = None) -> tuple[list[str], float, bool]:
    """The agent loop: GuessNumberEnv played with ``chat(messages) -> reply``; (replies, return, success)."""
    env = GuessNumberEnv()
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": env.reset(task)})
    replies, ret = [], 0.0
    for _ in range(max_turns):
        reply = chat(messages)
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply})
        step = env.step(reply)
        ret += step.reward
        if step.done:
            return replies, ret, bool(step.info.get("success", ret > 0))
        messages.append({"role": "user", "content": step.observation})
    return replies, ret, ret > 0
