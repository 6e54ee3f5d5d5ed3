"""The built-in tiny models: building them leaves the run's random state alone, and they load as documented."""

import pytest
import torch

from adrpo_diffusion import models
from adrpo_diffusion.models import TINY_SD3, TINY_SD3_SHAPES, resolve_model_path


def test_building_tiny_sd3_leaves_the_global_rng_unchanged(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADRPO_CACHE", str(tmp_path))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    path = resolve_model_path(TINY_SD3)
    assert torch.equal(torch.get_rng_state(), state)
    assert f"building {TINY_SD3} once into {path}" in capsys.readouterr().out
    resolve_model_path(TINY_SD3)  # built: no second build, no message
    assert capsys.readouterr().out == ""


def test_building_the_shapes_base_leaves_the_global_rng_unchanged(tmp_path, monkeypatch, capsys):
    """The real build takes minutes: its heavy part is replaced by one that draws from the global RNG."""
    from adrpo_diffusion.lab import pretrain

    def build(target):
        torch.rand(10)
        target.mkdir(parents=True)
        (target / "model_index.json").write_text("{}")

    monkeypatch.setenv("ADRPO_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrain, "build_tiny_sd3_shapes", build)
    state = torch.get_rng_state()
    assert resolve_model_path(TINY_SD3_SHAPES) == str(tmp_path / "tiny-sd3-shapes")
    assert torch.equal(torch.get_rng_state(), state)
    assert "about 4 minutes" in capsys.readouterr().out


def test_tiny_sd3_loads_with_from_pretrained_as_documented(tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    assert "text_encoder_3=None, tokenizer_3=None" in models.__doc__
    pipe = StableDiffusion3Pipeline.from_pretrained(resolve_model_path(TINY_SD3), text_encoder_3=None, tokenizer_3=None)
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, max_sequence_length=8,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


@pytest.mark.parametrize("name", ["stabilityai/stable-diffusion-3-medium-diffusers", "/models/sd3"])
def test_other_names_pass_through(name):
    assert resolve_model_path(name) == name
