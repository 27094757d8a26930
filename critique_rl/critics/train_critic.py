"""Train a small local critic model: SFT on (critic prompt, critique ending in a verdict) pairs.

Two sources of pairs:

- :func:`rule_critique_examples`: a built-in task's rows with correct and wrong responses (the task's typical
  mistake, near misses, another row's answer), each critiqued by the rule critic (verdict + reference answer)
  and closed by a ``Verdict: correct|incorrect`` line. A model trained on them with ``reference: hidden`` never
  sees the answer in its prompt: to write the critique it has to work the answer out (so it makes mistakes).
- :func:`cache_examples`: the critic cache a run filled (:class:`~critique_rl.critics.cache.CritiqueCache`): an
  API critic's replies to the run's (question, response) pairs; :func:`distill` trains on them and reports the
  local critic's agreement with the API critic on held-out pairs, and the tokens those API calls cost.

The prompt is exactly the one :class:`~critique_rl.critics.hf.HFCritic` sends (``critique_cot.j2``, the reference
shown or not), so the saved directory works as ``critic: {backend: hf, model: DIR, kind: cot}``. The model is the
repo's tiny Llama with a byte-level BPE tokenizer trained on the pairs' text (nothing is downloaded).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from critique_rl.critics.base import CritiqueRequest, parse_verdict, render_rule, verdict_scores
from critique_rl.errors import UserError
from critique_rl.templates import render

CARD = "critic_card.json"
"""What a trained critic directory says about itself (source, examples, steps, reference, scores)."""


def verdict_line(verdict: bool) -> str:
    return "Verdict: correct" if verdict else "Verdict: incorrect"


SHORT_PROMPT = (
    '{# The prompt of a critic trained with `critique-rl critic train` (saved in its directory, which HFCritic\n'
    '   uses for its cot prompt). Variables: question, response, reference (may be none). #}\n'
    'Grade the response. End with "Verdict: correct" or "Verdict: incorrect".\n'
    'Question: {{ question }}\n'
    'Response: {{ response }}\n'
    '{% if reference is not none %}Reference: {{ reference }}\n{% endif %}'
    'Critique:'
)
"""The compact critic prompt (``critique_cot.j2`` in a trained critic's directory): the same fields as the packaged
prompt at a third of its length, so a tiny critic trains three times faster; HFCritic picks it up from the
directory (see :attr:`critique_rl.critics.hf.HFCritic.template_dir`)."""


def digit_working(question: str, response_answer: str | None) -> str | None:
    """For a sum of non-negative integers (``47+38=``), the working a small critic can write one local step at a
    time, and then compare, digit by digit (wrong answers as ``Given``; ``Match``: 1 per agreeing digit)::

        Work 7+8=15 4+3+1=08
        Sum 085
        Given 084
        Match 110

    Columns least significant first, each written as two digits (carry, digit); every number zero-padded to the
    same width. A response answer that is not a number of at most that width is ``Given none`` (``Match 000``).
    None when ``question`` is not such a sum."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*\+\s*(\d+)\s*=\s*", question)
    if m is None:
        return None
    a, b = m.group(1), m.group(2)
    width = max(len(a), len(b)) + 1
    a, b = a.zfill(width - 1), b.zfill(width - 1)
    cols, carry, digits = [], 0, []
    for i in range(width - 1):
        x, y = int(a[-1 - i]), int(b[-1 - i])
        total = x + y + carry
        cols.append(f"{x}+{y}={total:02d}" if i == 0 else f"{x}+{y}+{carry}={total:02d}")
        carry, digits = total // 10, [total % 10, *digits]
    total = "".join(str(d) for d in [carry, *digits])
    given = (response_answer or "").strip()
    ok = given.isdigit() and len(given) <= width
    given = given.zfill(width) if ok else "none"
    match = "".join("1" if g == t else "0" for g, t in zip(given, total, strict=True)) if ok else "0" * width
    return f"Work {' '.join(cols)}\nSum {total}\nGiven {given}\nMatch {match}"


