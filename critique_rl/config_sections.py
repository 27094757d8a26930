"""The nested config sections of a run: ``critic:``, ``memory:``, ``lora:``, ``agent:``, ``vllm:``, the data
selection filters and ``phases:``. Each field is documented where it is declared."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from critique_rl.config_checks import (
    _check_finite,
    _non_negative,
    _positive,
    looks_like_secret,
)
from critique_rl.errors import ConfigError


@dataclass
class CriticConfig:
    """Which critic writes critiques, and how the client behaves (Critique-GRPO, arXiv:2506.03106)."""

    backend: str = "rule"
    """`rule`: templates from the verifier and reference, no model. `hf`: a local transformers model
    (`model` is a path, or `policy` for self-critique). `openai`: any OpenAI-compatible endpoint. `feedback`: the
    row's `feedback_column` text is the critique of its wrong answers (no critic call); other answers get the
    rule critique of `kind`."""
    kind: Literal["indicative", "ground_truth", "cot"] = "ground_truth"
    """`indicative`: verdict only; `ground_truth`: verdict plus the reference answer; `cot`: a step-by-step
    critique written by a model that ends in a parseable verdict."""
    model: str | None = None
    """Model name (openai backend) or local path / `policy` (hf backend)."""
    base_url: str | None = None
    """OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 for a vLLM server. None = api.openai.com."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key. The key itself is never stored or logged."""
    temperature: float = 0.0
    max_tokens: int = 256
    max_concurrency: int = 8
    """Most requests in flight at once."""
    timeout_s: float = 30.0
    """Per-request timeout in seconds."""
    max_retries: int = 3
    """Retries after the first try, with exponential backoff and jitter; Retry-After is honoured."""
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    cache_path: str | None = None
    """SQLite cache of API replies, keyed by (model, messages, params). None = <output_dir>/critic_cache.sqlite."""
    max_regenerations: int = 2
    """`cot` critiques whose verdict disagrees with the verifier are regenerated up to this many times."""
    fallback_kind: Literal["auto", "ground_truth", "indicative"] = "auto"
    """Kind used when a critique cannot be had. `auto`: ground_truth when a reference exists, else indicative."""
    template_dir: str | None = None
    """Folder with user jinja2 templates overriding the packaged ones (rendered in jinja2's sandbox)."""
    max_failure_share: float = 0.5
    """Training stops with an error when more than this share of critic requests failed (HTTP 401, timeouts,
    a dead server...), counted over the whole run once at least 16 requests were made; every failure is also
    warned about. 1.0 = never stop (failed critiques fall back to rule critiques)."""
    circuit_breaker_failures: int = 5
    """Circuit breaker of the openai backend: after this many requests in a row failed (after their retries),
    further requests fail at once, without a network call, for `circuit_breaker_cooldown_s`; then one probe
    request is let through. 0 = off."""
    circuit_breaker_cooldown_s: float = 30.0
    reference: Literal["visible", "hidden"] = "visible"
    """`visible`: a model critic's prompt (`critique_cot.j2`) shows the row's reference answer. `hidden`: the
    critic gets the question and the response only, as a critic model in the wild does (it never sees the answer,
    so its verdicts can be wrong: `critique/verdict_accuracy`, `critique/verdict_precision_wrong`,
    `critique/verdict_recall_wrong` are logged every step against the verifier); a critique whose verdict the
    verifier contradicts is regenerated (`max_regenerations`), then replaced by an indicative rule critique, which
    quotes no answer either. Applies to the hf and openai backends."""
    verdict_pattern: str | None = None
    r"""Extra regex for the verdict a `cot` critique ends in, with one capturing group around the verdict word
    (case-insensitive), e.g. `Final grade:\s*(pass|fail)`; tried before the built-in forms `Verdict:
    correct|incorrect` and the Critique-GRPO paper's `Conclusion: right|wrong`. None = the built-in forms."""
    error_rate: float = 0.0
    """`backend: noisy` only: share of critiques made wrong on purpose (what a critic's errors cost; see
    `critique_rl/critics/noisy.py`), in [0, 1]."""
    error_kind: Literal["verdict", "hint"] = "verdict"
    """`backend: noisy`: `verdict` flips the verdict; `hint` keeps a wrong answer's verdict but names a wrong fix."""
    error_check: bool = True
    """`backend: noisy`: the verifier check (a critique whose verdict the verifier contradicts is drawn again, up
    to `max_regenerations` times, then replaced by the fallback rule critique); false = verdicts taken as given."""
    error_inner: str = "rule"
    """`backend: noisy`: the backend whose critiques get the errors (built from this same section)."""
    error_seed: int = 0
    """`backend: noisy`: seed of the error draws."""

    def __post_init__(self) -> None:
        if self.verdict_pattern is not None:
            try:
                groups = re.compile(self.verdict_pattern).groups
            except re.error as exc:
                raise ConfigError("critic.verdict_pattern", self.verdict_pattern,
                                  f"not a valid regular expression ({exc})") from None
            if groups < 1:
                raise ConfigError("critic.verdict_pattern", self.verdict_pattern,
                                  "put one capturing group around the verdict word, e.g. 'Grade:\\s*(pass|fail)'")
        _positive("critic.max_concurrency", self.max_concurrency)
        _positive("critic.timeout_s", self.timeout_s)
        _non_negative("critic.max_retries", self.max_retries)
        _non_negative("critic.max_regenerations", self.max_regenerations)
        if not 0.0 <= self.error_rate <= 1.0:
            raise ConfigError("critic.error_rate", self.error_rate, "use a share in [0, 1], e.g. 0.3")
        _positive("critic.max_tokens", self.max_tokens)
        _check_finite(self, "critic.")
        if not 0.0 <= self.max_failure_share <= 1.0:
            raise ConfigError("critic.max_failure_share", self.max_failure_share, "use a value in [0, 1] (1 = never stop)")
        _non_negative("critic.circuit_breaker_failures", self.circuit_breaker_failures)
        _positive("critic.circuit_breaker_cooldown_s", self.circuit_breaker_cooldown_s)
        if looks_like_secret(self.api_key_env):
            raise ConfigError("critic.api_key_env", "<hidden: it looks like an API key>",
                              "give the NAME of the environment variable that holds the key (e.g. OPENAI_API_KEY), "
                              "never the key itself; export the key in that variable")
        if self.template_dir is not None and not Path(self.template_dir).expanduser().is_dir():
            raise ConfigError("critic.template_dir", self.template_dir,
                              "not a directory; point it at a folder of .j2 templates, or remove it for the packaged ones")
        from critique_rl.critics.factory import critic_backend_names  # late: the registry of critic backends

        if self.backend not in critic_backend_names():
            raise ConfigError("critic.backend", self.backend, f"choose one of {critic_backend_names()}")
        if self.backend == "openai" and not self.model:
            raise ConfigError("critic.model", self.model, "the openai backend needs a model name, e.g. gpt-4o-mini")
        if self.reference == "hidden" and self.fallback_kind == "ground_truth":
            raise ConfigError("critic.fallback_kind", self.fallback_kind,
                              "with critic.reference hidden a fallback critique may not quote the reference answer; "
                              "use auto or indicative")
        if self.reference == "hidden" and self.backend == "rule" and self.kind == "ground_truth":
            raise ConfigError("critic.reference", self.reference,
                              "a rule ground_truth critique is the reference answer; use kind indicative, or a model "
                              "critic (backend hf or openai, kind cot)")
        if self.kind == "cot" and self.backend == "rule":
            raise ConfigError(
                "critic.kind", self.kind, "the rule backend cannot write cot critiques; use backend hf or openai"
            )


