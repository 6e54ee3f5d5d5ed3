"""Flow-matching losses of ADRPO and its baselines (pure tensor code, no model code).

ADRPO and the reward-weighted baselines minimise one per-sample weighted sum of two squared errors,

    L = mean_i [ w_fm_i * mse_i(v_theta, target) + w_w2_i * mse_i(v_theta, v_ref) ],

and differ only in the weights they derive from the rewards of the rollout batch (:mod:`.methods`); DPO compares
winner/loser pairs instead (:func:`flow_dpo_loss`). ``mse_i`` is the mean over all non-batch elements of sample i.

Time/sign convention (DESIGN.md section 2): with data ``x1``, noise ``x0`` and ``sigma = 1 - t``,
diffusers' input is ``x_sigma = (1 - sigma) x1 + sigma x0`` and its velocity target is ``x0 - x1 = -u_t``;
:func:`flow_matching_pair` builds exactly that (the timestep each family's transformer is given at ``sigma`` is
the family's business: SD3 ``1000 sigma``, see :mod:`adrpo_diffusion.families`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mse_i = mean over non-batch dims of (a_i - b_i)^2``, shape ``(N,)``, in fp32 at least (bf16 inputs)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return (a.to(dtype) - b.to(dtype)).pow(2).flatten(1).mean(dim=1)


def weighted_fm_w2_loss(
    v_theta: torch.Tensor,
    v_ref: torch.Tensor | None,
    target: torch.Tensor,
    fm_weights: torch.Tensor,
    w2_weights: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean_i[fm_i * mse_i(v_theta, target) + w2_i * mse_i(v_theta, v_ref)]``.

    ``v_ref`` may be ``None`` only when every ``w2_i`` is zero (no reference pass needed). Returns the loss and
    its parts (detached): ``loss_fm``, ``loss_w2`` (the two weighted means), ``mse_fm`` and ``w2_divergence``
    (the unweighted means, the latter an estimate of ``E||v_theta - v_ref||^2``).
    """
    mse_fm = per_sample_mse(v_theta, target)
    fm_weights, w2_weights = fm_weights.to(mse_fm.dtype), w2_weights.to(mse_fm.dtype)
    loss_fm = (fm_weights * mse_fm).mean()
    if v_ref is None:
        if torch.any(w2_weights != 0):
            raise ValueError("v_ref is required when any W2 weight is non-zero")
        mse_w2 = torch.zeros_like(mse_fm)
        loss_w2 = mse_w2.sum()
    else:
        mse_w2 = per_sample_mse(v_theta, v_ref)
        loss_w2 = (w2_weights * mse_w2).mean()
    parts = {"loss_fm": loss_fm, "loss_w2": loss_w2, "mse_fm": mse_fm.mean(), "w2_divergence": mse_w2.mean()}
    return loss_fm + loss_w2, {k: v.detach() for k, v in parts.items()}


def adrpo_fm_loss(
    v_theta: torch.Tensor, v_ref: torch.Tensor, target: torch.Tensor, advantages: torch.Tensor, beta0: float
) -> torch.Tensor:
    """ADRPO's Eq. 6: ``mean_i[A_i * mse_i(v_theta, target) + (beta0 - A_i) * mse_i(v_theta, v_ref)]``.

    Per sample this is ``beta0 * mse_i(v_theta, v*) + const`` with ``v* = v_ref + (A_i / beta0)(target - v_ref)``:
    a convex pull towards the sample for ``A > 0``, away from it for ``A < 0``, to ``v_ref`` for ``A = 0``.
    """
    loss, _ = weighted_fm_w2_loss(v_theta, v_ref, target, advantages, beta0 - advantages)
    return loss


def flow_dpo_margins(
    v_w: torch.Tensor, v_w_ref: torch.Tensor, target_w: torch.Tensor,
    v_l: torch.Tensor, v_l_ref: torch.Tensor, target_l: torch.Tensor, dpo_beta: float,
) -> torch.Tensor:
    """Per-pair implicit reward margin of Diffusion-DPO in flow matching, shape ``(pairs,)``:

        m = -0.5 * dpo_beta * ((e_w - e_w_ref) - (e_l - e_l_ref)),

    ``e_w = mse(v_theta(x_w), target_w)``, ``e_w_ref = mse(v_ref(x_w), target_w)`` (same for the loser ``l``), each
    pair's two members built with the same noise and t. ``m > 0``: the policy lowered the winner's error, relative
    to the reference, more than the loser's.
    """
    e_w, e_w_ref = per_sample_mse(v_w, target_w), per_sample_mse(v_w_ref, target_w)
    e_l, e_l_ref = per_sample_mse(v_l, target_l), per_sample_mse(v_l_ref, target_l)
    return -0.5 * dpo_beta * ((e_w - e_w_ref) - (e_l - e_l_ref))


def flow_dpo_loss(
    v_w: torch.Tensor, v_w_ref: torch.Tensor, target_w: torch.Tensor,
    v_l: torch.Tensor, v_l_ref: torch.Tensor, target_l: torch.Tensor, dpo_beta: float,
) -> torch.Tensor:
    """Diffusion-DPO (Wallace et al. 2023) for rectified flow, the mean over pairs of

        -log sigmoid(-0.5 * dpo_beta * ((e_w - e_w_ref) - (e_l - e_l_ref)))

    with the errors of :func:`flow_dpo_margins` (``v_*_ref`` from the frozen reference, without gradient).
    """
    return -F.logsigmoid(flow_dpo_margins(v_w, v_w_ref, target_w, v_l, v_l_ref, target_l, dpo_beta)).mean()


def flow_matching_pair(
    x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input, noise level and target of one flow-matching regression in diffusers' rectified-flow convention.

    Paper: ``x_t = (1 - t) x0 + t x1`` with ``u_t = x1 - x0``. diffusers (SD3, FLUX.1, SANA): ``sigma = 1 - t``,
    returns ``(x_sigma = (1 - sigma) x1 + sigma x0, sigma, target = x0 - x1 = -u_t)``. Each model family maps
    ``sigma`` to its transformer's timestep (:meth:`adrpo_diffusion.families.base.ModelFamily.timestep`).
    """
    sigma = (1.0 - t).to(x1.dtype)
    sigma_b = sigma.view(-1, *([1] * (x1.ndim - 1)))
    x_sigma = (1.0 - sigma_b) * x1 + sigma_b * noise
    return x_sigma, sigma, noise - x1


def sample_times(n: int, scheme: str, generator: torch.Generator | None = None, logit_mean: float = 0.0,
                 logit_std: float = 1.0) -> torch.Tensor:
    """Draw ``t`` in (0, 1): ``uniform`` (the paper) or ``logit_normal`` (``t = sigmoid(N(m, s))``, as SD3
    pre-training)."""
    if scheme == "uniform":
        return torch.rand(n, generator=generator)
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator) * logit_std + logit_mean)
    raise ValueError(f"Unknown time sampling {scheme!r}; choose uniform or logit_normal")

