"""The registry of ``builtin:`` names: tiny offline models and assets, built once into the cache.

Product code reaches the test models of :mod:`adrpo_diffusion.testing` only through these names (the builders are
imported by their dotted path when a name is first resolved). A builder fills an empty directory; it is written
under a temporary name and renamed, so a cached entry is always complete.

    builtin:tiny-sd3          a tiny SD3 pipeline (VAE fitted to coloured blocks)
    builtin:tiny-sd3-shapes   the method lab's tiny SD3, pre-trained on coloured shapes
    builtin:tiny-flux         a tiny FLUX.1-dev-style pipeline (guidance-distilled transformer, packed latents)
    builtin:tiny-sana         a tiny SANA pipeline (DC-AE, Gemma-2 text encoder)
    builtin:tiny-scorers/<path>   a tiny random asset of the evaluation scorers (CLIP, PickScore, BLIP, ...)
    builtin:tiny-char-lm      a tiny Qwen2 causal LM for the first-letter task (adrpo-grpo's offline demo)
    builtin:tiny-omni-thinker a tiny Qwen2.5-Omni thinker for the pitch task (adrpo-grpo's offline audio demo)

The tiny SD3 models have no T5 encoder, so loading their directory directly needs the two absent components passed
as None, as for SD3 without T5 (the SD3 family does this itself)::

    StableDiffusion3Pipeline.from_pretrained(resolve_model("builtin:tiny-sd3"), text_encoder_3=None, tokenizer_3=None)
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .utils import build_once, cache_dir

PREFIX = "builtin:"
MODELS = {  # name -> (builder, how long a build takes on a CPU)
    "tiny-sd3": ("adrpo_diffusion.testing.tiny_pipelines:build_tiny_sd3", "about 10 s"),
    "tiny-sd3-shapes": ("adrpo_diffusion.testing.shapes_base:build_tiny_sd3_shapes", "about 10 minutes"),
    "tiny-flux": ("adrpo_diffusion.testing.tiny_pipelines:build_tiny_flux", "about 20 s"),
    "tiny-sana": ("adrpo_diffusion.testing.tiny_pipelines:build_tiny_sana", "about 10 s"),
}
LANGUAGE_MODELS = {  # transformers models, for adrpo-grpo and adrpo-audio-eval
    "tiny-char-lm": ("adrpo_diffusion.testing.tiny_language_models:build_tiny_lm", "about a second"),
    "tiny-omni-thinker": ("adrpo_diffusion.testing.tiny_language_models:build_tiny_omni", "a few seconds"),
}
ASSETS = {"tiny-scorers": ("adrpo_diffusion.testing.tiny_scorers:build_tiny_scorer_assets", "about a second")}
# The cache directory of a built-in whose recipe changed carries its revision (``tiny-sd3-shapes.r4``): a cache
# built by an older version of the package is never taken for the new model.
REVISIONS = {"tiny-sd3-shapes": 4}


def model_names() -> list[str]:
    return [PREFIX + name for name in MODELS]


def is_builtin(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def cache_name(name: str, variant: str = "") -> str:
    """The cache directory's name of built-in ``name`` (``variant``: a suffix for another build of its recipe, e.g. a
    smaller one for tests), with the recipe's revision from the second on: ``tiny-sd3-shapes-test-150.r4``."""
    revision = REVISIONS.get(name, 1)
    return name + variant if revision == 1 else f"{name}{variant}.r{revision}"


def _build(name: str, builder: tuple[str, str]) -> Path:
    """The cached directory of ``name``, built once. A build leaves the global torch RNG as it found it (the builders
    draw inside ``torch.random.fork_rng``): a run seeded before its model loads draws the same numbers either way."""
    target = cache_dir() / cache_name(name)
    (module, function), duration = builder[0].split(":"), builder[1]
    return build_once(target, lambda directory: getattr(importlib.import_module(module), function)(directory),
                      lambda: print(f"[adrpo] building {PREFIX}{name} once into {target} ({duration} on a CPU; later "
                                    "runs load it from there)", flush=True))


def resolve_model(name_or_path: str) -> str:
    """A ``builtin:`` model name -> its directory in the cache (built on first use); anything else unchanged."""
    if not is_builtin(name_or_path):
        return name_or_path
    name = name_or_path.removeprefix(PREFIX)
    if name not in MODELS:
        raise ValueError(f"Unknown built-in model {name_or_path!r}; the built-in models are {', '.join(model_names())}.")
    return str(_build(name, MODELS[name]))


def resolve_language_model(name_or_path: str) -> str:
    """A ``builtin:`` language model name (:data:`LANGUAGE_MODELS`) -> its directory in the cache (built on first
    use); anything else unchanged."""
    if not is_builtin(name_or_path):
        return name_or_path
    name = name_or_path.removeprefix(PREFIX)
    if name not in LANGUAGE_MODELS:
        raise ValueError(f"Unknown built-in language model {name_or_path!r}; the built-ins are "
                         f"{', '.join(PREFIX + n for n in LANGUAGE_MODELS)}.")
    return str(_build(name, LANGUAGE_MODELS[name]))


def resolve_asset(value: str) -> Path:
    """``builtin:<asset>/<path>`` -> that file or directory of the asset in the cache (built on first use)."""
    asset, _, sub = value.removeprefix(PREFIX).partition("/")
    if asset not in ASSETS:
        raise ValueError(f"Unknown built-in asset {value!r}; the built-in assets are "
                         f"{', '.join(PREFIX + a + '/...' for a in ASSETS)}.")
    root = _build(asset, ASSETS[asset])
    path = root / sub
    if not sub or not path.exists():
        available = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        raise FileNotFoundError(f"{value!r} is not a file of {PREFIX}{asset}; available: {', '.join(available)}")
    return path