@dataclass
class MemoryConfig:
    """SkillRL-style memory: demonstrations from successes, lessons abstracted from failures."""

    enabled: bool = False
    bank_path: str | None = None
    """SQLite file of the bank. None = <output_dir>/memory.sqlite (the run's own bank, snapshotted into every
    checkpoint). `critique-rl memory ...` defaults to `memory/critique-rl.sqlite` (the repository's `memory/`
    folder, git-ignored); point this there to train into that bank."""
    top_k_demos: int = 2
    top_k_lessons: int = 2
    token_budget: int = 256
    """Most tokens (whitespace words) of retrieved context rendered into a prompt."""
    embeddings: Literal["auto", "sentence_transformers", "lexical"] = "auto"
    """`auto`: sentence-transformers when installed (extra `embeddings`), else lexical BM25."""
    dedup_threshold: float = 0.9
    """A new lesson whose similarity to an existing one is above this merges into it."""
    abstraction: Literal["rule", "critic"] = "rule"
    """How failures become lessons: rule-based from verifier + critique, or by the critic with lesson.j2."""
    min_score: float | None = 0.0
    """Drop retrieved records whose retrieval score is <= this. 0.0 (default) drops the records that match no word
    of the question, which lexical retrieval otherwise adds to fill `top_k_*` (and, with embeddings, records at
    cosine <= 0). Decided from evidence (a), issue #28: on the experience task, seeds 3-5 with every arm fixed
    before the run, 3 lessons with min_score 0 gave +34.2 ± 20.0 points of held-out success over no memory
    (+12.9 / +37.1 / +52.5) while the same lessons with the top-up kept (None) gave +0.0 on every seed: the tiny
    policy copied the unrelated record. None keeps every record retrieval packed (the behaviour before)."""
    usefulness_weight: float = 0.5
    """Retrieval ranks the 3 x top_k most similar records by similarity / best similarity + this x the record's
    usefulness (smoothed mean lift in [-1, 1]: how much more often the episodes that saw it succeeded than the
    step's baseline; `critique-rl memory list --sort useful`). 0: similarity only (issue #28 item 3)."""

    def __post_init__(self) -> None:
        _check_finite(self, "memory.")
        _non_negative("memory.top_k_demos", self.top_k_demos)
        _non_negative("memory.top_k_lessons", self.top_k_lessons)
        _positive("memory.token_budget", self.token_budget)
        if self.usefulness_weight < 0:
            raise ConfigError("memory.usefulness_weight", self.usefulness_weight,
                              "use a value >= 0 (0 ranks by similarity only)")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise ConfigError("memory.dedup_threshold", self.dedup_threshold, "use a value in (0, 1]")


