"""A framework-style tool-calling agent on the ``openai`` client, trained through ``critique-rl serve``.

The agent below is what agent frameworks do (a tool registry of typed Python functions, a message history, a
loop: call the model, run the tool it asked for, send the result back as a ``tool`` message, stop at the final
answer); nothing in it knows about training. The policy writes each call as text, ``lookup("gold")``
(``critique_rl.agents.env.Tool`` parses literals and checks the argument types; nothing is evaluated).

The task is the built-in price lookup (``agent.env: price_lookup``): a hidden price table per episode, a question
``What is the price of "gold" plus 3?``, the tools ``lookup(key: str) -> int``, ``add(a: int, b: int) -> int``
and ``answer(n: int)``. The server hands out the task rows (``next_task``), the loop builds its tools over the
row's price table, plays, and reports the reward (``finish``; a wrong answer sends the tool trace as feedback)::

    critique-rl serve examples/agent_tools_cpu.yaml --port 8000 &
    python examples/agent_loop_tools_openai.py --base-url http://127.0.0.1:8000/v1 --workers 8

The server records every call's exact tokens (the ``tool`` results are the observations between actions), so
the episode trains as the in-process ``price_lookup`` env's episodes do. API key: ``$OPENAI_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from collections.abc import Callable
from typing import Any

import openai

from critique_rl.agents.env import Tool, ToolError, parse_tool_call


class ToolAgent:
    """A minimal tool-calling agent: ``run(question)`` -> the final answer (or None) and the message history.
    ``describe(tool_name, value)`` writes a tool's result into the ``tool`` message."""

    def __init__(self, client: Any, model: str, tools: dict[str, Tool], *, final_tool: str = "answer",
                 max_steps: int = 4, max_tokens: int = 10,
                 describe: Callable[[str, Any], str] = lambda name, value: str(value)) -> None:
        self.client, self.model, self.tools = client, model, tools
        self.final_tool, self.max_steps, self.max_tokens, self.describe = final_tool, max_steps, max_tokens, describe
        self.messages: list[dict[str, str]] = []

    def prompt(self, question: str) -> str:
        return "Tools: " + "; ".join(t.spec() for t in self.tools.values()) + f". {question}"

    def run(self, question: str) -> tuple[Any, list[dict[str, str]]]:
        self.messages = [{"role": "user", "content": self.prompt(question)}]
        for step in range(self.max_steps):
            try:
                reply = self.client.chat.completions.create(model=self.model, messages=self.messages,
                                                            max_tokens=self.max_tokens)
            except openai.BadRequestError as exc:  # the training server stops an episode at its limits
                if isinstance(exc.body, dict) and exc.body.get("code") in ("max_turns_exceeded",
                                                                           "context_length_exceeded"):
                    return None, self.messages
                raise
            text = reply.choices[0].message.content or ""
            self.messages.append({"role": "assistant", "content": text})
            try:
                call = parse_tool_call(text, self.tools)
                if call is None:
                    raise ToolError('write exactly one tool call, e.g. lookup("apple")')
                tool, args = call
                value = tool.call(args)
            except ToolError as exc:
                result = f"Error: {exc}"
            else:
                if tool.name == self.final_tool:
                    return value, self.messages
                result = self.describe(tool.name, value)
            if step == self.max_steps - 1:
                break
            self.messages.append({"role": "tool", "content": result})
        return None, self.messages


def price_tools(prices: dict[str, int]) -> tuple[dict[str, Tool], Callable[[str, Any], str]]:
    """The task's tools over its hidden price table, and how a result is phrased (as the built-in env does:
    ``gold = 8``, ``8 + 3 = 11``)."""
    last: list[Any] = []

    def lookup(key: str) -> int:
        last[:] = [key]
        if key not in prices:
            raise ToolError(f"lookup: no item '{key}'")
        return prices[key]

    def add(a: int, b: int) -> int:
        last[:] = [a, b]
        return a + b

    def answer(n: int):  # noqa: ANN202 - no return annotation: the prompt lists answer(n: int)
        return n

    def phrase(name: str, value: Any) -> str:
        return f"{last[0]} = {value}" if name == "lookup" else f"{last[0]} + {last[1]} = {value}"

    return {t.name: t for t in (Tool(lookup), Tool(add), Tool(answer))}, phrase


def play(base_url: str, api_key: str | None, model: str = "policy", max_steps: int = 4,
         max_episodes: int | None = None) -> list[dict[str, Any]]:
    """One worker: take the server's tasks until training ends (or ``max_episodes``), play, finish."""
    from critique_rl.agents.client import EpisodeClient, ServerError

    hub = EpisodeClient(base_url, api_key=api_key)
    out: list[dict[str, Any]] = []
    while max_episodes is None or len(out) < max_episodes:
        try:
            ep = hub.next_task(timeout=10.0)
            if ep is None:
                if hub.stats().get("closed", False):
                    break
                continue
        except (ServerError, OSError):
            break
        task = ep.task
        tools, phrase = price_tools({str(k): int(v) for k, v in task["prices"].items()})
        q = f'What is the price of "{task["key"]}" plus {task["addend"]}?'
        try:
            with hub.openai(ep.episode_id, max_retries=0, timeout=120.0) as client:  # closes its connections
                final, messages = ToolAgent(client, model, tools, max_steps=max_steps, describe=phrase).run(q)
        except openai.APIStatusError as exc:  # dropped (timed out) or the server stopped
            out.append({"episode_id": ep.episode_id, "error": str(exc)[:200]})
            continue
        except openai.APIConnectionError:
            break
        ok = final is not None and int(final) == int(task["answer"])
        trace = " | ".join(m["content"] for m in messages[1:])
        try:
            res = hub.finish(ep.episode_id, reward=float(ok), success=ok,
                             feedback=None if ok else f"Wrong: the answer was {task['answer']}. Trace: {trace}")
        except (ServerError, OSError):
            break
        out.append({"episode_id": ep.episode_id, "success": ok, "calls": len(messages) // 2,
                    "accepted": res.get("accepted"), "messages": messages})
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="policy")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--episodes", type=int, default=0, help="per worker (0: until training ends)")
    p.add_argument("--max-steps", type=int, default=4, help="model calls per episode (the env's max_calls)")
    args = p.parse_args(argv)
    key = os.environ.get("OPENAI_API_KEY") or None
    outs: list[list[dict[str, Any]]] = [[] for _ in range(args.workers)]

    def worker(i: int) -> None:
        outs[i] = play(args.base_url, key, args.model, args.max_steps, args.episodes or None)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    results = [r for o in outs for r in o if "success" in r]
    print(json.dumps({"episodes": len(results),
                      "success_rate": sum(r["success"] for r in results) / max(1, len(results))}))
    return results


if __name__ == "__main__":
    main()
