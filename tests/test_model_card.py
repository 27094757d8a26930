"""The model card (final/README.md) of a real run, and `critique-rl push` against a local stand-in of the Hub's
HTTP API on 127.0.0.1 (HF_ENDPOINT; never the real Hub)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from huggingface_hub.repocard_data import model_index_to_eval_results

from critique_rl.config import MemoryConfig, TrainConfig
from critique_rl.model_card import methods_used, render_model_card, write_model_card

QUICK = dict(tiny_hidden_size=64, tiny_heads=2, tiny_layers=1, sft_steps=4, sft_examples=64, max_steps=2,
             num_generations=4, generation_batch_size=8, mini_batch_size=8, eval_n=6, eval_batch_size=6,
             checkpoint_every=100, progress=False, log_rollouts=2)
TOKEN = "hf_testtoken_0123456789abcdef"


def _cfg(**kw: Any) -> dict[str, Any]:
    return TrainConfig(**{**QUICK, "output_dir": "unused", **kw}).to_dict()


def _ids(cfg: dict[str, Any]) -> set[str | None]:
    return {m.arxiv for m in methods_used(cfg)}


def test_methods_follow_the_config():
    default = _ids(_cfg())
    assert {"2402.03300", "2503.20783", "2506.03106", "1707.06347"} <= default
    assert not default & {"2601.05242", "2605.25604", "2507.16806", "2506.13351", "2106.09685", "2603.10165"}
    plain = _ids(_cfg(critique_on="none"))
    assert "2506.03106" not in plain and "2402.03300" in plain
    assert {"2601.05242"} <= _ids(_cfg(reward_aggregator="gdpo"))
    assert {"2605.25604"} <= _ids(_cfg(reward_aggregator="dvao"))
    assert {"2603.10165", "2601.20802"} <= _ids(_cfg(distill_weight=0.5))
    assert "2504.14945" in _ids(_cfg(offpolicy_gamma=0.1)) and "2504.14945" not in default
    assert "2506.13351" in _ids(_cfg(gates=["has_answer"]))
    assert "2506.01347" in _ids(_cfg(advantage_estimator="w_reinforce"))
    assert "2501.12948" not in _ids(_cfg(sft_steps=0)) and "2501.12948" in default


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    out = tmp_path_factory.mktemp("card") / "my-run"
    cfg = TrainConfig(**{**QUICK, "output_dir": str(out)}, memory=MemoryConfig(enabled=True, embeddings="lexical"))
    CritiqueGRPOTrainer(args=cfg).train()
    return out


def _front_matter(text: str) -> dict[str, Any]:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


def test_card_of_a_real_run(run_dir: Path):
    from critique_rl.memory import MemoryBank

    path = write_model_card(run_dir)
    assert path == run_dir / "final" / "README.md"
    text = path.read_text()
    meta = _front_matter(text)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"critique-rl", "critique-grpo", "memory"} <= set(meta["tags"])
    assert "base_model" not in meta  # the in-repo tiny model has no Hub id
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0]["value"] == round(summary["eval_accuracy_after_rl"], 4)
    assert f"| before RL (after the SFT warm-up) | {summary['eval_accuracy_before_rl']:.1%} |" in text
    assert f"| after RL (2 steps) | {summary['eval_accuracy_after_rl']:.1%} |" in text
    with MemoryBank(run_dir / "memory.sqlite", MemoryConfig(embeddings="lexical"), create=False) as bank:
        stats = bank.stats()
    assert (f"{stats['demonstrations']['count']} demonstration(s) and {stats['lessons']['count']} lesson(s)"
            in text)
    assert "arXiv:2506.03106" in text and "https://arxiv.org/abs/2402.03300" in text
    full = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert full["max_steps"] == 2 and full["memory"]["enabled"] is True


def test_card_names_the_base_model_and_hides_url_secrets(tmp_path: Path):
    run = tmp_path / "r"
    (run / "final").mkdir(parents=True)
    local = tmp_path / "qwen-instruct"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}))
    cfg = _cfg(model=str(local))
    cfg["lora"].update(enabled=True, merge_final=False)
    cfg["critic"]["base_url"] = "http://user:s3cret@127.0.0.1:8000/v1?key=abc"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    text = render_model_card(run)
    meta = _front_matter(text)
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and meta["library_name"] == "peft"
    assert "s3cret" not in text and "key=abc" not in text and "http://127.0.0.1:8000/v1" in text
    assert "No evaluation was recorded" in text and "arXiv:2106.09685" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("REPO_ID")' in text  # an adapter loads through peft
    cache = tmp_path / "hub" / "models--Org--Some-Model" / "snapshots" / "0123abc"
    cache.mkdir(parents=True)
    cfg["model"] = str(cache)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert _front_matter(render_model_card(run))["base_model"] == "Org/Some-Model"
    cfg["model"] = str(tmp_path)  # a local folder whose Hub id is unknown: no base_model, unless given
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert "base_model" not in _front_matter(render_model_card(run))
    assert _front_matter(render_model_card(run, base_model="Org/Given"))["base_model"] == "Org/Given"


# ---------------------------------------------------------------------------------------------------------
# push: a stand-in of the Hub's HTTP API (create repo, preupload, commit)

class FakeHub:
    def __init__(self, fail_status: int | None = None) -> None:
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.created: list[dict[str, Any]] = []
        self.files: dict[str, bytes] = {}
        self.commit_header: dict[str, Any] = {}
        self.validated: list[str] = []
        self.fail_status = fail_status
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.calls.append(("POST", self.path, dict(self.headers)))
                if hub.fail_status:
                    return self._reply(hub.fail_status, {"error": "Invalid credentials in Authorization header"})
                parts = self.path.split("?")[0].strip("/").split("/")
                if self.path == "/api/validate-yaml":  # the Hub checks a README's metadata before a commit
                    content = json.loads(body)["content"]
                    hub.validated.append(content)
                    try:
                        meta = yaml.safe_load(content[4:].split("\n---\n", 1)[0]) if content.startswith("---\n") \
                            else {}
                        if "model-index" in meta:
                            model_index_to_eval_results(meta["model-index"])
                    except Exception as exc:
                        return self._reply(400, {"errors": [{"message": repr(exc)}]})
                    return self._reply(200, {"errors": [], "warnings": []})
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    name = f"{payload.get('organization') or 'me'}/{payload['name']}"
                    return self._reply(200, {"url": f"{hub.url}/{name}"})
                if parts[:2] == ["api", "models"] and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if parts[:2] == ["api", "models"] and parts[4] == "commit":
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            hub.commit_header = item["value"]
                        elif item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    return self._reply(200, {"commitUrl": f"{hub.url}/{parts[2]}/{parts[3]}/commit/abc123",
                                             "commitOid": "abc123", "pullRequestUrl": None})
                return self._reply(404, {"error": f"not in the stand-in: {self.path}"})

            def do_GET(self) -> None:  # noqa: N802
                hub.calls.append(("GET", self.path, dict(self.headers)))
                self._reply(404, {"error": f"not in the stand-in: {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _push(run: Path, hub_url: str, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    """`critique-rl push` in a real subprocess (the console script's exit code, all of its output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub_url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HOME=str(run.parent / "hf_home"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "critique_rl.cli", "push", str(run), *args], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture
def push_here(monkeypatch, tmp_path):
    """`critique-rl push` through CliRunner in this process (no interpreter start-up per call)."""
    import huggingface_hub.constants as hub_constants
    from typer.testing import CliRunner

    from critique_rl.cli_push import push_command

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False, raising=False)
    app = typer.Typer()
    app.command()(push_command)

    def invoke(run: Path, hub_url: str, *args: str, token: str | None = TOKEN):
        env = {"HF_ENDPOINT": hub_url, "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf_home")}
        return CliRunner().invoke(app, [str(run), *args], env=env)

    return invoke


