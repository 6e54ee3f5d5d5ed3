"""Test set-up: offline, and one shared cache for the tiny pipelines (built once per cache)."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("ADRPO_CACHE", os.path.join(tempfile.gettempdir(), "adrpo_test_cache"))
if "PYTEST_XDIST_WORKER" in os.environ:
    # One torch thread per pytest-xdist worker (`-n 2` runs two), also in the processes the tests launch: the tiny
    # models gain little from a second thread, so two workers of one thread keep both cores busy without
    # oversubscribing them (BENCHMARKS.md, "The test suite").
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(items):
    """The tests marked ``slow`` first (a stable sort): with ``-n 2`` pytest-xdist hands them out before the many
    short ones, so that the two workers finish together."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="module", autouse=True)
def frozen_heap():
    """Before each test module, the objects alive then (above all those of the big imports: diffusers' pipelines,
    transformers' models, TorchDynamo; about 480k once the pipelines are imported) are moved out of the garbage
    collector's sight: every full collection (diffusers' ``free_memory`` between models, accelerate's at the end of
    a run, Python's own) then skips them, 0.25-0.3 s less each, about 38 s of the suite's CPU time (BENCHMARKS.md,
    "The test suite"). Reference counting still frees them; the tests' own objects are collected as usual."""
    import gc

    from diffusers import FluxPipeline, SanaPipeline, StableDiffusion3Pipeline  # noqa: F401

    import adrpo_diffusion.trainer  # noqa: F401

    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def tiny_sd3_dir():
    from adrpo_diffusion.builtin import resolve_model

    return resolve_model("builtin:tiny-sd3")


SHAPES_TEST_STEPS = 150  # in the cache directory's name with the base's revision: another recipe is never taken


@pytest.fixture(scope="session")
def shapes_test_base():
    """A smaller shapes base for the lab's tests: the recipe of ``builtin:tiny-sd3-shapes`` (8 to 13 minutes to
    build) with fewer VAE and pre-training steps and a smaller image bank, built once per cache in under a minute.
    It draws coloured blobs more than shapes: the lab's mechanics, not its numbers, are under test."""
    from adrpo_diffusion.builtin import cache_name
    from adrpo_diffusion.testing.shapes_base import build_tiny_sd3_shapes
    from adrpo_diffusion.utils import build_once, cache_dir

    name = cache_name("tiny-sd3-shapes", f"-test-{SHAPES_TEST_STEPS}")
    return str(build_once(cache_dir() / name, lambda directory:
                          build_tiny_sd3_shapes(directory, steps=SHAPES_TEST_STEPS, vae_steps=60, bank_size=512)))


@pytest.fixture(scope="session")
def shared_tmp_path(tmp_path_factory):
    """A directory of this test session that every pytest-xdist worker sees (each worker's own ``tmp_path``s lie in
    it); for results that one worker computes and the others reuse (:func:`adrpo_diffusion.utils.build_once`)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@pytest.fixture(scope="session")
def lora_difference():
    """``lora_difference(a, b)``: ``||a - b|| / ||B||`` over every tensor of two LoRA state dicts, with ``B`` the
    ``lora_B`` weights of ``a`` (zero before training): how far apart two runs ended, relative to how far training
    went. For runs that differ by float rounding only, a per-element bound is fragile: where a gradient is near
    zero, Adam's ``m / sqrt(v)`` turns its rounding into a whole step of that one weight."""
    def difference(a: dict, b: dict) -> float:
        apart = sum((a[key] - b[key]).double().pow(2).sum() for key in a)
        trained = sum(a[key].double().pow(2).sum() for key in a if "lora_B" in key)
        return (apart / trained).sqrt().item()

    return difference


@pytest.fixture
def tiny_pipe(tiny_sd3_dir):
    from adrpo_diffusion.families import load_family

    pipe = load_family(tiny_sd3_dir).pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe
