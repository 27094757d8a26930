"""A plain agent loop: the trained policy behind any OpenAI-compatible endpoint, plus its memory bank.

Serve the policy a run wrote (``runs/agent_cpu/final``; its tokenizer carries the chat template), e.g. with
vLLM, then run this loop against it::

    vllm serve runs/agent_cpu/final --served-model-name policy --port 8000
    python examples/agent_loop_openai.py --base-url http://127.0.0.1:8000/v1 --model policy \\
        --bank runs/agent_cpu/memory.sqlite --episodes 20

Each episode reads lessons and demonstrations from the bank before acting (``bank.retrieve``, rendered into
the system message), plays the env turn by turn with ``client.chat.completions.create``, and records the
outcome after (success -> demonstration, failure -> lesson; ``helped`` credit to what was retrieved). Nothing
here is specific to critique-rl's trainer: swap in your own env and client.
The API key is read from ``$OPENAI_API_KEY`` (a local server accepts any value).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from openai import OpenAI

from critique_rl.agents.env import Env, as_step_result
from critique_rl.agents.guess import GuessNumberEnv, make_tasks
from critique_rl.config import MemoryConfig
from critique_rl.memory import MemoryBank


def run_episode(client: OpenAI, model: str, env: Env, task: dict[str, Any], bank: MemoryBank | None,
                max_turns: int = 4, task_name: str = "guess_number", max_tokens: int = 8) -> dict[str, Any]:
    """One episode: retrieve -> act turn by turn -> record. Returns a JSON-ready summary."""
    first = env.reset(task)
    got = bank.retrieve(f"{task['prompt']}", tags=[task_name]) if bank is not None else None
    messages: list[dict[str, str]] = [{"role": "system", "content": got.text}] if got else []
    messages.append({"role": "user", "content": str(first)})
    reward, success, done = 0.0, False, False
    for _ in range(max_turns):
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                               temperature=0.0)
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
    return {"task": task["prompt"], "success": success, "done": done, "turns": sum(m["role"] == "assistant"
                                                                                   for m in messages),
            "memory_used": bool(got), "actions": [m["content"] for m in messages if m["role"] == "assistant"]}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="policy")
    p.add_argument("--bank", default=None, help="memory bank (SQLite); omit to run without memory")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--embeddings", default="auto", choices=["auto", "lexical", "sentence_transformers"],
                   help="bank retrieval backend (auto: sentence-transformers when installed)")
    args = p.parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY") or "EMPTY", max_retries=1,
                    timeout=60.0)
    bank = MemoryBank(args.bank, config=MemoryConfig(embeddings=args.embeddings)) if args.bank else None
    results = []
    try:
        for task in make_tasks("agent_loop", args.episodes, args.seed):
            results.append(run_episode(client, args.model, GuessNumberEnv(max_guesses=args.max_turns), task, bank,
                                       max_turns=args.max_turns))
            print(json.dumps(results[-1]))
    finally:
        if bank is not None:
            bank.close()
    rate = sum(r["success"] for r in results) / max(1, len(results))
    print(json.dumps({"episodes": len(results), "success_rate": rate}))
    return results


if __name__ == "__main__":
    main()
