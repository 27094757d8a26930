"""Episodes played by remote agent loops as the trainer's rollout source (``critique-rl serve``).

:class:`ServerSource` is an :class:`~critique_rl.agents.source.EpisodeSource` whose ``run`` hands the tasks out
through an :class:`~critique_rl.agents.episode_hub.EpisodeHub` and blocks until clients have finished them;
everything after (critiques, refinements, advantages, the update batch, directive distillation, memory) is
inherited, so an episode played through the server is the same :class:`~critique_rl.train.rollout_batch.RolloutBatch`
row as a built-in one::

    collect:       sampler.next_batch(G) -> hub.play(tasks, n)            # clients play n episodes per task
    critique:      the env's / configured critic, or the client's feedback text (critic.backend: feedback)
    refinements:   hub.play(failed tasks, 1, contexts=critiques)          # the critique in the system message
    update:        refined episodes trained under the plain context       # (memory context, no critique)

The optimizer step runs under ``hub.engine_lock`` (the server generates under the same lock) and bumps
``hub.policy_version`` (episodes finished on weights older than ``max_staleness`` steps are replayed).
Held-out evaluation plays the environment in process (``eval_via="env"``, the same greedy evaluation as
``critique-rl train``) or hands the held-out tasks to the clients, greedy and never trained (``"clients"``).
Every step appends the ids of the episodes it trained on to ``served_episodes.jsonl`` (cut back to the
checkpoint's step on ``--resume``, so an id appears once in the run's history).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from critique_rl.agents.episode_hub import EpisodeHub
from critique_rl.agents.registry import EnvSpec, EpisodeCritic
from critique_rl.agents.source import EpisodeCritiques, EpisodeSource
from critique_rl.agents.trajectory import Trajectory
from critique_rl.critics.base import Critique
from critique_rl.errors import ConfigError
from critique_rl.train.metrics import JsonlWriter
from critique_rl.train.rollout_batch import AdvantagePlan, RolloutBatch
from critique_rl.train.step_context import EpisodeRun, EpisodeStep

LEDGER = "served_episodes.jsonl"
NO_FEEDBACK = "The episode did not succeed. Think about what went wrong and try a different approach."


class ClientFeedbackCritic:
    """Critiques from the clients (``critic.backend: feedback`` with ``agent.critique_source: critic``): an
    episode's critique is the feedback text its client sent with ``finish``; an episode without one gets the
    env's own critic (when it has one) or a short generic critique, counted as a fallback."""

    kind = "feedback"

    def __init__(self, fallback: EpisodeCritic | None = None) -> None:
        self.fallback = fallback
        self.feedback_used = 0
        self.fallbacks = 0

    def critique_episodes(self, trajectories: list[Trajectory]) -> list[Critique]:
        out: list[Critique] = []
        for t in trajectories:
            text = t.turns[-1].info.get("feedback") if t.turns else None
            if isinstance(text, str) and text.strip():
                self.feedback_used += 1
                out.append(Critique(text=text.strip(), verdict=t.success, kind=self.kind))
                continue
            self.fallbacks += 1
            if self.fallback is not None:
                c = self.fallback.critique_episodes([t])[0]
                c.fallback = True
                out.append(c)
            else:
                out.append(Critique(text=NO_FEEDBACK, verdict=t.success, kind="indicative", fallback=True))
        return out

    def metrics(self) -> dict[str, float]:
        return {"critic/feedback_used": float(self.feedback_used), "critic/feedback_missing": float(self.fallbacks)}


class ServedLedger:
    """``served_episodes.jsonl`` (main process): per step, the ids of the episodes it trained on. A run cuts it back
    to the step it starts from before its first step (a resumed run trains the steps after its checkpoint again,
    so an id appears once in the run's history)."""

    def __init__(self, path: Path, fresh: bool) -> None:
        if fresh:
            path.unlink(missing_ok=True)
        self.writer = JsonlWriter(path)
        self.started = False

    def start(self, step: int) -> None:
        """Before step ``step + 1``: the first time, drop the rows after ``step``."""
        if not self.started:
            self.writer.truncate_after_step(step)
            self.started = True

    def write(self, row: dict[str, Any]) -> None:
        self.writer.write(row)

    def close(self) -> None:
        self.writer.close()


