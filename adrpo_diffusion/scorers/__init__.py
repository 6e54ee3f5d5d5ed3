"""One registry of image-text scorers, serving as training rewards and as evaluation metrics.

``build_scorer(name, **options)`` returns an object with ``score(images, prompts) -> (N,) float tensor``,
where ``images`` is a list of PIL images or a float tensor ``(N, 3, H, W)`` in ``[0, 1]``. A scorer may also
override the class method ``check_prompts(prompts)``, which raises a clear error before any model loads.
``build_reward(reward, reward_options)`` (:mod:`.combined`) is the training reward: one scorer, or a weighted sum
``R = sum_k w_k * scorer_k(image, prompt)`` of several.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from .base import Scorer, to_image_tensor

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


def check_scorer(name: str, options: dict, prompts=None) -> None:
    """Reject an unknown scorer name or option, or prompts it cannot score, before anything heavy loads."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown scorer {name!r}; available: {', '.join(available_scorers())}")
    parameters = inspect.signature(_REGISTRY[name]).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(options) - set(parameters))
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown} for scorer {name!r}; valid: {sorted(parameters)}")
    if prompts is not None:
        _REGISTRY[name].check_prompts(prompts)


def build_scorer(name: str, **options) -> Scorer:
    check_scorer(name, options)
    return _REGISTRY[name](**options)


# Built-in scorers register themselves on import.
from . import aesthetic, blip, clip, color, hpsv2, pickscore, shapes  # noqa: E402,F401
from .combined import WeightedReward, build_reward, check_reward, reward_parts  # noqa: E402

__all__ = ["Scorer", "WeightedReward", "available_scorers", "build_reward", "build_scorer", "check_reward", "check_scorer",
           "register_scorer", "reward_parts", "to_image_tensor"]
