"""ADRPO for language models on TRL's GRPO (the paper's Eq. 7). Needs the ``[llm]`` extra (trl)."""

from .config import ADRPOGRPOConfig
from .trainer import ADRPOGRPOTrainer, adaptive_kl_coefficients

__all__ = ["ADRPOGRPOConfig", "ADRPOGRPOTrainer", "adaptive_kl_coefficients"]
