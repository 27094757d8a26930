"""``critique-rl serve CONFIG``: train the policy behind an OpenAI-compatible server while agent loops play it.

The config is a run config with an ``agent:`` section (the environment whose tasks are handed out, e.g.
``guess_number``). One process holds everything::

    hub     = EpisodeHub(idle_timeout, max_staleness)           # tasks out, finished episodes back
    trainer = CritiqueGRPOTrainer(cfg) with ServerSource(hub)  # the one trainer; episodes come from the hub
    server  = PolicyServer(hub, ServeOptions(host, port, ...)) # /v1/chat/completions, /v1/episodes/*
    trainer.train() in a background thread; the server answers while it trains

Clients get a task with ``POST /v1/episodes/start`` (``critique_rl.agents.client``), play it with ordinary chat
calls carrying the episode id, and ``finish`` it with the reward. The run directory is the trainer's
(checkpoints, metrics.jsonl, memory bank) plus ``served_episodes.jsonl`` (the ids each step trained on) and
``serve.json`` (the server's URL, written once it listens). ``--resume`` continues from the newest checkpoint:
the task order is the trainer's checkpointed sampler, the episodes of an unfinished step are played again (new
ids), the memory bank is the checkpoint's copy.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, Literal

import typer
from rich.console import Console

from critique_rl.errors import ConfigError, UserError

SERVE_FILE = "serve.json"


def build_serve_trainer(cfg: Any, hub: Any, *, eval_via: Literal["env", "clients"] = "env", critic: Any = None,
                        memory: Any = None) -> Any:
    """The one trainer with a :class:`~critique_rl.agents.server_source.ServerSource` on ``hub`` as its rollout
    source (``cfg.agent.env`` names the environment whose tasks are handed out)."""
    if cfg.agent.env is None:  # before the heavy imports: a wrong config fails in about a second
        raise ConfigError("agent.env", None, "critique-rl serve hands out the tasks of an environment; name one in "
                          "the agent: section (e.g. guess_number, or package.module:function returning an EnvSpec)")
    from critique_rl.agents.registry import get_env_spec
    from critique_rl.agents.server_source import ServerSource
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    source = ServerSource(get_env_spec(cfg.agent.env), hub, critic=critic, bank=memory, eval_via=eval_via)
    return CritiqueGRPOTrainer(args=cfg, episode_source=source)


class ServeRun:
    """A serve run: hub, trainer (in a background thread) and HTTP server. ``start()`` returns once the server
    listens; ``wait()`` joins training (re-raising its error) and stops the server unless ``keep_serving``."""

    def __init__(self, cfg: Any, *, host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None,
                 idle_timeout: float = 300.0, max_staleness: int = 0, eval_via: Literal["env", "clients"] = "env",
                 resume: bool = False, keep_serving: bool = False, server_options: dict[str, Any] | None = None,
                 critic: Any = None, memory: Any = None) -> None:
        from critique_rl.agents.episode_hub import EpisodeHub
        from critique_rl.agents.server import PolicyServer, ServeOptions

        if idle_timeout <= 0:
            raise UserError(f"--idle-timeout {idle_timeout}: use a number of seconds > 0")
        if max_staleness < 0:
            raise UserError(f"--max-staleness {max_staleness}: use >= 0 optimizer steps")
        self.cfg = cfg
        self.resume = resume
        self.keep_serving = keep_serving
        self.hub = EpisodeHub(idle_timeout=idle_timeout, max_staleness=max_staleness)
        self.trainer = build_serve_trainer(cfg, self.hub, eval_via=eval_via, critic=critic, memory=memory)
        self.server = PolicyServer(self.hub, ServeOptions(host=host, port=port, api_key_env=api_key_env,
                                                          **(server_options or {})))
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def start(self) -> ServeRun:
        self.server.start()
        out = Path(self.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / SERVE_FILE).write_text(json.dumps({"base_url": self.base_url, "pid": os.getpid(),
                                                  "model": self.hub.model_name}) + "\n")
        self._thread = threading.Thread(target=self._train, name="critique-rl-trainer", daemon=True)
        self._thread.start()
        return self

    def _train(self) -> None:
        from critique_rl.agents.episode_hub import HubClosed

        try:
            self.summary = self.trainer.train(resume=self.resume)
        except HubClosed:
            self.error = UserError("training stopped: the server was shut down while episodes were being played "
                                   "(continue with --resume)")
        except BaseException as exc:  # noqa: BLE001 - handed to wait() in the main thread
            self.error = exc
        finally:
            self.hub.close()  # clients asking for a task get none (plain chat calls are still answered)
            src = getattr(self.trainer, "episodes", None)
            if src is not None and hasattr(src, "close"):
                src.close()

    def training_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Join training (``timeout`` seconds at most; None: until it ends); re-raise its error. The server is
        stopped once training ended, unless ``keep_serving``."""
        assert self._thread is not None, "start() the run first"
        self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        if self.error is not None or not self.keep_serving:
            self.server.stop()
        if self.error is not None:
            raise self.error
        return self.summary

    def stop(self) -> None:
        """Shut down: no more tasks, training interrupted at its next wait for episodes, server stopped."""
        self.hub.close()
        self.server.stop()
        if self._thread is not None:
            self._thread.join(30)


