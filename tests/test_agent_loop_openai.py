"""examples/agent_loop_openai.py against a loopback OpenAI-compatible server: lessons read before acting,
outcomes recorded after, helped credit; the bank API in someone else's loop."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from critique_rl.config import MemoryConfig
from critique_rl.memory import MemoryBank

sys.path.insert(0, str(Path(__file__).parent))
from critic_server import CriticServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("agent_loop_openai", ROOT / "examples" / "agent_loop_openai.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def policy(midpoint: bool):
    """A served 'policy': binary search on the range in the last user message, or always the low end."""

    def respond(body):
        last = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        lo, hi = map(int, re.search(r"from (\d+) to (\d+)", last).groups())
        return {"content": str((lo + hi) // 2 if midpoint else lo)}

    return respond


def test_loop_reads_memory_before_acting_and_records_after(tmp_path):
    mod = load_example()
    bank_path = tmp_path / "bank.sqlite"
    cfg = MemoryConfig(embeddings="lexical", top_k_demos=1, top_k_lessons=1, token_budget=200)
    with CriticServer(responder=policy(midpoint=False)) as server:  # a weak policy: fails, lessons recorded
        MemoryBank(bank_path, config=cfg).close()
        bank = MemoryBank(bank_path, config=cfg)
        client = _client(server)
        out = [mod.run_episode(client, "policy", mod.GuessNumberEnv(4), t, bank) for t in mod.make_tasks("t", 6, 0)]
        first_body = server.bodies[0]
        later = server.bodies[-1]
    assert not any(m["role"] == "system" for m in first_body["messages"])  # empty bank: no context
    assert later["messages"][0]["role"] == "system" and "Lessons from earlier mistakes" in later["messages"][0]["content"]
    assert out[0]["memory_used"] is False and out[-1]["memory_used"] is True
    failed = [o for o in out if not o["success"]]
    assert failed and all(o["turns"] == 4 for o in failed)
    st = bank.stats()
    assert st["lessons"]["count"] >= 1 and st["demonstrations"]["count"] == sum(o["success"] for o in out)
    with CriticServer(responder=policy(midpoint=True)) as server:  # a good policy: demonstrations + helped
        client = _client(server)
        wins = [mod.run_episode(client, "policy", mod.GuessNumberEnv(4), t, bank) for t in mod.make_tasks("u", 6, 1)]
    assert sum(w["success"] for w in wins) >= 5
    helped = sum(r.helped for r in bank.list())
    assert helped >= 1 and bank.stats()["demonstrations"]["count"] >= 1
    bank.close()


def test_main_runs_end_to_end(tmp_path, capsys, monkeypatch):
    mod = load_example()
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with CriticServer(responder=policy(midpoint=True)) as server:
        results = mod.main(["--base-url", server.base_url, "--model", "policy", "--episodes", "3",
                            "--bank", str(tmp_path / "b.sqlite"), "--embeddings", "lexical"])
    assert len(results) == 3 and '"success_rate"' in capsys.readouterr().out


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key="test-key", max_retries=0, timeout=10.0)
