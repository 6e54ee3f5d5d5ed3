"""PickScore v1: ``score = exp(logit_scale) * cos(image embedding, text embedding)``, no further scaling.

The model is a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences (``yuvalkirstain/PickScore_v1``), used with
the processor of the CLIP it started from (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); ``exp(logit_scale)`` is
about 100, and Stable Diffusion images score about 20-23. Reference: https://github.com/yuvalkirstain/PickScore
"""

from __future__ import annotations

import torch

from .clip import ClipScorer
from .loading import from_pretrained
from .registry import register_scorer

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


@register_scorer("pickscore")
class PickScoreScorer(ClipScorer):
    """``model``: hub id or local directory of the PickScore CLIPModel; ``processor``: hub id or local directory
    of its CLIPProcessor. The CLIP score with ``scale = exp(logit_scale)`` of the model."""

    files = {"model": "config.json", "processor": "tokenizer_config.json"}

    def __init__(self, model: str = DEFAULT_MODEL, processor: str = DEFAULT_PROCESSOR, device: str | None = None,
                 dtype: str = "float32", batch_size: int = 32):
        from transformers import CLIPModel, CLIPProcessor

        clip_processor = from_pretrained(CLIPProcessor, processor, "processor")  # the small part first
        clip = from_pretrained(CLIPModel, model, "model", dtype=getattr(torch, dtype))
        self._wrap(clip, clip_processor, device, dtype, batch_size, scale=clip.logit_scale.float().exp().item(),
                   clamp_negative=False)
