"""HPSv2.1 (Human Preference Score v2.1): ``score = scale * cos(image embedding, text embedding)``.

The model is an open_clip ViT-H-14 fine-tuned on human preferences; its state dict is ``HPS_v2.1_compressed.pt``
in the hub repo ``xswu/HPSv2``. The default ``scale=1`` returns the cosine as the ``hpsv2`` package does (about
0.25-0.33 for Stable Diffusion images); papers and the HPSv2 leaderboard often print it times 100 (``scale=100``).
Images are preprocessed as HPSv2 does: bicubic resize of the longest side to the model's input size, centred
zero (black) padding of the shorter side, then normalisation with the OpenAI CLIP mean and std.
Reference: https://github.com/tgxs002/HPSv2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Scorer
from .loading import resolve_file
from .registry import register_scorer

CHECKPOINT_REPO = "xswu/HPSv2"
CHECKPOINT_FILE = "HPS_v2.1_compressed.pt"


@register_scorer("hpsv2")
class HPSv2Scorer(Scorer):
    """``checkpoint``: local path of the state dict (a plain state dict or ``{"state_dict": ...}``); default:
    ``HPS_v2.1_compressed.pt`` from the hub repo ``xswu/HPSv2``. ``architecture``: an open_clip model config name.
    Weights stay float32; another ``dtype`` runs the model under autocast, as HPSv2 itself does on a GPU."""

    files = {"checkpoint": CHECKPOINT_FILE}

    def __init__(self, checkpoint: str = CHECKPOINT_REPO, architecture: str = "ViT-H-14", device: str | None = None,
                 dtype: str = "float32", batch_size: int = 32, scale: float = 1.0):
        import open_clip
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype)
        self.batch_size, self.scale = batch_size, scale
        path = resolve_file(checkpoint, CHECKPOINT_FILE, "checkpoint")
        # open_clip's loader unwraps {"state_dict": ...} and a DistributedDataParallel "module." prefix, and
        # loads strictly.
        self.model = open_clip.create_model(architecture, pretrained=path)
        self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(architecture)
        size = self.model.visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        self.mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)

    def to(self, device) -> HPSv2Scorer:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """HPSv2's evaluation transform on a ``(N, 3, H, W)`` batch in ``[0, 1]``."""
        height, width = images.shape[-2:]
        ratio = self.image_size / max(height, width)
        new_height, new_width = round(height * ratio), round(width * ratio)
        images = images.float()
        if (new_height, new_width) != (height, width):
            # antialias and the clamp mimic PIL's bicubic resize of 8-bit images
            images = F.interpolate(images, size=(new_height, new_width), mode="bicubic", antialias=True,
                                   align_corners=False).clamp(0, 1)
        pad_h, pad_w = self.image_size - new_height, self.image_size - new_width
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return (images - self.mean.to(images.device)) / self.std.to(images.device)

    def _score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.preprocess(images.to(self.device))
        tokens = self.tokenizer(prompts).to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            image_embeds = self.model.encode_image(pixels, normalize=True)
            text_embeds = self.model.encode_text(tokens, normalize=True)
        return self.scale * (image_embeds.float() * text_embeds.float()).sum(dim=-1)
