"""The offline language demo's task ("first letter", ``builtin:first-letter``): the prompt is a 4-letter word over
``a``-``h`` followed by ``=``; the completion should repeat the word's first letter. The reward is the fraction of
the ``COMPLETION_LENGTH`` completion characters equal to it (an early end of sequence scores the missing characters
as wrong). A random policy scores about 1/11. Its model is ``builtin:tiny-char-lm``
(:mod:`adrpo_diffusion.testing.tiny_language_models`).
"""

from __future__ import annotations

import itertools
import random

LETTERS = "abcdefgh"
COMPLETION_LENGTH = 8


def first_letter_prompts(num_prompts: int = 0, seed: int = 0) -> list[str]:
    """``num_prompts`` distinct prompts ``"word="`` in a fixed random order (0: all 4096)."""
    words = ["".join(w) + "=" for w in itertools.product(LETTERS, repeat=4)]
    random.Random(seed).shuffle(words)
    return words[:num_prompts or len(words)]


def first_letter_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """Fraction of the first ``COMPLETION_LENGTH`` completion characters equal to the prompt's first letter."""
    return [sum(c == p[0] for c in text[:COMPLETION_LENGTH]) / COMPLETION_LENGTH for p, text in zip(prompts, completions)]
