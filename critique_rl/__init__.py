"""critique-rl: RL post-training of language models with language feedback."""

from critique_rl.config import CriticConfig, CritiqueGRPOConfig, MemoryConfig, TrainConfig

__version__ = "0.1.0"

__all__ = ["CriticConfig", "CritiqueGRPOConfig", "MemoryConfig", "TrainConfig", "__version__"]
