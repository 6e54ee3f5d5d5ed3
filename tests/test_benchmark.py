import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from adrpo_diffusion.benchmark import markdown
from adrpo_diffusion.benchmark_models import transformer_flops


@pytest.mark.parametrize("dual", [(), (0,)])
def test_flop_count_matches_torch_flop_counter(dual):
    """Our closed-form FLOPs of an SD3 transformer forward against torch's own count of every matmul/SDPA."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=48,
                                  caption_projection_dim=64, pooled_projection_dim=40, pos_embed_max_size=16,
                                  dual_attention_layers=dual).eval()
    batch, text_tokens, latent = 2, 11, 16
    inputs = dict(hidden_states=torch.randn(batch, 4, latent, latent), timestep=torch.tensor([10.0, 500.0]),
                  encoder_hidden_states=torch.randn(batch, text_tokens, 48), pooled_projections=torch.randn(batch, 40))
    # the unfused math kernel runs attention as matmuls, which the counter sees (the fused CPU kernel it does not)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs)
    ours = transformer_flops(model.config, image_tokens=(latent // 2) ** 2, text_tokens=text_tokens)
    total = batch * (ours["linear"] + ours["attention"])
    assert total == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_markdown_table_marks_missing_phases():
    text = markdown([{"scenario": "a", "sample_images_per_s": 2.0, "sample_mfu": 0.41}, {"scenario": "b"}])
    assert "| a | 2.00 | 41.0% |" in text and "| b | - |" in text


def test_cpu_benchmark_end_to_end(tmp_path, tiny_sd3_dir):
    import json

    from adrpo_diffusion.benchmark import main

    out = tmp_path / "bench.json"
    assert main(["--arch", "tiny", "--repeats", "1", "--scenarios", "default,reference-copy", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    default, copy = report["scenarios"]
    for key in ("sample_images_per_s", "decode_images_per_s", "reward_images_per_s", "train_samples_per_s"):
        assert default[key] > 0
    assert copy["reference"] == "copy" and "sample_images_per_s" not in copy
    assert report["memory"]["reference_copy_extra_gb"] == pytest.approx(report["memory"]["transformer_gb"])
    assert set(report["methods"]) >= {"step_time_ratio_adrpo_over_orw-cfm-w2", "step_time_ratio_adrpo_over_fixed-beta"}
