"""Model families: one module per family, one registry, one way in.

    family = load_family("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16, guidance_scale=3.5)

``load_family`` takes a hub id, a local pipeline directory or a ``builtin:`` name, reads ``_class_name`` from the
pipeline's ``model_index.json`` to pick the family, and returns that family around the loaded pipeline. The
interface is :class:`~.base.ModelFamily`; each family's docstring states its time/sign mapping, latent layout and
guidance. Adding a family: one module here with a :class:`~.base.ModelFamily` subclass, listed in ``FAMILIES``
(and a tiny builder in :mod:`adrpo_diffusion.testing.tiny_pipelines` for its tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..builtin import is_builtin, model_names, resolve_model
from ..utils import check_source
from .base import AdapterCopies, MergedLoRA, ModelFamily, PromptCache, adapters_off, add_lora
from .flux import FluxFamily
from .sana import SanaFamily
from .sd3 import SD3Family

FAMILIES: dict[str, type[ModelFamily]] = {cls.name: cls for cls in (SD3Family, FluxFamily, SanaFamily)}

__all__ = ["FAMILIES", "AdapterCopies", "MergedLoRA", "ModelFamily", "PromptCache", "adapters_off", "add_lora",
           "check_model_source", "family_for", "load_family"]


def family_options_help() -> str:
    return "; ".join(f"{cls.name}: {name} ({help})" for cls in FAMILIES.values() for name, help in cls.options.items())


def check_model_source(name_or_path: str, option: str = "--pretrained_model") -> None:
    """Fail fast, before anything heavy loads, if ``name_or_path`` cannot be loaded.

    Accepts a ``builtin:`` name, a local pipeline directory (with ``model_index.json``), or a hub id that is
    either cached or reachable. ``option`` is how the user passes the model, for the error message.
    """
    if is_builtin(name_or_path):
        if name_or_path not in model_names():
            raise ValueError(f"Unknown built-in model {name_or_path!r}; the built-in models are {', '.join(model_names())}.")
        return
    check_source(name_or_path, "model_index.json", lambda local: f"{option} {local}", file_ok=False)


def family_for(path: str, pipeline: str = "auto") -> type[ModelFamily]:
    """The family of a resolved pipeline (local directory or hub id): by ``pipeline`` (a family's pipeline class
    name) or, with ``auto``, by ``_class_name`` in its ``model_index.json``."""
    if pipeline == "auto":
        index = Path(path) / "model_index.json"
        if not index.is_file():
            from huggingface_hub import hf_hub_download

            index = hf_hub_download(path, "model_index.json")
        pipeline = json.loads(Path(index).read_text())["_class_name"]
    for cls in FAMILIES.values():
        if cls.pipeline_class == pipeline:
            return cls
    supported = ", ".join(f"{cls.pipeline_class} ({name})" for name, cls in FAMILIES.items())
    raise ValueError(f"{path}: {pipeline} is not a supported model family; supported pipelines: {supported}.")


def load_family(name_or_path: str, dtype: torch.dtype = torch.float32, guidance_scale: float = 1.0,
                pipeline: str = "auto", load_kwargs: dict | None = None, **options) -> ModelFamily:
    """Load a pipeline (hub id, local directory or ``builtin:`` name) as its model family.

    ``guidance_scale``: the family's guidance (see :class:`~.base.ModelFamily`); ``options``: family-specific load
    options (SD3: ``drop_t5``), an option another family's is refused when set; ``load_kwargs``: passed on to
    ``from_pretrained``."""
    check_model_source(name_or_path)
    path = resolve_model(name_or_path)
    return family_for(path, pipeline).load(path, dtype, guidance_scale, load_kwargs, **options)
