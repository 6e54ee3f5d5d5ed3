"""FLUX.1 (``FluxPipeline``, ``FluxTransformer2DModel``): dev (guidance-distilled) and schnell.

Time and sign: ``sigma = 1 - t``; the transformer gets ``timestep = sigma`` in ``[0, 1]`` (the pipeline passes the
scheduler's ``1000 sigma`` divided by 1000 and the model scales it back inside) and predicts ``noise - x1 = -u_t``,
as diffusers' FLUX training scripts regress it.
Latents: ``(vae_latent - shift_factor) * scaling_factor``, ``(N, 16, H/8, W/8)`` (4 channels in the tiny test
model). The transformer sees them PACKED: every 2x2 patch of the latent becomes one token of ``4 C`` channels,
``(N, (h/2)(w/2), 4C)``, with ``img_ids`` (the patch's row and column) and ``txt_ids`` (zeros) as the rotary
position ids. :meth:`FluxFamily.velocity` packs its input and unpacks the velocity with the pipeline's own
``_pack_latents`` / ``_unpack_latents``, so everything outside sees ``(N, C, h, w)`` like SD3.
Prompts: T5-XXL per-token ``embeds`` ``(N, max_sequence_length, 4096)`` and the CLIP-L ``pooled`` ``(N, 768)``.
Guidance: no classifier-free guidance and no negative prompt. FLUX.1-dev is guidance-distilled: the guidance
scale (``guidance_scale``, 3.5 in the model card) is an INPUT of the transformer (its guidance embedding), given in
the rollouts and in the loss alike, so the policy trained is the velocity at that guidance. FLUX.1-schnell
(``guidance_embeds: false``) takes none; ``guidance_scale`` is then ignored.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import ModelFamily


class FluxFamily(ModelFamily):
    name: ClassVar[str] = "flux"
    pipeline_class: ClassVar[str] = "FluxPipeline"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    # the attention projections of the double-stream blocks (image and context) and of the single-stream blocks
    lora_targets: ClassVar[tuple[str, ...]] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )
    repeated_blocks: ClassVar[tuple[str, ...]] = ("FluxTransformerBlock", "FluxSingleTransformerBlock")

    def _encode(self, prompts, device, max_sequence_length, negative=False):
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                    max_sequence_length=max_sequence_length)
        return {"embeds": embeds, "pooled": pooled}

    def _rollout(self, cond, negative, num_inference_steps, resolution, generator):
        packed = self.pipe(
            prompt_embeds=cond["embeds"], pooled_prompt_embeds=cond["pooled"], guidance_scale=self.guidance_scale,
            num_inference_steps=num_inference_steps, height=resolution, width=resolution, output_type="latent",
            generator=generator,
        ).images
        return self.pipeline_cls()._unpack_latents(packed, resolution, resolution, self.pipe.vae_scale_factor)

    def timestep(self, sigma):
        return sigma

    def guidance(self, n: int, device) -> torch.Tensor | None:
        """The guidance embedding's input (dev), or None (schnell)."""
        if not self.config.guidance_embeds:
            return None
        return torch.full((n,), self.guidance_scale, device=device, dtype=torch.float32)

    def velocity(self, transformer, latents, timestep, cond):
        pipeline = self.pipeline_cls()
        n, c, h, w = latents.shape
        img_ids = pipeline._prepare_latent_image_ids(n, h // 2, w // 2, latents.device, latents.dtype)
        txt_ids = torch.zeros(cond["embeds"].shape[1], 3, device=latents.device, dtype=latents.dtype)
        packed = transformer(
            hidden_states=pipeline._pack_latents(latents, n, c, h, w), timestep=timestep,
            guidance=self.guidance(n, latents.device), pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["embeds"], txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]
        scale = self.pipe.vae_scale_factor
        return pipeline._unpack_latents(packed, h * scale, w * scale, scale)