def critic_prompt(question: str, response: str, reference: str | None, tokenizer: Any = None,
                  template_dir: str | None = None) -> str:
    """The text :class:`HFCritic` feeds its model for this request (``reference`` None = hidden)."""
    content = render("critique_cot.j2", template_dir, question=question, response=response,
                     reference=reference if reference not in (None, "") else None)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return content + "\n"


def rule_critique_examples(task_name: str, n: int, seed: int = 0, kind: str = "ground_truth",
                           correct_share: float = 0.5, split: str = "train",
                           working: bool | str = "digits") -> list[dict[str, Any]]:
    """``n`` (question, response, reference, verdict, critique) dicts from a built-in task's ``split``: a share
    ``correct_share`` of right responses, the rest wrong (the task's typical mistake where it applies, else a
    near miss of a number answer, a random number, or another row's answer), critiqued by the rule critic of
    ``kind`` with a final verdict line. ``working``: how the critique first works the problem out, so a critic
    that does not see the reference computes it before it judges (a chain of thought, not a quote):
    ``digits`` (default), the column-by-column sum and a digit-by-digit comparison of :func:`digit_working`
    where the question is a sum (else as ``check``); ``check`` (or True), one line ``Check: 47+38= 85.`` (the
    first recipe: the verdict then hangs on comparing two whole numbers in one token, and a tiny critic
    trained on it stayed at the majority verdict); ``none`` (or False), no working."""
    from critique_rl.tasks import get_task

    task = get_task(task_name)
    rows = task.make_examples(split, n, seed)
    rng = random.Random(seed + 11)
    out = []
    for row in rows:
        part = task.for_row(row)
        right = part.sft_completion(row)
        if rng.random() < correct_share:
            response = right
        else:
            response = _wrong_response(part, row, rows, rng)
            if response is None:
                continue
        verdict = bool(part.verify(response, row["answer"]))
        request = CritiqueRequest(question=row["prompt"], response=response, reference=row["answer"],
                                  verdict=verdict, metadata={"answer": part.extract(response) or response})
        critique = render_rule(kind, request).strip() + "\n" + verdict_line(verdict)
        style = {True: "check", False: "none"}.get(working, working)  # type: ignore[call-overload]
        work = digit_working(row["prompt"], part.extract(response)) if style == "digits" else None
        if work is not None:
            critique = work + "\n" + critique
        elif style in ("digits", "check"):
            critique = f"Check: {row['prompt']} {row['answer']}.\n" + critique
        elif style != "none":
            raise UserError(f"working={working!r}: use digits, check or none")
        out.append({"question": row["prompt"], "response": response, "reference": row["answer"],
                    "verdict": verdict, "critique": critique})
    return out


def _wrong_response(task: Any, row: dict[str, Any], rows: list[dict[str, Any]], rng: random.Random) -> str | None:
    choice = rng.random()
    if choice < 0.5 and task.mistake is not None:
        wrong = task.mistake(row)
        if wrong is not None:
            return wrong
    answer = str(row["answer"])
    if answer.lstrip("-").isdigit():
        if choice > 0.9:  # a number of any size, as a policy early in training writes
            return str(rng.randrange(10 ** rng.randint(1, len(answer) + 1)))
        delta = rng.choice([-11, -10, -9, -2, -1, 1, 2, 9, 10, 11])
        return str(int(answer) + delta)
    for _ in range(8):
        other = rows[rng.randrange(len(rows))]
        if not task.verify(str(other["answer"]), row["answer"]):
            return task.sft_completion(other)
    return None


# ----------------------------------------------------------------------------------------------------------
# the critic cache as a data set


