"""The architectures the benchmarks build at full size with random weights (SD3-medium's transformer, VAE and text
encoders, the CLIP reward), their FLOPs, and the GPUs' peak throughput for MFU: shared by ``adrpo-benchmark``
(:mod:`.benchmark`) and its end-to-end mode (:mod:`.benchmark_e2e`)."""

from __future__ import annotations

import contextlib

import torch

SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
SD3_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False,
)
# SD3's text encoders (CLIP-L, OpenCLIP-bigG, T5-XXL) at their real sizes. The CLIP towers take the token ids of
# the character tokenizer (builtin:tiny-scorers/clip: 512 and 513 are its start and end tokens) in their real
# vocabularies.
CHAR_TOKENIZER_IDS = dict(bos_token_id=512, eos_token_id=513, pad_token_id=513)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu")
# CLIP reward models: (vision tower, text tower, image size, projection dim); sd3-medium's is ViT-L/14's
CLIP_REWARD = {
    "sd3-medium": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=224, patch_size=14),
                   dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12), 224, 768),
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8),
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2), 32, 16),
}
# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s), for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def transformer_flops(config, image_tokens: int, text_tokens: int) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) of one SD3 transformer forward for ONE sample, split into ``linear`` (every
    matmul with a weight) and ``attention`` (QK^T and AV over the joint sequence).

    Per joint block with width d: the image stream has qkv (3d^2), out (d^2) and a 4x MLP (8d^2) per token;
    the text stream the same, except in the last block (``context_pre_only``), which only projects qkv;
    AdaLN modulations are per sample (6d^2 each stream). Attention: 2 N^2 d multiply-adds, N = image + text
    tokens. SD3.5's dual-attention blocks add a second image-only attention.
    """
    c = config
    d = c.num_attention_heads * c.attention_head_dim
    n, m = image_tokens, text_tokens
    macs_linear = n * c.in_channels * c.patch_size**2 * d  # patch embedding
    macs_linear += m * c.joint_attention_dim * c.caption_projection_dim  # context embedder
    macs_linear += 256 * d + d * d + c.pooled_projection_dim * d + d * d  # timestep and pooled-text embedders
    macs_attention = 0
    dual = set(getattr(c, "dual_attention_layers", ()) or ())
    for layer in range(c.num_layers):
        last = layer == c.num_layers - 1
        macs_linear += 6 * d * d + n * 12 * d * d  # image stream: adaLN, qkv, out, MLP
        macs_linear += (2 * d * d + m * 3 * d * d) if last else (6 * d * d + m * 12 * d * d)
        macs_attention += 2 * (n + m) ** 2 * d
        if layer in dual:
            macs_linear += 3 * d * d + n * 4 * d * d
            macs_attention += 2 * n * n * d
    out_channels = c.out_channels or c.in_channels
    macs_linear += 2 * d * d + n * d * c.patch_size**2 * out_channels  # final adaLN and projection
    return {"linear": 2.0 * macs_linear, "attention": 2.0 * macs_attention}


def sd3_text_encoders(configs: list[dict], device, dtype) -> list[torch.nn.Module]:
    """SD3's text encoders at random init, built on ``device`` in ``dtype`` (T5-XXL is 19 GB in fp32): a
    ``CLIPTextModelWithProjection`` for each config with ``projection_dim``, a ``T5EncoderModel`` for one with
    ``d_model``; in eval mode, frozen."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    models = []
    with default_dtype(dtype), torch.device(device):
        for config in configs:
            if "d_model" in config:
                models.append(T5EncoderModel(T5Config(**config, is_encoder_decoder=False)))
            else:
                models.append(CLIPTextModelWithProjection(CLIPTextConfig(**config, max_position_embeddings=77,
                                                                         **CHAR_TOKENIZER_IDS)))
    return [m.eval().requires_grad_(False) for m in models]


def clip_reward_model(arch: str, device, dtype):
    """The CLIP-score reward's ``CLIPModel`` (ViT-L/14 for sd3-medium, a tiny one for tiny) at random init on
    ``device`` in ``dtype``, and its ``CLIPProcessor`` on the character tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from .builtin import resolve_asset

    vision, text, size, projection = CLIP_REWARD[arch]
    config = CLIPConfig(text_config=dict(vocab_size=514, max_position_embeddings=77, **CHAR_TOKENIZER_IDS, **text),
                        vision_config=vision, projection_dim=projection)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                                                 crop_size={"height": size, "width": size}),
                              tokenizer=CLIPProcessor.from_pretrained(resolve_asset("builtin:tiny-scorers/clip")).tokenizer)
    with default_dtype(dtype), torch.device(device):
        return CLIPModel(config), processor


@contextlib.contextmanager
def default_dtype(dtype):
    """Build modules directly in ``dtype`` (random init included), not in fp32 first."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
