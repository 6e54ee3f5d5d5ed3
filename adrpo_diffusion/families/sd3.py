"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, ``SD3Transformer2DModel``; medium and large alike).

Time and sign: ``sigma = 1 - t``; the transformer gets ``timestep = 1000 sigma`` (the scheduler's timesteps, as the
pipeline passes them) and predicts ``noise - x1 = -u_t``.
Latents: ``(vae_latent - shift_factor) * scaling_factor``, ``(N, 16, H/8, W/8)`` (4 channels in the tiny test
model), unpacked; the transformer patchifies inside.
Prompts: CLIP-L and OpenCLIP-bigG (pooled and per-token) and T5-XXL, concatenated by the pipeline into ``embeds``
``(N, 77 + max_sequence_length, 4096)`` and ``pooled`` ``(N, 2048)``. Without T5 (option ``drop_t5``, or a
pipeline saved without it) the pipeline feeds zeros in its place.
Guidance: true classifier-free guidance in the rollouts (the empty prompt as the negative, batched with the
conditional pass by the pipeline); the loss regresses the conditional velocity.
"""

from __future__ import annotations

from typing import ClassVar

from .base import ModelFamily


class SD3Family(ModelFamily):
    name: ClassVar[str] = "sd3"
    pipeline_class: ClassVar[str] = "StableDiffusion3Pipeline"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_targets: ClassVar[tuple[str, ...]] = (
        "to_q", "to_k", "to_v", "to_out.0",  # image-stream attention
        "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",  # text-stream (context) attention
    )
    repeated_blocks: ClassVar[tuple[str, ...]] = ("JointTransformerBlock",)
    options: ClassVar[dict[str, str]] = {
        "drop_t5": "load without the T5 text encoder (about 9 GB in fp16 for SD3-medium); zeros take its place"}

    @classmethod
    def load_options(cls, drop_t5: bool = False) -> dict:
        return {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}

    def _encode(self, prompts, device, max_sequence_length, negative=False):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return {"embeds": embeds, "pooled": pooled}

    def _rollout(self, cond, negative, num_inference_steps, resolution, generator):
        return self.pipe(
            prompt_embeds=cond["embeds"], pooled_prompt_embeds=cond["pooled"],
            negative_prompt_embeds=negative["embeds"], negative_pooled_prompt_embeds=negative["pooled"],
            num_inference_steps=num_inference_steps, guidance_scale=self.guidance_scale,
            height=resolution, width=resolution, output_type="latent", generator=generator,
        ).images

    def timestep(self, sigma):
        return sigma * 1000.0

    def velocity(self, transformer, latents, timestep, cond):
        return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond["embeds"],
                           pooled_projections=cond["pooled"], return_dict=False)[0]
