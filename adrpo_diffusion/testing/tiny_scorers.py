"""Tiny random weights for every Table 1 scorer, so that the whole evaluation runs offline (configs and tests).

``build_tiny_scorer_assets(target)`` writes, deterministically (fixed seeds)::

    clip/                   CLIPModel (32 wide, 16-dim projection, 30 px) + CLIPProcessor (character tokenizer)
    pickscore/              another such CLIPModel with PickScore's logit scale (exp = 100), and its processor
    aesthetic.pth           an aesthetic-predictor head (16-12-8-6-4-1) on the tiny CLIP's embedding
    blip/med_config.json    BLIP's BERT config (32 wide, 2 layers); blip/tokenizer/vocab.txt: a character WordPiece
    blip/ImageReward.pt     ImageReward in its original key layout (ViT 64 wide, 1 head, 32 px, patch 8)
    blip/model_large.pth    BLIP in the layout of BLIP's model_large.pth (for BLIPScore)

A scorer option ``builtin:tiny-scorers/<path>`` resolves to ``<ADRPO cache>/tiny-scorers/<path>``
(:mod:`adrpo_diffusion.builtin`); the assets are built there on first use (about a second). Scores from random
weights carry no meaning: they test the plumbing.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from pathlib import Path

import torch

from .tiny_pipelines import char_tokenizer

# transformers BlipVisionModel names -> original BLIP ViT names (the inverse of the scorer's loading renames).
_VISION_ORIGINAL = [
    (r"embeddings\.class_embedding", "cls_token"),
    (r"embeddings\.position_embedding", "pos_embed"),
    (r"embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.qkv\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"post_layernorm\.(weight|bias)", r"norm.\1"),
]
_VISION_WIDTH, _TEXT_WIDTH, _PROJECTION = 64, 32, 16


def build_tiny_clip(target: str | os.PathLike, seed: int = 0, logit_scale: float | None = None) -> Path:
    """A random CLIPModel (two 32-wide towers, projection 16, 30 px images) and its CLIPProcessor (character
    tokenizer, no download), saved with ``save_pretrained``. ``logit_scale`` overrides CLIP's initial log(1/0.07)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(tower, image_size=30, patch_size=6),
        projection_dim=_PROJECTION,
    )
    model = CLIPModel(config)
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    model.save_pretrained(target)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(target)
    return Path(target)


def _aesthetic_head(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    widths = [_PROJECTION, 12, 8, 6, 4, 1]
    state = {}
    for index, inputs, outputs in zip((0, 2, 4, 6, 7), widths, widths[1:]):
        state[f"layers.{index}.weight"] = torch.randn(outputs, inputs, generator=generator) / math.sqrt(inputs)
        state[f"layers.{index}.bias"] = torch.randn(outputs, generator=generator)
    return state


def _write_blip_text_files(directory: Path) -> Path:
    """A character-level WordPiece vocabulary (every word splits into characters) and BLIP's med_config.json
    sized to it (plus BLIP's two added tokens); returns the med_config path."""
    characters = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *("##" + c for c in characters)]
    (directory / "tokenizer").mkdir(parents=True)
    (directory / "tokenizer" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    med_config = {
        "model_type": "bert", "vocab_size": len(vocab) + 2, "hidden_size": _TEXT_WIDTH, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "type_vocab_size": 2, "encoder_width": _VISION_WIDTH,
        "add_cross_attention": True,
    }
    path = directory / "med_config.json"
    path.write_text(json.dumps(med_config, indent=1))
    return path


def _blip_state(med_config: Path, cross_attention: bool, seed: int) -> dict:
    """Random BLIP ViT and BERT weights under the original BLIP names (``visual_encoder.*``, ``text_encoder.*``)."""
    from transformers import BlipVisionConfig, BlipVisionModel

    from ..scorers.blip import VISION_LAYER_NORM_EPS, _text_model

    torch.manual_seed(seed)
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=_VISION_WIDTH, intermediate_size=2 * _VISION_WIDTH, num_hidden_layers=2, num_attention_heads=1,
        image_size=32, patch_size=8, layer_norm_eps=VISION_LAYER_NORM_EPS, hidden_act="gelu",
    ))
    text = _text_model(str(med_config), _VISION_WIDTH, cross_attention)
    state = {}
    for key, value in vision.state_dict().items():
        pattern, target = next((p, t) for p, t in _VISION_ORIGINAL if re.fullmatch(p, key))
        state["visual_encoder." + re.sub(pattern, target, key)] = value
    state.update({"text_encoder." + key: value for key, value in text.state_dict().items()})
    return state


def build_tiny_scorer_assets(directory: str | os.PathLike) -> Path:
    """Write every tiny scorer asset (see the module docstring) into ``directory`` (fixed seeds; the global torch RNG
    is left as it was)."""
    root = Path(directory)
    with torch.random.fork_rng(devices=[]):
        build_tiny_clip(root / "clip", seed=0)
        build_tiny_clip(root / "pickscore", seed=1, logit_scale=math.log(100.0))
        torch.save(_aesthetic_head(seed=2), root / "aesthetic.pth")

        med_config = _write_blip_text_files(root / "blip")
        reward = {"blip." + k: v for k, v in _blip_state(med_config, cross_attention=True, seed=3).items()}
        generator = torch.Generator().manual_seed(4)
        widths = [_TEXT_WIDTH, 16, 8, 8, 4, 1]
        for index, inputs, outputs in zip((0, 2, 4, 6, 7), widths, widths[1:]):
            reward[f"mlp.layers.{index}.weight"] = torch.randn(outputs, inputs, generator=generator) / math.sqrt(inputs)
            reward[f"mlp.layers.{index}.bias"] = torch.randn(outputs, generator=generator)
        torch.save(reward, root / "blip" / "ImageReward.pt")

        blip = _blip_state(med_config, cross_attention=False, seed=5)
        for name, width in (("vision_proj", _VISION_WIDTH), ("text_proj", _TEXT_WIDTH)):
            blip[f"{name}.weight"] = torch.randn(_PROJECTION, width, generator=generator) / math.sqrt(width)
            blip[f"{name}.bias"] = torch.zeros(_PROJECTION)
        torch.save({"model": blip}, root / "blip" / "model_large.pth")
    return root
