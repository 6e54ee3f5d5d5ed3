"""Flow-matching losses of ADRPO and its baselines (pure tensor code, no model code).

Every method minimises one per-sample weighted sum of two squared errors,

    L = mean_i [ w_fm_i * mse_i(v_theta, target) + w_w2_i * mse_i(v_theta, v_ref) ],

and differs only in the weights it derives from the rewards of the rollout batch (:func:`method_weights`).
``mse_i`` is the mean over all non-batch elements of sample i.

Time/sign convention (DESIGN.md section 2): with data ``x1``, noise ``x0`` and ``sigma = 1 - t``,
diffusers' SD3 input is ``x_sigma = (1 - sigma) x1 + sigma x0`` at ``timestep = 1000 sigma`` and its
velocity target is ``x0 - x1 = -u_t``; :func:`flow_matching_pair` builds exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .advantages import group_advantages

METHODS = ("adrpo", "orw-cfm-w2", "raft", "fixed-beta")


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


@dataclass(frozen=True)
class MethodWeights:
    """Per-sample loss weights of one rollout batch, plus the advantage statistics worth logging."""

    fm: torch.Tensor
    w2: torch.Tensor
    advantages_raw: torch.Tensor
    advantages: torch.Tensor
    needs_reference: bool


def method_weights(
    method: str,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    clip_range: tuple[float, float] = (-1.0, 1.0),
    beta0: float = 1.0,
    beta: float = 1.0,
    tau: float = 1.0,
    raft_top_k: int = 1,
) -> MethodWeights:
    """Weights of every sample of the (global) rollout batch.

    - ``adrpo``:      ``w_fm = A``, ``w_w2 = beta0 - A`` (Eq. 6), ``A`` the clipped group advantage.
    - ``fixed-beta``: ``w_fm = A``, ``w_w2 = beta`` (the ablation that removes the adaptive part).
    - ``orw-cfm-w2``: ``w_fm = exp(tau R_i) / mean_j exp(tau R_j)`` over the batch (non-negative, mean 1),
      ``w_w2 = beta``.
    - ``raft``:       ``w_fm = K / k`` for the top-k rewards of each group and 0 otherwise (so the loss is the
      mean FM loss over the kept samples), no regulariser.
    """
    raw = group_advantages(rewards, group_ids, clip_range=None)
    clipped = raw.clamp(min=clip_range[0], max=clip_range[1])
    zeros = torch.zeros_like(rewards)
    if method == "adrpo":
        return MethodWeights(clipped, beta0 - clipped, raw, clipped, True)
    if method == "fixed-beta":
        return MethodWeights(clipped, torch.full_like(rewards, beta), raw, clipped, beta != 0)
    if method == "orw-cfm-w2":
        fm = torch.softmax(tau * rewards.float(), dim=0) * rewards.numel()
        return MethodWeights(fm.to(rewards.dtype), torch.full_like(rewards, beta), raw, clipped, beta != 0)
    if method == "raft":
        keep = zeros.clone()
        for group in torch.unique(group_ids):
            members = torch.nonzero(group_ids == group).flatten()
            if raft_top_k > members.numel():
                raise ValueError(f"raft_top_k={raft_top_k} exceeds the group size {members.numel()}")
            keep[members[torch.topk(rewards[members], raft_top_k).indices]] = 1.0
        fm = keep * (rewards.numel() / keep.sum())
        return MethodWeights(fm, zeros, raw, clipped, False)
    raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}")


def flow_matching_pair(
    x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs and target of one flow-matching regression in diffusers' SD3 convention.

    Paper: ``x_t = (1 - t) x0 + t x1`` with ``u_t = x1 - x0``. SD3: ``sigma = 1 - t``, returns
    ``(x_sigma, timestep = 1000 sigma, target = x0 - x1 = -u_t)``.
    """
    sigma = (1.0 - t).to(x1.dtype)
    sigma_b = sigma.view(-1, *([1] * (x1.ndim - 1)))
    x_sigma = (1.0 - sigma_b) * x1 + sigma_b * noise
    return x_sigma, sigma * 1000.0, noise - x1


def sample_times(n: int, scheme: str, generator: torch.Generator | None = None, logit_mean: float = 0.0,
                 logit_std: float = 1.0) -> torch.Tensor:
    """Draw ``t`` in (0, 1): ``uniform`` (the paper) or ``logit_normal`` (``t = sigmoid(N(m, s))``, as SD3
    pre-training)."""
    if scheme == "uniform":
        return torch.rand(n, generator=generator)
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator) * logit_std + logit_mean)
    raise ValueError(f"Unknown time sampling {scheme!r}; choose uniform or logit_normal")

