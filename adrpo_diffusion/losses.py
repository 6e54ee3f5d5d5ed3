"""Flow-matching losses of ADRPO and its baselines (pure tensor code, no model code).

ADRPO and the reward-weighted baselines minimise one per-sample weighted sum of two squared errors,

    L = mean_i [ w_fm_i * mse_i(v_theta, target) + w_w2_i * mse_i(v_theta, v_ref) ],

and differ only in the weights they derive from the rewards of the rollout batch (:mod:`.methods`); DPO compares
winner/loser pairs instead (:func:`flow_dpo_loss`); DiffusionNFT contrasts implicit positive and negative policies
around an old copy of the policy (:func:`nft_loss`); AWM weights a flow-matching "log-likelihood" by the advantage
through a clipped ratio (:func:`awm_log_prob`, :func:`clipped_ratio_loss`). ``mse_i`` is the mean over all non-batch
elements of sample i.

Time/sign convention (README, "Conventions"): with data ``x1``, noise ``x0`` and ``sigma = 1 - t``,
diffusers' input is ``x_sigma = (1 - sigma) x1 + sigma x0`` and its velocity target is ``x0 - x1 = -u_t``;
:func:`flow_sample` builds exactly that (the timestep each family's transformer is given at ``sigma`` is
the family's business: SD3 ``1000 sigma``, see :mod:`adrpo_diffusion.families`).
"""

from __future__ import annotations

from typing import NamedTuple

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


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x_data: torch.Tensor,
             sigma: torch.Tensor, r: torch.Tensor, beta: float) -> torch.Tensor:
    """DiffusionNFT's policy loss per sample (Zheng et al. 2025; official code ``scripts/train_nft_sd3.py``), shape
    ``(N,)``:

        v+ = beta v_theta + (1 - beta) v_old          (implicit positive policy)
        v- = (1 + beta) v_old - beta v_theta          (implicit negative policy)
        e± = x_t - sigma v± - x_data                  (error of the clean-data prediction x_t - sigma v±)
        L± = mean(e±^2) / stopgrad(max(mean|e±|, 1e-5))      (means over the sample's elements)
        loss = (r L+ + (1 - r) L-) / beta

    ``x_t = (1 - sigma) x_data + sigma noise`` with ``x_data`` the clean rollout latents and ``v`` predicting
    ``noise - x_data`` (diffusers' convention); ``sigma`` and ``r`` (the optimality probability in ``[0, 1]``) are
    ``(N,)``; ``v_old`` is used without gradient. Computed in float32 at least.
    """
    dtype = torch.promote_types(v_theta.dtype, torch.float32)
    v_theta, v_old, x_t, x_data = (x.to(dtype) for x in (v_theta, v_old.detach(), x_t, x_data))
    sigma_b = sigma.to(dtype).view(-1, *([1] * (x_t.ndim - 1)))

    def adaptive_mse(v):
        error = (x_t - sigma_b * v - x_data).flatten(1)
        scale = error.detach().abs().mean(dim=1).clamp(min=1e-5)
        return error.pow(2).mean(dim=1) / scale

    positive = adaptive_mse(beta * v_theta + (1 - beta) * v_old)
    negative = adaptive_mse((1 + beta) * v_old - beta * v_theta)
    r = r.to(dtype)
    return (r * positive + (1 - r) * negative) / beta


def awm_log_prob(v: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, weighting: str = "ghuber",
                 power: float = 0.25) -> torch.Tensor:
    """Advantage Weighted Matching's flow-matching "log-probability" of a sample, shape ``(N,)`` (Xue et al. 2025;
    official code ``scripts/train_sd3_awm.py``, ``compute_log_prob_awm``), with ``m = mse_i(v, target)``:

        uniform: log p = -m
        ghuber:  log p = -sigma * ((m + 1e-10)^power - (1e-10)^power) / power

    ``target = noise - x_data``; ``sigma`` ``(N,)``. ``ghuber`` (a generalised Huber weighting, the official default
    with power 0.25) grows slower than ``m`` for large errors and weights noisier inputs more. Computed in float64,
    as the official code does (the ratio of two such values is taken next).
    """
    m = per_sample_mse(v.double(), target.double())
    if weighting == "uniform":
        return -m
    if weighting == "ghuber":
        return -sigma.double() * ((m + 1e-10) ** power - 1e-10**power) / power
    raise ValueError(f"Unknown AWM weighting {weighting!r}; choose ghuber or uniform")


