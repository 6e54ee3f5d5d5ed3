"""Several rewards at once: a weighted sum of scorers of the registry.

The ``reward`` of a config is a scorer name, or a mapping of scorer names to weights ``w_k``; the reward is

    R(image, prompt) = sum_k w_k * scorer_k(image, prompt)

(the trainer multiplies it by ``reward_scale``). A single name is the sum of one part with weight 1. With a mapping,
``reward_options`` is keyed by scorer name (``{clip: {model: DIR}}``); with a single name it holds that scorer's
options. Weights may be negative (a penalty), not 0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch

from ..utils import did_you_mean
from .base import to_image_tensor
from .custom import is_custom
from .registry import available_scorers, build_scorer, check_scorer, check_scorer_sources, unknown_scorer

EXAMPLE = "{pickscore: 1.0, clip: 0.5}"


def reward_parts(reward, reward_options) -> dict[str, tuple[float, dict]]:
    """``{name: (weight, options)}`` of a config's ``reward`` and ``reward_options``: a scorer name gives
    ``{name: (1.0, reward_options)}``, a mapping ``name -> weight`` gives ``{name: (weight, reward_options.get(name,
    {}))}``. Raises one ``ValueError`` listing every problem, one a line; builds nothing."""
    if not isinstance(reward_options, Mapping):
        raise ValueError(f"reward_options must be a mapping, got {reward_options!r} ({type(reward_options).__name__})")
    if isinstance(reward, str):
        reward, reward_options = {reward: 1.0}, {reward: reward_options}
    elif not isinstance(reward, Mapping):
        raise ValueError(f"reward must be a scorer name or a mapping of scorer names to weights, e.g. {EXAMPLE}; got "
                         f"{reward!r} ({type(reward).__name__})")
    elif not reward:
        raise ValueError(f"reward is an empty mapping: give at least one scorer name -> weight, e.g. {EXAMPLE}")
    elif not all(isinstance(name, str) for name in reward):
        raise ValueError(f"reward's keys must be scorer names, e.g. {EXAMPLE}; got {list(reward)}")
    problems = []
    valid = available_scorers()
    for name, weight in reward.items():
        if name not in valid and not is_custom(name):
            problems.append(unknown_scorer(name))
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            problems.append(f"weight of reward {name!r} must be a finite number, got {weight!r}")
        elif weight == 0:
            problems.append(f"weight of reward {name!r} is 0: drop it instead (a negative weight is a penalty)")
    unknown = [key for key in reward_options if key not in reward]
    if unknown:
        names = ", ".join(f"{key!r}{did_you_mean(key, reward)}" for key in unknown)
        problems.append(f"reward_options key(s) {names} are not scorers of the reward {list(reward)}: with "
                        "several rewards, reward_options is keyed by scorer name, e.g. {clip: {model: DIR}}")
    for name, options in reward_options.items():
        if name in reward and not isinstance(options, Mapping):
            problems.append(f"reward_options[{name!r}] must be a mapping of {name}'s options, got {options!r}")
    if problems:
        raise ValueError("\n".join(problems))
    return {name: (float(weight), dict(reward_options.get(name, {}))) for name, weight in reward.items()}


def check_reward(reward, reward_options, prompts=None) -> dict[str, tuple[float, dict]]:
    """Every problem of the reward, before any model loads: :func:`reward_parts`, then each part's options and (when
    given) whether it can score ``prompts`` (:func:`check_scorer`). Returns the parts."""
    parts = reward_parts(reward, reward_options)
    problems = []
    for name, (_, options) in parts.items():
        try:
            check_scorer(name, options, prompts)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("\n".join(problems))
    return parts


def check_reward_sources(reward, reward_options) -> None:
    """Every model and file the reward's scorers would load can be had (:func:`.check_scorer_sources`), asked before
    any loads; one ``FileNotFoundError`` lists what cannot, each with the ``adrpo-train`` option that passes a local
    copy. Call after :func:`check_reward`."""
    single = isinstance(reward, str)
    problems = []
    for name, (_, options) in reward_parts(reward, reward_options).items():
        def local_option(option, path, name=name):
            inner = f"{{{option}: {path}}}"
            return f"--reward_options '{inner if single else f'{{{name}: {inner}}}'}'"

        try:
            check_scorer_sources(name, options, local_option)
        except FileNotFoundError as err:
            problems += [f"reward {name!r}: {line}" for line in str(err).splitlines()]
    if problems:
        raise FileNotFoundError("\n".join(problems))


class WeightedReward:
    """``R = sum_k w_k * scorer_k(image, prompt)`` over the parts ``{name: (weight, options)}`` of
    :func:`reward_parts`, each scorer built once. Has a scorer's ``score`` and ``to``."""

    def __init__(self, parts: dict[str, tuple[float, dict]]):
        self.names = list(parts)
        self.weights = {name: weight for name, (weight, _) in parts.items()}
        self.scorers = {name: build_scorer(name, **options) for name, (_, options) in parts.items()}

    @classmethod
    def of(cls, **scorers) -> WeightedReward:
        """The sum with weight 1 of scorers already built, by name: ``WeightedReward.of(reward=my_scorer)``. A
        scorer needs ``score(images, prompts)``; ``to`` and ``details`` are used where it has them."""
        reward = cls({})
        reward.names, reward.weights, reward.scorers = list(scorers), dict.fromkeys(scorers, 1.0), scorers
        return reward

    def to(self, device) -> WeightedReward:
        for scorer in self.scorers.values():
            if hasattr(scorer, "to"):
                scorer.to(device)
        return self

    def score_parts(self, images, prompts) -> dict[str, torch.Tensor]:
        """Each part's raw score ``scorer_k(image, prompt)``, ``{name: (N,) float32 tensor}`` on the CPU. PIL images
        are converted to one tensor once, for every part."""
        if not isinstance(images, torch.Tensor):
            images = to_image_tensor(list(images))
        prompts = list(prompts)
        return {name: scorer.score(images, prompts).float().cpu() for name, scorer in self.scorers.items()}

    @torch.no_grad()
    def score_checks(self, images, prompts) -> tuple[dict[str, torch.Tensor], list[tuple[float, torch.Tensor]]]:
        """:meth:`score_parts` and the reward's components ``[(w_k, c)]`` for
        :func:`.advantages.decoupled_signal`: each check of a part whose scorer has checks
        (:meth:`.base.Scorer.checks`; the part's score is then their mean over those that apply, so each is computed
        once), with the part's weight, or the part's score where its scorer has none."""
        if not isinstance(images, torch.Tensor):
            images = to_image_tensor(list(images))
        prompts = list(prompts)
        parts, components = {}, []
        for name, scorer in self.scorers.items():
            checks = scorer.checks(images, prompts) if hasattr(scorer, "checks") else {}
            if checks:
                stacked = torch.stack([check.float().cpu() for check in checks.values()])
                parts[name] = stacked.nanmean(dim=0)
                components += [(self.weights[name], check) for check in stacked]
            else:
                parts[name] = scorer.score(images, prompts).float().cpu()
                components.append((self.weights[name], parts[name]))
        return parts, components

    def details(self, images, prompts) -> dict[str, torch.Tensor]:
        """Every part's :meth:`.base.Scorer.details`, ``{name: (N,) tensor}`` on the CPU."""
        prompts = list(prompts)
        return {key: value.float().cpu() for scorer in self.scorers.values() if hasattr(scorer, "details")
                for key, value in scorer.details(images, prompts).items()}

    def combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum_k w_k * part_k`` of :meth:`score_parts`' output."""
        return sum(self.weights[name] * parts[name] for name in self.names)

    def score(self, images, prompts) -> torch.Tensor:
        """``R = sum_k w_k * scorer_k(image, prompt)``, ``(N,)``."""
        return self.combine(self.score_parts(images, prompts))


def build_reward(reward, reward_options) -> WeightedReward:
    """The :class:`WeightedReward` of a config's ``reward`` and ``reward_options``, checked first (:func:`check_reward`)."""
    return WeightedReward(check_reward(reward, reward_options))
