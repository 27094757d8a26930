"""critique-rl: RL post-training of language models with language feedback."""

from __future__ import annotations

from typing import Any

from critique_rl.config import CriticConfig, CritiqueGRPOConfig, MemoryConfig, TrainConfig

__version__ = "0.1.0"

__all__ = ["CriticConfig", "CritiqueGRPOConfig", "CritiqueGRPOTrainer", "MemoryConfig", "TrainConfig", "__version__"]


def __getattr__(name: str) -> Any:
    """``CritiqueGRPOTrainer`` is imported on first use (it pulls in torch, transformers and accelerate)."""
    if name == "CritiqueGRPOTrainer":
        from critique_rl.train.trainer import CritiqueGRPOTrainer

        return CritiqueGRPOTrainer
    raise AttributeError(f"module 'critique_rl' has no attribute {name!r}")
