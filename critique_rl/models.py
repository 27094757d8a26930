"""Policy and tokenizer loading, device/dtype choice, and the tiny in-repo model builder.

The tiny model is a real Llama-architecture causal LM with a byte-level BPE tokenizer trained in-process on
the task's text (digits split one per token). Both save/load with ``save_pretrained``/``from_pretrained``,
so the same code path serves a tiny CPU model and a Qwen/Llama checkpoint on GPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from critique_rl.errors import UserError

SPECIAL_TOKENS = {"pad": "<|pad|>", "eos": "<|eos|>", "bos": "<|bos|>"}


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``; digits are always single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS["pad"],
        eos_token=SPECIAL_TOKENS["eos"],
        bos_token=SPECIAL_TOKENS["bos"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return fast


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 256,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A small Llama causal LM sized for CPU training (head_dim = hidden/heads >= 32)."""
    if hidden_size % heads or hidden_size // heads < 32:
        raise UserError(f"tiny model: hidden_size/heads = {hidden_size}/{heads} must be an integer >= 32")
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def choose_device(device: str = "auto") -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is visible; use device: auto or cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_policy(path: str | Path, device: str = "auto", dtype: torch.dtype | None = None):
    """Load ``(model, tokenizer)`` from a local directory saved with ``save_pretrained``.

    Never downloads: a missing directory is a :class:`UserError` naming the path.
    """
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise UserError(f"model path '{path}' has no config.json; pass a directory saved with save_pretrained")
    tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dev = choose_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=dtype)
    return model.to(dev), tokenizer


def wants_chat_template(tokenizer, mode: str = "auto") -> bool:
    """Whether prompts get wrapped in the tokenizer's chat template (`auto`: when it has one)."""
    if mode == "yes":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("config field 'use_chat_template' = 'yes' but the tokenizer has no chat template; use auto")
        return True
    return mode == "auto" and bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, text: str, use_chat: bool, system: str | None = None) -> str:
    """The text the policy is conditioned on: raw ``text``, or a one-turn chat with a generation prompt; a
    conversational dataset prompt (a :class:`critique_rl.data.Prompt` with messages) through the chat template."""
    if getattr(text, "messages", None):
        from critique_rl.templates import render_conversation

        return render_conversation(tokenizer, text, use_chat, system)
    if not use_chat:
        return text if system is None else f"{system}\n{text}"
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
