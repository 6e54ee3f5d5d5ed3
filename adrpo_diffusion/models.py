"""Loading SD3-family pipelines, attaching LoRA, and the built-in tiny offline pipeline.

Every model is loaded through ``StableDiffusion3Pipeline.from_pretrained`` with a hub id or a local
directory. The tiny pipeline (``builtin:tiny-sd3``) is built from configs with random weights, saved with
``save_pretrained`` into a cache directory, and loaded back through that same path. ``builtin:tiny-sd3-shapes``
is a tiny pipeline pre-trained on the coloured-shapes data of the method lab (:mod:`adrpo_diffusion.lab.pretrain`),
cached the same way. Both have no T5 encoder, so loading their directory directly needs the two absent components
passed as None, as for SD3 without T5 (:func:`load_sd3_pipeline` does this itself)::

    StableDiffusion3Pipeline.from_pretrained(resolve_model_path("builtin:tiny-sd3"), text_encoder_3=None, tokenizer_3=None)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

BUILTIN_PREFIX = "builtin:"
TINY_SD3 = "builtin:tiny-sd3"
TINY_SD3_SHAPES = "builtin:tiny-sd3-shapes"
BUILTIN_MODELS = (TINY_SD3, TINY_SD3_SHAPES)
DEFAULT_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0",  # image-stream attention
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",  # text-stream (context) attention
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("ADRPO_CACHE", Path.home() / ".cache" / "adrpo_diffusion"))


def check_model_source(name_or_path: str, option: str = "--pretrained_model") -> None:
    """Fail fast, before anything heavy loads, if ``name_or_path`` cannot be loaded.

    Accepts a ``builtin:`` name, a local pipeline directory (with ``model_index.json``), or a hub id that is
    either cached or reachable. ``option`` is how the user passes the model, for the error message.
    """
    if name_or_path.startswith(BUILTIN_PREFIX):
        if name_or_path not in BUILTIN_MODELS:
            raise ValueError(f"Unknown built-in model {name_or_path!r}; the built-in models are {', '.join(BUILTIN_MODELS)}.")
        return
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{path} is a directory but has no model_index.json: pass a diffusers pipeline directory "
                "(the output of pipeline.save_pretrained or a downloaded hub snapshot)."
            )
        return
    local = "/models/" + name_or_path.rstrip("/").split("/")[-1]
    offline_hint = (
        f"To use a local copy, pass its directory, e.g. {option} {local} (download it once, where there is "
        f"network, with `huggingface-cli download {name_or_path} --local-dir {local}`)."
    )
    if not _HUB_ID.match(name_or_path):
        raise FileNotFoundError(f"Model {name_or_path!r} is neither a local directory nor a hub id (owner/name). {offline_hint}")
    from huggingface_hub import constants, file_exists, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "model_index.json"), str):
        return  # in the local hub cache
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"Model {name_or_path!r} is not a local directory and not in the hub cache, and HF_HUB_OFFLINE is set. {offline_hint}"
        )
    try:
        found = file_exists(name_or_path, "model_index.json")
    except Exception as err:  # network down, gated repo without a token, ...
        raise FileNotFoundError(
            f"Cannot reach {name_or_path!r} on the hub ({type(err).__name__}: {err}). {offline_hint}"
        ) from err
    if not found:
        raise FileNotFoundError(f"{name_or_path!r} has no model_index.json on the hub: not a diffusers pipeline. {offline_hint}")


def resolve_model_path(name_or_path: str) -> str:
    """Map built-in names to their cached directory (building it once); pass anything else through.

    A build leaves the global torch RNG as it found it: a run seeded before its model loads draws the same
    numbers whether or not the model had to be built first."""
    if name_or_path not in BUILTIN_MODELS:
        return name_or_path
    target = cache_dir() / name_or_path.removeprefix(BUILTIN_PREFIX)
    if not (target / "model_index.json").is_file():
        if name_or_path == TINY_SD3:
            build, duration = build_tiny_sd3, "about 10 s"
        else:
            from .lab.pretrain import build_tiny_sd3_shapes as build

            duration = "about 4 minutes"
        print(f"[adrpo] building {name_or_path} once into {target} ({duration} on a CPU; later runs load it from there)",
              flush=True)
        with torch.random.fork_rng(devices=[]):
            build(target)
    return str(target)


def load_sd3_pipeline(name_or_path: str, dtype: torch.dtype = torch.float32, drop_t5: bool = False):
    """Load an SD3-family pipeline from a hub id, a local directory or a built-in name.

    ``drop_t5`` skips the T5 encoder (about 9 GB in fp16 for SD3-medium); the pipeline then feeds zeros
    in its place. A local directory saved without T5 (such as the tiny pipeline) is loaded that way
    automatically.
    """
    from diffusers import StableDiffusion3Pipeline

    check_model_source(name_or_path)
    path = resolve_model_path(name_or_path)
    extra = {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}
    return StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype, **{**absent_components(path), **extra})


def absent_components(path: str) -> dict:
    """Components a local pipeline was saved without (``[null, null]`` in its model_index.json, e.g. the tiny
    SD3's T5): ``from_pretrained`` needs them passed as None explicitly."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return {}
    return {name: None for name, value in json.loads(index.read_text()).items()
            if isinstance(value, list) and value[0] is None}


def add_lora(transformer, rank: int, alpha: float, target_modules=DEFAULT_LORA_TARGETS, init_weights=True):
    """Attach a LoRA adapter in place (diffusers' ``add_adapter``, no PeftModel wrapper) and return its config."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=init_weights)
    transformer.add_adapter(config)
    return config


def lora_metadata(config) -> dict:
    """The LoraConfig as the plain dict diffusers stores next to the weights (so alpha loads correctly)."""
    meta = config.to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])  # a set in PEFT; JSON needs a list
    return json.loads(json.dumps(meta, default=str))


# ----------------------------------------------------------------------------------------------------------
# The tiny offline pipeline


def _char_tokenizer(max_length: int = 77):
    """A character-level CLIP BPE tokenizer (the byte alphabet, no merges): needs no download."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _blocks_batch(n: int, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """Synthetic images in [-1, 1]: a uniform background colour with one rectangle of another colour."""
    images = torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, size, size).clone()
    for image in images:
        colour = torch.rand(3, 1, 1, generator=generator)
        x0, y0 = torch.randint(0, size * 3 // 4, (2,), generator=generator).tolist()
        w, h = torch.randint(size // 5, size // 2, (2,), generator=generator).tolist()
        image[:, y0 : y0 + h, x0 : x0 + w] = colour
    return images * 2 - 1


def fit_tiny_vae(vae, batches, steps: int, batch_size: int = 16, seed: int = 0, decode_mean: bool = False) -> list[float]:
    """Briefly train a tiny VAE to reconstruct images of ``batches(n, generator)`` (in [-1, 1]), decoding a
    posterior sample (or its mean: sharper edges within few steps), then set SD3's latent scale and shift from
    its latent statistics. Returns the loss of every step. A randomly initialised decoder's GroupNorms wash out
    the latents' colour information, leaving a reward almost nothing that a fine-tuned transformer can change."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        images = batches(batch_size, generator)
        posterior = vae.encode(images).latent_dist
        z = posterior.mean if decode_mean else posterior.sample(generator=generator)
        loss = (vae.decode(z).sample - images).pow(2).mean() + 1e-4 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        latents = vae.encode(batches(256, generator)).latent_dist.mean
    vae.register_to_config(shift_factor=round(latents.mean().item(), 4), scaling_factor=round(1 / latents.std().item(), 4))
    vae.requires_grad_(False)
    return losses


def tiny_sd3_pipeline(transformer_config: dict, fit_vae, seed: int = 0, tokenizer_length: int = 77):
    """A tiny SD3 pipeline of the real diffusers classes with seeded random weights: 32x32 images, a VAE with
    4 latent channels (16x16 latents) fitted by ``fit_vae(vae)``, an ``SD3Transformer2DModel(**transformer_config)``
    and two 32-wide CLIP text encoders with a character-level tokenizer; no T5 (the pipeline then feeds zeros, as
    SD3 does when ``text_encoder_3`` is dropped)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**transformer_config)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
    )
    fit_vae(vae)
    text_encoders = [
        CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=32, bos_token_id=512, eos_token_id=513, pad_token_id=513,
            hidden_act="gelu",
        ))
        for _ in range(2)
    ]
    tokenizer = _char_tokenizer(tokenizer_length)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoders[0], tokenizer=tokenizer, text_encoder_2=text_encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def build_tiny_sd3(target: str | os.PathLike, seed: int = 0) -> Path:
    """Build ``builtin:tiny-sd3`` (:func:`tiny_sd3_pipeline` with a random 2-block transformer and the VAE briefly
    fitted to coloured blocks, ~10 s on a CPU) and save it to ``target`` with :func:`save_pipeline_atomically`."""
    transformer_config = dict(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=32,
    )
    pipe = tiny_sd3_pipeline(transformer_config, lambda vae: fit_tiny_vae(vae, _blocks_batch, steps=150, seed=seed), seed)
    return save_pipeline_atomically(pipe, target)


def save_pipeline_atomically(pipe, target: str | os.PathLike) -> Path:
    """``pipe.save_pretrained`` into a temporary directory next to ``target``, then one rename: an interrupted
    build never leaves a half-written model behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        pipe.save_pretrained(tmp / "pipeline")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / "pipeline", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
