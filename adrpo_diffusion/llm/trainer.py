"""ADRPO on TRL's GRPO (the paper's Eq. 7): the KL term of completion i is weighted by ``beta0 - clip(A_i)``.

    L = L_PG + mean over completions i of (beta0 - clip(A_i, A_min, A_max)) * KL_i(pi_theta || pi_ref)

Everything but the KL coefficient is TRL's ``GRPOTrainer``: generation (transformers or vLLM), reward functions
and reward models, group advantages, the clipped policy-gradient term and its aggregation (``loss_type``), PEFT,
multi-GPU. ``A_i`` is ``inputs["advantages"]``, the advantage TRL's policy-gradient term uses: reward minus the
group mean, divided by the group std when ``scale_rewards="group"`` (TRL's default; ``"none"`` keeps the raw
difference, ``"batch"`` divides by the batch std).
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer

from .config import ADRPOGRPOConfig


def adaptive_kl_coefficients(advantages: torch.Tensor, beta0: float, advantage_min: float, advantage_max: float) -> torch.Tensor:
    """Per-sample KL coefficients ``beta0 - clamp(A, advantage_min, advantage_max)``, same shape as ``advantages``.

    A completion better than its group (A > 0) is held less tightly to the reference model, a worse one more.
    """
    return beta0 - advantages.clamp(advantage_min, advantage_max)


class _PerSampleBeta(float):
    """``beta0`` as a float (so TRL's ``self.beta != 0.0`` checks see beta0) whose product with a tensor, TRL's
    ``self.beta * per_token_kl``, multiplies by the per-sample coefficients instead. Counts those products."""

    def __new__(cls, beta0: float, coefficients: torch.Tensor):
        value = super().__new__(cls, beta0)
        value.coefficients, value.products = coefficients, 0
        return value

    def __mul__(self, other):
        if isinstance(other, torch.Tensor):
            self.products += 1
            return self.coefficients * other
        return float(self) * other


class ADRPOGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose KL coefficient is per completion (``ADRPOGRPOConfig``: beta0, advantage_min/max).

    The override: TRL's ``_compute_loss`` adds ``self.beta * per_token_kl`` to the per-token loss (trl 1.16,
    grpo_trainer.py, "per_token_loss = per_token_loss + self.beta * per_token_kl"; the same line since 0.29) and
    offers no hook for a per-sample weight. So ``_compute_loss`` runs TRL's own with ``self.beta`` replaced, for
    that call, by beta0 carrying the per-sample coefficients, and checks that TRL multiplied it into the KL
    exactly once (a TRL release that computes the KL term differently fails loudly instead of training GRPO).
    """

    args: ADRPOGRPOConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, ADRPOGRPOConfig):
            raise TypeError(f"ADRPOGRPOTrainer needs an ADRPOGRPOConfig, got {type(self.args).__name__}")

    def _compute_loss(self, model, inputs):
        args = self.args
        coefficients = adaptive_kl_coefficients(inputs["advantages"], args.beta0, args.advantage_min, args.advantage_max)
        if coefficients.dim() == 1:
            coefficients = coefficients.unsqueeze(1)  # (B, 1): one coefficient per completion, over its tokens
        self.beta = _PerSampleBeta(args.beta0, coefficients)
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            products, self.beta = self.beta.products, args.beta0
        if products != 1:
            raise RuntimeError(
                f"TRL's GRPOTrainer._compute_loss multiplied self.beta into a tensor {products} times (expected once, "
                "as 'self.beta * per_token_kl'): this TRL version is not supported by ADRPOGRPOTrainer."
            )
        mode = "train" if self.model.training else "eval"
        gathered = self.accelerator.gather(coefficients)
        self._metrics[mode]["adrpo/kl_coef_mean"].append(gathered.mean().item())
        advantages = self.accelerator.gather(inputs["advantages"])
        clipped = (advantages < args.advantage_min) | (advantages > args.advantage_max)
        self._metrics[mode]["adrpo/clip_fraction"].append(clipped.float().mean().item())
        return loss
