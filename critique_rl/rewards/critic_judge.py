"""The critic as judge: reward ``critic`` scores each response from the critic call that writes its critique.

``reward_funcs: [critic]`` makes the run's critic (``critic:``, a model critic of kind ``cot``: hf or openai) the
reward. Per response, one critic call returns a critique ending in a verdict (``Verdict: correct|incorrect``), or
with ``mode: score`` a rubric score (``Score: 7/10``); the reward is 1/0 for the verdict, score/max_score for the
score, None (not applicable) when the reply has neither. The critique is kept (:meth:`BaseCritic.remember`), so
when the same step's critique stage asks for that response's critique, it is a cache hit, not a second call: one
call per response for reward and feedback alike, counted in ``critic/prompt_tokens`` / ``completion_tokens`` (the
stage's reuse in ``critic/cache_hits``). Identical (question, response) pairs in a batch are judged once; the
openai backend's disk cache (``critic_cache.sqlite``) also serves repeats across steps and resumed runs.

Without a verifier, set ``verifier: critique_rl.rewards.critic_judge:judge_verdict``: a response is correct when
the judge's reward is above ``reward_threshold`` (it reads the verdicts the reward already paid for; a response the
judge has not seen, e.g. in evaluation, is judged then). A task with no reference answer and no verifier then trains
from the critic alone, and ``critique_on: wrong`` refines the responses the judge rejected with the judge's own
critiques.

``group: true``: group-relative judging, as ART's RULER does: the n responses to one question (consecutive rows
with the same prompt) are scored in one call (``judge_group.j2``), in a shuffled order (position-bias guard; with
``orders: k`` the group is scored k times in different orders and the scores averaged). Each response's line
(``Response K: <sentence> Score: S``) is kept as its critique, with verdict correct when the score is above half
the scale, so the critique stage reuses it too (no second call).

The judge uses the run's own critic object (the one the trainer builds after its reward functions), so judge and
critique stage share one critic, one cache and one set of ``critic/*`` counters; pass ``critic=`` to use another.
"""

from __future__ import annotations

import random
import re
import weakref
from typing import Any

from critique_rl.critics.base import BaseCritic, Critique, CritiqueRequest
from critique_rl.errors import UserError
from critique_rl.primitives import completion_text
from critique_rl.rewards.base import register_reward
from critique_rl.tasks import Task
from critique_rl.templates import render

