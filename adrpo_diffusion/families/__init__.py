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
import re
from pathlib import Path

import torch

from ..builtin import is_builtin, model_names, resolve_model
from .base import AdapterCopies, MergedLoRA, ModelFamily, PromptCache, adapters_off, add_lora
from .flux import FluxFamily
from .sana import SanaFamily
from .sd3 import SD3Family

FAMILIES: dict[str, type[ModelFamily]] = {cls.name: cls for cls in (SD3Family, FluxFamily, SanaFamily)}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

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
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{path} is a directory but has no model_index.json: pass a diffusers pipeline directory "
                "(the output of pipeline.save_pretrained or a downloaded hub snapshot)."
            )
        return
    local = "/models/" + name_or_path.rstrip("/").split("/")[-1]
    offline_hint = (
        f"To use a local copy, pass its directory, e.g. {option} {local} (download it once, where there is "
        f"network, with `huggingface-cli download {name_or_path} --local-dir {local}`)."
    )
    if not _HUB_ID.match(name_or_path):
        raise FileNotFoundError(f"Model {name_or_path!r} is neither a local directory nor a hub id (owner/name). {offline_hint}")
    from huggingface_hub import constants, file_exists, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "model_index.json"), str):
        return  # in the local hub cache
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"Model {name_or_path!r} is not a local directory and not in the hub cache, and HF_HUB_OFFLINE is set. {offline_hint}"
        )
    try:
        found = file_exists(name_or_path, "model_index.json")
    except Exception as err:  # network down, gated repo without a token, ...
        raise FileNotFoundError(
            f"Cannot reach {name_or_path!r} on the hub ({type(err).__name__}: {err}). {offline_hint}"
        ) from err
    if not found:
        raise FileNotFoundError(f"{name_or_path!r} has no model_index.json on the hub: not a diffusers pipeline. {offline_hint}")


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
