"""One registry of image-text scorers, serving as training rewards and as evaluation metrics.

``build_scorer(name, **options)`` returns an object with ``score(images, prompts) -> (N,) float tensor``,
where ``images`` is a list of PIL images or a float tensor ``(N, 3, H, W)`` in ``[0, 1]``. A scorer may also
override the class method ``check_prompts(prompts)``, which raises a clear error before any model loads.
``build_reward(reward, reward_options)`` (:mod:`.combined`) is the training reward: one scorer, or a weighted sum
``R = sum_k w_k * scorer_k(image, prompt)`` of several. A user's own reward goes by ``module.path:function`` or
``path/to/file.py:function`` wherever a registered name does (:mod:`.custom`). :func:`check_scorer_sources` finds
out, before anything loads, whether the models and files a scorer needs can be had (local, cached or on the hub).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from ..builtin import is_builtin
from ..utils import check_source, did_you_mean
from .base import Scorer, to_image_tensor
from .custom import custom_scorer_class, is_custom

_REGISTRY: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str):
    def decorator(factory):
        if name in _REGISTRY:
            raise ValueError(f"Scorer {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_scorers() -> list[str]:
    return sorted(_REGISTRY)


def unknown_scorer(name: str) -> str:
    return (f"Unknown scorer {name!r}{did_you_mean(name, _REGISTRY)}; available: {', '.join(available_scorers())}, or "
            "your own as module.path:function or path/to/file.py:function")


def scorer_class(name: str):
    """The factory of a registered scorer, or of a user's own (``module.path:function``); ``ValueError`` otherwise."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if is_custom(name):
        return custom_scorer_class(name)
    raise ValueError(unknown_scorer(name))


def check_scorer(name: str, options: dict, prompts=None) -> None:
    """Reject an unknown scorer name or option, or prompts it cannot score, before anything heavy loads."""
    factory = scorer_class(name)
    parameters = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(options) - set(parameters))
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown} for scorer {name!r}; valid: {sorted(parameters)}")
    if prompts is not None:
        factory.check_prompts(prompts)


def check_scorer_sources(name: str, options: dict, local_option: Callable[[str, str], str]) -> None:
    """``FileNotFoundError`` when a model or file that scorer ``name`` would load with ``options`` cannot be had
    (:func:`~adrpo_diffusion.utils.check_source`: not on disk, offline and not cached, or not on the hub);
    ``local_option(option, path)`` says how the user passes a local copy, in the command's words. One line per
    missing model or file."""
    problems = []
    for option, (spec, filename) in scorer_class(name).sources(options).items():
        try:
            if not is_builtin(spec):
                check_source(spec, filename, lambda local, option=option: local_option(option, local))
        except FileNotFoundError as err:
            problems.append(str(err))
    if problems:
        raise FileNotFoundError("\n".join(problems))


def build_scorer(name: str, **options) -> Scorer:
    check_scorer(name, options)
    return scorer_class(name)(**options)


# Built-in scorers register themselves on import.
from . import aesthetic, blip, clip, color, hpsv2, pickscore, shapes  # noqa: E402,F401
from .combined import WeightedReward, build_reward, check_reward, check_reward_sources, reward_parts  # noqa: E402

__all__ = ["Scorer", "WeightedReward", "available_scorers", "build_reward", "build_scorer", "check_reward",
           "check_reward_sources", "check_scorer", "check_scorer_sources", "register_scorer", "reward_parts", "scorer_class",
           "to_image_tensor"]
