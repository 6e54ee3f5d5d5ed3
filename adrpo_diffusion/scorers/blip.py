"""ImageReward and BLIPScore (as defined in THUDM/ImageReward), hosted on transformers' BLIP classes.

Both read BLIP's pretraining model: a ViT image encoder and a BERT text encoder whose layers can cross-attend to
the image (BLIP's ``med_config.json``). The original checkpoints are loaded through an explicit key mapping with
strict accounting, since the PyPI ``image-reward`` package no longer imports with current transformers.

- ImageReward: ``(mlp(h) - 0.16717362830052426) / 1.0333394966054072``, where ``h`` is the [CLS] output of the
  text encoder run on the prompt while cross-attending to the ViT's output tokens, and ``mlp`` is a stack of
  linear layers without activations (768-1024-128-64-16-1 in the released model).
- BLIPScore: ``cos(vision_proj(v), text_proj(t))``, where ``v`` is the ViT's [CLS] output and ``t`` the [CLS]
  output of a text-only pass of the text encoder.

Prompts are tokenized as the original does: bert-base-uncased WordPiece, ``[CLS] ... [SEP]``, padded/truncated
to 35 tokens. ImageReward's ``score`` keeps [CLS] first even in the cross-attending pass (BLIP's ITM head swaps
in ``[ENC]``; ImageReward does not, and its reference scores only match with [CLS]). Images go through CLIP's
preprocessing (shorter side to 224 bicubic, centre crop, CLIP mean/std) on uint8 pixels, as the original applies
it to PIL images. The crop offset is torchvision's ``round(margin / 2)`` (half to even), not transformers' floor:
they differ by a pixel when the margin is 3 mod 4, e.g. for 1216x832 images (resized to 327x224).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from .base import Scorer
from .loading import resolve_file
from .registry import register_scorer

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
BLIP_LARGE_URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large.pth"
TEXT_MAX_LENGTH = 35
VISION_LAYER_NORM_EPS = 1e-6  # BLIP's ViT; transformers' BlipVisionConfig defaults to 1e-5

# Original BLIP ViT parameter names -> transformers BlipVisionModel names (full-match regular expressions).
_VISION_RENAMES = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
]


def _vision_rules(prefix: str) -> list[tuple[str, str]]:
    return [(re.escape(prefix) + pattern, "vision." + target) for pattern, target in _VISION_RENAMES]


def _text_rule(prefix: str) -> tuple[str, str]:
    # BLIP's med.py and transformers' BlipTextModel share parameter names.
    return re.escape(prefix) + r"((?:embeddings|encoder)\..+)", r"text.\1"


def blip_tokenizer(vocab_path: str):
    """bert-base-uncased WordPiece plus BLIP's two added tokens, ``[DEC]`` (bos) and ``[ENC]``, as the original."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab=vocab_path)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def center_crop(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` of ``(..., H, W)`` (both at least ``size``), offset as torchvision's
    ``CenterCrop`` (the original's) places it: ``round((H - size) / 2)`` with Python's half-to-even rounding."""
    top, left = (round((dim - size) / 2) for dim in pixels.shape[-2:])
    return pixels[..., top : top + size, left : left + size]


def map_checkpoint(state: dict, rules, ignore, module: nn.Module, source: str) -> dict:
    """Rename ``state``'s keys to ``module``'s by the first full-matching ``(pattern, target)`` rule.

    Every key must be renamed to a parameter of ``module`` or match an ``ignore`` pattern, and every parameter
    of ``module`` must be filled; otherwise raise ``ValueError`` naming the keys."""
    mapped, origin, unexpected = {}, {}, []
    for key, value in state.items():
        if any(re.fullmatch(pattern, key) for pattern in ignore):
            continue
        for pattern, target in rules:
            if re.fullmatch(pattern, key):
                name = re.sub(pattern, target, key)
                mapped[name], origin[name] = value, key
                break
        else:
            unexpected.append(key)
    expected = set(module.state_dict())
    unexpected += [origin[name] for name in sorted(set(mapped) - expected)]
    missing = sorted(expected - set(mapped))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model. Parameters it lacks (model names): {_some(missing)}. "
            f"Keys it has that are neither mapped nor ignored: {_some(unexpected)}."
        )
    return mapped


def _some(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit]) or "none"
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def _vision_model(state: dict, prefix: str, heads: int | None):
    """A BlipVisionModel sized from the checkpoint's shapes (heads cannot be read from shapes: default width/64)."""
    from transformers import BlipVisionConfig, BlipVisionModel

    width = state[prefix + "cls_token"].shape[-1]
    patch = state[prefix + "patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state[prefix + "pos_embed"].shape[1] - 1)
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k)))
    config = BlipVisionConfig(
        hidden_size=width, intermediate_size=state[prefix + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth, num_attention_heads=heads or width // 64, image_size=grid * patch,
        patch_size=patch, layer_norm_eps=VISION_LAYER_NORM_EPS, hidden_act="gelu",
    )
    return BlipVisionModel(config)


def _text_model(med_config_path: str, vision_width: int, cross_attention: bool):
    """A BlipTextModel from BLIP's BERT config; cross-attention layers attend to ``vision_width`` features."""
    from transformers import BlipTextConfig, BlipTextModel

    med = json.loads(Path(med_config_path).read_text())
    config = BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=vision_width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med["hidden_act"], layer_norm_eps=med["layer_norm_eps"], pad_token_id=med["pad_token_id"],
        bos_token_id=med["vocab_size"] - 2,  # BLIP's [DEC], the first of the two tokens it adds to BERT's vocabulary
        # transformers builds the cross-attention layers only for a "decoder"; the forward pass stays bidirectional.
        is_decoder=cross_attention, use_cache=False,
    )
    return BlipTextModel(config, add_pooling_layer=False)


