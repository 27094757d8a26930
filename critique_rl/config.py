"""Configuration dataclasses, YAML loading and strict validation.

One documented dataclass per concern, TRL-style: every field carries its default and, where it comes from a
paper, the arXiv id. ``TrainConfig`` is the run config (aliased as ``CritiqueGRPOConfig``); the critic and
the memory have nested configs under the keys ``critic:`` and ``memory:``. Every YAML key is a field.

Validation is strict: unknown keys, wrong types and impossible combinations raise :class:`ConfigError`
naming the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from critique_rl.config_checks import (  # noqa: F401
    TINY_MIN_VOCAB,
    TRACKERS,
    _check_finite,
    _check_trackers,
    _non_negative,
    _positive,
    check_data_fields,
    from_dict,
    looks_like_secret,
)
from critique_rl.config_sections import (  # noqa: F401
    AgentConfig,
    CriticConfig,
    DynamicSamplingConfig,
    LoraConfig,
    LowVarianceFilterConfig,
    MemoryConfig,
    PassRateFilterConfig,
    PhaseConfig,
    VLLMConfig,
)
from critique_rl.config_yaml import (  # noqa: F401 (the names config.py always had)
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_NODES,
    _expanded_nodes,
    _read_yaml,
)
from critique_rl.errors import ConfigError, UserError
from critique_rl.presets import DEMO_PRESET, PRESETS  # noqa: F401 (the names config.py always had)


@dataclass
class TrainConfig:
    """One training run: model, data, SFT warm-up, GRPO / Critique-GRPO, logging and checkpoints."""

    # --- model and data ------------------------------------------------------------------------------------
    model: str = "tiny"
    """`tiny`: build a small Llama + byte-level BPE tokenizer in-process. Else a local HF model directory."""
    task: str = "addition"
    """Built-in task (`addition`, `reverse`) or one registered with `critique_rl.tasks.register_task`."""
    tasks: dict[str, float] = field(default_factory=dict)
    """Several tasks in one run: {task name: RL sampling weight}, e.g. {addition: 0.7, reverse: 0.3} (weights are
    normalised). Rows carry a `task` column (each judged by its own task) and metrics are also logged per task
    (`task/<name>/accuracy`, `task/<name>/reward`, `task/<name>/share`, `eval/<name>/accuracy`). SFT draws every
    task equally and the held-out set splits `eval_n` evenly. {} = the single `task` (leave `task` out)."""
    task_order: Literal["joint", "entropy", "listed"] = "joint"
    """With `tasks`: `joint` draws every batch from all tasks by weight; `entropy` measures each task's output
    entropy under the policy when RL starts and trains the tasks one after another, lowest entropy (most
    structured) first, each for its weight's share of the RL steps (Omni-Thinker, arXiv:2507.14783: structured
    before open-ended); `listed`: one after another in the order given (a control)."""
    task_order_prompts: int = 32
    """Prompts per task for the `entropy` measurement, each sampled `num_generations` times."""
    train_file: str | None = None
    """Optional JSONL/parquet file or saved HF dataset dir with columns `prompt`, `answer` (overrides task data)."""
    eval_file: str | None = None
    dataset_name: str | None = None
    """Training rows from `datasets.load_dataset(dataset_name, dataset_config, split=dataset_split)`, as TRL's
    CLI takes them: a Hub dataset id (read from the local cache when HF_DATASETS_OFFLINE=1) or a local folder of
    data files (JSONL/parquet/CSV). Not together with `train_file`. Loading scripts are not run (datasets >= 4
    removed them): export such data to parquet. Held-out rows come from `eval_file`."""
    dataset_config: str | None = None
    """The dataset's configuration (subset), e.g. `main` for gsm8k. None = its default."""
    dataset_split: str = "train"
    """The split of `dataset_name` to train on; slices work (`train[:1000]`)."""
    prompt_column: str = "prompt"
    """Column holding the prompt (e.g. `question` for GSM8K): a string (TRL's standard format) or a list of
    {role, content} messages (TRL's conversational format, rendered with the tokenizer's chat template; a
    tokenizer without one is an error naming the row)."""
    reference_column: str | None = "answer"
    """Column holding the reference answer (e.g. `solution`, `ground_truth`); reward functions, verifiers and
    critiques receive it as `answer` (and under its own name). null = the data has no reference: what needs one
    (`correctness`, `brier`, `selective_utility` and `math` rewards, `ground_truth` critiques, SFT, the tiny model,
    `refinement_source: reference`) is refused, and `verifier` must be set (e.g. to your reward function). Every
    other column reaches reward functions, gates and critic templates by its name."""
    feedback_column: str | None = None
    """Column whose text (test output, environment feedback, a human note) is the critique of that row's wrong
    answers, verbatim and with no critic call, for refinements and directive distillation alike. Needs
    `critic.backend: feedback`; right answers and rows whose feedback is null get the rule critique of
    `critic.kind`."""
    verifier: str | None = None
    """Dotted path `pkg.module:function(completion, answer) -> bool` for user datasets, or a TRL-style batch
    function called like a reward function (`def correct(completions, answer, **kwargs)`, correct where the value
    is > `reward_threshold`). Also judges the built-in rewards and critiques. None = the task's."""
    output_dir: str = "runs/demo"
    seed: int = 0
    deterministic: bool = False
    """`true`: torch uses only deterministic kernels (`torch.use_deterministic_algorithms(True)`, cuDNN without
    autotuning) and cuBLAS a fixed workspace (`CUBLAS_WORKSPACE_CONFIG=:4096:8`, set before CUDA starts), so a
    rerun on the same machine with the same seed, thread count and library versions repeats bit for bit on
    GPU too. Costs: slower kernels for some ops on CUDA (e.g. scatter/index_add backward), 32 MiB of cuBLAS
    workspace, and an op with no deterministic kernel raises instead of running. On CPU runs are already
    repeatable without it. Results still differ across machines, devices and library versions."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast of forward passes (accelerate). `auto`: bf16 on a CUDA GPU that supports it, else none (CPU).
    Master weights stay in `weights_dtype` (float32 by default), so `bf16` here is the usual mixed precision."""
    weights_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the trained weights and optimizer state. `float32` (default): fp32 master weights, with bf16
    autocast from `mixed_precision` on GPU. `bfloat16`: pure bf16 weights (half the memory of weights, grads and
    Adam state; updates smaller than bf16's resolution are lost), only when asked for."""
    fused_lm_head: Literal["auto", "on", "off"] = "auto"
    """Score completion tokens straight from the last hidden states in row chunks, never holding the
    `[batch, tokens, vocab]` logits (`critique_rl.algos.logprobs.linear_selective_log_softmax`, as TRL's fused
    LM head). `auto`: on for CUDA runs of models whose logits are a plain projection; `off` on CPU, where tiny
    vocabularies make the logits cheap. Top-K distillation still takes the logits path."""
    prefix_sharing: Literal["auto", "on", "off"] = "auto"
    """Encode each group's shared prompt once (Prefix Grouper, arXiv:2506.05433): in the policy, reference and
    teacher passes the rows with the same prompt run as one packed sequence with a block attention mask, and
    generation encodes each distinct prompt once and copies its KV cache to the samples. Same log-probs and
    gradients up to float rounding (`critique_rl.train.prefix_sharing`). `auto`: wherever the model supports it
    (sdpa/eager attention, logits a plain projection) and the packed forward is estimated cheaper; `on`: always
    (an error where unsupported); `off`: every row encodes its own prompt."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them (RL updates only): a
    ~30% slower update for activation memory that no longer grows with layers x completion length; what long
    (reasoning-length) completions on one GPU need."""
    use_chat_template: Literal["auto", "yes", "no"] = "auto"
    """Wrap prompts in the tokenizer's chat template. `auto`: when the tokenizer has one."""

    # --- tiny model (model == "tiny") ---------------------------------------------------------------------
    tiny_hidden_size: int = 256
    tiny_layers: int = 2
    tiny_heads: int = 8
    """head_dim = hidden/heads must be >= 32 so a CPU vLLM can serve the same model."""
    tiny_vocab_size: int = 512

    # --- SFT warm-up (imitation before exploration) -------------------------------------------------------
    sft_steps: int = 1000
    sft_batch_size: int = 64
    sft_learning_rate: float = 1e-3
    sft_examples: int = 4000
    """Training rows generated from the task (also the RL prompt pool) when no train_file is given."""
    sft_mistake_rate: float = 0.0
    """Fraction of SFT demonstrations (where the task's typical mistake applies) that make that mistake, e.g.
    dropping the carry in addition: an imperfect demonstrator whose systematic error RL has to fix."""

    # --- RL ----------------------------------------------------------------------------------------------
    max_steps: int = 100
    num_generations: int = 8
    """Group size n (samples per prompt). GRPO needs >= 2 (arXiv:2402.03300)."""
    generation_batch_size: int = 128
    """Completions sampled per step (= prompts per step x num_generations)."""
    mini_batch_size: int = 64
    """Completions per optimizer micro-batch; gradients accumulate over the whole generation batch."""
    num_iterations: int = 1
    """Optimizer passes over each generation batch (mu in GRPO). >1 makes the PPO ratio non-trivial."""
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    max_nonfinite_steps: int = 3
    """An update whose loss or gradient norm is NaN/inf is skipped (no optimizer step, gradients dropped);
    after this many in a row training stops with an error, and no NaN weights are ever saved."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    """Most tokens per completion. None = the task's own limit (e.g. 6 for addition, 16 with confidence)."""
    advantage_estimator: str = "dr_grpo"
    """`dr_grpo`: A = R - mean (arXiv:2503.20783); `grpo`: (R - mean)/std (arXiv:2402.03300)."""
    loss_aggregation: str = "token_sum_norm"
    """`token_sum_norm`: token sum / constant (Dr.GRPO, arXiv:2503.20783); `token_mean` (DAPO,
    arXiv:2503.14476); `seq_mean_token_mean` (original GRPO)."""
    policy_loss: str = "ppo_clip"
    """The on-policy per-token loss, by name from `critique_rl.algos.losses.POLICY_LOSSES` (register your own with
    `register_policy_loss`). `ppo_clip`: PPO's clipped surrogate with `clip_eps_low` / `clip_eps_high`."""
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    """Asymmetric clip range; the higher upper bound is DAPO's clip-higher (arXiv:2503.14476)."""
    kl_beta: float = 0.0
    """Weight of the k3 KL estimator to a frozen reference policy (0 = no reference model kept)."""
    entropy_coef: float = 0.0
    reward_funcs: list[str] = field(default_factory=lambda: ["correctness"])
    """Registry names (`correctness`, `format`, `overlong`, `brier`) or `pkg.module:fn` / `file.py:fn`."""
    reward_weights: list[float] | None = None
    """One weight b_k per reward function (default all 1.0)."""
    reward_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Keyword arguments per reward name, e.g. {format: {pattern: '\\d+'}, overlong: {max_length: 16}}."""
    reward_aggregator: str = "weighted_sum"
    """How K rewards become one advantage: `weighted_sum` (sum_k b_k r_k, then `advantage_estimator`),
    `gdpo` (arXiv:2601.05242), `dvao` (arXiv:2605.25604, variance-adaptive weights)."""
    gates: list[str] = field(default_factory=list)
    """Rubric gates (DRO, arXiv:2506.13351): `has_answer`, `max_length`, `format` or `pkg.module:fn`; a
    failing rollout gets no gradient and a group with none passing is dropped."""
    gate_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    w_lambda: float = 0.1
    """W-REINFORCE weight of correct samples (arXiv:2506.01347); used by `w_reinforce`."""
    reward_threshold: float = 0.5
    """A reward above this counts as correct for `w_reinforce` / `psr` / `nsr`."""
    rollout_backend: str = "hf"
    """`hf`: transformers generate on the live policy. `vllm`: a vLLM engine (section `vllm:`; extra `vllm`),
    colocated or a server, with the weights synced after every optimizer step. Refinements and evaluation use the
    same engine."""
    tis_cap: float | None = 2.0
    """C of truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training"): on-policy token losses are weighted by min(pi_old / pi_engine, C), the trainer's
    probability of each sampled token over the rollout engine's. null = no correction (the mismatch is still
    logged as mismatch/*). Applied only with a separate engine (`vllm`): with `hf` the sampler is the trained
    module itself, so the ratio is 1 up to float noise and is logged, not applied."""

    # --- Critique-GRPO (arXiv:2506.03106) -----------------------------------------------------------------
    preset: str | None = None
    """`paper`: the settings of Critique-GRPO as published (arXiv:2506.03106, see `PRESETS`): critiques only for
    groups with no correct answer (`critique_on: all_wrong_groups`), refinement tokens shaped p/(p+0.1)
    (`offpolicy_gamma: 0.1`), one refinement kept per group (`refinements_per_group: 1`), A = R - mean (`dr_grpo`),
    no KL term, no distillation. Fields you set yourself win over the preset's (in YAML; in Python a field left
    at its class default takes the preset's value). None = the defaults, which follow this repo's measurements:
    refinements for every wrong response, unshaped (`critique_on: wrong`, `offpolicy_gamma: null`)."""
    critique_on: Literal["none", "all_wrong_groups", "wrong", "all"] = "wrong"
    """Which responses get critiques: every response of groups with no correct answer (the groups plain
    GRPO learns nothing from; the paper's form, `preset: paper`), every wrong response (default: what this repo
    measured to teach most, +2.8 +- 0.5 over GRPO on 20 seeds at a mid-range start, +14 to +89 on a plateau task,
    against +0.3 / -0.1 for the paper's form), or all. `none` (or critic.backend none) = plain GRPO."""
    refinements_per_group: int = 1
    """k refinements kept per question (correct first, else random); the group is n initial + k (paper: 7+1)."""
    offpolicy_gamma: float | None = None
    """Shaping of refinement tokens, p/(p+gamma) (LUFFY, arXiv:2504.14945; Critique-GRPO uses 0.1, `preset:
    paper`); null (default) = no shaping (plain -A log p), which taught more in this repo's measurements."""
    offpolicy_weighting: Literal["none", "is", "gap"] = "none"
    """Per-token weight on the refinement tokens' loss (`critique_rl.algos.offpolicy_token_weights`), from
    their log-probs under the plain prompt and under the critique they were sampled with. `none`: as published;
    `is`: truncated importance weight min(pi(a|q) / pi(a|q,c), offpolicy_weight_cap); `gap`: 1 + the log-prob the
    critique added, capped (directive tokens weigh more)."""
    offpolicy_weight_cap: float = 2.0
    refinement_source: Literal["critique", "reference"] = "critique"
    """Where the off-policy sample of a critiqued group comes from. `critique`: the policy's refinement under the
    critique (Critique-GRPO). `reference`: the row's reference completion put into the group as is, with no
    critic call (LUFFY-style off-policy demonstration, arXiv:2504.14945): the control that separates "a correct
    answer in the group" from what the critique's content teaches."""
    distill_weight: float = 0.0
    """w_dir: weight of token-level directive distillation (OpenClaw-RL arXiv:2603.10165, SDPO arXiv:2601.20802);
    the teacher is the policy conditioned on the critique (the refinement prompt), the student the policy on q."""
    eval_weight: float = 1.0
    """w_eval: weight of the group (evaluative) advantage in A_total = w_eval * A_group + w_dir * A_distill."""
    distill_mode: Literal["sampled_token", "topk_logits"] = "sampled_token"
    """`sampled_token`: per-token advantage log pi(a|s_enh) - log pi(a|q) in the clipped loss;
    `topk_logits`: reverse KL over the teacher's top-K tokens plus a tail bin, added to the loss."""
    distill_topk: int = 20
    distill_divergence: Literal["reverse_kl", "forward_kl", "jsd"] = "reverse_kl"
    """Divergence of the `topk_logits` term (`critique_rl.algos.topk_divergence`). `reverse_kl` KL(student ||
    teacher), mode-seeking (SDPO arXiv:2601.20802); `forward_kl` KL(teacher || student), whose pull towards the
    teacher's token does not vanish when the student gives it ~0 probability (the plateau); `jsd` the generalised
    Jensen-Shannon divergence with `distill_jsd_beta` (GKD arXiv:2306.13649)."""
    distill_jsd_beta: float = 0.5
    distill_teacher: Literal["current", "ema"] = "current"
    """Weights of the critique-conditioned teacher. `current`: the policy being trained (the teacher moves with
    every update). `ema`: an exponential moving average of the policy weights, a stabilised teacher as SDPO
    (arXiv:2601.20802) uses; costs one extra copy of the weights (also in checkpoints); single process or DDP."""
    distill_teacher_ema: float = 0.99
    """EMA decay of the `ema` teacher: theta_T <- decay * theta_T + (1 - decay) * theta after each update."""
    distill_on: Literal["critiqued", "all"] = "critiqued"
    """Responses distilled: those that got a critique, or all (then every response is critiqued)."""
    sft_refine_fraction: float = 0.0
    """Share of SFT rows that also yield a refinement demonstration (wrong answer + ground-truth critique ->
    correct answer), so a small policy learns to read the refinement prompt."""
    sft_refine_steps: Literal["shared", "added"] = "shared"
    """`shared`: refinement demos take their share of `sft_steps` (plain demonstrations get fewer steps, which
    can lower plain accuracy); `added`: the warm-up runs longer, `sft_steps x (plain + refine demos) / plain`
    steps, so plain demonstrations get the `sft_steps` batches they get without refinement demos."""
    sft_refine_critic: Literal["rule", "run"] = "rule"
    """Who writes the critiques of the refinement demos. `rule`: the rule ground-truth critique (verdict plus the
    reference answer). `run`: the run's own critic (`critic:`), one call per demo before the warm-up, so the policy
    learns to read the critiques it will get in RL (a model critic's wording); the verifier check applies as in RL,
    and a demo whose critique still does not call the wrong answer wrong is dropped (counted in the summary's
    `sft_refine_demo_critiques`). Single-turn runs with a critic; not with a self-critique (`critic.model: policy`)."""

    # --- schedule ---------------------------------------------------------------------------------------
    phases: list[PhaseConfig] = field(default_factory=list)
    """Training phases run in order, e.g. [{kind: sft, steps: 1000}, {kind: rl, steps: 200}, {kind: rl, steps:
    100, learning_rate: 3e-5, reward_funcs: [correctness, brier]}]; every phase is checkpointed and a run resumes
    inside any of them. [] (default) = the default two-phase schedule: sft for `sft_steps`, then rl for `max_steps`. With
    phases, `max_steps` is the sum of the rl phases' steps (leave it out) and `sft_steps` is not used."""

    # --- data selection (critique_rl/train/selection.py) -------------------------------------------------
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    pass_rate_filter: PassRateFilterConfig = field(default_factory=PassRateFilterConfig)
    low_variance_filter: LowVarianceFilterConfig = field(default_factory=LowVarianceFilterConfig)
    sample_budget: int | None = None
    """Stop RL before the step that would start with this many completions already sampled (refills and pass-rate
    measurements included: `selection/samples_total`), even before `max_steps`; for comparisons at equal samples
    generated. The LR schedule still runs over `max_steps`. None = no budget."""

    # --- evaluation, logging, checkpoints -----------------------------------------------------------------
    eval_n: int = 200
    """Held-out problems for the before/after table."""
    eval_every: int = 0
    """Evaluate every N RL steps (0 = only before and after RL)."""
    eval_batch_size: int = 200
    log_rollouts: int = 16
    """Rollouts per step written to rollouts.jsonl."""
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    progress: bool = True
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers fed the same scalars, under the same names and steps, as metrics.jsonl (which is
    always written): any of `tensorboard`, `wandb`, `trackio` (through accelerate's trackers; install with
    `pip install "critique-rl[trackers]"`), or `all`. TensorBoard writes under `<output_dir>/tensorboard`;
    wandb runs offline with no network when `WANDB_MODE=offline` is set (its files go under `<output_dir>`);
    trackio keeps a local SQLite database (`$TRACKIO_DIR`). Only the main process logs."""
    tracker_project: str = "critique-rl"
    """Project name given to the trackers (the wandb/trackio project; TensorBoard's run folder)."""

    critic: CriticConfig = field(default_factory=CriticConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)

    def __post_init__(self) -> None:
        self._apply_preset()
        for name, cls in (("dynamic_sampling", DynamicSamplingConfig), ("pass_rate_filter", PassRateFilterConfig),
                          ("low_variance_filter", LowVarianceFilterConfig)):
            if isinstance(getattr(self, name), dict):  # a mapping given in Python: validated like YAML
                setattr(self, name, from_dict(cls, getattr(self, name), prefix=f"{name}."))
        _check_finite(self)
        self._check_tasks()
        self._check_phases()
        check_data_fields(self)
        if self.sample_budget is not None:
            _positive("sample_budget", self.sample_budget)
        if self.num_generations < 2:
            raise ConfigError(
                "num_generations", self.num_generations, "group advantages need at least 2 samples per prompt; use >= 2"
            )
        if self.generation_batch_size % self.num_generations:
            raise ConfigError(
                "generation_batch_size",
                self.generation_batch_size,
                f"must be divisible by num_generations ({self.num_generations}); "
                f"e.g. {self.num_generations * max(1, self.generation_batch_size // self.num_generations)}",
            )
        if self.mini_batch_size < 1 or self.generation_batch_size % self.mini_batch_size:
            raise ConfigError(
                "mini_batch_size",
                self.mini_batch_size,
                f"must divide generation_batch_size ({self.generation_batch_size})",
            )
        if self.tiny_hidden_size % self.tiny_heads or self.tiny_hidden_size // self.tiny_heads < 32:
            raise ConfigError(
                "tiny_heads",
                self.tiny_heads,
                f"tiny_hidden_size ({self.tiny_hidden_size}) / tiny_heads must be an integer >= 32 (CPU vLLM needs head_dim >= 32)",
            )
        for name in ("max_steps", "sft_steps", "warmup_steps", "kl_beta", "entropy_coef", "eval_every", "log_rollouts"):
            _non_negative(name, getattr(self, name))
        for name in ("num_iterations", "learning_rate", "eval_n", "eval_batch_size",
                     "sft_batch_size", "sft_examples", "keep_checkpoints", "temperature", "max_grad_norm",
                     "checkpoint_every", "tiny_layers", "tiny_vocab_size"):
            _positive(name, getattr(self, name))
        if self.mixed_precision == "fp16" and self.device == "cpu":
            raise ConfigError("mixed_precision", "fp16", "fp16 autocast needs a CUDA GPU; use auto or no with device cpu")
        if not 0 <= self.seed < 2**32:
            raise ConfigError("seed", self.seed, "use an integer in [0, 2**32) (numpy's seed range)")
        if self.tiny_vocab_size < TINY_MIN_VOCAB:
            raise ConfigError("tiny_vocab_size", self.tiny_vocab_size,
                              f"the byte-level tokenizer needs at least {TINY_MIN_VOCAB} tokens (256 bytes + 3 "
                              f"special tokens); use >= {TINY_MIN_VOCAB}, e.g. 512")
        _positive("max_nonfinite_steps", self.max_nonfinite_steps)
        _check_trackers(self.report_to)
        if self.tis_cap is not None:
            _positive("tis_cap", self.tis_cap)
        if not 0.0 <= self.sft_refine_fraction <= 1.0:
            raise ConfigError("sft_refine_fraction", self.sft_refine_fraction, "use a value in [0, 1]")
        self._check_sft_refine_critic()
        if self.offpolicy_gamma is not None and self.offpolicy_gamma <= 0:
            raise ConfigError("offpolicy_gamma", self.offpolicy_gamma, "use a value > 0, or null to disable shaping")
        _non_negative("refinements_per_group", self.refinements_per_group)
        _positive("offpolicy_weight_cap", self.offpolicy_weight_cap)
        _non_negative("distill_weight", self.distill_weight)
        _positive("distill_topk", self.distill_topk)
        if not 0.0 < self.distill_jsd_beta < 1.0:
            raise ConfigError("distill_jsd_beta", self.distill_jsd_beta, "use a value in (0, 1), e.g. 0.5")
        if not 0.0 < self.distill_teacher_ema < 1.0:
            raise ConfigError("distill_teacher_ema", self.distill_teacher_ema, "use a decay in (0, 1), e.g. 0.99")
        if self.refinement_source == "reference" and self.critique_on == "none":
            raise ConfigError("refinement_source", self.refinement_source,
                              "reference answers are injected into the groups critique_on selects; set critique_on "
                              "(e.g. all_wrong_groups)")
        if self.refinement_source == "reference" and self.distill_weight > 0:
            raise ConfigError("distill_weight", self.distill_weight, "directive distillation needs critiques; with "
                              "refinement_source: reference there are none, use 0 or refinement_source: critique")
        if self.distill_weight > 0 and (self.critic.backend == "none" or self.critique_on == "none"):
            raise ConfigError("distill_weight", self.distill_weight,
                              "directive distillation needs critiques; set critic.backend and critique_on, or 0")
        if not 0.0 <= self.sft_mistake_rate <= 1.0:
            raise ConfigError("sft_mistake_rate", self.sft_mistake_rate, "use a value in [0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p", self.top_p, "use a value in (0, 1]")
        if self.clip_eps_low < 0 or self.clip_eps_high < 0:
            raise ConfigError("clip_eps_low", self.clip_eps_low, "clip ranges must be >= 0")
        if not self.reward_funcs:
            raise ConfigError("reward_funcs", self.reward_funcs, "name at least one reward function, e.g. [correctness]")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(
                "reward_weights",
                self.reward_weights,
                f"give one weight per reward function ({len(self.reward_funcs)}: {self.reward_funcs})",
            )
        if self.model != "tiny" and not Path(self.model).expanduser().is_dir():
            raise ConfigError(
                "model",
                self.model,
                "not a readable local model directory; pass a folder saved with save_pretrained, or `tiny`",
            )
        if self.kl_beta > 0 and self.num_iterations < 1:
            raise ConfigError("num_iterations", self.num_iterations, "must be >= 1")
        if self.max_new_tokens is not None:
            _positive("max_new_tokens", self.max_new_tokens)
        # names from the registries (late import: algos imports only torch; the engine registry lazily imports
        # its engines), so a registered plugin is accepted and an unknown name lists what is registered
        from critique_rl.algos import ADVANTAGE_ESTIMATORS, AGGREGATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
        from critique_rl.rollout.factory import ROLLOUT_ENGINES

        for registry, value in ((AGGREGATORS, self.reward_aggregator), (ADVANTAGE_ESTIMATORS, self.advantage_estimator),
                                (LOSS_AGGREGATIONS, self.loss_aggregation), (POLICY_LOSSES, self.policy_loss),
                                (ROLLOUT_ENGINES, self.rollout_backend)):
            if value not in registry:
                raise registry.unknown(value)

    def _check_sft_refine_critic(self) -> None:
        if self.sft_refine_critic not in ("rule", "run"):
            raise ConfigError("sft_refine_critic", self.sft_refine_critic, "use rule (the rule ground-truth critique) "
                              "or run (the run's critic writes the refinement demos' critiques)")
        if self.sft_refine_critic == "rule":
            return
        why = ("sft_refine_fraction is 0 (no refinement demos)" if self.sft_refine_fraction == 0
               else "the run has no critic (critic.backend none)" if self.critic.backend == "none"
               else "critique_on is none (no critic is built)" if self.critique_on == "none"
               else "refinement_source is reference (no critic is built)" if self.refinement_source == "reference"
               else "critic.model is policy: the policy would critique before its warm-up"
               if self.critic.model == "policy" else "episodes (agent.env) warm up on scripted episodes, not on "
               "refinement demos" if self.agent.env is not None else None)
        if why:
            raise ConfigError("sft_refine_critic", "run", f"{why}; use sft_refine_critic: rule")

    def _apply_preset(self) -> None:
        """Fill the preset's values into fields still at their class default (``load_config`` has already merged
        them under the file's own keys, so there every field the file sets wins)."""
        if self.preset is None:
            return
        if self.preset not in PRESETS:
            raise ConfigError("preset", self.preset, f"choose one of {sorted(PRESETS)}, or null for the defaults")
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) == defaults.get(name):
                setattr(self, name, value)

    def _check_phases(self) -> None:
        """Validate ``phases`` and derive ``max_steps`` (the sum of the rl phases' steps) from them."""
        if not self.phases:
            return
        self.phases = [from_dict(PhaseConfig, ph, prefix=f"phases[{i}].") if isinstance(ph, dict) else ph
                       for i, ph in enumerate(self.phases)]
        for i, ph in enumerate(self.phases):
            ph.check(f"phases[{i}]")
            funcs = ph.reward_funcs or self.reward_funcs
            if ph.reward_weights is not None and len(ph.reward_weights) != len(funcs):
                raise ConfigError(f"phases[{i}].reward_weights", ph.reward_weights,
                                  f"give one weight per reward function of the phase ({len(funcs)}: {funcs})")
            if ph.reward_funcs is not None and ph.reward_weights is None and self.reward_weights is not None \
                    and len(self.reward_weights) != len(ph.reward_funcs):
                raise ConfigError(f"phases[{i}].reward_weights", None, "the phase's reward_funcs differ in number "
                                  "from the run's reward_weights; give the phase its own reward_weights")
            self._check_phase_tasks(i, ph)
        rl_steps = sum(ph.steps for ph in self.phases if ph.kind == "rl")
        default_max = TrainConfig.__dataclass_fields__["max_steps"].default
        if self.max_steps not in (default_max, rl_steps):
            raise ConfigError("max_steps", self.max_steps, f"with phases the run has {rl_steps} RL steps (the sum of "
                              "its rl phases); leave max_steps out or set the phases' steps")
        self.max_steps = rl_steps

    def _check_phase_tasks(self, i: int, ph: PhaseConfig) -> None:
        if ph.tasks is None:
            return
        where = f"phases[{i}].tasks"
        if not self.tasks:
            raise ConfigError(where, ph.tasks, "a phase reweights the run's tasks; set `tasks` for the run too")
        if ph.kind != "rl":
            raise ConfigError(where, ph.tasks, "an sft phase imitates every task's rows; give it a train_file "
                              "for other data, or move the weights to an rl phase")
        if ph.train_file:
            raise ConfigError(where, ph.tasks, "a phase with a train_file draws from that file; drop one of the two")
        if self.task_order != "joint":
            raise ConfigError(where, ph.tasks, f"task_order {self.task_order!r} already orders the tasks; use "
                              "task_order: joint to order them by hand with phases")
        unknown = sorted(set(ph.tasks) - set(self.tasks))
        if unknown:
            raise ConfigError(where, ph.tasks, f"{unknown} not among the run's tasks {sorted(self.tasks)}")
        for name, w in ph.tasks.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"{where}.{name}", w, "a sampling weight must be a finite number >= 0")
        if not any(w > 0 for w in ph.tasks.values()):
            raise ConfigError(where, ph.tasks, "give at least one task a weight > 0")

    def _check_tasks(self) -> None:
        if not self.tasks:
            if self.task_order != "joint":
                raise ConfigError("task_order", self.task_order, "orders the tasks of a mixture; set `tasks`, e.g. "
                                  "tasks: {addition: 1, reverse: 1}")
            return
        if not isinstance(self.tasks, dict) or len(self.tasks) < 2:
            raise ConfigError("tasks", self.tasks, "give two or more tasks with their sampling weights, e.g. "
                              "{addition: 1, reverse: 1} (one task: use `task`)")
        for name, w in self.tasks.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ConfigError(f"tasks.{name}", w, "a sampling weight must be a finite number > 0")
        if self.task != TrainConfig.__dataclass_fields__["task"].default and \
                sorted(self.task.split("+")) != sorted(self.tasks):  # "a+b" for tasks {b: .., a: ..} is fine
            raise ConfigError("task", self.task, f"with `tasks` the run's task is their mixture {self.task_name!r}; "
                              "leave `task` out")
        if self.train_file:
            raise ConfigError("train_file", self.train_file, "`tasks` generates each task's rows; for your own data "
                              "use one train_file whose rows carry a `task` column (per-task metrics come from it)")
        _positive("task_order_prompts", self.task_order_prompts)
        self.task = self.task_name

    @property
    def task_name(self) -> str:
        """The run's task: `task`, or with `tasks` their mixture's name (`"a+b"`, which `get_task` builds)."""
        return "+".join(self.tasks) if self.tasks else self.task

    def schedule(self) -> list[PhaseConfig]:
        """The phases to run: ``phases``, or the default sft (``sft_steps``) + rl (``max_steps``) schedule."""
        if self.phases:
            return list(self.phases)
        return [PhaseConfig(kind="sft", steps=self.sft_steps, name="warm-up"),
                PhaseConfig(kind="rl", steps=self.max_steps, name="rl")]

    @property
    def prompts_per_step(self) -> int:
        return self.generation_batch_size // self.num_generations

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


CritiqueGRPOConfig = TrainConfig

def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Load a YAML run config (the embedded demo preset when ``path`` is None) and apply overrides.

    An empty file gives the :class:`TrainConfig` class defaults (not the demo preset), with a warning that says so.
    Overrides that are None are ignored (they stand for CLI flags not given); to set a field to null, put it in the
    file or build the config with :func:`from_dict`.
    """
    data: dict[str, Any] = dict(DEMO_PRESET) if path is None else {}
    if path is not None:
        data = _read_yaml(path)
        if data is None:
            print(f"warning: config file '{path}' is empty: training with the TrainConfig class defaults "
                  f"({TrainConfig.sft_steps} SFT + {TrainConfig.max_steps} RL steps), not the demo preset; run "
                  "`critique-rl train` with no config file for the demo", file=sys.stderr)
            data = {}
        if not isinstance(data, dict):
            raise UserError(f"config file '{path}' must hold a mapping of field: value at the top level")
    data.update({k: v for k, v in overrides.items() if v is not None})
    preset = data.get("preset")
    if isinstance(preset, str) and preset in PRESETS:  # the file's own keys win over the preset's
        data = {**PRESETS[preset], **data, "preset": None}
        cfg = from_dict(TrainConfig, data)
        cfg.preset = preset  # recorded (config.yaml), already applied
        return cfg
    return from_dict(TrainConfig, data)
