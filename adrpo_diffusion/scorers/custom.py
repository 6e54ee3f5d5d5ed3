"""A user's own reward, named ``module.path:function`` or ``path/to/file.py:function`` wherever a scorer name goes
(``reward``, a key of a ``reward`` mapping, an evaluation metric).

The function takes ``(images, prompts, **options)``: ``images`` a float tensor ``(N, 3, H, W)`` in ``[0, 1]`` on
the CPU, ``prompts`` a list of ``N`` strings, ``options`` the scorer's options (``reward_options``); it returns ``N``
numbers (a list, an array or a tensor), higher is better. ``module.path:ClassName`` may instead name a
:class:`~.base.Scorer` subclass, built with the options (for a reward that loads a model once).

    # my_rewards.py
    def brightness(images, prompts, target=0.5):
        return -(images.mean(dim=(1, 2, 3)) - target).abs()

    adrpo-train --config configs/tiny_cpu.yaml --reward my_rewards.py:brightness --reward_options '{target: 0.7}'
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import torch

from .base import Scorer

POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def is_custom(name: str) -> bool:
    return ":" in name


def _load_attribute(spec: str):
    where, _, attribute = spec.rpartition(":")
    if not where or not attribute.isidentifier():
        raise ValueError(f"Custom reward {spec!r}: write module.path:function or path/to/file.py:function")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ValueError(f"Custom reward {spec!r}: no file {path}")
        name = f"adrpo_custom_reward.{path.stem}"
        if name not in sys.modules:
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            sys.modules[name] = module
        module = sys.modules[name]
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(f"Custom reward {spec!r}: cannot import {where!r} ({err}). Put it on PYTHONPATH, or name "
                             f"its file: path/to/{where.split('.')[-1]}.py:{attribute}") from None
    if not hasattr(module, attribute):
        raise ValueError(f"Custom reward {spec!r}: {where} has no {attribute!r}")
    return getattr(module, attribute)


def custom_scorer_class(spec: str) -> type[Scorer]:
    """The scorer class of a custom reward ``spec`` (see the module docstring); ``ValueError`` when ``spec`` cannot be
    imported or names something that cannot score ``(images, prompts)``. Imports the module, builds nothing."""
    target = _load_attribute(spec)
    if isinstance(target, type):
        if not issubclass(target, Scorer):
            raise ValueError(f"Custom reward {spec!r} is a class but not an adrpo_diffusion.scorers.Scorer subclass")
        return target
    if not callable(target):
        raise ValueError(f"Custom reward {spec!r} is a {type(target).__name__}, not a function")
    parameters = list(inspect.signature(target).parameters.values())
    if len([p for p in parameters[:2] if p.kind in POSITIONAL]) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in parameters):
        raise ValueError(f"Custom reward {spec!r} must take (images, prompts, **options); its signature is "
                         f"{inspect.signature(target)}")

    # its options, checked like a built-in scorer's, and the two every scorer takes from adrpo-evaluate
    options = parameters[2:]
    common = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
              for name, default in (("batch_size", 32), ("device", None)) if name not in {p.name for p in options}]

    class FunctionScorer(Scorer):
        __signature__ = inspect.Signature([*options, *common])

        def __init__(self, batch_size: int = 32, device: str | None = None, **options):
            self.batch_size, self.options = batch_size, options  # the images stay on the CPU, as documented

        def _score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            scores = torch.as_tensor(target(images, prompts, **self.options), dtype=torch.float32).cpu()
            if scores.shape != (len(prompts),):
                raise ValueError(f"Custom reward {spec!r} returned scores of shape {tuple(scores.shape)} for "
                                 f"{len(prompts)} images: it must return one number per image")
            return scores

    FunctionScorer.__qualname__ = FunctionScorer.__name__ = f"FunctionScorer[{spec}]"
    return FunctionScorer