@dataclass
class LoraConfig:
    """Low-rank adapters through ``peft`` (LoRA, arXiv:2106.09685). Only adapter weights train; the KL
    reference is the base model with the adapter disabled (no second copy of the weights)."""

    enabled: bool = False
    r: int = 16
    """Rank of the update matrices."""
    alpha: float = 32.0
    """Scaling numerator: the update is (alpha / r) * B A."""
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    """Module names (e.g. [q_proj, v_proj]) or `all-linear` (every linear layer but the output head)."""
    merge_final: bool = True
    """Write `final/` as a merged full model (loadable without peft); false = the adapter alone."""

    def __post_init__(self) -> None:
        _check_finite(self, "lora.")
        _positive("lora.r", self.r)
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("lora.dropout", self.dropout, "use a value in [0, 1)")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("lora.target_modules", self.target_modules, "name at least one module, or all-linear")


@dataclass
class AgentConfig:
    """Multi-turn agent training (critique_rl/agents): episodes in an environment instead of single answers.

    With ``env`` set, `critique-rl train` runs :class:`critique_rl.train.trainer.CritiqueGRPOTrainer` on episodes (:mod:`critique_rl.agents.source`): ``num_generations``
    episodes per task form a GRPO group, ``generation_batch_size`` episodes per step; critiques are written per
    episode and refined episodes re-run with the critique in context; memory is read at reset and written after."""

    env: str | None = None
    """A built-in env (`guess_number`) or `package.module:function` returning an `EnvSpec`. None = single-turn."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the env constructor (guess_number: max_guesses)."""
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the env's task generator (guess_number: lo, hi)."""
    max_turns: int = 4
    """Policy turns per episode at most (an episode still running then stops with stop_reason max_turns)."""
    max_turn_tokens: int = 8
    """New tokens per action at most (an action cut there is kept, finished=False)."""
    max_episode_tokens: int | None = None
    """Tokens in the whole episode context at most; None = the model's positions."""
    critique_source: Literal["env", "critic"] = "env"
    """Episode critiques from the env's own rule critic (`env`, when it has one) or from the `critic:` section
    (`critic`: rule/hf/openai over the episode transcript)."""
    threaded_envs: bool = False
    """Step synchronous envs in worker threads (for envs that wait on I/O); async envs always interleave."""
    seed_per_task: bool = False
    """Sample each task's episodes under their own seed, from (seed, step, the task's place in the global batch), so
    the episodes do not depend on the number of processes: a run under `accelerate launch` repeats the 1-process run
    of the same global batch. Costs batching: one engine call per task and turn instead of one per turn."""

    def __post_init__(self) -> None:
        _positive("agent.max_turns", self.max_turns)
        _positive("agent.max_turn_tokens", self.max_turn_tokens)
        if self.max_episode_tokens is not None:
            _positive("agent.max_episode_tokens", self.max_episode_tokens)