class ServerSource(EpisodeSource):
    """Episodes of remote clients (through ``hub``) as the trainer's rollout source.

    Args:
        spec: the environment whose tasks are handed out (``agent.env``); its ``make_env`` is used only for the
            warm-up's scripted episodes and, with ``eval_via="env"``, the held-out evaluation.
        hub: the hub the HTTP server hands the episodes out from.
        eval_via: ``"env"`` (held-out episodes in process, greedy) or ``"clients"`` (handed out, greedy,
            never trained).
    """

    def __init__(self, spec: EnvSpec, hub: EpisodeHub, critic: Any = None, bank: Any = None,
                 eval_via: Literal["env", "clients"] = "env") -> None:
        super().__init__(spec, critic=critic, bank=bank)
        if eval_via not in ("env", "clients"):
            raise ConfigError("eval_via", eval_via, "use env (held-out episodes in process) or clients")
        self.hub = hub
        self.eval_via = eval_via
        self._ledger: ServedLedger | None = None
        self._ids: dict[int, str] = {}  # id(trajectory) -> episode id of the step's training episodes

    def for_step(self, ctx: EpisodeStep) -> ServerSource:
        view = super().for_step(ctx)
        view._ids = {}  # the view's own: the ids of the episodes it plays
        return view

    @staticmethod
    def check_config(cfg: Any, world: int) -> None:
        EpisodeSource.check_config(cfg, world)
        if world > 1:
            raise ConfigError("num_processes", world, "critique-rl serve trains in one process (one hub, one "
                              "engine behind the HTTP server); launch it without accelerate's multi-process")
        if cfg.critic.backend == "feedback" and cfg.agent.critique_source != "critic":
            raise ConfigError("agent.critique_source", cfg.agent.critique_source, "critic.backend: feedback reads "
                              "the clients' feedback text as the critique; set agent.critique_source: critic")

    # ------------------------------------------------------------------------------------------------------
    def setup_model(self, run: EpisodeRun, resume_from: Path | None) -> dict[str, Any]:
        samplers = super().setup_model(run, resume_from)
        hub, cfg = self.hub, self.cfg
        with hub.lock:
            hub.tokenizer, hub.renderer, hub.limits = run.tokenizer, self.renderer, self.limits
            hub.temperature, hub.top_p = cfg.temperature, cfg.top_p
            hub.context_fn = self.memory.context_fn if self.memory is not None else None
        if run.is_main:
            self._ledger = ServedLedger(run.out / LEDGER, fresh=resume_from is None)
        return samplers

    @contextmanager
    def weight_update(self) -> Iterator[None]:
        """The trainer holds this around each optimizer step and each SFT phase (the rollout source's hook): the
        weights change under ``hub.engine_lock``, then the policy is one version more."""
        with self.hub.engine_lock:
            yield
        self.hub.bump_version()

    def _build_critic(self, run: EpisodeRun) -> EpisodeCritic | None:
        cfg = self.cfg
        if (cfg.critique_on != "none" and self._critic_arg is None and cfg.agent.critique_source == "critic"
                and cfg.critic.backend == "feedback"):
            return ClientFeedbackCritic(self.spec.critic() if self.spec.critic is not None else None)
        return super()._build_critic(run)

    # ------------------------------------------------------------------------------------------------------
    # episodes
    # ------------------------------------------------------------------------------------------------------
    def run(self, generator: Any, tasks: list[dict[str, Any]], n: int, *, greedy: bool = False,
            contexts: list[str | None] | None = None, env_kwargs: dict[str, Any] | None = None) -> list[Trajectory]:
        """Training episodes and refinements: handed out through the hub (blocks until all are finished).
        Greedy (held-out) episodes: in process with ``eval_via="env"``, else through the hub, never trained."""
        if greedy and self.eval_via == "env":
            kw = {} if env_kwargs is None else {"env_kwargs": env_kwargs}
            return super().run(generator, tasks, n, greedy=True, contexts=contexts, **kw)
        if env_kwargs is not None and env_kwargs != self.env_kwargs:
            raise ConfigError("phases[].env_kwargs", env_kwargs, "the clients of critique-rl serve run their own "
                              "env; a phase cannot change its arguments there (set them in your agent loop, and "
                              "remove env_kwargs from the phase)")
        self.hub.engine = generator
        label = "eval" if greedy else ("refine" if contexts is not None else "train")
        ids: list[str] = []
        trajs = self.hub.play(tasks, n, contexts, greedy=greedy, label=label, ids_out=ids)
        if not greedy:  # held-out episodes are never trained
            self._ids.update((id(x), e) for x, e in zip(trajs, ids, strict=True))
        return trajs

    def evaluate(self, generator: Any) -> dict[str, Any]:
        """Held-out success (greedy); in process it runs under ``engine_lock`` (one engine user at a time)."""
        if self.eval_via == "clients":
            return super().evaluate(generator)
        with self.hub.engine_lock:
            return super().evaluate(generator)

    def collect(self, timer: Any) -> tuple[RolloutBatch, dict[str, Any]]:
        if self._ledger is not None:
            self._ledger.start(self.ctx.step)  # resumed: the steps after the checkpoint are trained again
        return super().collect(timer)

    def _memory_update(self, batch: RolloutBatch, crit: EpisodeCritiques | None) -> dict[str, Any]:
        with self.hub.lock:  # retrieval for new episodes waits while the bank is written
            return super()._memory_update(batch, crit)

    def step_metrics(self, batch: RolloutBatch, crit: EpisodeCritiques | None, plan: AdvantagePlan,
                     local: dict[str, Any], selection: dict[str, Any]) -> dict[str, Any]:
        out = super().step_metrics(batch, crit, plan, local, selection)
        trained = [self._ids[id(x)] for x in batch.episodes if x.turns]
        refined = [self._ids[id(crit.refined[j])] for _, _, j in plan.kept] if crit is not None else []
        self.hub.mark_trained(len(trained) + len(refined))
        st = self.hub.stats()
        out.update({f"serve/{k}": float(st[k]) for k in ("handed_out", "finished", "dropped_timeout",
                                                           "dropped_stale", "policy_version")})
        if self._ledger is not None:
            self._ledger.write({"step": self.ctx.step + 1, "episodes": trained, "refinements": refined,
                                "policy_version": st["policy_version"]})
        return out

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