class _BlipScorer(Scorer):
    """What both scorers share: files, tokenizer, preprocessing and the BLIP vision and text encoders.

    Options: ``checkpoint`` (see each scorer), ``med_config``: BLIP's ``med_config.json``, or a directory or hub
    repo id holding it; ``tokenizer``: a directory or hub repo id holding bert-base-uncased's ``vocab.txt``;
    ``vision_heads``: the ViT's attention heads, which the weights do not tell (default width // 64, i.e. 16 for
    the released ViT-L/16); ``device``, ``dtype``, ``batch_size``. A file that is neither local nor fetchable
    raises ``FileNotFoundError`` before anything loads.

    Subclasses describe their checkpoint: its file name in a hub repo (``files``), the key prefix of the BLIP model, the
    renaming rules and ignored keys, and ``_state_and_heads`` (the BLIP state dict and the extra modules)."""

    prefix: str
    rules: tuple[tuple[str, str], ...]
    ignored: tuple[str, ...]
    cross_attention: bool  # whether the text encoder needs its cross-attention layers

    def __init__(self, checkpoint: str, med_config: str, tokenizer: str, vision_heads: int | None,
                 device: str | None, dtype: str, batch_size: int):
        from transformers import CLIPImageProcessorPil

        # Find every file before loading anything heavy.
        checkpoint_path = resolve_file(checkpoint, self.files["checkpoint"], "checkpoint")
        med_config_path = resolve_file(med_config, "med_config.json", "med_config")
        self.tokenizer = blip_tokenizer(resolve_file(tokenizer, "vocab.txt", "tokenizer"))

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype)
        self.batch_size = batch_size
        state, heads = self._state_and_heads(torch.load(checkpoint_path, map_location="cpu", weights_only=True))
        try:
            vision = _vision_model(state, self.prefix + "visual_encoder.", vision_heads)
        except (KeyError, ValueError) as err:
            raise ValueError(f"{checkpoint_path} has no BLIP ViT weights ({err!r})") from err
        text = _text_model(med_config_path, vision.config.hidden_size, self.cross_attention)
        if len(self.tokenizer) != text.config.vocab_size:
            raise ValueError(f"The tokenizer has {len(self.tokenizer)} tokens but the text encoder "
                             f"{text.config.vocab_size}; pass bert-base-uncased's vocab.txt with 'tokenizer'")
        self.model = nn.ModuleDict({"vision": vision, "text": text, **heads})
        self.model.load_state_dict(map_checkpoint(state, self.rules, self.ignored, self.model, checkpoint_path))
        self.model.to(self.device, self.dtype).eval().requires_grad_(False)

        self.image_size = vision.config.image_size
        # Resize and normalise only; _pixels crops as the original does.
        self.processor = CLIPImageProcessorPil(size={"shortest_edge": self.image_size}, do_center_crop=False)

    def _state_and_heads(self, loaded) -> tuple[dict, dict[str, nn.Module]]:
        raise NotImplementedError

    def to(self, device) -> _BlipScorer:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        # The original preprocesses uint8 PIL images; rounding back to uint8 reproduces it exactly for PIL input.
        pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        inputs = self.processor(images=list(pixels), input_data_format="channels_first", return_tensors="pt")
        return center_crop(inputs["pixel_values"], self.image_size).to(self.device, self.dtype)

    def _tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH,
                                return_tensors="pt")
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)



