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

from . import aesthetic, blip, clip, color, hpsv2, pickscore, shapes  # noqa: F401  (they register themselves)
from .base import Scorer, to_image_tensor
from .combined import WeightedReward, build_reward, check_reward, check_reward_sources, reward_parts
from .registry import (
    available_scorers,
    build_scorer,
    check_scorer,
    check_scorer_sources,
    register_scorer,
    scorer_class,
)

__all__ = ["Scorer", "WeightedReward", "available_scorers", "build_reward", "build_scorer", "check_reward",
           "check_reward_sources", "check_scorer", "check_scorer_sources", "register_scorer", "reward_parts", "scorer_class",
           "to_image_tensor"]
