"""Built-in env with typed tools: price lookup (``agent.env: price_lookup``).

Every episode draws a fresh hidden price table (each of 12 items costs 1..9) and asks one question, e.g.
``What is the price of "gold" plus 3?`` (the item quoted as in the call, so the tokens to copy match). The price is only revealed by a tool, so a policy that does not call it
is right 1 time in 9. The policy writes exactly one call per turn, ``name(literal args)``::

    lookup("gold")      ->  gold = 8            lookup(key: str) -> int   the hidden price of an item
    add(8, 3)           ->  8 + 3 = 11          add(a: int, b: int) -> int
    answer(11)          ->  Correct!            answer(n: int)            ends the episode

The tools are :class:`~critique_rl.agents.env.Tool` objects (typed Python callables: arguments are parsed as
literals and type-checked against the annotations, never evaluated). A malformed action (not a call, an
unknown tool, a mistyped argument, an unknown item) gets an ``Error: ...`` observation and costs a turn.
``answer`` ends the episode (reward 1 and ``info["success"]`` when the number is the price plus the addend);
after ``max_calls`` actions without an answer the episode ends unsuccessfully.

For the SFT warm-up and critiques it comes with a scripted **demonstrator** with a systematic
mistake (for metals it skips ``lookup`` 70% of the time and adds an assumed price of 5; fruits it always looks
up), the **expert** (always looks up), and an episode-level **rule critic** that names the turn where a price
was used without being looked up, a wrong ``add`` or a wrong ``answer``.

The held-out split: a task's ``(item, price, addend)`` decides its split by a fixed hash (one in five
combinations is held out), so no evaluation episode is a training episode with the same hidden price.
"""

from __future__ import annotations

import functools
import random
import re
import zlib
from typing import Any

from critique_rl.agents.env import EpisodeRuleCritic, StepResult, Tool, ToolError, parse_tool_call
from critique_rl.agents.trajectory import Trajectory

FRUITS = ("apple", "pear", "plum", "fig", "lime", "kiwi")
METALS = ("gold", "iron", "zinc", "tin", "lead", "copper")
ITEMS = FRUITS + METALS
KIND = {**{k: "fruit" for k in FRUITS}, **{k: "metal" for k in METALS}}
MAX_PRICE = 9
MAX_ADDEND = 9
HELDOUT_MOD = 5
"""One ``(item, price, addend)`` combination in ``HELDOUT_MOD`` is held out for evaluation."""
DIRECTIVE = "Instead, call lookup on the item first, then add its price, then answer the sum."
ASSUMED_PRICE = 5
"""The price the demonstrator assumes when it skips the lookup."""


# ---------------------------------------------------------------------------------------------------------
# tasks and the held-out split
# ---------------------------------------------------------------------------------------------------------


def question(key: str, addend: int) -> str:
    return f'What is the price of "{key}" plus {addend}?'


@functools.cache
def tools_line() -> str:
    """The tool list every first observation starts with (the typed signatures of the three tools)."""
    return "Tools: " + "; ".join(t.spec() for t in PriceLookupEnv().tools.values()) + "."


def first_observation(key: str, addend: int) -> str:
    return f"{tools_line()} {question(key, addend)}"


def is_heldout(key: str, price: int, addend: int) -> bool:
    """Whether ``(key, price, addend)`` belongs to the evaluation split (a fixed hash, the same everywhere)."""
    return zlib.crc32(f"{key}:{price}:{addend}".encode()) % HELDOUT_MOD == 0


