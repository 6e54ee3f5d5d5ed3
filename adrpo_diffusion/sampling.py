"""Prompt-embedding cache and online rollouts from the current policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptCache:
    """Every prompt encoded once (kept on the CPU), plus the empty prompt for classifier-free guidance."""

    embeds: torch.Tensor  # (num_prompts, seq, joint_attention_dim)
    pooled: torch.Tensor  # (num_prompts, pooled_projection_dim)
    negative_embeds: torch.Tensor  # (1, seq, dim)
    negative_pooled: torch.Tensor  # (1, pooled_dim)

    def select(self, indices: list[int], device, dtype):
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.embeds[index].to(device, dtype), self.pooled[index].to(device, dtype)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device, dtype, max_sequence_length: int, batch_size: int = 32) -> PromptCache:
    def encode(batch):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=batch, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return embeds.to("cpu", dtype), pooled.to("cpu", dtype)

    parts = [encode(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    negative_embeds, negative_pooled = encode([""])
    return PromptCache(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), negative_embeds, negative_pooled)


def free_text_encoders(pipe) -> None:
    """Drop the text encoders once every prompt is cached: the rollouts only need the transformer and VAE."""
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def sample_latents(pipe, cache: PromptCache, prompt_indices: list[int], *, num_inference_steps: int,
                   guidance_scale: float, resolution: int, batch_size: int, generators=None) -> torch.Tensor:
    """ODE rollouts of the pipeline's transformer as it is now (LoRA on): final latents ``x1`` in the
    transformer's latent space (``output_type="latent"``: scaled and shifted, never re-encoded from pixels).

    ``generators``: one ``torch.Generator`` per sample for reproducible held-out draws; ``None`` draws from the
    global RNG (saved in checkpoints, so training rollouts resume exactly).
    """
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    latents = []
    for start in range(0, len(prompt_indices), batch_size):
        chunk = prompt_indices[start : start + batch_size]
        embeds, pooled = cache.select(chunk, device, dtype)
        n = len(chunk)
        out = pipe(
            prompt_embeds=embeds, pooled_prompt_embeds=pooled,
            negative_prompt_embeds=cache.negative_embeds.to(device, dtype).expand(n, -1, -1),
            negative_pooled_prompt_embeds=cache.negative_pooled.to(device, dtype).expand(n, -1),
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            height=resolution, width=resolution, output_type="latent",
            generator=None if generators is None else generators[start : start + n],
        )
        latents.append(out.images)
    return torch.cat(latents)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Transformer latents -> images ``(N, 3, H, W)`` in ``[0, 1]`` (undo SD3's scale and shift, then decode)."""
    images = []
    vae = pipe.vae
    for start in range(0, latents.shape[0], batch_size):
        z = latents[start : start + batch_size].to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images.append(pipe.image_processor.postprocess(vae.decode(z, return_dict=False)[0], output_type="pt").float())
    return torch.cat(images)


def image_grid(images: torch.Tensor, cols: int, labels: list[str] | None = None):
    """A PIL grid of images ``(N, 3, H, W)`` in ``[0, 1]``, ``cols`` per row, the last row padded with black.
    ``labels``: one text per row (e.g. its prompt), written in PIL's default font in a white band on the left."""
    import math

    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw, ImageFont

    pil = [Image.fromarray((img.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()) for img in images]
    cols = min(len(pil), cols)
    rows = math.ceil(len(pil) / cols)
    pil += [Image.new("RGB", pil[0].size)] * (rows * cols - len(pil))
    grid = make_image_grid(pil, rows=rows, cols=cols)
    if not labels:
        return grid
    font = ImageFont.load_default()
    texts = [label if len(label) <= 60 else label[:57] + "..." for label in labels]
    boxes = [ImageDraw.Draw(grid).textbbox((0, 0), text, font=font) for text in texts]
    band = max(box[2] for box in boxes) + 8
    labelled = Image.new("RGB", (grid.width + band, grid.height), "white")
    labelled.paste(grid, (band, 0))
    draw, height = ImageDraw.Draw(labelled), pil[0].height
    for row, (text, box) in enumerate(zip(texts, boxes)):
        draw.text((4, row * height + (height - box[3] - box[1]) / 2), text, fill="black", font=font)
    return labelled
