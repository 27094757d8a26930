"""What the policy server (``critique_rl.agents.server``) adds to the engine's own generation time.

One run per model size:

1. **Through the server.** 16 agent loops (threads in a separate client process, stdlib HTTP keep-alive
   connections) play guess-the-number episodes against ``PolicyServer`` on 127.0.0.1: ``POST
   /v1/episodes/start``, one ``/v1/chat/completions`` call per turn (the whole history each time), ``finish``.
   The server batches the concurrent calls into engine calls and records every batch it ran (prompt ids +
   sampling settings). Timed: wall clock from the first handout (the agents released together) to the answer
   of the last episode's ``finish`` (until 2026-12-06 the timer ran to the last agent thread's exit, which also
   held each agent's final ``episodes/start`` waiting out its 2 s timeout once every episode was handed out;
   that number is still printed as "old: to client exit").
2. **Direct.** Right after, the same engine is called directly on exactly those batches (same prompts, same batch
   composition, same order), timed with nothing else running in the process.

Wall overhead = server wall / direct engine time - 1: everything the server adds per call (HTTP, JSON, history
check, rendering, batching waits, the client loop and env in between, and on a busy machine the scheduling
delays of all those threads) relative to the engine's own time on the same work. Target (issue 27): <= 10% at 16
concurrent clients. It is split exactly into **gaps** (server wall - the server's engine calls, over the direct
engine time: the time the engine thread did not generate) + **engine slowdown** (the server's engine calls / the
same calls direct - 1: the engine sharing the process and the cores with the HTTP side, and on a shared machine
the load drifting between the two runs; ``--rounds N`` repeats the pair and prints the median). Where the wall
went is printed from the engine thread's batch timeline: head (to the first call queued), engine, idle (the
engine thread with no call queued: replies sent, the agents' own work, next requests parsed), collect (a batch's
first call queued to its dispatch; straggler wait: its last call to its dispatch), tail (the last engine call to
the last finish); with the client's round trips and its CPU per call.

Also printed: the server process's CPU time outside the engine calls (HTTP, validation, rendering, recording;
torch runs on one thread, so the engine's CPU is the engine thread's) as a fraction of the direct engine's CPU
time: what the server costs in compute, independent of how busy the machine is; and the HTTP handler threads'
CPU per call. Episodes are greedy so both sides generate the same tokens. Timings on a shared machine are noisy:
the load average (``uptime``) is printed with them.

Last, the server's own round trip per call: one client in this process plays episodes one after another against
an engine that answers at once (a zero-time stand-in, used only for this line), p50/p90 in milliseconds.

Usage: python benchmarks/server_overhead.py [--sizes tiny larger] [--rounds 1] [--episodes-per-client 3]
[--max-new-tokens 16]
Writes benchmarks/results/server_overhead.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from critique_rl.agents.episode_hub import EpisodeHub  # noqa: E402
from critique_rl.agents.guess import GuessNumberEnv, make_tasks  # noqa: E402
from critique_rl.agents.runner import EpisodeLimits, generate_from_ids  # noqa: E402
from critique_rl.agents.server import PolicyServer, ServeOptions  # noqa: E402
from critique_rl.agents.trajectory import TINY_CHAT_TEMPLATE, TurnRenderer  # noqa: E402
from critique_rl.models import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from critique_rl.rollout.base import SamplingParams  # noqa: E402
from critique_rl.rollout.hf import HFGenerator  # noqa: E402

SIZES = {  # in-repo Llama models built from scratch (no download)
    "tiny": dict(hidden_size=64, layers=1, heads=2),        # the tests' model
    "larger": dict(hidden_size=256, layers=4, heads=4),     # ~40x the parameters
    "big": dict(hidden_size=512, layers=8, heads=8),        # ~25M parameters
}
TEXTS = (["U: Guess my number from 1 to 16.\nA: 4<|eos|>\nU: Higher. It is from 5 to 16.\nA: 8<|eos|>\n"] * 30
         + ["Lower. Correct! Say one number. Out of guesses. It was 12."] * 10)


# ---- the client process ----------------------------------------------------------------------------------------

def _post(conn: http.client.HTTPConnection, path: str, body: dict, headers: dict | None = None) -> tuple[int, Any]:
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    return resp.status, (json.loads(raw) if raw else None)


def _agent(port: int, max_tokens: int, out: list, barrier: threading.Barrier) -> None:
    """One agent loop; appends (calls, time of its last finish's answer, per-call round trips, per-call times
    from a reply to the next request of the episode: the client's own work)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    barrier.wait()
    calls, last_finish, rtts, between = 0, None, [], []
    while True:
        status, ep = _post(conn, "/v1/episodes/start", {"timeout": 2})
        if status != 200:
            break
        env = GuessNumberEnv()
        messages = [{"role": "user", "content": env.reset(ep["task"])}]
        ret, success, replied = 0.0, False, None
        for _ in range(4):
            t0 = time.perf_counter()
            if replied is not None:
                between.append(t0 - replied)
            status, reply = _post(conn, "/v1/chat/completions",
                                  {"model": "policy", "messages": messages, "max_tokens": max_tokens},
                                  {"X-Episode-Id": ep["episode_id"]})
            replied = time.perf_counter()
            rtts.append(replied - t0)
            if status != 200:
                raise RuntimeError(f"chat call failed: {status} {reply}")
            calls += 1
            action = reply["choices"][0]["message"]["content"]
            messages.append({"role": "assistant", "content": action})
            step = env.step(action)
            ret += step.reward
            if step.done:
                success = bool(step.info.get("success"))
                break
            messages.append({"role": "user", "content": step.observation})
        _post(conn, f"/v1/episodes/{ep['episode_id']}/finish", {"reward": ret, "success": success})
        last_finish = time.perf_counter()
    out.append((calls, last_finish, rtts, between))


def client_process(port: int, clients: int, max_tokens: int, queue: Any) -> None:
    """``clients`` agent threads; puts a dict on ``queue``: calls, ``wall_s`` (barrier release to the last
    episode's finish answer), ``process_wall_s`` (to the last agent's exit: includes each agent's final
    ``episodes/start`` that waits out its 2 s timeout once every episode is handed out), client CPU seconds, and
    per-call round trips / times between a reply and the episode's next request (seconds)."""
    out: list[tuple] = []
    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=_agent, args=(port, max_tokens, out, barrier)) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    end = time.perf_counter()
    queue.put({"calls": sum(o[0] for o in out), "t0": t0, "wall_s": max(o[1] for o in out if o[1] is not None) - t0,
               "process_wall_s": end - t0, "cpu_s": time.process_time() - cpu0,
               "rtts": [x for o in out for x in o[2]], "between": [x for o in out for x in o[3]]})


