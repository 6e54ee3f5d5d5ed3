"""The built-in tiny models (adrpo_diffusion.builtin): building them leaves the run's random state alone, and they load
as documented."""

import pytest
import torch

from adrpo_diffusion import builtin
from adrpo_diffusion.builtin import resolve_model


def test_building_tiny_sd3_leaves_the_global_rng_unchanged(tmp_path, monkeypatch, capsys):
    """The real builder, with 2 VAE-fitting steps instead of hundreds (the build is the same code, seconds faster)."""
    from adrpo_diffusion.testing import tiny_pipelines

    monkeypatch.setenv("ADRPO_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_pipelines, "BLOCKS_VAE_STEPS", 2)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    path = resolve_model("builtin:tiny-sd3")
    assert torch.equal(torch.get_rng_state(), state)
    assert "building builtin:tiny-sd3 once into " + path in capsys.readouterr().out
    resolve_model("builtin:tiny-sd3")  # built: no second build, no message
    assert capsys.readouterr().out == ""


def test_building_the_shapes_base_leaves_the_global_rng_unchanged(tmp_path, monkeypatch, capsys):
    """The real build takes minutes: its heavy part is replaced by one that draws from the global RNG inside the
    builder's own fork, as the real one does."""
    from adrpo_diffusion.testing import shapes_base

    def build(directory):
        with torch.random.fork_rng(devices=[]):
            torch.rand(10)
        (directory / "model_index.json").write_text("{}")

    monkeypatch.setenv("ADRPO_CACHE", str(tmp_path))
    monkeypatch.setattr(shapes_base, "build_tiny_sd3_shapes", build)
    state = torch.get_rng_state()
    assert resolve_model("builtin:tiny-sd3-shapes") == str(tmp_path / "tiny-sd3-shapes.r4")  # the recipe's revision
    assert torch.equal(torch.get_rng_state(), state)
    assert "about 10 minutes" in capsys.readouterr().out


def test_tiny_sd3_loads_with_from_pretrained_as_documented(tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    assert "text_encoder_3=None, tokenizer_3=None" in builtin.__doc__
    pipe = StableDiffusion3Pipeline.from_pretrained(resolve_model("builtin:tiny-sd3"), text_encoder_3=None, tokenizer_3=None)
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, max_sequence_length=8,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


@pytest.mark.parametrize("name", ["stabilityai/stable-diffusion-3-medium-diffusers", "/models/sd3"])
def test_other_names_pass_through(name):
    assert resolve_model(name) == name


def test_unknown_builtin_names_the_known_ones():
    with pytest.raises(ValueError, match="builtin:tiny-sd3, builtin:tiny-sd3-shapes, builtin:tiny-flux, builtin:tiny-sana"):
        resolve_model("builtin:tiny-sd4")


def test_processes_that_share_the_cache_build_a_model_once(tmp_path):
    """Three processes ask for the same directory at once: one builds it (slowly), the others wait for it and load
    it; none sees a half-built or replaced directory."""
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from adrpo_diffusion.utils import build_once\n"
        "root = Path(sys.argv[1])\n"
        "def build(directory):\n"
        "    with open(root / 'builds.log', 'a') as log:\n"
        "        log.write('built\\n')\n"
        "    time.sleep(1.0)\n"
        "    (directory / 'weights').write_text('complete')\n"
        "print((build_once(root / 'model', build) / 'weights').read_text())\n"
    )
    processes = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
                 for _ in range(3)]
    outputs = [p.communicate(timeout=60)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0]
    assert outputs == ["complete\n"] * 3
    assert (tmp_path / "builds.log").read_text() == "built\n"
