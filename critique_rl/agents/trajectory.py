"""Multi-turn trajectories, token in / token out.

A :class:`Trajectory` keeps, per turn, the tokens that were appended to the context for the observation and
the **exact token ids the engine generated** for the action (EOS included when it finished). The context of
turn ``t`` is the concatenation of everything before it, never a re-tokenisation of the decoded history, so
what the policy is trained on is token for token what it sampled from (no drift across turns).

For training, an episode is one row of a :class:`~critique_rl.train.rollout_batch.RolloutBatch`: the prompt is
the first observation's tokens, the completion everything after it (``act_0, obs_1, act_1, ...``) and the
**action mask** is True on action tokens only, so observation tokens are masked out of every loss
(:meth:`Trajectory.to_completion`, :meth:`Trajectory.action_mask`).

:class:`TurnRenderer` renders turns with the tokenizer's chat template (``system`` = memory / critique
context, ``user`` = observations, ``assistant`` = actions) or, without one, as plain text. The tokens of an
observation are the template's text between the end of the previous action and the next generation prompt,
found by rendering a two-message probe once per observation; with an action cut at the per-turn token limit
(no EOS), the template's end-of-turn text is added first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from critique_rl.errors import UserError
from critique_rl.rollout.base import Completion

StopReason = Literal["done", "max_turns", "max_tokens", "error"]

_ACTION_PROBE = "ACTIONPROBE7f3a"
_USER_PROBE = "USERPROBE7f3a"


@dataclass
class Turn:
    """One policy turn: the observation it answered and the action it wrote."""

    observation: str
    obs_ids: list[int]
    """Tokens appended to the context for ``observation`` (turn 0: the whole first prompt)."""
    action_ids: list[int]
    """Exactly the ids the engine generated (EOS included when ``finished``)."""
    action_logprobs: list[float]
    action_text: str
    finished: bool
    """False when the action was cut at the per-turn token limit."""
    reward: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trajectory:
    """One episode. ``success`` is decided by the env (``info["success"]`` on the last step, else a positive
    return); ``stop_reason`` says why it ended."""

    task: dict[str, Any]
    context: str | None = None
    """Text rendered into the first prompt as the system message (memory, critique), or None."""
    turns: list[Turn] = field(default_factory=list)
    final_observation: str | None = None
    """The env's reply to the last action (not part of the context the policy saw)."""
    done: bool = False
    success: bool = False
    stop_reason: StopReason = "max_turns"
    error: str | None = None
    memory_context: str | None = None
    """The memory part of ``context`` (retrieved at reset); the plain context a refined episode is trained
    under. The rest of ``context`` (a critique) follows it."""
    retrieved_ids: list[str] = field(default_factory=list)
    """Memory records rendered into ``context`` (for ``helped`` credit)."""

    # ---- token views ----------------------------------------------------------------------------------------
    @property
    def prompt_ids(self) -> list[int]:
        return self.turns[0].obs_ids if self.turns else []

    def completion_ids(self) -> list[int]:
        """Everything after the first prompt: ``act_0 + obs_1 + act_1 + ... + act_last``."""
        out: list[int] = []
        for i, t in enumerate(self.turns):
            if i:
                out += t.obs_ids
            out += t.action_ids
        return out

    def action_mask(self) -> list[bool]:
        """Aligned with :meth:`completion_ids`: True on action tokens, False on observation tokens."""
        out: list[bool] = []
        for i, t in enumerate(self.turns):
            if i:
                out += [False] * len(t.obs_ids)
            out += [True] * len(t.action_ids)
        return out

    def sampling_logprobs(self) -> list[float]:
        """Aligned with :meth:`completion_ids`: the engine's log-probs on actions, 0.0 on observations."""
        out: list[float] = []
        for i, t in enumerate(self.turns):
            if i:
                out += [0.0] * len(t.obs_ids)
            lp = list(t.action_logprobs)
            out += lp + [0.0] * (len(t.action_ids) - len(lp))
        return out

    def token_ids(self) -> list[int]:
        """The whole episode's context: first prompt, then completion."""
        return self.prompt_ids + self.completion_ids()

    def action_spans(self) -> list[tuple[int, int]]:
        """``(start, end)`` of each action in :meth:`completion_ids`."""
        spans, pos = [], 0
        for i, t in enumerate(self.turns):
            if i:
                pos += len(t.obs_ids)
            spans.append((pos, pos + len(t.action_ids)))
            pos += len(t.action_ids)
        return spans

    # ---- text views -----------------------------------------------------------------------------------------
    @property
    def total_reward(self) -> float:
        return float(sum(t.reward for t in self.turns))

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    def messages(self, include_context: bool = True) -> list[dict[str, str]]:
        """The episode as chat messages (system context, user observations, assistant actions, and the final
        observation as a last user message)."""
        msgs: list[dict[str, str]] = []
        if include_context and self.context:
            msgs.append({"role": "system", "content": self.context})
        for t in self.turns:
            msgs.append({"role": "user", "content": t.observation})
            msgs.append({"role": "assistant", "content": t.action_text})
        if self.final_observation is not None:
            msgs.append({"role": "user", "content": self.final_observation})
        return msgs

    def transcript(self) -> str:
        """Readable text: ``> action`` lines between observations (what critics and memory see)."""
        lines = []
        for t in self.turns:
            lines.append(t.observation)
            lines.append(f"> {t.action_text}")
        if self.final_observation is not None:
            lines.append(self.final_observation)
        return "\n".join(lines)

    def to_completion(self, text: str | None = None) -> Completion:
        """This episode as one :class:`~critique_rl.rollout.base.Completion` (completion ids, log-probs aligned
        with them, the transcript as text); pair it with :meth:`action_mask`."""
        return Completion(token_ids=self.completion_ids(), logprobs=self.sampling_logprobs(),
                          text=self.transcript() if text is None else text,
                          finished=self.done)

    def to_log(self) -> dict[str, Any]:
        """A JSON-ready record, turn by turn (rollouts.jsonl)."""
        return {
            "task": self.task.get("prompt"),
            "context": self.context,
            "turns": [{"observation": t.observation, "action": t.action_text, "reward": t.reward,
                       "action_tokens": len(t.action_ids), "finished": t.finished} for t in self.turns],
            "final_observation": self.final_observation,
            "return": self.total_reward,
            "success": self.success,
            "stop_reason": self.stop_reason,
            **({"error": self.error} if self.error else {}),
        }


