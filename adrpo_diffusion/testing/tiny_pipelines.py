"""Tiny offline pipelines of every model family: the real diffusers and transformers classes, built from configs
with seeded random weights, saved with ``save_pretrained`` and loaded back with ``from_pretrained`` like a hub id
(product code reaches them only as ``builtin:tiny-sd3``, ``builtin:tiny-flux``, ``builtin:tiny-sana``; see
:mod:`adrpo_diffusion.builtin`).

All are 32x32 images, a VAE with 4 latent channels and a 2x compression (16x16 latents) briefly fitted to coloured
blocks (:func:`fit_tiny_vae`: a random decoder's normalisations wash the latents' colour out, leaving a colour reward
nothing to learn), and text encoders on a character-level tokenizer that needs no download (:func:`char_tokenizer`).
Every build draws from its own RNG (``torch.random.fork_rng``): building never moves the global torch RNG.

Adding a family's tiny model: one ``build_tiny_<family>(directory)`` here and one line in ``builtin.MODELS``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

BLOCKS_VAE_STEPS = 150


def save_pipeline(pipe, directory) -> None:
    """``pipe.save_pretrained(directory)`` without diffusers' warning that an absent component (the tiny SD3's
    ``text_encoder_3=None``) "cannot be saved": it is recorded as absent, as intended."""
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")

    def expected(record):
        return "=None of type <class 'NoneType'> cannot be saved" not in record.getMessage()

    logger.addFilter(expected)
    try:
        pipe.save_pretrained(directory)
    finally:
        logger.removeFilter(expected)


def char_tokenizer(max_length: int = 77):
    """A character-level CLIP BPE tokenizer (the byte alphabet, no merges): needs no download. Serves every text
    encoder slot of the tiny pipelines (CLIP, T5, Gemma)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


VOCAB, BOS, EOS = 514, 512, 513  # the character tokenizer's size and special tokens


