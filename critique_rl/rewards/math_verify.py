"""Math answers checked with Hugging Face's ``math-verify`` (the verifier TRL and open-r1 use), behind the
``math`` extra (``pip install "critique-rl[math]"``).

- the ``math`` reward: 1.0 when the completion's final answer equals the reference, else 0.0 (None where a row
  has no reference);
- :func:`math_equal` / :func:`verify`: the same check as a verifier (``verifier:
  critique_rl.rewards.math_verify:verify``);
- the ``math`` task (``task: math``): judges rows by :func:`math_equal`, quotes :func:`extract_math_answer` in
  critiques; it has no generator, so the rows come from ``train_file`` / ``dataset_name`` and ``eval_file``.

Final answers understood, in both the completion and the reference: ``\\boxed{...}`` (LaTeX, fractions,
``\\sqrt``, ...), GSM8K's ``#### 42`` (the text after the last ``####``, its line), "the answer is 42", and
plain numbers (the last one, commas as thousands separators: ``1,000`` = 1000). Equivalence is math-verify's
(``0.5`` = ``\\frac{1}{2}``, ``10%`` = ``0.1``).

math-verify bounds each parse and comparison with a timer that works only in the main thread (``signal``); in
other threads (a reward run from a worker thread) the checks run without it.
"""

from __future__ import annotations

import importlib.util
import re
import threading
from typing import Any

from critique_rl.errors import UserError
from critique_rl.primitives import completion_text
from critique_rl.rewards.base import RewardFunc, register_reward
from critique_rl.tasks import Example, Task, register_task

INSTALL_HINT = 'pip install "critique-rl[math]" (or pip install math-verify)'
TIMEOUT_S = 5
"""Seconds allowed per parse or comparison (main thread only)."""

_HASHES = re.compile(r"####[ \t]*([^\n]*)")


def math_verify_available() -> bool:
    """Whether the ``math-verify`` package can be imported (without importing it)."""
    return importlib.util.find_spec("math_verify") is not None


def require_math_verify(what: str = "the math reward") -> Any:
    """The ``math_verify`` module, or a one-line :class:`UserError` naming ``what`` and the install command."""
    try:
        import math_verify
    except ImportError:
        raise UserError(f"{what} needs the math-verify package, which is not installed; {INSTALL_HINT}") from None
    return math_verify


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def final_answer_text(text: str) -> str:
    """The part of ``text`` that states the final answer when it uses GSM8K's ``#### x`` (the text after the
    last ``####`` on its line), else ``text`` unchanged (math-verify finds ``\\boxed{}``, "the answer is", or
    the last number in it)."""
    found = _HASHES.findall(text or "")
    return found[-1].strip() if found and found[-1].strip() else (text or "")


def parse_answer(text: str, gold: bool = False) -> list[Any]:
    """math-verify's parse of ``text``'s final answer (an empty list when none is found). A reference (``gold``)
    written as bare LaTeX (``2\\sqrt{2}``, no ``$``) is read as math, not as its first number."""
    mv = require_math_verify()
    body = final_answer_text(text)
    if gold and "\\" in body and "$" not in body and "\\boxed" not in body:
        body = f"${body}$"
    return mv.parse(body, parsing_timeout=_timeout())


def math_equal(completion: str, reference: str) -> bool:
    """Whether the final answer of ``completion`` equals ``reference`` (math-verify equivalence)."""
    if reference is None:
        return False
    gold = parse_answer(str(reference), gold=True)
    pred = parse_answer(completion_text(completion))
    if not gold or not pred:
        return False
    return bool(require_math_verify().verify(gold, pred, timeout_seconds=_timeout()))


def verify(completion: str, answer: str) -> bool:
    """``verifier: critique_rl.rewards.math_verify:verify``: :func:`math_equal` as a per-sample verifier."""
    return math_equal(completion, answer)


def extract_math_answer(completion: str) -> str | None:
    """The completion's final answer as written (``\\frac{1}{2}``, ``72``), for critiques and logs; None when
    none is found."""
    parsed = parse_answer(completion)
    return str(parsed[-1]) if parsed else None


@register_reward("math")
def math_factory(task: Task) -> RewardFunc:
    """``math``: 1.0 when math-verify finds the completion's final answer equal to the reference ``answer``
    column (``\\boxed{}``, GSM8K ``####``, plain numbers, fractions, LaTeX), else 0.0; None where the reference
    is None. Needs the ``math`` extra (a one-line error naming it otherwise)."""
    require_math_verify("reward 'math'")

    def math(prompts: list[Any], completions: list[Any], answer: list[str | None], **_: Any) -> list[float | None]:
        return [None if a is None else (1.0 if math_equal(completion_text(c), a) else 0.0)
                for c, a in zip(completions, answer, strict=True)]

    return math


def _no_generator(split: str, n: int, seed: int) -> list[Example]:
    field = "eval_file" if split == "eval" else "train_file"
    raise UserError(f"task 'math' generates no {split} rows; set {field} (e.g. a GSM8K-style JSONL: question + "
                    f"answer ending in '#### 42'){' or dataset_name' if split == 'train' else ''}")


MATH = register_task(Task(
    name="math",
    make_examples=_no_generator,
    verify=math_equal,
    extract=lambda completion: extract_math_answer(completion) if math_verify_available() else None,
    description="Math word problems (your data) judged by math-verify: \\boxed{}, GSM8K ####, plain numbers.",
    max_new_tokens=512,
))
"""``task: math``: your math data judged by :func:`math_equal`."""