_SCORE = re.compile(r"\bscore\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?", re.IGNORECASE)
_GROUP_LINE = re.compile(r"response\s*#?\s*(\d+)\b.*?\bscore\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_LAST_JUDGE: list[weakref.ReferenceType[CriticJudge]] = []


def parse_score(text: str, max_score: float) -> float | None:
    """The last ``Score: x`` (or ``Score: x/y``) in ``text`` as a fraction of ``max_score`` (or of y), clipped to
    [0, 1]; None when there is none."""
    found = _SCORE.findall(text or "")
    if not found:
        return None
    value, denom = found[-1]
    top = float(denom) if denom else float(max_score)
    if top <= 0:
        return None
    return min(1.0, max(0.0, float(value) / top))


def parse_group_scores(text: str, n: int, max_score: float) -> list[float | None]:
    """Per displayed position 1..n, the score on its ``Response K: ... Score: S`` line as a fraction of
    ``max_score`` (clipped to [0, 1]); None where a position has no line (the last line for a K wins)."""
    return [s for s, _ in parse_group_lines(text, n, max_score)]


def parse_group_lines(text: str, n: int, max_score: float) -> list[tuple[float | None, str]]:
    """Per displayed position 1..n: (score as in :func:`parse_group_scores`, the line's critique sentence)."""
    out: list[tuple[float | None, str]] = [(None, "")] * n
    for line in (text or "").splitlines():
        m = _GROUP_LINE.search(line)
        if m:
            k = int(m.group(1))
            if 1 <= k <= n:
                sentence = line[m.end(1):].split("Score", 1)[0].split("score", 1)[0].strip(" :-*.")
                out[k - 1] = (min(1.0, max(0.0, float(m.group(2)) / float(max_score))), sentence)
    return out


def prompt_text(prompt: Any) -> str:
    """The question of a reward-function ``prompts`` entry: a string as is, a chat prompt's last user message."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        chosen = users[-1:] or [m for m in prompt if isinstance(m, dict)][-1:]
        return completion_text(chosen) if chosen else ""
    return str(prompt)


class CriticJudge:
    """Reward ``critic`` (see the module docstring). Callable TRL's way: ``judge(prompts, completions, answer=...)``.

    Args:
        task: the run's task (its ``extract`` gives the answer a rule fallback critique quotes).
        critic: a critic to judge with; None = the critic the trainer builds for this run (``critic:``).
        mode: ``verdict`` (1 correct / 0 incorrect) or ``score`` (a rubric score, ``Score: S`` out of ``max_score``).
        group: score the n responses of a question in one call (group-relative, shuffled order).
        orders: with ``group``, the number of shuffled orders each group is scored in (averaged).
        max_score: the top of the rubric scale.
        seed: seed of the shuffles (the k-th call of the run shuffles with ``seed + k``).
    """

    __name__ = "critic"

    def __init__(self, task: Task, critic: BaseCritic | None = None, mode: str = "verdict", group: bool = False,
                 orders: int = 1, max_score: float = 10.0, seed: int = 0) -> None:
        from critique_rl.critics.factory import build_order

        if mode not in ("verdict", "score"):
            raise UserError(f"config field 'reward_kwargs' for reward 'critic': mode {mode!r}; use verdict or score")
        if orders < 1 or max_score <= 0:
            raise UserError("config field 'reward_kwargs' for reward 'critic': orders >= 1 and max_score > 0 needed")
        self.task, self.critic, self.mode, self.group = task, critic, mode, bool(group)
        self.orders, self.max_score, self.seed = int(orders), float(max_score), int(seed)
        self._built_after = build_order()
        self._calls = 0
        self.scores: dict[tuple[str, str], float | None] = {}
        """(question, response) -> the reward given, for :func:`judge_verdict` (bounded: cleared past 100k)."""
        self.judged = 0
        """Critic requests this judge made (identical pairs in a batch count once)."""
        self.positions: list[list[int]] = []
        """With ``group``: the shuffled order of each judged group (last 1000), for inspection."""
        _LAST_JUDGE[:] = [weakref.ref(self)]

    def resolve_critic(self) -> BaseCritic:
        """The critic to judge with: the given one, else the one built for the run after this judge."""
        if self.critic is None:
            from critique_rl.critics.factory import built_since

            self.critic = built_since(self._built_after)
        if self.critic is None:
            raise UserError("reward 'critic' judges with the run's critic, and none was built: set critic.backend "
                            "(hf or openai) with critic.kind cot, and critique_on (e.g. wrong); or pass critic=")
        if getattr(self.critic, "kind", None) != "cot":
            raise UserError(f"reward 'critic' needs a model critic of kind cot (critic.kind), not "
                            f"{getattr(self.critic, 'kind', None)!r}: a rule critique only repeats the verifier")
        return self.critic

    def __call__(self, prompts: list[Any], completions: list[Any], answer: list[Any] | None = None,
                 **columns: Any) -> list[float | None]:
        questions = [prompt_text(p) for p in prompts]
        texts = [completion_text(c) for c in completions]
        answers = list(answer) if answer is not None else [None] * len(texts)
        critic = self.resolve_critic()
        if self.group:
            rewards = self._judge_groups(critic, questions, texts, answers)
        else:
            rewards = self._judge_each(critic, questions, texts, answers, columns.get("task"))
        if len(self.scores) > 100_000:
            self.scores.clear()
        for q, t, r in zip(questions, texts, rewards, strict=True):
            self.scores[(q, t)] = r
        return rewards

    def _judge_each(self, critic: BaseCritic, questions: list[str], texts: list[str], answers: list[Any],
                    task_names: list[Any] | None) -> list[float | None]:
        parts = self.task.for_rows(len(texts), task_names)
        requests = [CritiqueRequest(question=q, response=t, reference=None if a in (None, "") else str(a),
                                    metadata={"answer": part.extract(t) or t.strip()})
                    for q, t, a, part in zip(questions, texts, answers, parts, strict=True)]
        first: dict[Any, int] = {}
        for i, req in enumerate(requests):
            first.setdefault(critic.prompt_key(req) or (req.question, req.response, req.reference), i)
        unique = sorted(set(first.values()))
        critiques = critic.critique([requests[i] for i in unique])
        self.judged += len(unique)
        by_index = {}
        for i, c in zip(unique, critiques, strict=True):
            critic.remember(requests[i], c)  # the critique stage's call for this response is a cache hit
            by_index[i] = None if c.fallback else (self._reward(c.text, c.verdict))
        return [by_index[first[critic.prompt_key(r) or (r.question, r.response, r.reference)]] for r in requests]

    def _reward(self, text: str, verdict: bool | None) -> float | None:
        if self.mode == "score":
            return parse_score(text, self.max_score)
        return None if verdict is None else float(verdict)

    def _judge_groups(self, critic: BaseCritic, questions: list[str], texts: list[str],
                      answers: list[Any]) -> list[float | None]:
        spans: list[tuple[int, int]] = []
        start = 0
        for i in range(1, len(questions) + 1):
            if i == len(questions) or questions[i] != questions[start]:
                spans.append((start, i))
                start = i
        requests, plan = [], []
        for s, e in spans:
            for _ in range(self.orders):
                order = list(range(e - s))
                random.Random(self.seed + self._calls).shuffle(order)
                self._calls += 1
                prompt = render("judge_group.j2", getattr(critic, "template_dir", None), question=questions[s],
                                responses=[texts[s + j] for j in order], max_score=int(self.max_score))
                requests.append(CritiqueRequest(question=questions[s], response="", metadata={"prompt": prompt}))
                plan.append((s, order))
                self.positions.append(order)
        del self.positions[:-1000]
        replies = critic.critique(requests)
        self.judged += len(requests)
        sums: list[list[float]] = [[] for _ in texts]
        notes: list[str] = [""] * len(texts)
        for (s, order), reply in zip(plan, replies, strict=True):
            for pos, (score, sentence) in enumerate(parse_group_lines(reply.text, len(order), self.max_score)):
                if score is not None:
                    sums[s + order[pos]].append(score)
                    notes[s + order[pos]] = notes[s + order[pos]] or sentence
        rewards = [sum(v) / len(v) if v else None for v in sums]
        for q, t, a, r, note in zip(questions, texts, answers, rewards, notes, strict=True):
            if r is None:
                continue
            # the group reply's line on this response becomes its critique (verdict: above half the scale), so
            # the critique stage refines it without a second call
            verdict = r > 0.5
            text = f"{note or 'Judged against the other responses'}.\nVerdict: {'correct' if verdict else 'incorrect'}"
            request = CritiqueRequest(question=q, response=t, reference=None if a in (None, "") else str(a))
            critic.remember(request, Critique(text=text, verdict=verdict, kind="cot"))
        return rewards


@register_reward("critic")
def critic_judge_factory(task: Task, critic: BaseCritic | None = None, mode: str = "verdict", group: bool = False,
                         orders: int = 1, max_score: float = 10.0, seed: int = 0) -> CriticJudge:
    """Reward ``critic``: the run's critic as the judge (see :class:`CriticJudge`); options from
    ``reward_kwargs: {critic: {mode: score, group: true, orders: 2, max_score: 10}}``."""
    return CriticJudge(task, critic=critic, mode=mode, group=group, orders=orders, max_score=max_score, seed=seed)


def judge_verdict(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
    """A verifier for runs judged by reward ``critic`` (``verifier: critique_rl.rewards.critic_judge:judge_verdict``):
    the judge's reward for each response (correct when above ``reward_threshold``). Responses the judge already
    scored cost nothing; others (e.g. held-out evaluation) are judged now."""
    judge = _LAST_JUDGE[0]() if _LAST_JUDGE else None
    if judge is None:
        raise UserError("verifier judge_verdict reads the 'critic' reward's verdicts; add critic to reward_funcs")
    keys = [(prompt_text(p), completion_text(c)) for p, c in zip(prompts, completions, strict=True)]
    missing = [i for i, k in enumerate(keys) if k not in judge.scores]
    if missing:
        sub = {k: [v[i] for i in missing] for k, v in columns.items() if isinstance(v, list) and len(v) == len(keys)}
        judge([prompts[i] for i in missing], [completions[i] for i in missing], **sub)
    return [judge.scores.get(k) for k in keys]
