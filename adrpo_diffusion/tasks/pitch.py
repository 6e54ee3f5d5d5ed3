"""The offline audio demo's task ("pitch", ``builtin:audio-pitch``): a synthetic audio multiple-choice task whose
answer is in the audio alone. A clip of 0.3 to 0.6 s holds one tone, low (200-400 Hz), middle (800-1200 Hz) or high
(2500-3500 Hz), at a random loudness, with noise; the text asks ``pitch?`` and the model answers with one character,
``a`` (low), ``b`` (middle) or ``c`` (high). The reward (and the held-out accuracy) is 1 for the right character
(:func:`adrpo_diffusion.llm.answers.first_character_reward`). Every prompt's text is the same, so any accuracy
above 1/3 comes from the audio. Its model is ``builtin:tiny-omni-thinker``
(:mod:`adrpo_diffusion.testing.tiny_language_models`).
"""

from __future__ import annotations

import numpy as np

SAMPLING_RATE = 16000
PITCH_BANDS = {"a": (200.0, 400.0), "b": (800.0, 1200.0), "c": (2500.0, 3500.0)}  # answer: low, middle, high
QUESTION = "pitch?"


def pitch_clip(answer: str, rng: np.random.Generator) -> np.ndarray:
    """One clip of the pitch task for ``answer`` (a key of ``PITCH_BANDS``), float32 at ``SAMPLING_RATE``."""
    low, high = PITCH_BANDS[answer]
    n = int(SAMPLING_RATE * rng.uniform(0.3, 0.6))
    t = np.arange(n) / SAMPLING_RATE
    tone = rng.uniform(0.05, 0.5) * np.sin(2 * np.pi * rng.uniform(low, high) * t + rng.uniform(0, 2 * np.pi))
    return (tone + 0.01 * rng.standard_normal(n)).astype(np.float32)


def pitch_rows(num_rows: int, seed: int = 0) -> list[dict]:
    """``num_rows`` rows of the pitch task (answers cycling a, b, c): a conversational ``prompt`` (the clip, then
    the question), the ``audio`` samples, the ``answer`` character and the ``choices``."""
    rng = np.random.default_rng(seed)
    answers = list(PITCH_BANDS)
    rows = []
    for i in range(num_rows):
        answer = answers[i % len(answers)]
        rows.append({"prompt": [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": QUESTION}]}],
                     "audio": pitch_clip(answer, rng), "answer": answer, "choices": answers})
    return rows
