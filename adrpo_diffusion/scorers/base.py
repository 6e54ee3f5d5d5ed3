"""What every scorer shares: the image conversion and the batching loop."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch


def to_image_tensor(images) -> torch.Tensor:
    """A list of PIL images or a float tensor ``(N, 3, H, W)`` in ``[0, 1]`` -> float tensor ``(N, 3, H, W)``."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Image tensors must have shape (N, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError("Image tensors must be floating point in [0, 1]")
        return images
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError("PIL images of different sizes cannot be scored as one tensor; resize them first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


class Scorer:
    """Base class: subclasses implement ``_score_batch(images, prompts)`` on a tensor batch."""

    batch_size: int = 32
    # option naming a model or a file -> the file it must provide (checked before anything loads: sources())
    files: ClassVar[dict[str, str]] = {}

    @classmethod
    def sources(cls, options: dict) -> dict[str, tuple[str, str]]:
        """``{option: (the model or file it names, the file needed)}`` of what ``cls(**options)`` would load, with
        the defaults of ``__init__`` where ``options`` gives none."""
        defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
        return {option: (options.get(option, defaults[option]), filename) for option, filename in cls.files.items()}

    @classmethod
    def check_prompts(cls, prompts: Sequence[str]) -> None:
        """Raise ``ValueError`` when a prompt cannot be scored (called before any model loads); the default
        accepts every prompt."""

    @torch.no_grad()
    def score(self, images, prompts: Sequence[str]) -> torch.Tensor:
        prompts = list(prompts)
        if isinstance(images, torch.Tensor):
            count = images.shape[0]
        else:
            images = list(images)
            count = len(images)
        if count != len(prompts):
            raise ValueError(f"Got {count} images but {len(prompts)} prompts")
        scores = []
        for start in range(0, count, self.batch_size):
            batch = to_image_tensor(images[start : start + self.batch_size])
            scores.append(self._score_batch(batch, prompts[start : start + self.batch_size]).float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    def _score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def checks(self, images, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The checks whose mean over those that apply is the score, ``{name: (N,) tensor}``, NaN where one does not
        apply (``shapes``: colour, shape, count, position); none by default (the score is one number). The trainer's
        ``decoupled_normalization`` standardises each check apart."""
        return {}

    def details(self, images, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-image diagnostics beyond the score, ``{name: (N,) tensor}`` (NaN where one does not apply), reported
        in the held-out summary; none by default."""
        return {}

    def to(self, device) -> Scorer:
        return self