class TurnRenderer:
    """Turns -> token ids, with the tokenizer's chat template (``use_chat``) or as plain text.

    Plain text: the first prompt is ``context + "\\n"`` (if any) + ``observation + "\\n"``; each later
    observation adds ``observation + "\\n"`` after the action (an action cut without EOS gets ``"\\n"`` first).
    """

    def __init__(self, tokenizer: Any, use_chat: bool) -> None:
        self.tokenizer = tokenizer
        self.use_chat = use_chat
        eos = getattr(tokenizer, "eos_token", None)
        self.eos_text = eos if isinstance(eos, str) else ""
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        if use_chat:
            self._probe()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict[str, str]], gen: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def _probe(self) -> None:
        """Find the template's end-of-assistant-turn text (what follows an action's content)."""
        base = [{"role": "user", "content": _USER_PROBE}, {"role": "assistant", "content": _ACTION_PROBE}]
        self._base_text = self._render(base, gen=False)
        at = self._base_text.rfind(_ACTION_PROBE)
        if at < 0:
            raise UserError("the tokenizer's chat template drops assistant messages from the history; multi-turn "
                            "episodes need one that renders them (or set use_chat_template: no)")
        self._end_of_turn = self._base_text[at + len(_ACTION_PROBE):]

    def first(self, observation: str, context: str | None = None) -> list[int]:
        """Tokens of the first prompt (system context + first observation + generation prompt)."""
        return self.encode(self.first_text(observation, context))

    def first_text(self, observation: str, context: str | None = None) -> str:
        if not self.use_chat:
            return (f"{context}\n" if context else "") + f"{observation}\n"
        msgs = ([{"role": "system", "content": context}] if context else []) + [{"role": "user", "content": observation}]
        return self._render(msgs, gen=True)

    def observation_text(self, observation: str, action_finished: bool) -> str:
        """The text appended after an action for the next ``observation`` (up to the next generation prompt)."""
        if not self.use_chat:
            return ("" if action_finished else "\n") + f"{observation}\n"
        base = [{"role": "user", "content": _USER_PROBE}, {"role": "assistant", "content": _ACTION_PROBE}]
        full = self._render(base + [{"role": "user", "content": observation}], gen=True)
        if not full.startswith(self._base_text):
            raise UserError("the tokenizer's chat template renders earlier turns differently once a turn is added; "
                            "token-in/token-out episodes need a prefix-stable template (or use_chat_template: no)")
        tail = self._end_of_turn
        if action_finished and self.eos_text and tail.startswith(self.eos_text):
            tail = tail[len(self.eos_text):]  # the action's own EOS token closed the turn already
        return tail + full[len(self._base_text):]

    def observation(self, observation: str, action_finished: bool) -> list[int]:
        return self.encode(self.observation_text(observation, action_finished))

    def render_messages(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The whole conversation as text (chat template, or the plain format above)."""
        if self.use_chat:
            return self._render(messages, gen=add_generation_prompt)
        out = ""
        for m in messages:
            if m["role"] == "assistant":
                out += m["content"] + self.eos_text
            else:
                out += m["content"] + "\n"
        return out


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}A: {{ m['content'] }}<|eos|>\n"
    "{% elif m['role'] == 'system' %}S: {{ m['content'] }}\n"
    "{% else %}U: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)
"""A minimal chat template for the tiny in-repo tokenizer (its EOS token ends assistant turns)."""