@register_scorer("imagereward")
class ImageRewardScorer(_BlipScorer):
    """ImageReward v1.0: ``(mlp(h) - 0.16717362830052426) / 1.0333394966054072``, ``h`` the [CLS] output of the
    BLIP text encoder on the prompt, cross-attending to the image's ViT tokens.

    ``checkpoint``: ``ImageReward.pt`` in its original layout (``blip.visual_encoder.*``, ``blip.text_encoder.*``,
    ``mlp.layers.*``), a directory or hub repo id holding it. """

    files = {"checkpoint": "ImageReward.pt", "med_config": "med_config.json", "tokenizer": "vocab.txt"}
    prefix = "blip."
    rules = (*_vision_rules("blip.visual_encoder."), _text_rule("blip.text_encoder."),
             (r"mlp\.layers\.(\d+)\.(weight|bias)", r"mlp.\1.\2"))
    # position_ids is a constant buffer; the contrastive projections take no part in the reward.
    ignored = (r"blip\.text_encoder\.embeddings\.position_ids", r"blip\.(vision|text)_proj\.(weight|bias)")
    cross_attention = True

    def __init__(self, checkpoint: str = "THUDM/ImageReward", med_config: str = "THUDM/ImageReward",
                 tokenizer: str = "bert-base-uncased", vision_heads: int | None = None, device: str | None = None,
                 dtype: str = "float32", batch_size: int = 32):
        super().__init__(checkpoint, med_config, tokenizer, vision_heads, device, dtype, batch_size)
        self.model["mlp"].float()  # the original runs the head on float32 features

    def _state_and_heads(self, loaded) -> tuple[dict, dict[str, nn.Module]]:
        # Linear layers at the checkpoint's indices; the original's dropouts between them are identities here.
        shapes = {int(k.split(".")[2]): v.shape for k, v in loaded.items() if re.fullmatch(r"mlp\.layers\.\d+\.weight", k)}
        if not shapes:
            raise ValueError("The checkpoint has no ImageReward head (mlp.layers.*)")
        layers = [nn.Linear(shapes[i][1], shapes[i][0]) if i in shapes else nn.Identity() for i in range(max(shapes) + 1)]
        return loaded, {"mlp": nn.Sequential(*layers)}

    def _score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        input_ids, attention_mask = self._tokens(prompts)
        image_tokens = self.model["vision"](pixel_values=self._pixels(images)).last_hidden_state
        text = self.model["text"](input_ids=input_ids, attention_mask=attention_mask,
                                  encoder_hidden_states=image_tokens).last_hidden_state
        reward = self.model["mlp"](text[:, 0].float()).squeeze(-1)
        return (reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


@register_scorer("blipscore")
class BlipScorer(_BlipScorer):
    """BLIPScore (ImageReward's baseline): ``cos(vision_proj(v), text_proj(t))``, ``v`` the ViT's [CLS] output,
    ``t`` the [CLS] output of a text-only pass of the BLIP text encoder.

    ``checkpoint``: BLIP's pretrained ``model_large.pth`` (``{"model": state_dict}``; its momentum encoders,
    queues, ITM head and decoder are ignored), a URL, or a directory or hub repo id holding it. """

    files = {"checkpoint": "model_large.pth", "med_config": "med_config.json", "tokenizer": "vocab.txt"}
    prefix = ""
    rules = (*_vision_rules("visual_encoder."), _text_rule("text_encoder."),
             (r"(vision_proj|text_proj)\.(weight|bias)", r"\1.\2"))
    # Pretraining-only parts, and the cross-attention layers a text-only pass does not use.
    ignored = (
        r"text_encoder\.embeddings\.position_ids",
        r"text_encoder\.encoder\.layer\.\d+\.crossattention\..+",
        r"(visual_encoder|text_encoder|vision_proj|text_proj)_m\..+",
        r"image_queue|text_queue|queue_ptr|temp",
        r"itm_head\.(weight|bias)",
        r"text_decoder\..+",
    )
    cross_attention = False

    def __init__(self, checkpoint: str = BLIP_LARGE_URL, med_config: str = "THUDM/ImageReward",
                 tokenizer: str = "bert-base-uncased", vision_heads: int | None = None, device: str | None = None,
                 dtype: str = "float32", batch_size: int = 32):
        super().__init__(checkpoint, med_config, tokenizer, vision_heads, device, dtype, batch_size)

    def _state_and_heads(self, loaded) -> tuple[dict, dict[str, nn.Module]]:
        if "model" not in loaded:
            raise ValueError("BLIP checkpoints hold their state dict under 'model'; this one has none")
        state = loaded["model"]
        heads = {}
        for name in ("vision_proj", "text_proj"):
            if name + ".weight" not in state:
                raise ValueError(f"The checkpoint has no {name}.weight (is it BLIP's model_large.pth?)")
            heads[name] = nn.Linear(state[name + ".weight"].shape[1], state[name + ".weight"].shape[0])
        return state, heads

    def _score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        input_ids, attention_mask = self._tokens(prompts)
        image_cls = self.model["vision"](pixel_values=self._pixels(images)).last_hidden_state[:, 0]
        text_cls = self.model["text"](input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        image = nn.functional.normalize(self.model["vision_proj"](image_cls).float(), dim=-1)
        text = nn.functional.normalize(self.model["text_proj"](text_cls).float(), dim=-1)
        return (image * text).sum(-1)
