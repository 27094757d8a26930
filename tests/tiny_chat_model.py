"""A local model directory like an instruct model's: the tiny in-repo Llama, its byte-level tokenizer and a chat
template, saved with save_pretrained (what ``model: /models/Qwen...-Instruct`` points at, in miniature)."""

from __future__ import annotations

from pathlib import Path

from critique_rl.agents import TINY_CHAT_TEMPLATE
from critique_rl.models import build_tiny_model, build_tiny_tokenizer

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen's ChatML layout (without its default system message)."""


def save_tiny_chat_model(path: Path, texts: list[str], chat_template: str | None = TINY_CHAT_TEMPLATE,
                         vocab_size: int = 400, seed: int = 0) -> Path:
    """Save a tiny model + tokenizer (trained on ``texts``) with ``chat_template`` (None: no template) to ``path``."""
    tok = build_tiny_tokenizer(texts, vocab_size)
    if chat_template is not None:
        tok.chat_template = chat_template
    model = build_tiny_model(tok, hidden_size=64, layers=1, heads=2, max_positions=512, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