def blocks_batch(n: int, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """Synthetic images in [-1, 1]: a uniform background colour with one rectangle of another colour."""
    images = torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, size, size).clone()
    for image in images:
        colour = torch.rand(3, 1, 1, generator=generator)
        x0, y0 = torch.randint(0, size * 3 // 4, (2,), generator=generator).tolist()
        w, h = torch.randint(size // 5, size // 2, (2,), generator=generator).tolist()
        image[:, y0 : y0 + h, x0 : x0 + w] = colour
    return images * 2 - 1


def fit_tiny_vae(vae, batches, steps: int, batch_size: int = 16, seed: int = 0, decode_mean: bool = False,
                 shift: bool = True) -> list[float]:
    """Briefly train a tiny VAE to reconstruct images of ``batches(n, generator)`` (in [-1, 1]), decoding a
    posterior sample (or its mean: sharper edges within few steps; a deterministic autoencoder such as SANA's DC-AE
    has only that), then set the latent scale (and, with ``shift``, the shift, as SD3 and FLUX have) from its latent
    statistics. Returns the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)

    def encode(images):
        out = vae.encode(images)
        if not hasattr(out, "latent_dist"):
            return out.latent, None
        posterior = out.latent_dist
        return (posterior.mean if decode_mean else posterior.sample(generator=generator)), posterior

    losses = []
    for _ in range(steps):
        images = batches(batch_size, generator)
        z, posterior = encode(images)
        loss = (vae.decode(z).sample - images).pow(2).mean()
        if posterior is not None:
            loss = loss + 1e-4 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        out = vae.encode(batches(256, generator))
        latents = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latent
    if shift:
        vae.register_to_config(shift_factor=round(latents.mean().item(), 4), scaling_factor=round(1 / latents.std().item(), 4))
    else:
        vae.register_to_config(scaling_factor=round(1 / latents.pow(2).mean().sqrt().item(), 4))
    vae.requires_grad_(False)
    return losses


def _tiny_kl_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
    )


def _clip_text_config(**extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS,
                          pad_token_id=EOS, hidden_act="gelu", **extra)


def tiny_sd3_pipeline(transformer_config: dict, fit_vae, seed: int = 0, tokenizer_length: int = 77):
    """A tiny SD3 pipeline with seeded random weights (drawn from the global RNG: call it inside
    ``torch.random.fork_rng``): a VAE fitted by ``fit_vae(vae)``, an ``SD3Transformer2DModel(**transformer_config)``
    and two 32-wide CLIP text encoders with a character-level tokenizer; no T5 (the pipeline then feeds zeros, as
    SD3 does when ``text_encoder_3`` is dropped)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**transformer_config)
    vae = _tiny_kl_vae()
    fit_vae(vae)
    text_encoders = [CLIPTextModelWithProjection(_clip_text_config(projection_dim=32)) for _ in range(2)]
    tokenizer = char_tokenizer(tokenizer_length)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoders[0], tokenizer=tokenizer, text_encoder_2=text_encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def build_tiny_sd3(directory: str | os.PathLike, seed: int = 0) -> Path:
    """``builtin:tiny-sd3``: :func:`tiny_sd3_pipeline` with a random 2-block transformer and the VAE fitted to
    coloured blocks (~10 s on a CPU), saved into ``directory``."""
    transformer_config = dict(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        pipe = tiny_sd3_pipeline(transformer_config,
                                 lambda vae: fit_tiny_vae(vae, blocks_batch, steps=BLOCKS_VAE_STEPS, seed=seed), seed)
    save_pipeline(pipe, directory)
    return Path(directory)


def build_tiny_flux(directory: str | os.PathLike, seed: int = 0) -> Path:
    """``builtin:tiny-flux``: a FLUX.1-dev-style pipeline: a guidance-distilled ``FluxTransformer2DModel``
    (``guidance_embeds``; one double- and one single-stream block, 2 heads of 16, rotary axes 4+6+6) on packed
    latents (4 channels x 2x2 patches = 16 in), a CLIP text encoder (pooled) and a T5 encoder (per token), both 32
    wide on the character tokenizer, the KL VAE fitted to coloured blocks, and FLUX.1-dev's scheduler settings
    (resolution-dependent shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        vae = _tiny_kl_vae()
        fit_tiny_vae(vae, blocks_batch, steps=BLOCKS_VAE_STEPS, seed=seed)
        clip = CLIPTextModel(_clip_text_config())
        t5 = T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2,
                                     feed_forward_proj="gated-gelu", pad_token_id=EOS, eos_token_id=EOS,
                                     decoder_start_token_id=EOS))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=char_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=char_tokenizer(), transformer=transformer)
    save_pipeline(pipe, directory)
    return Path(directory)


def build_tiny_sana(directory: str | os.PathLike, seed: int = 0) -> Path:
    """``builtin:tiny-sana``: a SANA pipeline: a ``SanaTransformer2DModel`` (2 blocks of linear self-attention and
    cross-attention, 2 heads of 16, patch 2), a tiny DC-AE (``AutoencoderDC``, no shift) fitted to coloured blocks, a
    32-wide Gemma-2 text encoder on the character tokenizer, and SANA's flow DPM-Solver scheduler."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
            sample_size=16, patch_size=2,
        )
        vae = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
            decoder_block_types="ResBlock", encoder_block_out_channels=(16, 32), decoder_block_out_channels=(16, 32),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
            decoder_qkv_multiscales=((), ()),
        )
        fit_tiny_vae(vae, blocks_batch, steps=BLOCKS_VAE_STEPS, seed=seed, shift=False)
        gemma = Gemma2Model(Gemma2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=2048, bos_token_id=BOS, eos_token_id=EOS,
            pad_token_id=EOS,
        ))
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    # the pipeline prefixes prompts with its long "complex human instruction": a tokenizer length to match
    pipe = SanaPipeline(tokenizer=char_tokenizer(2048), text_encoder=gemma, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    save_pipeline(pipe, directory)
    return Path(directory)