def make_tasks(split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` episodes of ``split`` (``train`` or ``eval``): per episode a fresh price table over all items, the
    asked ``key`` and ``addend``; ``answer`` is the right final number. Train and eval draw from disjoint
    ``(key, price, addend)`` combinations (:func:`is_heldout`) and different RNG streams."""
    if split not in ("train", "eval"):
        raise ValueError(f"split = {split!r}: use 'train' or 'eval'")
    rng = random.Random(f"price_lookup:{split}:{seed}")
    want_heldout = split == "eval"
    tasks: list[dict[str, Any]] = []
    while len(tasks) < n:
        prices = {k: rng.randint(1, MAX_PRICE) for k in ITEMS}
        key = rng.choice(ITEMS)
        addend = rng.randint(1, MAX_ADDEND)
        if is_heldout(key, prices[key], addend) != want_heldout:
            continue
        tasks.append({"prompt": question(key, addend), "answer": str(prices[key] + addend), "key": key,
                      "kind": KIND[key], "addend": addend, "prices": prices})
    return tasks


# ---------------------------------------------------------------------------------------------------------
# the environment
# ---------------------------------------------------------------------------------------------------------


class PriceLookupEnv:
    """``reset(task)`` reads ``key``, ``addend`` and ``prices`` from the task row; ``step(text)`` parses one tool
    call (see the module docstring). ``info`` holds ``tool`` (the called tool's name, or None), ``ok`` (whether
    the call went through) and, on the last step, ``success``."""

    def __init__(self, max_calls: int = 4) -> None:
        if max_calls < 1:
            raise ValueError(f"max_calls = {max_calls}: use >= 1")
        self.max_calls = max_calls
        self.prices: dict[str, int] = {}
        self.key = ""
        self.addend = 0
        self.calls = 0
        self.done = False
        self._args: list[Any] = []
        self.tools = {t.name: t for t in (Tool(self.lookup, name="lookup"), Tool(self.add, name="add"),
                                          Tool(self.answer, name="answer"))}

    # the typed tools (their annotations are what Tool checks and what the prompt lists); each keeps the
    # arguments it was called with for the observation and ``info["args"]``
    def lookup(self, key: str) -> int:
        self._args = [key]
        if key not in self.prices:
            raise ToolError(f"lookup: no item '{key}'")
        return self.prices[key]

    def add(self, a: int, b: int) -> int:
        self._args = [a, b]
        return a + b

    def answer(self, n: int):  # no return annotation: the prompt lists answer(n: int)
        self._args = [n]
        return n

    @property
    def target(self) -> int:
        return self.prices[self.key] + self.addend

    def reset(self, task: dict[str, Any]) -> str:
        try:
            prices = {str(k): int(v) for k, v in dict(task["prices"]).items()}
            key, addend = str(task["key"]), int(task["addend"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"price_lookup task rows need 'prices' (item -> int), 'key' and 'addend' ({exc!r})") from None
        if key not in prices:
            raise ValueError(f"task key '{key}' is not in its price table")
        self.prices, self.key, self.addend, self.calls, self.done = prices, key, addend, 0, False
        return first_observation(key, addend)

    def step(self, action: str) -> StepResult:
        if self.done:
            raise RuntimeError("price_lookup: the episode is over; call reset(task) first")
        self.calls += 1
        info: dict[str, Any] = {"tool": None, "ok": False}
        try:
            call = parse_tool_call(action, self.tools)
            if call is None:
                raise ToolError('write exactly one tool call, e.g. lookup("apple")')
            tool, args = call
            info["tool"] = tool.name
            value = tool.call(args)
        except ToolError as exc:
            info["error"] = str(exc)
            return self._after(f"Error: {exc}", info)
        info.update(ok=True, args=list(self._args), value=value)
        if tool.name == "answer":
            ok = value == self.target
            info["success"] = ok
            self.done = True
            return StepResult("Correct!" if ok else f"Wrong. The answer was {self.target}.", float(ok), True, info)
        if tool.name == "lookup":
            return self._after(f"{self._args[0]} = {value}", info)
        return self._after(f"{self._args[0]} + {self._args[1]} = {value}", info)

    def _after(self, observation: str, info: dict[str, Any]) -> StepResult:
        if self.calls >= self.max_calls:
            info["success"] = False
            self.done = True
            return StepResult(f"{observation.rstrip('.')}. Out of turns. The answer was {self.target}.", 0.0, True,
                              info)
        return StepResult(observation, 0.0, False, info)


# ---------------------------------------------------------------------------------------------------------
# scripted players (SFT warm-up) and the rule critic
# ---------------------------------------------------------------------------------------------------------

_QUESTION = re.compile(r'price of "(\w+)" plus (\d+)\?')
_LOOKED_UP = re.compile(r"^(\w+) = (-?\d+)$")
_ADDED = re.compile(r"^(-?\d+) \+ (-?\d+) = (-?\d+)$")


class ScriptedPlayer:
    """A scripted player for the warm-up: ``player(observation, rng) -> action``.

    It keeps the question of the episode it is playing (read from the first observation, which resets it), so
    one player plays one episode at a time. ``p_skip`` is the systematic mistake: for items of kind
    ``skip_kind`` it skips the lookup with that probability and adds :data:`ASSUMED_PRICE` instead; 0 is the
    expert."""

    def __init__(self, p_skip: float = 0.0, skip_kind: str = "metal") -> None:
        self.p_skip = p_skip
        self.skip_kind = skip_kind
        self.key = ""
        self.addend = 0

    def __call__(self, observation: str, rng: random.Random) -> str:
        q = _QUESTION.search(observation)
        if q is not None:  # a new episode
            self.key, self.addend = q.group(1), int(q.group(2))
            if KIND.get(self.key) == self.skip_kind and rng.random() < self.p_skip:
                return f"add({ASSUMED_PRICE}, {self.addend})"
            return f'lookup("{self.key}")'
        looked = _LOOKED_UP.match(observation.strip())
        if looked is not None:
            return f"add({looked.group(2)}, {self.addend})"
        added = _ADDED.match(observation.strip())
        if added is not None:
            return f"answer({added.group(3)})"
        return f'lookup("{self.key}")'  # after an error: start over


DEMONSTRATOR_P_SKIP = 0.7
"""How often the demonstrator skips the lookup for a metal (its systematic mistake)."""


def critique_text(traj: Trajectory) -> str:
    """The first mistake of the episode (a malformed call, a lookup of another item, a price used without a
    lookup, a wrong add, a wrong answer, no answer), then the directive; praise plus the directive when there
    was none. Reads the env's ``info`` of each turn (``tool``, ``ok``, ``args``, ``value``)."""
    key, addend = str(traj.task.get("key", "")), int(traj.task.get("addend", 0))
    price: int | None = None
    for i, t in enumerate(traj.turns):
        info, act = t.info or {}, t.action_text.strip() or "the empty action"
        turn = f"Turn {i + 1}"
        if not info.get("ok"):
            return f"{turn}: {act} is not a valid tool call ({info.get('error', 'no result')}). {DIRECTIVE}"
        tool, args = info.get("tool"), list(info.get("args", []))
        if tool == "lookup":
            if args != [key]:
                return f"{turn}: {act} looked up another item; the question asks about {key}. {DIRECTIVE}"
            price = int(info["value"])
        elif tool == "add":
            if price is None:
                return (f"{turn}: {act} used a price for {key} that was never looked up; call "
                        f'lookup("{key}") first. {DIRECTIVE}')
            if sorted(args) != sorted([price, addend]):
                return f"{turn}: {act} should add the price of {key}, {price}, and {addend}. {DIRECTIVE}"
        elif tool == "answer":
            if price is None:
                return f"{turn}: {act} answered without looking up the price of {key}. {DIRECTIVE}"
            if not info.get("success"):
                return f"{turn}: {act} is not the price of {key} plus {addend}. {DIRECTIVE}"
    if not traj.success:
        return f"There was no answer(...) call within the turns. {DIRECTIVE}"
    return f"Every step used the tools correctly. {DIRECTIVE}"


class PriceCritic(EpisodeRuleCritic):
    """Episode-level rule critic for price lookup: sees the whole trajectory, writes one critique."""

    critique_text = staticmethod(critique_text)