def serve_command(
    config: Path = typer.Argument(..., help="YAML run config with an agent: section (the env whose tasks are served)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free port; serve.json in the run dir says which)."),
    api_key_env: str | None = typer.Option(None, "--api-key-env",
                                           help="Environment variable holding the bearer token clients must send."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the run directory."),
    output_dir: str | None = typer.Option(None, "--output-dir", help="Run directory (overrides the config)."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="RL steps (overrides the config)."),
    seed: int | None = typer.Option(None, "--seed", help="Run seed (overrides the config)."),
    idle_timeout: float = typer.Option(300.0, "--idle-timeout",
                                       help="Seconds without a call after which an episode is dropped and replayed."),
    max_staleness: int = typer.Option(0, "--max-staleness", help="Optimizer steps an episode's weights may lag "
                                      "behind when it finishes; older episodes are dropped and replayed."),
    eval_via: str = typer.Option("env", "--eval-via", help="Held-out evaluation: env (in process, greedy) or "
                                 "clients (handed out greedy, never trained)."),
    keep_serving: bool = typer.Option(False, "--keep-serving",
                                      help="After training, keep answering chat calls with the final policy."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (logs only)."),
) -> None:
    """Serve the policy being trained (OpenAI-compatible) and train it on the episodes agent loops play."""
    from critique_rl.config import load_config

    if eval_via not in ("env", "clients"):
        raise UserError(f"--eval-via {eval_via!r}: choose env or clients")
    overrides: dict[str, Any] = {"output_dir": output_dir, "max_steps": max_steps, "seed": seed}
    if no_progress:
        overrides["progress"] = False
    cfg = load_config(config, **overrides)
    run = ServeRun(cfg, host=host, port=port, api_key_env=api_key_env, idle_timeout=idle_timeout,
                   max_staleness=max_staleness, eval_via=eval_via, resume=resume,  # type: ignore[arg-type]
                   keep_serving=keep_serving)
    console = Console(stderr=True)
    run.start()
    console.print(f"serving {run.hub.model_name} at {run.base_url} (run directory: {cfg.output_dir})")
    previous = signal.signal(signal.SIGTERM, lambda *_: run.stop())
    try:
        while run.wait(timeout=1.0) is None and run.training_alive():
            pass
        summary = run.summary
        if summary is not None:
            from critique_rl.train.run_setup import summary_table

            Console().print(summary_table(summary))
        if keep_serving:
            console.print(f"training done; serving the final policy at {run.base_url} (Ctrl-C stops)")
            run.server.wait()
    except KeyboardInterrupt:
        console.print("interrupted: stopping the server (continue training with --resume)")
        run.stop()
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
