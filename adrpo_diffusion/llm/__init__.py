"""ADRPO for language models on TRL's GRPO (the paper's Eq. 7). Needs the ``[llm]`` extra (trl).

The names below are imported on first use, so that ``adrpo-grpo --help`` (``adrpo_diffusion.llm.cli``) works, and
says which extra to install, without TRL.
"""

import importlib

_EXPORTS = {"ADRPOGRPOConfig": ".config", "ADRPOGRPOTrainer": ".trainer", "adaptive_kl_coefficients": ".trainer"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
