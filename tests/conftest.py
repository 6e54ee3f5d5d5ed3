"""Test set-up: offline, and one shared cache for the tiny pipeline (built once per test session)."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("ADRPO_CACHE", os.path.join(tempfile.gettempdir(), "adrpo_test_cache"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd3_dir():
    from adrpo_diffusion.models import TINY_SD3, resolve_model_path

    return resolve_model_path(TINY_SD3)


@pytest.fixture
def tiny_pipe(tiny_sd3_dir):
    from adrpo_diffusion.models import load_sd3_pipeline

    pipe = load_sd3_pipeline(tiny_sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe
