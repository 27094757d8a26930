"""Build the configured critic from a :class:`~critique_rl.config.CriticConfig`."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from critique_rl.config import CriticConfig
from critique_rl.critics.base import BaseCritic
from critique_rl.errors import UserError
from critique_rl.registry import Registry

CACHE_FILENAME = "critic_cache.sqlite"

_BUILD_ORDER = itertools.count(1)
_BUILT: weakref.WeakValueDictionary[int, BaseCritic] = weakref.WeakValueDictionary()


def built_since(order: int) -> BaseCritic | None:
    """The most recent critic :func:`build_critic` built after build number ``order`` (see :func:`build_order`)
    that is still alive, else None. The critic-as-judge reward uses it to score with the run's own critic (the
    trainer builds its critic after its reward functions), so judge and critique stage share one critic."""
    for n in sorted(_BUILT, reverse=True):
        if n <= order:
            break
        critic = _BUILT.get(n)
        if critic is not None:
            return critic
    return None


_last_order = 0


def build_order() -> int:
    """The number of the last critic built so far (0 before any)."""
    return _last_order


def _register(critic: BaseCritic) -> BaseCritic:
    global _last_order
    _last_order = next(_BUILD_ORDER)
    _BUILT[_last_order] = critic
    return critic


def build_critic(
    cfg: CriticConfig,
    *,
    policy: Any | None = None,
    tokenizer: Any | None = None,
    output_dir: str | Path | None = None,
) -> BaseCritic | None:
    """The critic for ``cfg`` (None for backend ``none``).

    - ``rule``: :class:`RuleCritic` (kind ``indicative`` or ``ground_truth``).
    - ``hf``: :class:`HFCritic` on ``cfg.model`` (a local path), or on ``policy``/``tokenizer`` when
      ``cfg.model`` is None or ``"policy"`` (self-critique).
    - ``openai``: :class:`OpenAICritic`; the cache is ``cfg.cache_path``, else
      ``<output_dir>/critic_cache.sqlite``, else none.
    """
    if cfg.backend == "none":
        return None
    return _register(_build(cfg, policy=policy, tokenizer=tokenizer, output_dir=output_dir))


CriticBuilder = Callable[..., BaseCritic]
"""``builder(cfg, common, *, policy, tokenizer, output_dir) -> critic``: ``common`` holds the keyword arguments
every critic takes (``fallback_kind``, ``template_dir``)."""

CRITIC_BACKENDS: Registry[CriticBuilder] = Registry("critic backend", "critic.backend")
"""Critic backends by name (``critic.backend``); ``none`` (no critic) is not an entry."""


def register_critic_backend(name: str) -> Callable[[CriticBuilder], CriticBuilder]:
    """Register a critic builder under ``name`` (``critic: {backend: <name>}`` in a config)."""
    return CRITIC_BACKENDS.decorator(name)


def critic_backend_names() -> list[str]:
    """Every value ``critic.backend`` accepts: ``none`` and the registered backends."""
    return ["none", *CRITIC_BACKENDS.names()]


def _build(cfg: CriticConfig, *, policy: Any | None, tokenizer: Any | None,
           output_dir: str | Path | None) -> BaseCritic:
    if cfg.backend not in CRITIC_BACKENDS:
        raise UserError(f"config field 'critic.backend' = {cfg.backend!r}: choose one of {critic_backend_names()}")
    common = {"fallback_kind": cfg.fallback_kind, "template_dir": cfg.template_dir}
    return CRITIC_BACKENDS[cfg.backend](cfg, common, policy=policy, tokenizer=tokenizer, output_dir=output_dir)


@register_critic_backend("rule")
def _rule(cfg: CriticConfig, common: dict[str, Any], **_: Any) -> BaseCritic:
    from critique_rl.critics.rule import RuleCritic

    return RuleCritic(kind=cfg.kind, **common)


@register_critic_backend("feedback")
def _feedback(cfg: CriticConfig, common: dict[str, Any], **_: Any) -> BaseCritic:
    """feedback_column: a row's feedback text is its wrong answers' critique."""
    from critique_rl.critics.feedback_column import FeedbackColumnCritic

    return FeedbackColumnCritic(kind=cfg.kind, **common)


@register_critic_backend("hf")
def _hf(cfg: CriticConfig, common: dict[str, Any], *, policy: Any | None, tokenizer: Any | None,
        **_: Any) -> BaseCritic:
    from critique_rl.critics.hf import HFCritic

    common = {**common, "reference": cfg.reference}
    if cfg.model in (None, "", "policy"):
        if policy is None or tokenizer is None:
            raise UserError(
                "config field 'critic.model' is unset (or 'policy') but no policy model/tokenizer was "
                "passed; set critic.model to a local model directory"
            )
        model: Any = policy
    else:
        model = cfg.model
    critic = HFCritic(
        model,
        tokenizer if model is policy else None,
        kind=cfg.kind,
        max_new_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        max_regenerations=cfg.max_regenerations,
        verdict_pattern=cfg.verdict_pattern,
        **common,
    )
    critic.shares_policy = model is policy  # the trainer routes it through its rollout engine (vLLM)
    return critic


@register_critic_backend("openai")
def _openai(cfg: CriticConfig, common: dict[str, Any], *, output_dir: str | Path | None, **_: Any) -> BaseCritic:
    from critique_rl.critics.openai_api import OpenAICritic

    cache_path = cfg.cache_path
    if cache_path is None and output_dir is not None:
        cache_path = str(Path(output_dir) / CACHE_FILENAME)
    return OpenAICritic(
        model=cfg.model or "",
        kind=cfg.kind,
        base_url=cfg.base_url,
        api_key_env=cfg.api_key_env,
        temperature=cfg.temperature,
        max_tokens=cfg.max_tokens,
        max_concurrency=cfg.max_concurrency,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
        backoff_base_s=cfg.backoff_base_s,
        backoff_max_s=cfg.backoff_max_s,
        cache_path=cache_path,
        max_regenerations=cfg.max_regenerations,
        verdict_pattern=cfg.verdict_pattern,
        circuit_breaker_failures=cfg.circuit_breaker_failures,
        circuit_breaker_cooldown_s=cfg.circuit_breaker_cooldown_s,
        reference=cfg.reference,
        **common,
    )


@register_critic_backend("noisy")
def _noisy(cfg: CriticConfig, common: dict[str, Any], *, policy: Any | None, tokenizer: Any | None,
           output_dir: str | Path | None, **_: Any) -> BaseCritic:
    """A critic with injected errors (critics/noisy.py): ``error_inner``'s critiques, ``error_rate`` of them wrong."""
    import dataclasses

    from critique_rl.critics.noisy import NoisyCritic

    if cfg.error_inner in ("noisy", "none") or cfg.error_inner not in CRITIC_BACKENDS:
        inner_names = [n for n in CRITIC_BACKENDS.names() if n != "noisy"]
        raise UserError(f"config field 'critic.error_inner' = {cfg.error_inner!r}: choose the critic that gets the "
                        f"errors, one of {inner_names}")
    inner_cfg = dataclasses.replace(cfg, backend=cfg.error_inner)
    inner = CRITIC_BACKENDS[cfg.error_inner](inner_cfg, common, policy=policy, tokenizer=tokenizer,
                                             output_dir=output_dir)
    return NoisyCritic(inner, error_rate=cfg.error_rate, error_kind=cfg.error_kind, check=cfg.error_check,
                       max_regenerations=cfg.max_regenerations, seed=cfg.error_seed, **common)
