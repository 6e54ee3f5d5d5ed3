"""The scorer registry: names -> factories, with the checks that run before any model loads. Built-in scorers
register themselves with :func:`register_scorer` when :mod:`adrpo_diffusion.scorers` imports them."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from ..builtin import is_builtin
from ..utils import check_source, did_you_mean
from .base import Scorer
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
