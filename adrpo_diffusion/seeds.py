"""The one held-out seed scheme: every held-out or evaluation image is named by (seed, prompt index, k), the k-th
image of a prompt under a seed, and drawn from its own generator seeded by :func:`image_seed`. The trainer's held-out
check (its ``eval_seeds``, one image each: k = 0), the method lab's held-out and validation images (``eval_seed`` /
``val_seed``, k = 0 .. images - 1) and ``adrpo-evaluate`` all use it, so an image is the same whatever the batch it
lands in, and the trainer's held-out image of a prompt under seed s has the noise of ``adrpo-evaluate``'s image
(s, prompt, 0) at the same size."""

from __future__ import annotations

import numpy as np
import torch


def image_seed(seed: int, prompt_index: int, k: int) -> int:
    """The generator seed of one image: numpy's ``SeedSequence`` hash of ``(seed, prompt_index, k)``, a
    non-negative 63-bit integer; distinct triples give independent streams (no ``seed + 1000 i + j`` overlaps)."""
    return int(np.random.SeedSequence([seed, prompt_index, k]).generate_state(1, dtype=np.uint64)[0] >> 1)


def image_generators(triples, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One seeded generator per ``(seed, prompt_index, k)``."""
    return [torch.Generator(device).manual_seed(image_seed(*triple)) for triple in triples]