# ---- one measurement -------------------------------------------------------------------------------------------

def build(size: str, max_new_tokens: int) -> tuple[EpisodeHub, Any]:
    tok = build_tiny_tokenizer(TEXTS, vocab_size=300)
    tok.chat_template = TINY_CHAT_TEMPLATE
    model = build_tiny_model(tok, max_positions=512, seed=3, **SIZES[size])
    engine = HFGenerator(model, tok)
    hub = EpisodeHub(idle_timeout=600)
    hub.engine, hub.tokenizer, hub.renderer = engine, tok, TurnRenderer(tok, use_chat=True)
    hub.limits = EpisodeLimits(max_turns=4, max_new_tokens=max_new_tokens)
    return hub, model


def replay(hub: EpisodeHub, batches: list[tuple[list[list[int]], SamplingParams]]) -> tuple[float, int]:
    """The same engine calls, directly: (seconds, generated tokens)."""
    t0, tokens = time.perf_counter(), 0
    for ids, params in batches:
        outs = generate_from_ids(hub.engine, hub.tokenizer, ids, params)
        tokens += sum(len(g[0].token_ids) for g in outs)
    return time.perf_counter() - t0, tokens


def breakdown(timeline: list[Any], t0: float, t_end: float) -> dict[str, float]:
    """Where the wall clock from the first handout (``t0``) to the last finish (``t_end``) went, in seconds (the
    parts add up to the wall): ``head`` (to the first call queued: handouts, first requests), ``engine`` (engine
    calls), ``idle`` (engine thread idle, no call queued: replies sent, the agents' own work, next requests
    parsed and prepared), ``collect`` (a batch's first call queued to its dispatch) of which ``straggler_wait``
    (its last call queued to its dispatch: waiting for calls that may still come), ``tail`` (the last engine call
    to the last finish answer)."""
    out = dict(head=0.0, engine=0.0, idle=0.0, collect=0.0, straggler_wait=0.0, tail=0.0)
    if not timeline:
        return out
    out["head"] = timeline[0].first_queued - t0
    prev = None
    for b in timeline:
        start = b.first_queued if prev is None else max(b.first_queued, prev)
        if prev is not None:
            out["idle"] += start - prev
        out["collect"] += b.dispatched - start
        out["straggler_wait"] += b.dispatched - max(b.last_queued, start)
        out["engine"] += b.finished - b.dispatched
        prev = b.finished
    out["tail"] = t_end - prev
    return {k: round(v, 4) for k, v in out.items()}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else 0.0