@dataclass
class VLLMConfig:
    """The vLLM rollout engine (``rollout_backend: vllm``): where it runs and how it gets the new weights.

    `colocate`: a ``vllm.LLM`` inside the trainer process (one per process), sharing the accelerator; after every
    optimizer step the trainer's weights (LoRA: merged) are loaded into it in place. `server`: a separately started
    OpenAI-compatible ``vllm serve`` (see docs/scaling.md); rollouts are HTTP requests, and after every step the
    weights are written to ``sync_dir`` and the server loads them (``/collective_rpc``)."""

    mode: Literal["colocate", "server"] = "colocate"
    gpu_memory_utilization: float = 0.3
    """Share of the GPU's memory a colocated engine may take for weights + KV cache; the trainer keeps the rest."""
    kv_cache_gb: float | None = None
    """KV-cache size in GiB (overrides gpu_memory_utilization). None = from gpu_memory_utilization on GPU, 1 GiB on
    CPU (a CPU engine would otherwise size its cache from the machine's free memory)."""
    sleep: bool = True
    """Colocate: put the engine to sleep (KV cache freed, weights offloaded) during each policy update and wake it
    for the next rollout (vLLM sleep mode). Ignored where the platform has no sleep mode (CPU)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Engine weights dtype. `auto`: bfloat16 on a GPU, float32 on CPU."""
    max_model_len: int | None = None
    """Longest prompt + completion the engine serves. None = the model config's max positions."""
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    """No CUDA graphs / compilation: faster start, and weights can be swapped under the engine freely."""
    base_url: str | None = None
    """Server: the OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1."""
    served_model: str | None = None
    """Server: the served model name. None = the first model the server lists."""
    sync_dir: str | None = None
    """Server: folder (readable by the server: same machine or shared filesystem) the trainer writes the new weights
    to after every step. None = <output_dir>/vllm_sync."""
    timeout_s: float = 600.0
    """Server: per-request timeout in seconds (a whole batch of completions, or a weight load)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("vllm.gpu_memory_utilization", self.gpu_memory_utilization, "use a value in (0, 1]")
        if self.kv_cache_gb is not None:
            _positive("vllm.kv_cache_gb", self.kv_cache_gb)
        if self.max_model_len is not None:
            _positive("vllm.max_model_len", self.max_model_len)
        _positive("vllm.tensor_parallel_size", self.tensor_parallel_size)
        _positive("vllm.timeout_s", self.timeout_s)
        if self.mode == "server" and not self.base_url:
            raise ConfigError("vllm.base_url", self.base_url, "server mode needs the server's URL, e.g. "
                              "http://127.0.0.1:8000/v1 (start it with `vllm serve`, see docs/scaling.md)")


@dataclass
class DynamicSamplingConfig:
    """DAPO dynamic sampling (arXiv:2503.14476): groups whose rewards have zero spread (all samples scored alike
    on every objective, so every advantage is 0) are dropped and the batch is refilled with further prompts."""

    enabled: bool = False
    max_refill_batches: int = 3
    """Most extra prompt batches sampled per step to refill it; a batch still short is padded with dropped
    groups (no gradient). Each refill costs a whole batch of samples (logged as selection/samples)."""

    def __post_init__(self) -> None:
        _non_negative("dynamic_sampling.max_refill_batches", self.max_refill_batches)


@dataclass
class PassRateFilterConfig:
    """Difficulty filter on the prompt pool: measured before RL (and every `refresh_every` steps) by sampling each
    prompt `samples` times; prompts solved too rarely or too often leave the pool until the next refresh."""

    enabled: bool = False
    samples: int = 8
    """Samples per prompt for the pass-rate estimate (at the RL temperature)."""
    max_prompts: int | None = None
    """Prompts measured (a seeded sample of the pool); the others always stay. None = the whole pool."""
    too_hard_at_most: float | None = 0.0
    """Prompts with pass rate <= this are dropped as too hard (0.0: never solved). null = keep hard prompts."""
    too_easy_at_least: float | None = 1.0
    """Prompts with pass rate >= this are dropped as too easy (1.0: always solved). null = keep easy prompts."""
    refresh_every: int = 0
    """Re-measure the whole measured pool every N RL steps (dropped prompts may come back). 0 = only before RL."""

    def __post_init__(self) -> None:
        _check_finite(self, "pass_rate_filter.")
        _positive("pass_rate_filter.samples", self.samples)
        if self.max_prompts is not None:
            _positive("pass_rate_filter.max_prompts", self.max_prompts)
        _non_negative("pass_rate_filter.refresh_every", self.refresh_every)
        for name in ("too_hard_at_most", "too_easy_at_least"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"pass_rate_filter.{name}", value, "use a pass rate in [0, 1], or null to turn "
                                  "that side off")
        if (self.too_hard_at_most is not None and self.too_easy_at_least is not None
                and self.too_hard_at_most >= self.too_easy_at_least):
            raise ConfigError("pass_rate_filter.too_hard_at_most", self.too_hard_at_most,
                              f"must be below too_easy_at_least ({self.too_easy_at_least}), or every prompt is dropped")


@dataclass
class LowVarianceFilterConfig:
    """DRO's query filter (arXiv:2506.13351): groups whose scalar reward (sum_k b_k r_k) varies too little across
    their samples give a degenerate comparison and get no gradient this step."""

    enabled: bool = False
    min_std: float = 0.0
    """Groups whose reward std is below this are dropped (0 = no threshold)."""
    drop_fraction: float = 0.0
    """Also drop this fraction of each step's groups with the lowest reward std (decided over all processes)."""

    def __post_init__(self) -> None:
        _check_finite(self, "low_variance_filter.")
        _non_negative("low_variance_filter.min_std", self.min_std)
        if not 0.0 <= self.drop_fraction < 1.0:
            raise ConfigError("low_variance_filter.drop_fraction", self.drop_fraction, "use a value in [0, 1)")