def cache_examples(cache_path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One example per (question, response) in a filled critic cache, and the cache's totals.

    The reply kept for a pair: the first try whose verdict agrees with the verifier's (what the run used),
    else the first try with a parseable verdict; pairs with no parseable verdict, and rows cached before the
    cache recorded its requests, are counted and skipped. Totals: ``replies``, ``prompt_tokens``,
    ``completion_tokens`` (every stored reply was paid for once), ``pairs``, ``skipped_no_request``,
    ``skipped_no_verdict``, ``models``."""
    from critique_rl.critics.cache import CritiqueCache

    path = Path(cache_path).expanduser()
    if not path.is_file():
        raise UserError(f"--cache '{cache_path}' does not exist; pass the critic_cache.sqlite a run wrote "
                        "(critic.cache_path, default <output_dir>/critic_cache.sqlite)")
    cache = CritiqueCache(path)
    try:
        records = cache.records()
    finally:
        cache.close()
    totals: dict[str, Any] = {"replies": len(records), "prompt_tokens": sum(r["prompt_tokens"] for r in records),
                              "completion_tokens": sum(r["completion_tokens"] for r in records),
                              "models": sorted({r["model"] for r in records}), "skipped_no_request": 0,
                              "skipped_no_verdict": 0}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r["question"] is None or r["response"] is None:
            totals["skipped_no_request"] += 1
            continue
        groups.setdefault((r["question"], r["response"]), []).append(r)
    out = []
    for (question, response), recs in groups.items():
        recs.sort(key=lambda r: (r["regeneration"] or 0, r["created"]))
        parsed = [(r, parse_verdict(r["text"])) for r in recs]
        truth = next((r["verdict"] for r in recs if r["verdict"] is not None), None)
        agreeing = [(r, v) for r, v in parsed if v is not None and (truth is None or v == truth)]
        usable = agreeing or [(r, v) for r, v in parsed if v is not None]
        if not usable:
            totals["skipped_no_verdict"] += 1
            continue
        rec, verdict = usable[0]
        out.append({"question": question, "response": response, "reference": rec["reference"],
                    "verdict": verdict, "verifier_verdict": truth, "critique": rec["text"].strip(),
                    "reference_shown": rec["reference_shown"]})
    totals["pairs"] = len(out)
    return out, totals


def split_held_out(examples: list[dict[str, Any]], share: float, seed: int) -> tuple[list, list]:
    """(train, held-out) split by question (no question on both sides), seeded."""
    if not 0.0 < share < 1.0:
        raise UserError(f"--held-out {share}: use a share in (0, 1), e.g. 0.2")
    questions = sorted({e["question"] for e in examples})
    random.Random(seed).shuffle(questions)
    k = max(1, round(share * len(questions)))
    held = set(questions[:k])
    train = [e for e in examples if e["question"] not in held]
    test = [e for e in examples if e["question"] in held]
    if not train or not test:
        raise UserError(f"{len(examples)} usable pairs over {len(questions)} questions are too few to hold "
                        f"{share:g} of them out; fill the cache with more critiques")
    return train, test


# ----------------------------------------------------------------------------------------------------------
# training and scoring


def train_critic_model(examples: list[dict[str, Any]], out_dir: str | Path, *, reference: str = "hidden",
                       steps: int = 600, batch_size: int = 32, learning_rate: float = 1e-3, seed: int = 0,
                       hidden_size: int = 256, layers: int = 2, heads: int = 8, vocab_size: int = 512,
                       max_positions: int = 512, template_dir: str | None = None, short_prompt: bool = True,
                       on_step: Callable[[int, float], None] | None = None,
                       card: dict[str, Any] | None = None, init_from: str | Path | None = None) -> Path:
    """SFT a tiny Llama on ``examples`` (critic prompt -> critique) and save it (model, tokenizer and
    :data:`CARD`) to ``out_dir``. ``reference``: ``hidden`` trains prompts without the reference answer (use the
    model with ``critic.reference: hidden``), ``visible`` with it when the example has one. ``short_prompt``:
    train on (and save in ``out_dir``, where HFCritic finds it) the compact :data:`SHORT_PROMPT` instead of the
    packaged ``critique_cot.j2`` (ignored when ``template_dir`` is given). ``init_from``: a critic directory to
    go on training (its model and tokenizer; the size arguments are then ignored) instead of a fresh model."""
    import torch

    from critique_rl.models import build_tiny_model, build_tiny_tokenizer
    from critique_rl.train.sft import sft_warmup

    if reference not in ("hidden", "visible"):
        raise UserError(f"--reference {reference!r}: use hidden or visible")
    if not examples:
        raise UserError("no training pairs for the critic")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if short_prompt and template_dir is None:
        (out / "critique_cot.j2").write_text(SHORT_PROMPT + "\n")
        template_dir = str(out)
    pairs = [(critic_prompt(e["question"], e["response"], e["reference"] if reference == "visible" else None,
                            template_dir=template_dir), e["critique"]) for e in examples]
    if init_from is not None:
        from critique_rl.models import load_policy

        model, tokenizer = load_policy(init_from, device="cpu")
        max_positions = int(model.config.max_position_embeddings)
    else:
        tokenizer = build_tiny_tokenizer([p + c for p, c in pairs], vocab_size=vocab_size)
    longest = max(len(tokenizer(p + c, add_special_tokens=False)["input_ids"]) for p, c in pairs) + 1
    if longest > max_positions:
        raise UserError(f"the longest critic pair is {longest} tokens, over the model's {max_positions} positions; "
                        "shorten the critiques (critic.max_tokens) or raise max_positions")
    if init_from is None:
        model = build_tiny_model(tokenizer, hidden_size=hidden_size, layers=layers, heads=heads,
                                 max_positions=max_positions, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        losses = sft_warmup(model, tokenizer, pairs, steps, batch_size, learning_rate, seed=seed, on_step=on_step)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    done_before = json.loads((Path(init_from) / CARD).read_text()).get("steps", 0) if init_from is not None else 0
    info = {"reference": reference, "examples": len(examples), "steps": done_before + steps, "batch_size": batch_size,
            "learning_rate": learning_rate, "final_loss": losses[-1] if losses else None, **(card or {})}
    (out / CARD).write_text(json.dumps(info, indent=2))
    return out


def critic_verdicts(model_dir: str | Path, examples: list[dict[str, Any]], *, reference: str = "hidden",
                    max_new_tokens: int = 48, batch_size: int = 64) -> list[bool | None]:
    """First-try verdicts (greedy, no regeneration) of the critic in ``model_dir`` on ``examples``."""
    from critique_rl.critics.hf import HFCritic

    critic = HFCritic(model_dir, kind="cot", max_new_tokens=max_new_tokens, batch_size=batch_size,
                      max_regenerations=0, reference=reference, device="cpu")
    requests = [CritiqueRequest(question=e["question"], response=e["response"], reference=e.get("reference"))
                for e in examples]
    return [c.verdict for c in critic.critique(requests)]  # verdict None on the request: the raw first try


def agreement_report(verdicts: list[bool | None], truth: list[bool | None]) -> dict[str, Any]:
    """``verdicts`` against ``truth`` (pairs whose truth is None are skipped): ``n``, ``agreement``,
    ``precision_wrong``, ``recall_wrong`` (wrong answers as the positive class, see :func:`verdict_scores`),
    ``unparsable`` and ``majority_baseline`` (the agreement of always giving the commoner verdict)."""
    checked = agreed = tp = fp = fn = unparsable = 0
    for v, t in zip(verdicts, truth, strict=True):
        if t is None:
            continue
        checked += 1
        unparsable += v is None
        agreed += v == t
        tp += v is False and not t
        fp += v is False and bool(t)
        fn += v is not False and not t
    scores = verdict_scores(checked, agreed, tp, fp, fn)
    return {"n": checked, "agreement": scores["accuracy"], "precision_wrong": scores["precision_wrong"],
            "recall_wrong": scores["recall_wrong"], "unparsable": unparsable / checked if checked else None,
            "majority_baseline": _majority(truth)}


def score_critic(model_dir: str | Path, examples: list[dict[str, Any]], *, reference: str = "hidden",
                 target: str = "verdict", max_new_tokens: int = 48, batch_size: int = 64) -> dict[str, Any]:
    """:func:`agreement_report` of the critic in ``model_dir`` on ``examples`` against ``target`` (``verdict``:
    the example's critique verdict, e.g. the source critic's; ``verifier``: the verifier's)."""
    verdicts = critic_verdicts(model_dir, examples, reference=reference, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    key = "verdict" if target == "verdict" else "verifier_verdict"
    return agreement_report(verdicts, [e.get(key) for e in examples])


def _majority(truth: list[bool | None]) -> float | None:
    known = [t for t in truth if t is not None]
    if not known:
        return None
    right = sum(known)
    return max(right, len(known) - right) / len(known)


def api_cost(totals: dict[str, Any], price_input: float | None, price_output: float | None) -> dict[str, Any]:
    """Tokens the cached API calls used and, given prices in $ per 1M tokens, what they cost."""
    out = {"replies": totals["replies"], "prompt_tokens": totals["prompt_tokens"],
           "completion_tokens": totals["completion_tokens"],
           "total_tokens": totals["prompt_tokens"] + totals["completion_tokens"]}
    if price_input is not None and price_output is not None:
        out["usd"] = totals["prompt_tokens"] * price_input / 1e6 + totals["completion_tokens"] * price_output / 1e6
    return out


def distill(cache_path: str | Path, out_dir: str | Path, *, held_out: float = 0.2, seed: int = 0,
            steps: int = 600, batch_size: int = 32, learning_rate: float = 1e-3, reference: str | None = None,
            max_new_tokens: int = 48, price_input: float | None = None, price_output: float | None = None,
            on_step: Callable[[int, float], None] | None = None, **model_kw: Any) -> dict[str, Any]:
    """Critic cache -> SFT pairs -> a local critic in ``out_dir``; its agreement with the cached critic on held-out
    pairs and the API cost the cache holds. ``reference`` None: as the source critic saw it (hidden unless every
    pair's prompt showed the reference). Writes ``out_dir/distill_report.json`` and returns the report."""
    examples, totals = cache_examples(cache_path)
    if len(examples) < 2:
        raise UserError(f"critic cache '{cache_path}' holds {len(examples)} usable (question, response, critique) "
                        f"pairs ({totals['replies']} replies, {totals['skipped_no_request']} without their request, "
                        f"{totals['skipped_no_verdict']} without a parseable verdict); fill it with a run first")
    if reference is None:
        shown = [e["reference_shown"] for e in examples]
        reference = "visible" if all(shown) else "hidden"
    train, test = split_held_out(examples, held_out, seed)
    card = {"source": "distilled", "cache": str(cache_path), "source_models": totals["models"]}
    train_critic_model(train, out_dir, reference=reference, steps=steps, batch_size=batch_size,
                       learning_rate=learning_rate, seed=seed, on_step=on_step, card=card, **model_kw)
    verdicts = critic_verdicts(out_dir, test, reference=reference, max_new_tokens=max_new_tokens)
    held = agreement_report(verdicts, [e["verdict"] for e in test])
    vs_verifier = agreement_report(verdicts, [e["verifier_verdict"] for e in test])
    source_vs_verifier = [e["verdict"] == e["verifier_verdict"] for e in test if e["verifier_verdict"] is not None]
    report = {"cache": str(cache_path), "out": str(out_dir), "reference": reference, "train_pairs": len(train),
              "held_out_pairs": len(test), "agreement_with_source": held, "local_vs_verifier": vs_verifier,
              "source_vs_verifier": (sum(source_vs_verifier) / len(source_vs_verifier)) if source_vs_verifier else None,
              "api_cost_replaced": api_cost(totals, price_input, price_output),
              "skipped": {"no_request": totals["skipped_no_request"], "no_verdict": totals["skipped_no_verdict"]}}
    Path(out_dir, "distill_report.json").write_text(json.dumps(report, indent=2))
    return report
