"""LAION improved aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE.pth``), a prompt-independent score.

``score = MLP(e / ||e||)`` where ``e`` is the CLIP ViT-L/14 image embedding and the MLP is
``Linear(768, 1024) Dropout Linear(1024, 128) Dropout Linear(128, 64) Dropout Linear(64, 16) Linear(16, 1)``
(no activations; state-dict keys ``layers.{0,2,4,6,7}``). Scores lie roughly in 1-10, about 5-6.5 for
Stable Diffusion images. Reference: https://github.com/christophschuhmann/improved-aesthetic-predictor
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Scorer
from .clip import DEFAULT_CLIP
from .loading import from_pretrained, resolve_file
from .registry import register_scorer

# A hub mirror of the GitHub release file (the GitHub repository is not a hub repo).
CHECKPOINT_REPO = "camenduru/improved-aesthetic-predictor"
CHECKPOINT_FILE = "sac+logos+ava1-l14-linearMSE.pth"
_LINEAR_LAYERS = (0, 2, 4, 6, 7)  # indices of the Linear layers in the released nn.Sequential


def aesthetic_mlp(state_dict: dict) -> nn.Sequential:
    """The predictor's ``nn.Sequential`` with every width read from the checkpoint (so tiny test heads load)."""
    shapes = [state_dict[f"layers.{i}.weight"].shape for i in _LINEAR_LAYERS]
    linear = [nn.Linear(inputs, outputs) for outputs, inputs in shapes]
    mlp = nn.Sequential(linear[0], nn.Dropout(0.2), linear[1], nn.Dropout(0.2), linear[2], nn.Dropout(0.1),
                        linear[3], linear[4])
    mlp.load_state_dict({key.removeprefix("layers."): value for key, value in state_dict.items()})
    return mlp


@register_scorer("aesthetic")
class AestheticScorer(Scorer):
    """``clip_model``: hub id or local directory of a CLIPModel and its processor. ``checkpoint``: local path of the
    predictor's ``.pth``; default: ``sac+logos+ava1-l14-linearMSE.pth`` from the hub repo
    ``camenduru/improved-aesthetic-predictor``. ``dtype`` is CLIP's; the MLP runs in float32 as released."""

    files = {"checkpoint": CHECKPOINT_FILE, "clip_model": "config.json"}

    def __init__(self, clip_model: str = DEFAULT_CLIP, checkpoint: str = CHECKPOINT_REPO, device: str | None = None,
                 dtype: str = "float32", batch_size: int = 32):
        from transformers import CLIPImageProcessor, CLIPModel

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype)
        self.batch_size = batch_size
        # The small head first, so that a missing file fails before CLIP loads.
        path = resolve_file(checkpoint, CHECKPOINT_FILE, "checkpoint")
        self.mlp = aesthetic_mlp(torch.load(path, map_location="cpu", weights_only=True))
        self.mlp.to(self.device).eval().requires_grad_(False)
        self.processor = from_pretrained(CLIPImageProcessor, clip_model, "clip_model")
        self.clip = from_pretrained(CLIPModel, clip_model, "clip_model", dtype=self.dtype)
        self.clip.to(self.device).eval().requires_grad_(False)

    def to(self, device) -> AestheticScorer:
        self.device = torch.device(device)
        self.clip.to(self.device)
        self.mlp.to(self.device)
        return self

    def _score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.processor(images=list(images.float().clamp(0, 1).cpu()), do_rescale=False,
                                return_tensors="pt")["pixel_values"]
        embeds = self.clip.get_image_features(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        embeds = torch.nn.functional.normalize(embeds.float(), dim=-1)
        return self.mlp(embeds).squeeze(-1)
