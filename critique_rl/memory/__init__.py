"""SkillRL-style memory: demonstrations from successes, lessons abstracted from failures, retrieved into
prompts. ``MemoryBank`` is the entry point; see :mod:`critique_rl.memory.bank`."""

from critique_rl.memory.abstraction import (
    ABSTRACTIONS,
    CriticAbstractor,
    Failure,
    LessonDraft,
    parse_lesson,
    register_abstraction,
    rule_abstraction,
)
from critique_rl.memory.bank import DEFAULT_BANK, Episode, MemoryBank, PruneResult, RecordResult, Retrieved
from critique_rl.memory.records import Demonstration, Lesson, Record
from critique_rl.memory.retrieval import Embedder, SentenceTransformerEmbedder, embeddings_available

__all__ = [
    "ABSTRACTIONS",
    "DEFAULT_BANK",
    "CriticAbstractor",
    "Demonstration",
    "Embedder",
    "Episode",
    "Failure",
    "Lesson",
    "LessonDraft",
    "MemoryBank",
    "PruneResult",
    "Record",
    "RecordResult",
    "Retrieved",
    "SentenceTransformerEmbedder",
    "embeddings_available",
    "parse_lesson",
    "register_abstraction",
    "rule_abstraction",
]
