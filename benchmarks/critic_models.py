"""Build and score the two local critics of the critic-error benchmark (issue #29 items 2 and 3).

    python benchmarks/critic_models.py --out benchmarks/results/critic_models --steps 800

1. ``local``: a tiny critic trained in-repo on rule critiques of the ``addition`` task with the reference hidden
   (``critique-rl critic train``'s recipe: column-by-column working, a digit-by-digit comparison, then the
   verdict). Scored on held-out pairs (the task's eval split) against the verifier: verdict accuracy,
   precision and recall on wrong answers, and the majority baseline.
2. ``distilled``: an "API critic" -- the loopback OpenAI-compatible server of ``tests/critic_server.py`` whose
   replies are written by a careful grader that recomputes the sum (it never sees the reference) -- critiques
   the same kind of (question, response) pairs through :class:`~critique_rl.critics.OpenAICritic`, which fills
   the SQLite critic cache as a run does; ``critique-rl critic distill``'s :func:`distill` turns the cache into
   a local critic and reports its agreement with the API critic on held-out questions and the API tokens the
   cache holds (the server reports ~4 characters a token, as an English tokenizer does; dollars at the
   ``--price-*`` given).

Writes ``<out>/local``, ``<out>/distilled`` (critic directories) and ``<out>/report.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def api_critic_reply(body: dict[str, Any]) -> dict[str, Any]:
    """The stand-in API critic: checks a sum column by column from the question and the response alone."""
    prompt = body["messages"][-1]["content"]
    question = prompt.split("Question:\n", 1)[1].split("\n", 1)[0].strip()
    response = prompt.split("Response:\n", 1)[1].split("\n\n", 1)[0].strip()
    a, b = (int(x) for x in re.findall(r"\d+", question)[:2])
    total = a + b
    units = a % 10 + b % 10
    carry = units // 10
    tens = a // 10 % 10 + b // 10 % 10 + carry
    lines = [f"{a % 10}+{b % 10}={units}" + (" carry 1" if carry else "") + f", {a // 10 % 10}+{b // 10 % 10}"
             + ("+1" if carry else "") + f"={tens}: {total}."]
    digits = re.findall(r"\d+", response)
    given = digits[-1] if digits else None
    ok = given is not None and int(given) == total
    if given is None:
        lines.append("No number given.")
    else:
        w = max(len(given), len(str(total)))
        pairs = " ".join(f"{g}{'=' if g == t else '≠'}{t}" for g, t in zip(given.zfill(w), str(total).zfill(w),
                                                                            strict=True))
        lines.append(f"Response {given}: {pairs}.")
    lines.append("Right." if ok else f"It should be {total}.")
    lines.append("Verdict: correct" if ok else "Verdict: incorrect")
    text = "\n".join(lines)
    return {"content": text, "usage": (max(1, len(prompt) // 4), max(1, len(text) // 4))}


def build_local(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from critique_rl.critics.train_critic import rule_critique_examples, score_critic, train_critic_model

    pairs = rule_critique_examples("addition", args.examples, seed=args.seed)
    held = rule_critique_examples("addition", args.eval_examples, seed=args.seed + 1, split="eval")
    t0 = time.perf_counter()
    init = None
    if args.resume and (out / "model.safetensors").is_file():  # go on training the saved critic
        init = out.parent / "local_before_resume"
        import shutil

        shutil.rmtree(init, ignore_errors=True)
        shutil.copytree(out, init)
    train_critic_model(pairs, out, reference="hidden", steps=args.steps, init_from=init, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, seed=args.seed, hidden_size=args.hidden_size,
                       heads=args.heads, on_step=_ticker("local", args.steps),
                       card={"source": "rule ground_truth critiques on addition (train split), digit working"})
    wall = time.perf_counter() - t0
    scores = score_critic(out, held, reference="hidden", target="verdict", max_new_tokens=args.max_new_tokens)
    return {"train_pairs": len(pairs), "held_out_pairs": len(held), "train_s": round(wall), **scores}


def build_distilled(out: Path, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    from critic_server import CriticServer

    from critique_rl.critics import OpenAICritic
    from critique_rl.critics.base import CritiqueRequest
    from critique_rl.critics.train_critic import distill, rule_critique_examples

    cache.unlink(missing_ok=True)
    pairs = rule_critique_examples("addition", args.examples, seed=args.seed + 2, working="none")
    requests = [CritiqueRequest(question=e["question"], response=e["response"], reference=e["reference"],
                                verdict=e["verdict"]) for e in pairs]
    with CriticServer(responder=api_critic_reply) as srv:
        critic = OpenAICritic("api-critic", base_url=srv.base_url, kind="cot", reference="hidden",
                              cache_path=cache, max_concurrency=16, max_retries=0, timeout_s=30)
        t0 = time.perf_counter()
        critic.critique(requests)
        critic.close()
        fill_s = time.perf_counter() - t0
        calls = srv.requests
    t0 = time.perf_counter()
    report = distill(cache, out, held_out=0.2, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                     learning_rate=args.learning_rate, max_new_tokens=args.max_new_tokens,
                     price_input=args.price_input, price_output=args.price_output, hidden_size=args.hidden_size,
                     heads=args.heads, on_step=_ticker("distilled", args.steps))
    return {"api_calls": calls, "cache_fill_s": round(fill_s, 1), "train_and_score_s": round(time.perf_counter() - t0),
            **report}


def _ticker(label: str, total: int):  # noqa: ANN202 - progress line every 10%
    t0 = time.perf_counter()

    def tick(step: int, loss: float) -> None:
        if (step + 1) % max(1, total // 10) == 0:
            print(f"  {label} step {step + 1}/{total} loss {loss:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    return tick


def main() -> None:
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/critic_models")
    ap.add_argument("--which", nargs="+", default=["local", "distilled"], choices=["local", "distilled"])
    ap.add_argument("--examples", type=int, default=4000)
    ap.add_argument("--eval-examples", type=int, default=300)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--price-input", type=float, default=0.15, help="$ per 1M prompt tokens (gpt-4o-mini's list price)")
    ap.add_argument("--price-output", type=float, default=0.60, help="$ per 1M completion tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="local: go on training the critic already in --out")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "report.json"
    report: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    report["command"] = "python benchmarks/critic_models.py " + " ".join(sys.argv[1:])
    if "local" in args.which:
        report["local"] = build_local(root / "local", args)
        print(json.dumps({"local": report["local"]}), flush=True)
        path.write_text(json.dumps(report, indent=1))
    if "distilled" in args.which:
        report["distilled"] = build_distilled(root / "distilled", root / "api_critic_cache.sqlite", args)
        print(json.dumps({"distilled": report["distilled"]}), flush=True)
        path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