def test_push_uploads_final_and_the_card(run_dir: Path, push_here):
    card = run_dir / "final" / "README.md"
    card.unlink(missing_ok=True)  # push writes the card when the run has none
    with FakeHub() as hub:
        res = _push(run_dir, hub.url, "--repo-id", "me/critique-model", "--private")
    assert res.returncode == 0, res.stderr[-2000:]
    assert card.is_file() and 'from_pretrained("me/critique-model")' in card.read_text()
    assert TOKEN not in res.stdout + res.stderr
    assert len(hub.created) == 1 and hub.created[0]["name"] == "critique-model"
    assert hub.created[0]["organization"] == "me" and hub.created[0]["visibility"] == "private"
    assert all(h.get("authorization") == f"Bearer {TOKEN}" or h.get("Authorization") == f"Bearer {TOKEN}"
               for _, _, h in hub.calls)
    on_disk = {p.name: p.read_bytes() for p in (run_dir / "final").iterdir() if p.is_file()}
    assert set(on_disk) >= {"README.md", "config.json", "model.safetensors"}
    assert hub.files == on_disk  # every file of final/, byte for byte
    assert hub.validated == [on_disk["README.md"].decode()]  # the card's metadata passed the Hub's check
    assert "commit/abc123" in res.stdout
    write_model_card(run_dir)  # a card the trainer wrote: its usage example gets the repo id on push
    assert '"REPO_ID"' in card.read_text()
    with FakeHub() as hub:
        res = push_here(run_dir / "final", hub.url, "--repo-id", "org/second")
    assert res.exit_code == 0, res.output
    assert b'from_pretrained("org/second")' in hub.files["README.md"] and b"REPO_ID" not in hub.files["README.md"]
    assert "visibility" not in hub.created[0]  # not --private: the Hub's default


def test_push_errors_are_one_line_and_never_show_the_token(run_dir: Path, tmp_path: Path, push_here):
    with FakeHub(fail_status=401) as hub:
        res = _push(run_dir, hub.url, "--repo-id", "me/critique-model")
    assert res.returncode == 2 and TOKEN not in res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: push to me/critique-model") and "401" in lines[0], lines
    with FakeHub() as hub:
        res = push_here(run_dir, hub.url, "--repo-id", "me/x", token=None)
        assert res.exit_code == 2 and "HF_TOKEN is not set" in res.stderr and not hub.calls
        res = push_here(run_dir, hub.url, "--repo-id", "no namespace")
        assert res.exit_code == 2 and "--repo-id" in res.stderr and not hub.calls
        (tmp_path / "final").mkdir()
        (tmp_path / "config.yaml").write_text("model: tiny\n")
        res = push_here(tmp_path, hub.url, "--repo-id", "me/x")
        assert res.exit_code == 2 and "no config.json" in res.stderr and not hub.calls
        assert all(len(r.stderr.strip().splitlines()) == 1 for r in [res])
