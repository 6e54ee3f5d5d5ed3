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


@pytest.fixture(scope="session")
def tiny_sd3_shapes_dir():
    """The method lab's shapes base (pre-trained once per cache, about 5 minutes on 2 cores)."""
    from adrpo_diffusion.builtin import resolve_model

    return resolve_model("builtin:tiny-sd3-shapes")


@pytest.fixture
def tiny_pipe(tiny_sd3_dir):
    from adrpo_diffusion.families import load_family

    pipe = load_family(tiny_sd3_dir).pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe
