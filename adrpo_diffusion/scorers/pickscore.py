"""PickScore v1: ``score = exp(logit_scale) * cos(image embedding, text embedding)``, no further scaling.

The model is a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences (``yuvalkirstain/PickScore_v1``), used with
the processor of the CLIP it started from (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); ``exp(logit_scale)`` is
about 100, and Stable Diffusion images score about 20-23. Reference: https://github.com/yuvalkirstain/PickScore
"""

from __future__ import annotations

import torch

from . import register_scorer
from .base import Scorer
from .loading import from_pretrained

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


@register_scorer("pickscore")
class PickScoreScorer(Scorer):
    """``model``: hub id or local directory of the PickScore CLIPModel; ``processor``: hub id or local directory
    of its CLIPProcessor."""

    def __init__(self, model: str = DEFAULT_MODEL, processor: str = DEFAULT_PROCESSOR, device: str | None = None,
                 dtype: str = "float32", batch_size: int = 32):
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype)
        self.batch_size = batch_size
        self.processor = from_pretrained(CLIPProcessor, processor, "processor")
        self.model = from_pretrained(CLIPModel, model, "model", dtype=self.dtype)
        self.model.to(self.device).eval().requires_grad_(False)

    def to(self, device) -> PickScoreScorer:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def _score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.processor(images=list(images.float().clamp(0, 1).cpu()), do_rescale=False,
                                return_tensors="pt")["pixel_values"]
        text = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embeds = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        text_embeds = self.model.get_text_features(
            input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
        ).pooler_output
        cos = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        return self.model.logit_scale.float().exp() * cos
