"""A plain agent loop on the ``openai`` client. Point it at ``critique-rl serve`` and the policy learns from it.

The loop (:func:`run_episode`) is ordinary agent code: reset an env, call ``client.chat.completions.create`` turn
by turn, step the env with the reply. Nothing in it knows about training. Two ways to run it:

**Train** (the server is ``critique-rl serve``; only ``--base-url`` changes)::

    critique-rl serve examples/serve_cpu.yaml --port 8000 &
    python examples/agent_loop_openai.py --base-url http://127.0.0.1:8000/v1 --max-turns 3 --workers 4

Each worker asks the server for a task (``EpisodeClient.next_task``), plays it with an ``openai`` client whose
calls carry the episode id (header ``X-Episode-Id``), and reports the return with ``finish`` (on a failure the
env's last reply goes along as feedback). The server records the exact tokens of every call, puts memory and,
for refinements, the critique into the system message (the loop never sees it), and trains on finished groups.
The loop ends when training ends.

**Just act** (any OpenAI-compatible server, e.g. ``vllm serve runs/agent_cpu/final``): the loop plays its own
tasks and may read / write a memory bank around each episode (``--bank``; lessons before acting, outcomes after).

The API key is read from ``$OPENAI_API_KEY`` (a local server accepts any value; ``critique-rl serve
--api-key-env NAME`` checks it).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from typing import Any

import openai
from openai import OpenAI

from critique_rl.agents.env import Env, as_step_result
from critique_rl.agents.guess import GuessNumberEnv, make_tasks
from critique_rl.config import MemoryConfig
from critique_rl.memory import MemoryBank

LIMIT_CODES = ("max_turns_exceeded", "context_length_exceeded")


def run_episode(client: OpenAI, model: str, env: Env, task: dict[str, Any], bank: MemoryBank | None = None,
                max_turns: int = 4, task_name: str = "guess_number", max_tokens: int = 8) -> dict[str, Any]:
    """One episode: (retrieve) -> act turn by turn -> (record). Returns a JSON-ready summary."""
    first = env.reset(task)
    got = bank.retrieve(f"{task['prompt']}", tags=[task_name]) if bank is not None else None
    messages: list[dict[str, str]] = [{"role": "system", "content": got.text}] if got else []
    messages.append({"role": "user", "content": str(first)})
    reward, success, done, stopped = 0.0, False, False, None
    for _ in range(max_turns):
        try:
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                   temperature=0.0)
        except openai.BadRequestError as exc:  # a training server stops an episode at its limits
            code = (exc.body or {}).get("code") if isinstance(exc.body, dict) else None
            if code not in LIMIT_CODES:
                raise
            stopped = code
            break
        action = reply.choices[0].message.content or ""
        messages.append({"role": "assistant", "content": action})
        step = as_step_result(env.step(action))
        reward += step.reward
        messages.append({"role": "user", "content": step.observation})
        if step.done:
            done, success = True, bool(step.info.get("success", reward > 0))
            break
    if bank is not None:
        # the env's last reply is the critique here; plug in a critic (critique_rl.critics) for richer lessons
        transcript = [m for m in messages if m["role"] != "system"]
        bank.record(task=task["prompt"], trajectory=transcript, reward=reward, success=success,
                    critique=None if success else messages[-1]["content"], reference=str(task.get("answer")),
                    task_name=task_name)
        if got:
            bank.credit(got, success)
    return {"task": task["prompt"], "success": success, "done": done, "reward": reward,
            "turns": sum(m["role"] == "assistant" for m in messages), "memory_used": bool(got), "stopped": stopped,
            "last_observation": messages[-1]["content"],
            "actions": [m["content"] for m in messages if m["role"] == "assistant"]}


def is_training_server(base_url: str, api_key: str | None) -> bool:
    """True when ``base_url`` is ``critique-rl serve`` (it answers ``/v1/episodes/stats``)."""
    from critique_rl.agents.client import EpisodeClient, ServerError

    try:
        EpisodeClient(base_url, api_key=api_key, timeout=10.0).stats()
    except (ServerError, OSError):
        return False
    return True


def train_worker(base_url: str, api_key: str | None, model: str, max_turns: int, max_tokens: int = 8,
                 max_episodes: int | None = None, env_kwargs: dict[str, Any] | None = None,
                 on_episode: Any = None) -> list[dict[str, Any]]:
    """Play the server's tasks until it hands out none (training ended) or ``max_episodes`` are done."""
    from critique_rl.agents.client import EpisodeClient, ServerError

    hub = EpisodeClient(base_url, api_key=api_key)
    out: list[dict[str, Any]] = []
    while max_episodes is None or len(out) < max_episodes:
        try:
            ep = hub.next_task(timeout=10.0)
        except (ServerError, OSError):
            break  # the server went away or stopped handing out (training ended)
        if ep is None:
            try:
                if not hub.stats().get("closed", False):
                    continue  # the trainer is between steps
            except (ServerError, OSError):
                pass
            break
        try:
            with hub.openai(ep.episode_id, max_retries=0, timeout=120.0) as client:  # closes its connections
                result = run_episode(client, model, GuessNumberEnv(**(env_kwargs or {"max_guesses": max_turns})),
                                     ep.task, max_turns=max_turns, max_tokens=max_tokens)
        except openai.APIStatusError as exc:  # the episode was dropped (timed out) or the server stopped
            out.append({"episode_id": ep.episode_id, "error": str(exc)[:200]})
            continue
        except openai.APIConnectionError:
            break
        feedback = None if result["success"] else result["last_observation"]
        try:
            res = hub.finish(ep.episode_id, reward=result["reward"], success=result["success"], feedback=feedback)
        except ServerError as exc:
            res = {"accepted": False, "reason": exc.message}
        except OSError:
            break
        result.update(episode_id=ep.episode_id, accepted=res.get("accepted"))
        out.append(result)
        if on_episode is not None:
            on_episode(result)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="policy")
    p.add_argument("--bank", default=None, help="memory bank (SQLite) read/written by the loop itself (not with "
                   "critique-rl serve, which keeps its own)")
    p.add_argument("--episodes", type=int, default=10, help="episodes to play (training: per worker; 0 = until "
                   "training ends)")
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="concurrent loops (training server only)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--embeddings", default="auto", choices=["auto", "lexical", "sentence_transformers"],
                   help="bank retrieval backend (auto: sentence-transformers when installed)")
    args = p.parse_args(argv)
    api_key = os.environ.get("OPENAI_API_KEY") or None
    results: list[dict[str, Any]] = []
    if is_training_server(args.base_url, api_key):
        lock = threading.Lock()

        def echo(r: dict[str, Any]) -> None:
            with lock:
                print(json.dumps({k: r[k] for k in ("episode_id", "success", "turns", "accepted")}), flush=True)

        outs: list[list[dict[str, Any]]] = [[] for _ in range(args.workers)]

        def worker(i: int) -> None:
            outs[i] = train_worker(args.base_url, api_key, args.model, args.max_turns, args.max_tokens,
                                   max_episodes=args.episodes or None, on_episode=echo)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.workers)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        results = [r for o in outs for r in o]
    else:
        client = OpenAI(base_url=args.base_url, api_key=api_key or "EMPTY", max_retries=1, timeout=60.0)
        bank = MemoryBank(args.bank, config=MemoryConfig(embeddings=args.embeddings)) if args.bank else None
        try:
            for task in make_tasks("agent_loop", args.episodes, args.seed):
                results.append(run_episode(client, args.model, GuessNumberEnv(max_guesses=args.max_turns), task, bank,
                                           max_turns=args.max_turns, max_tokens=args.max_tokens))
                print(json.dumps(results[-1]))
        finally:
            if bank is not None:
                bank.close()
    played = [r for r in results if "success" in r]
    rate = sum(r["success"] for r in played) / max(1, len(played))
    print(json.dumps({"episodes": len(played), "success_rate": rate}))
    return results


if __name__ == "__main__":
    main()