def measure(size: str, clients: int, episodes_per_client: int, max_new_tokens: int, wait_ms: float) -> dict[str, Any]:
    hub, model = build(size, max_new_tokens)
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    warm = [hub.renderer.first("Guess my number from 1 to 16.")] * clients
    for _ in range(3):  # warm-up (first calls allocate)
        generate_from_ids(hub.engine, hub.tokenizer, warm, params)
    tasks = make_tasks("overhead", clients * episodes_per_client, seed=0)
    results: list = []
    player = threading.Thread(target=lambda: results.extend(hub.play(tasks, 1, greedy=True, poll_s=0.05)))
    player.start()
    server = PolicyServer(hub, ServeOptions(port=0, max_batch=clients, batch_wait_ms=wait_ms, record_batches=True))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with server:
        proc = ctx.Process(target=client_process, args=(server.port, clients, max_new_tokens, q))
        cpu0 = time.process_time()
        proc.start()
        got = q.get(timeout=1800)
        server_cpu = time.process_time() - cpu0
        proc.join(timeout=60)
        player.join(timeout=60)
        stats = server.stats()["server"]
        handler_cpu = server.handler_cpu_s() if hasattr(server, "handler_cpu_s") else None
    hub.close()
    calls, server_wall = got["calls"], got["wall_s"]
    batcher = server.batcher
    batches = batcher.batches if batcher is not None else []
    assert batches is not None and len(results) == len(tasks)
    cpu0 = time.process_time()
    direct_s, direct_tokens = replay(hub, batches)
    direct_cpu = time.process_time() - cpu0
    engine_cpu = batcher.engine_cpu_s if batcher is not None else 0.0
    timeline = getattr(batcher, "timeline", None)
    parts = breakdown(timeline, got["t0"], got["t0"] + server_wall) if timeline else None
    gen_tokens = stats["generated_tokens"]
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    return {
        "size": size, "params_m": round(params_m, 2), "clients": clients, "episodes": len(tasks), "calls": calls,
        "engine_calls": len(batches), "mean_batch": round(calls / max(1, len(batches)), 2),
        "max_new_tokens": max_new_tokens, "batch_wait_ms": wait_ms,
        "server_wall_s": round(server_wall, 3), "server_engine_s": round(stats["engine_s"], 3),
        "direct_engine_s": round(direct_s, 3), "generated_tokens": gen_tokens, "direct_tokens": direct_tokens,
        "server_calls_per_s": round(calls / server_wall, 1), "direct_calls_per_s": round(calls / direct_s, 1),
        "server_tokens_per_s": round(gen_tokens / server_wall, 1),
        "direct_tokens_per_s": round(direct_tokens / direct_s, 1),
        "overhead": round(server_wall / direct_s - 1, 4),
        "gaps_share": round((server_wall - stats["engine_s"]) / direct_s, 4),
        "engine_slowdown": round(stats["engine_s"] / direct_s - 1, 4),
        "client_process_wall_s": round(got["process_wall_s"], 3),
        "overhead_to_client_exit": round(got["process_wall_s"] / direct_s - 1, 4),
        "wall_breakdown_s": parts,
        "client_rtt_ms_p50_p90": [_pct(got["rtts"], 0.5), _pct(got["rtts"], 0.9)],
        "client_between_calls_ms_p50_p90": [_pct(got["between"], 0.5), _pct(got["between"], 0.9)],
        "client_cpu_ms_per_call": round(1000 * got["cpu_s"] / calls, 3),
        "batch_sizes": [len(ids) for ids, _ in batches],
        "server_cpu_s": round(server_cpu, 3), "server_engine_cpu_s": round(engine_cpu, 3),
        "direct_cpu_s": round(direct_cpu, 3),
        "server_cpu_ms_per_call_outside_engine": round(1000 * (server_cpu - engine_cpu) / calls, 3),
        "handler_cpu_ms_per_call": None if handler_cpu is None else round(1000 * handler_cpu / calls, 3),
        "cpu_overhead": round((server_cpu - engine_cpu) / direct_cpu, 4),
        "server_ms_per_call": round(1000 * server_wall / calls, 2),
        "direct_ms_per_call": round(1000 * direct_s / calls, 2),
    }


class ZeroTimeEngine:
    """Answers every prompt at once with the same 16 tokens: isolates the server's own per-call latency."""

    def __init__(self, tokenizer: Any) -> None:
        self.ids = tokenizer(" 7" * 8, add_special_tokens=False)["input_ids"]

    def sync_weights(self) -> None:
        return None

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Any]]:
        from critique_rl.rollout.base import Completion

        return [[Completion(token_ids=list(self.ids), logprobs=[0.0] * len(self.ids), text=" 7" * 8, finished=False)]
                for _ in prompt_ids]


