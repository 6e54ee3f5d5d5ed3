"""A dependency-free reward: how well the image shows the colour named in the prompt (offline demos, tests)."""

from __future__ import annotations

import re

import torch

from ..tasks.shapes import COLOURS as SHAPES_PALETTE
from .base import Scorer
from .registry import register_scorer

# red, green, blue and yellow are exactly the colours the shapes task paints (so climbing this reward on shapes
# captions moves the pixels towards the data's colours, not away from them)
COLORS = {
    **SHAPES_PALETTE,
    "orange": (1.0, 0.55, 0.0), "purple": (0.5, 0.0, 0.5), "pink": (1.0, 0.6, 0.75), "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5), "brown": (0.55, 0.27, 0.07),
}
_WORD = re.compile(r"[a-z]+")


def named_color(prompt: str) -> str | None:
    """The first colour word of the prompt (``grey`` counts as ``gray``), or None."""
    for word in _WORD.findall(prompt.lower()):
        word = "gray" if word == "grey" else word
        if word in COLORS:
            return word
    return None


@register_scorer("color")
class ColorScorer(Scorer):
    """``score = 1 - mean over pixels of ||pixel - colour||_2 / sqrt(3)``, in ``[0, 1]``; 1 is a uniform image
    of exactly the named colour."""

    def __init__(self, batch_size: int = 256):
        self.batch_size = batch_size

    @classmethod
    def check_prompts(cls, prompts) -> None:
        missing = [p for p in prompts if named_color(p) is None]
        if missing:
            raise ValueError(
                f"The color reward needs a colour word ({', '.join(COLORS)}) in every prompt; "
                f"{len(missing)} prompt(s) have none, e.g. {missing[0]!r}"
            )

    def _score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_prompts(prompts)
        targets = torch.tensor([COLORS[named_color(p)] for p in prompts], dtype=images.dtype, device=images.device)
        distance = (images.clamp(0, 1) - targets[:, :, None, None]).norm(dim=1)  # (N, H, W)
        return 1.0 - distance.flatten(1).mean(dim=1) / 3**0.5

