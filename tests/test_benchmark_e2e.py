"""adrpo-benchmark --e2e: the real trainer on the tiny architecture, and its refusals of bad input."""

import json
from types import SimpleNamespace

import pytest
from transformers import CLIPTokenizer

from adrpo_diffusion.benchmark import main
from adrpo_diffusion.benchmark_e2e import ARCHS, Variant, parse_variant
from adrpo_diffusion.benchmark_models import transformer_flops

VARIANT_FIELDS = {"name", "overrides", "images_per_step", "rollout_forwards_per_image", "image_tokens", "text_tokens",
                  "forward_gflops_per_image", "first_step_seconds", "steady_seconds", "steady_steps",
                  "rollout_images_per_s", "rollout_tflops", "rollout_mfu", "construct_seconds",
                  "time_to_first_step_seconds", "allocated_gb_at_start", "startup_peak_gb", "train_peak_gb", "metrics",
                  "seconds"}


def test_e2e_tiny_two_variants(tmp_path, capsys):
    models, runs, out = tmp_path / "models", tmp_path / "runs", tmp_path / "e2e.json"
    argv = ["--e2e", "--arch", "tiny", "--steps", "2", "--variant", "k4:images_per_prompt=4,rollout_batch_size=16",
            "--model_dir", str(models), "--runs_dir", str(runs), "--peak_tflops", "0.5", "--output", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out.split("| variant |")[1].splitlines()[2:]
    report = json.loads(out.read_text())
    assert report["build_seconds"] > 0 and report["config"] == "configs/tiny_cpu.yaml"

    # the saved pipeline: T5 included, the CLIP towers' end token the tokenizer's
    index = json.loads((models / "pipeline" / "model_index.json").read_text())
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    eos = CLIPTokenizer.from_pretrained(models / "pipeline" / "tokenizer").eos_token_id
    assert json.loads((models / "pipeline" / "text_encoder" / "config.json").read_text())["eos_token_id"] == eos
    transformer = SimpleNamespace(**json.loads((models / "pipeline" / "transformer" / "config.json").read_text()))
    flops = transformer_flops(transformer, image_tokens=(32 // 2 // 2) ** 2, text_tokens=77 + 8)  # tiny_cpu: 32 px, T5 8

    baseline, k4 = report["variants"]
    assert (baseline["name"], k4["name"], k4["overrides"]) == ("baseline", "k4", {"images_per_prompt": "4",
                                                                                   "rollout_batch_size": "16"})
    for variant, images in ((baseline, 8 * 8), (k4, 8 * 4)):
        assert set(variant) == VARIANT_FIELDS
        rows = [json.loads(line) for line in (runs / variant["name"] / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [1, 2] and variant["metrics"] == rows
        seconds = [{p: row[f"seconds_{p}"] for p in ("rollout", "reward", "train")} for row in rows]
        assert variant["first_step_seconds"] == pytest.approx({**seconds[0], "step": sum(seconds[0].values())})
        assert variant["steady_seconds"] == pytest.approx({**seconds[1], "step": sum(seconds[1].values())})
        assert all(value > 0 for value in variant["steady_seconds"].values())
        assert variant["images_per_step"] == images
        assert variant["rollout_images_per_s"] == pytest.approx(images / seconds[1]["rollout"])
        assert variant["forward_gflops_per_image"] * 1e9 == pytest.approx(flops["linear"] + flops["attention"])
        assert variant["rollout_mfu"] == pytest.approx(  # tiny_cpu: 8 sampler steps, guidance 1 (no CFG)
            images / seconds[1]["rollout"] * 8 * (flops["linear"] + flops["attention"]) / 0.5e12)
        assert 0 < variant["construct_seconds"] < variant["time_to_first_step_seconds"] < variant["seconds"]
        assert variant["startup_peak_gb"] is None and variant["train_peak_gb"] is None  # CPU: no CUDA peak
    assert [row.split(" | ")[0] for row in table] == ["| baseline", "| k4 (images_per_prompt=4, rollout_batch_size=16)"]

    # a second call reuses the models; a spent time budget skips every variant and still writes the report
    assert main([*argv, "--time_budget", "0"]) == 0
    report = json.loads(out.read_text())
    assert report["build_seconds"] is None
    assert [v.get("skipped") for v in report["variants"]] == ["time budget", "time budget"]
    assert "| baseline | time budget |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--variant", "fast:no_such_key=1"], "Unknown config key(s) in the command line: 'no_such_key'"),
    (["--variant", "fast:rollout_batch_size=0"], "rollout_batch_size must be >= 1"),
    (["--variant", "fast:compile_transformer"], "'compile_transformer' is not KEY=VALUE"),
    (["--variant", "fast"], "give baseline (the config as is) or NAME:KEY=VALUE"),
    (["--variant", "fast:max_steps=3"], "max_steps is set by the benchmark itself"),
    (["--variant", "a:lora_rank=4", "--variant", "a:lora_rank=8"], "'a' is given more than once"),
    (["--config", "no_such_config"], "Unknown config 'no_such_config'"),
    (["--steps", "1"], "--steps must be >= 2"),
])
def test_e2e_refuses_bad_input_before_building(tmp_path, capsys, args, message):
    assert main(["--e2e", "--model_dir", str(tmp_path / "models"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_e2e_refuses_a_model_dir_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    assert main(["--e2e", "--model_dir", str(tmp_path / "mine")]) == 2
    assert "was not written by adrpo-benchmark --e2e" in capsys.readouterr().err


def test_variant_values_may_hold_commas():
    assert parse_variant("w2:method_options={beta0: 2, advantage_max: 1}, lora_rank=4") == Variant(
        "w2", {"method_options": "{beta0: 2, advantage_max: 1}", "lora_rank": "4"})


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architectures_fit_together(arch):
    """What SD3's pipeline joins must match (the sd3-medium build runs only on a GPU): pooled text = both CLIP
    projections, per-token text = T5's width (the CLIP states padded to it), latent channels = the VAE's."""
    spec = ARCHS[arch]
    transformer, vae, (clip_l, clip_g, t5) = spec["transformer"], spec["vae"], spec["text_encoders"]
    assert transformer["pooled_projection_dim"] == clip_l["projection_dim"] + clip_g["projection_dim"]
    assert transformer["joint_attention_dim"] == t5["d_model"] >= clip_l["hidden_size"] + clip_g["hidden_size"]
    assert transformer["in_channels"] == transformer["out_channels"] == vae["latent_channels"]
