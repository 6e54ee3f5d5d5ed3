"""CLIP score: ``100 * cos(image embedding, text embedding)`` with a transformers ``CLIPModel``.

Computed here rather than with torchmetrics, whose CLIPScore breaks on transformers 5 (the feature getters
now return an output object; the embedding is its ``pooler_output``).
"""

from __future__ import annotations

import torch

from .base import Scorer, to_image_tensor
from .loading import from_pretrained
from .registry import register_scorer

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


@register_scorer("clip")
class ClipScorer(Scorer):
    """``model``: a hub id or a local directory holding a CLIPModel and its CLIPProcessor."""

    files = {"model": "config.json"}

    def __init__(self, model: str = DEFAULT_CLIP, device: str | None = None, dtype: str = "float32",
                 batch_size: int = 32, scale: float = 100.0, clamp_negative: bool = False):
        from transformers import CLIPModel, CLIPProcessor

        self._wrap(from_pretrained(CLIPModel, model, "model", dtype=getattr(torch, dtype)),
                   from_pretrained(CLIPProcessor, model, "model"), device, dtype, batch_size, scale, clamp_negative)

    @classmethod
    def from_model(cls, model, processor, device: str | None = None, dtype: str = "float32", batch_size: int = 32,
                   scale: float = 100.0, clamp_negative: bool = False) -> ClipScorer:
        """Wrap an already built ``CLIPModel`` and ``CLIPProcessor`` (benchmarks, custom loading)."""
        scorer = cls.__new__(cls)
        scorer._wrap(model, processor, device, dtype, batch_size, scale, clamp_negative)
        return scorer

    def _wrap(self, model, processor, device, dtype, batch_size, scale, clamp_negative):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype)
        self.batch_size, self.scale, self.clamp_negative = batch_size, scale, clamp_negative
        self.processor = processor
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)

    def to(self, device) -> ClipScorer:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        """CLIP image embeddings ``(N, D)`` (float32, on the CPU, not normalised) of a list of PIL images or an
        ``(N, 3, H, W)`` tensor in ``[0, 1]``, computed ``batch_size`` images at a time."""
        batches = [self._image_embeds(to_image_tensor(images[start : start + self.batch_size])).float().cpu()
                   for start in range(0, len(images), self.batch_size)]
        return torch.cat(batches) if batches else torch.zeros(0, self.model.config.projection_dim)

    def _image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=list(images.float().clamp(0, 1).cpu()), do_rescale=False,
                                return_tensors="pt")["pixel_values"]
        return self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)).pooler_output

    def _score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_embeds = self._image_embeds(images)
        text = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True)
        text_embeds = self.model.get_text_features(
            input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
        ).pooler_output
        cos = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        return self.scale * (cos.clamp(min=0) if self.clamp_negative else cos)

