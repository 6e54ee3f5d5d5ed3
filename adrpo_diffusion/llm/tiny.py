"""The offline demo's pieces: a character-level tokenizer built with `tokenizers`, a tiny randomly initialised
Qwen2 causal LM, and a task with a verifiable reward.

The task ("first letter"): the prompt is a 4-letter word over ``a``-``h`` followed by ``=``; the completion
should repeat the word's first letter. The reward is the fraction of the ``COMPLETION_LENGTH`` completion
characters equal to it (an early end of sequence scores the missing characters as wrong). A random policy
scores about 1/11.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from ..utils import cached_build

TINY_LM = "builtin:tiny-char-lm"
FIRST_LETTER = "builtin:first-letter"
LETTERS = "abcdefgh"
SPECIAL_TOKENS = ["<pad>", "<eos>"]
COMPLETION_LENGTH = 8


def char_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per character of ``LETTERS + "="``, made locally."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(LETTERS + "="))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def build_tiny_lm(target: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised 2-layer Qwen2 (about 0.1M parameters) and its tokenizer into ``target``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return Path(target)


def tiny_lm_path() -> str:
    """The built-in tiny LM's directory in the cache (built once), loaded like any local model directory."""
    return cached_build("tiny-char-lm", "tokenizer.json", build_tiny_lm)


def first_letter_prompts(num_prompts: int = 0, seed: int = 0) -> list[str]:
    """``num_prompts`` distinct prompts ``"word="`` in a fixed random order (0: all 4096)."""
    words = ["".join(w) + "=" for w in itertools.product(LETTERS, repeat=4)]
    random.Random(seed).shuffle(words)
    return words[:num_prompts or len(words)]


def first_letter_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """Fraction of the first ``COMPLETION_LENGTH`` completion characters equal to the prompt's first letter."""
    return [sum(c == p[0] for c in text[:COMPLETION_LENGTH]) / COMPLETION_LENGTH for p, text in zip(prompts, completions)]
