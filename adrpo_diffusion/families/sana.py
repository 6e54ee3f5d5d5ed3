"""SANA and SANA 1.5 (``SanaPipeline``, ``SanaTransformer2DModel`` with linear attention, the DC-AE
``AutoencoderDC``, a Gemma-2 text encoder).

Time and sign: ``sigma = 1 - t``; the transformer gets ``timestep = 1000 sigma * timestep_scale`` (the scheduler's
timestep times the transformer config's ``timestep_scale``, 1 for SANA and SANA 1.5, as the pipeline passes it) and
predicts ``noise - x1 = -u_t`` (``flow_prediction``), as diffusers' SANA training script regresses it. (SANA's
DPM-Solver sampler tells the transformer ``round(1000 sigma)``: within half a step of 1/1000.)
Latents: ``vae_latent * scaling_factor`` (the DC-AE has no shift), ``(N, 32, H/32, W/32)``; unpacked.
Prompts: Gemma-2's last hidden states ``embeds`` ``(N, max_sequence_length, 2304)`` and their attention ``mask``
(given to the transformer as ``encoder_attention_mask``). The pipeline prefixes each prompt with its "complex human
instruction" by default and keeps the first and the last ``max_sequence_length - 1`` tokens; the cache does the same
(the empty negative prompt without the instruction, as the pipeline encodes it).
Guidance: true classifier-free guidance in the rollouts (the empty prompt as the negative); the loss regresses the
conditional velocity. Rollouts run at the exact resolution asked for (no aspect-ratio binning).
"""

from __future__ import annotations

import inspect
from typing import ClassVar

from .base import ModelFamily


class SanaFamily(ModelFamily):
    name: ClassVar[str] = "sana"
    pipeline_class: ClassVar[str] = "SanaPipeline"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    # self-attention (linear) and cross-attention projections of every block
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    repeated_blocks: ClassVar[tuple[str, ...]] = ("SanaTransformerBlock",)

    def _encode(self, prompts, device, max_sequence_length, negative=False):
        # the pipeline's default instruction for prompts; none for its negative prompt
        instruction = None if negative else inspect.signature(self.pipe.__call__).parameters["complex_human_instruction"].default
        embeds, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                     max_sequence_length=max_sequence_length,
                                                     complex_human_instruction=instruction)
        return {"embeds": embeds, "mask": mask}

    def _rollout(self, cond, negative, num_inference_steps, resolution, generator):
        return self.pipe(
            prompt_embeds=cond["embeds"], prompt_attention_mask=cond["mask"],
            negative_prompt=None, negative_prompt_embeds=negative["embeds"],
            negative_prompt_attention_mask=negative["mask"],
            guidance_scale=self.guidance_scale, num_inference_steps=num_inference_steps, height=resolution,
            width=resolution, use_resolution_binning=False, output_type="latent", generator=generator,
        ).images

    def generate(self, prompts, *, num_inference_steps, resolution, generators, **call_kwargs):
        return super().generate(prompts, num_inference_steps=num_inference_steps, resolution=resolution,
                                generators=generators, **{"use_resolution_binning": False, **call_kwargs})

    def timestep(self, sigma):
        return sigma * 1000.0 * self.config.timestep_scale

    def velocity(self, transformer, latents, timestep, cond):
        v = transformer(hidden_states=latents, encoder_hidden_states=cond["embeds"],
                        encoder_attention_mask=cond["mask"], timestep=timestep, return_dict=False)[0]
        if self.config.out_channels // 2 == self.config.in_channels:  # learned sigma: keep the velocity half
            v = v.chunk(2, dim=1)[0]
        return v