def server_latency(calls: int = 200) -> dict[str, float]:
    """One client in this process, one episode after another, against a zero-time engine: the round trip of a
    chat call through the server (HTTP, JSON, history check, rendering, recording), in milliseconds."""
    hub, _ = build("tiny", 16)
    hub.engine = ZeroTimeEngine(hub.tokenizer)
    episodes = calls // 4
    player = threading.Thread(target=lambda: hub.play(make_tasks("latency", episodes, seed=0), 1, poll_s=0.05))
    player.start()
    times: list[float] = []
    with PolicyServer(hub, ServeOptions(port=0)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for _ in range(episodes):
            _, ep = _post(conn, "/v1/episodes/start", {"timeout": 5})
            messages = [{"role": "user", "content": ep["task"]["prompt"]}]
            for _turn in range(4):
                t0 = time.perf_counter()
                _, reply = _post(conn, "/v1/chat/completions", {"model": "policy", "messages": messages},
                                 {"X-Episode-Id": ep["episode_id"]})
                times.append(1000 * (time.perf_counter() - t0))
                messages += [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                             {"role": "user", "content": "Higher."}]
            _post(conn, f"/v1/episodes/{ep['episode_id']}/finish", {"reward": 0.0})
        player.join(timeout=30)
    hub.close()
    times.sort()
    return {"calls": len(times), "p50_ms": round(times[len(times) // 2], 3),
            "p90_ms": round(times[int(len(times) * 0.9)], 3), "min_ms": round(times[0], 3)}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "larger"], choices=sorted(SIZES))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--episodes-per-client", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--rounds", type=int, default=1,
                   help="server run + direct replay pairs per size (each pair back to back; the table shows every "
                        "round, then the median overhead: on a shared machine the load drifts between pairs)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "server_overhead.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        for k in range(args.rounds):
            before = uptime()
            row = measure(size, args.clients, args.episodes_per_client, args.max_new_tokens, args.batch_wait_ms)
            row["round"] = k
            row["uptime_before"], row["uptime_after"] = before, uptime()
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| model | params | calls | engine calls (mean batch) | server calls/s | direct calls/s | server tok/s | "
          "direct tok/s | ms/call server / direct | wall overhead | (old: to client exit) | server CPU outside the "
          "engine |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['params_m']}M | {r['calls']} | {r['engine_calls']} ({r['mean_batch']}) | "
              f"{r['server_calls_per_s']} | {r['direct_calls_per_s']} | {r['server_tokens_per_s']} | "
              f"{r['direct_tokens_per_s']} | {r['server_ms_per_call']} / {r['direct_ms_per_call']} | "
              f"{100 * r['overhead']:+.1f}% | {100 * r['overhead_to_client_exit']:+.1f}% | "
              f"{r['server_cpu_ms_per_call_outside_engine']} ms/call = {100 * r['cpu_overhead']:.1f}% of the "
              "engine's CPU |")
    print("\nwall overhead = gaps (server wall - its engine calls, over the direct engine time) + engine slowdown (the "
          "engine calls inside the server vs the same calls direct)")
    for size in args.sizes:
        rs = [r for r in rows if r["size"] == size]
        med = statistics.median(r["overhead"] for r in rs)
        print(f"{size}: " + "; ".join(
            f"round {r['round']}: {100 * r['overhead']:+.1f}% = gaps {100 * r['gaps_share']:+.1f}% + engine "
            f"{100 * r['engine_slowdown']:+.1f}%" for r in rs) + (f"; median {100 * med:+.1f}%" if len(rs) > 1 else ""))
    print("\nwhere the server wall went (ms; parts add up to the wall): head = handouts and first calls, engine = engine "
          "calls, idle = engine idle with no call queued (replies, the agents' own work, next requests), collect = "
          "first call of a batch to its dispatch (straggler wait: last call to dispatch), tail = last engine call to "
          "last finish")
    for r in rows:
        b = r["wall_breakdown_s"] or {}
        print(f"{r['size']} (round {r['round']}): " + ", ".join(f"{k} {1000 * v:.1f}" for k, v in b.items())
              + f"; direct engine {1000 * r['direct_engine_s']:.1f}; handler CPU {r['handler_cpu_ms_per_call']} ms/call"
              + f"; client: round trip p50/p90 {r['client_rtt_ms_p50_p90']} ms, reply to next request p50/p90 "
              + f"{r['client_between_calls_ms_p50_p90']} ms, client CPU {r['client_cpu_ms_per_call']} ms/call")
    latency = server_latency()
    print(f"\nserver round trip per chat call (1 client in process, zero-time engine, {latency['calls']} calls): "
          f"p50 {latency['p50_ms']} ms, p90 {latency['p90_ms']} ms, min {latency['min_ms']} ms")
    for r in rows:
        print(f"{r['size']} (round {r['round']}): load {r['uptime_before'].split('load average:')[-1].strip()} (before), "
              f"{r['uptime_after'].split('load average:')[-1].strip()} (after)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "server_latency": latency, "machine": platform.platform(), "cpus": os.cpu_count(),
                               "torch_threads": args.threads}, indent=2))
    return rows


if __name__ == "__main__":
    main()