@dataclass
class PhaseConfig:
    """One phase of a training schedule (``phases:``), run in order by one `critique-rl train`."""

    kind: Literal["sft", "rl"] = "rl"
    """`sft`: imitation on the phase's data (prompt -> demonstration); `rl`: GRPO / Critique-GRPO steps."""
    steps: int | None = None
    """(required) Optimizer steps of the phase (SFT steps, or RL steps: every RL step counts towards the run's step)."""
    name: str | None = None
    learning_rate: float | None = None
    """None = `sft_learning_rate` (sft) or `learning_rate` (rl). An rl phase's rate scales the run's schedule."""
    reward_funcs: list[str] | None = None
    """rl: this phase's objectives (names as in `reward_funcs`). None = the run's `reward_funcs`."""
    reward_weights: list[float] | None = None
    """rl: one weight per objective of the phase. None = the run's `reward_weights` (or all 1.0)."""
    train_file: str | None = None
    """This phase's data (JSONL/parquet/CSV/saved dataset with `prompt`, `answer`). None = the run's rows."""
    tasks: dict[str, float] | None = None
    """rl, with the run's `tasks`: this phase's sampling weights over them, e.g. {addition: 1} (a task left out or
    weighted 0 is not drawn). None = the run's weights."""
    task_kwargs: dict[str, Any] | None = None
    """Episodes (`agent.env`): this phase's task-generator arguments, over `agent.task_kwargs` (e.g. {hi: 64} for
    harder games). The phase draws from its own tasks (sft: its scripted episodes); evaluation keeps the run's
    held-out tasks. None = the run's tasks."""
    env_kwargs: dict[str, Any] | None = None
    """Episodes (`agent.env`): this phase's env-constructor arguments, over `agent.env_kwargs` (e.g. {max_guesses:
    3}). Evaluation keeps the run's env. None = the run's env."""

    def check(self, where: str) -> None:
        if self.steps is None:
            raise ConfigError(f"{where}.steps", None, "every phase needs its number of steps, e.g. steps: 100")
        _non_negative(f"{where}.steps", self.steps)
        if self.learning_rate is not None:
            _positive(f"{where}.learning_rate", self.learning_rate)
        if self.kind == "sft" and (self.reward_funcs is not None or self.reward_weights is not None):
            raise ConfigError(f"{where}.reward_funcs", self.reward_funcs, "an sft phase has no rewards; move them "
                              "to an rl phase")
        if self.reward_funcs is not None and not self.reward_funcs:
            raise ConfigError(f"{where}.reward_funcs", self.reward_funcs, "name at least one reward, or leave it out")
        for name in ("task_kwargs", "env_kwargs"):
            if getattr(self, name) is not None and (self.train_file or self.tasks):
                raise ConfigError(f"{where}.{name}", getattr(self, name), "an episode phase draws its tasks from the "
                                  "env; train_file and tasks are single-turn data: drop one of the two")