def clipped_ratio_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                       clip_range: float) -> torch.Tensor:
    """The PPO-style clipped surrogate per sample, shape ``(N,)``:

        ratio = exp(log_prob - stopgrad(old_log_prob))
        loss  = max(-A ratio, -A clip(ratio, 1 - clip_range, 1 + clip_range))

    ``old_log_prob`` is the log-probability under the policy that made the rollouts.
    """
    ratio = torch.exp(log_prob - old_log_prob.detach())
    advantages = advantages.to(ratio.dtype)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))


class FlowSample(NamedTuple):
    """One flow-matching regression point: the transformer's input ``x_sigma``, its noise level ``sigma`` ``(N,)``
    and the velocity ``target``."""

    x_sigma: torch.Tensor
    sigma: torch.Tensor
    target: torch.Tensor


def flow_sample(x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> FlowSample:
    """Input, noise level and target of one flow-matching regression in diffusers' rectified-flow convention.

    Paper: ``x_t = (1 - t) x0 + t x1`` with ``u_t = x1 - x0``. diffusers (SD3, FLUX.1, SANA): ``sigma = 1 - t``,
    ``x_sigma = (1 - sigma) x1 + sigma x0``, ``target = x0 - x1 = -u_t``. Each model family maps ``sigma`` to its
    transformer's timestep (:meth:`adrpo_diffusion.families.base.ModelFamily.timestep`).
    """
    sigma = (1.0 - t).to(x1.dtype)
    sigma_b = sigma.view(-1, *([1] * (x1.ndim - 1)))
    x_sigma = (1.0 - sigma_b) * x1 + sigma_b * noise
    return FlowSample(x_sigma, sigma, noise - x1)


TIME_SAMPLING = ("uniform", "logit_normal", "sampler")


def sample_times(n: int, scheme: str, draws: int = 1, generator: torch.Generator | None = None,
                 logit_mean: float = 0.0, logit_std: float = 1.0, sampler_t: torch.Tensor | None = None) -> torch.Tensor:
    """``draws`` times ``t`` in (0, 1) for each of ``n`` units, shape ``(draws, n)``, stratified: draw ``d`` of a
    unit takes ``u = (d + U) / draws`` with ``U ~ U(0, 1)``, so a unit's draws cover the distribution evenly (each
    draw keeps the distribution of ``t`` over the choice of ``d``; the mean over draws has less variance than with
    independent draws). ``u`` becomes ``t`` by the scheme's inverse CDF:

    - ``uniform`` (the paper): ``t = u``;
    - ``logit_normal`` (SD3 pre-training): ``t = sigmoid(logit_mean + logit_std * Phi^-1(u))``;
    - ``sampler``: one of the ``N`` times ``sampler_t`` at which the rollout sampler evaluates the model (its
      shifted schedule, as Flow-GRPO, DiffusionNFT and AWM train), index ``floor(u N)``.
    """
    u = (torch.arange(draws, dtype=torch.float32)[:, None] + torch.rand(draws, n, generator=generator)) / draws
    if scheme == "uniform":
        return u
    if scheme == "logit_normal":
        return torch.sigmoid(torch.special.ndtri(u.clamp(1e-7, 1 - 1e-7)) * logit_std + logit_mean)
    if scheme == "sampler":
        if sampler_t is None:
            raise ValueError("time sampling 'sampler' needs the sampler's times (sampler_t)")
        return sampler_t.float()[(u * len(sampler_t)).long().clamp(max=len(sampler_t) - 1)]
    raise ValueError(f"Unknown time sampling {scheme!r}; choose {', '.join(TIME_SAMPLING)}")
