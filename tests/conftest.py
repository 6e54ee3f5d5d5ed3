"""Test set-up: offline, and one shared cache for the tiny pipelines (built once per cache)."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("ADRPO_CACHE", os.path.join(tempfile.gettempdir(), "adrpo_test_cache"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd3_dir():
    from adrpo_diffusion.builtin import resolve_model

    return resolve_model("builtin:tiny-sd3")


SHAPES_TEST_STEPS = 150  # in the cache directory's name: another recipe is never taken for this one


@pytest.fixture(scope="session")
def shapes_test_base():
    """A smaller shapes base for the lab's tests: the recipe of ``builtin:tiny-sd3-shapes`` (8 to 13 minutes to
    build) with fewer VAE and pre-training steps and a smaller image bank, built once per cache in under a minute.
    It draws coloured blobs more than shapes: the lab's mechanics, not its numbers, are under test."""
    from adrpo_diffusion.testing.shapes_base import build_tiny_sd3_shapes
    from adrpo_diffusion.utils import build_once, cache_dir

    return str(build_once(cache_dir() / f"tiny-sd3-shapes-test-{SHAPES_TEST_STEPS}", lambda directory:
                          build_tiny_sd3_shapes(directory, steps=SHAPES_TEST_STEPS, vae_steps=60, bank_size=512)))


@pytest.fixture
def tiny_pipe(tiny_sd3_dir):
    from adrpo_diffusion.families import load_family

    pipe = load_family(tiny_sd3_dir).pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe
