"""Group-relative advantages and winner/loser pairs (pure tensor code).

For sample i of prompt group g(i) with K samples:

    A_i = clip(R_i - (1/K) * sum_{j: g(j) = g(i)} R_j,  A_min, A_max)

Normalised (Flow-GRPO, DiffusionNFT and AWM divide the differences by a standard deviation):

    A_i = (R_i - mean_{g(i)} R) / max(std, eps)

with ``std`` the population standard deviation of R over the group g(i) (``group_std``) or over the whole batch
(``batch_std``, the anchors' default). Multiplying every reward by c > 0 then leaves A unchanged (for std > eps).

Decoupled (GDPO, Liu et al. 2026, for a reward that is a sum of parts): each part c_k (a scorer of a weighted reward,
or each check of a scorer that averages checks, e.g. ``shapes``) is standardised within its group before the weighted
sum, so that a part that barely varies inside a group counts as much as one that varies a lot; the method then ranks
or normalises the signal ``s`` (:func:`decoupled_signal`) in place of R:

    s_i = (1 - m) z(R)_i + m z(sum_k w_k z(c_k))_i,    z(x)_i = (x_i - mean_{g(i)} x) / std_{g(i)} x  (0 if std <= eps)

Under multi-GPU the K samples of a group may live on different processes: the trainer gathers all rewards
and group ids first, so every baseline sees its whole group, and then takes this process's slice.
"""

from __future__ import annotations

import torch


def group_means(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of ``values`` over the samples sharing its group id, shape ``(N,)``."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    counts = torch.bincount(inverse, minlength=num_groups).to(values.dtype)
    return (sums / counts)[inverse]


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, clip_range: tuple[float, float] | None = (-1.0, 1.0)
) -> torch.Tensor:
    """``A = R - mean of R over the same group``, clipped to ``clip_range`` (``None``: unclipped)."""
    if rewards.ndim != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards and group_ids must be 1-D of equal length, got {tuple(rewards.shape)} "
                         f"and {tuple(group_ids.shape)}")
    advantages = rewards - group_means(rewards, group_ids)
    if clip_range is not None:
        advantages = advantages.clamp(min=clip_range[0], max=clip_range[1])
    return advantages


NORMALIZATIONS = ("none", "group_std", "batch_std")


def normalized_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, normalization: str = "none",
                          eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Unclipped advantages ``(R - group mean) / max(std, eps)`` (``none``: divided by 1) and the per-sample divisor."""
    raw = group_advantages(rewards, group_ids, clip_range=None)
    if normalization == "none":
        return raw, torch.ones_like(raw)
    if normalization == "group_std":
        std = group_means(raw.pow(2), group_ids).sqrt()
    elif normalization == "batch_std":
        std = rewards.std(correction=0).expand_as(raw)
    else:
        raise ValueError(f"Unknown advantage normalization {normalization!r}; choose {', '.join(NORMALIZATIONS)}")
    divisor = std.clamp(min=eps)
    return raw / divisor, divisor


def group_standardized(values: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``z(x)_i = (x_i - mean_{g(i)} x) / std_{g(i)} x``, the population std over the group; 0 where it is <= eps,
    NaN in a group with a NaN or inf value: :func:`normalized_advantages` with ``group_std``, zeroed where the divisor
    is the floor ``eps``."""
    standardized, divisor = normalized_advantages(values, group_ids, "group_std", eps)
    return torch.where(divisor <= eps, torch.zeros_like(standardized), standardized)


def decoupled_signal(rewards: torch.Tensor, components: list[tuple[float, torch.Tensor]], group_ids: torch.Tensor,
                     mix: float, eps: float = 1e-4) -> torch.Tensor:
    """``s = (1 - mix) z(R) + mix z(sum_k w_k z(c_k))`` (module docstring) for the reward ``rewards`` and its parts
    ``components`` ``[(w_k, c_k)]``, each ``(N,)``; NaN in a part (a check that does not apply to the image's prompt)
    counts 0. ``mix`` 1 is GDPO's decoupled normalisation (before its batch normalisation, which the method's own
    normalisation replaces), 0 the reward alone, standardised per group. A group with a NaN or inf reward gets NaN."""
    if not 0 <= mix <= 1:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    total = torch.zeros_like(rewards)
    for weight, part in components:
        applies = ~torch.isnan(part)
        z = group_standardized(torch.nan_to_num(part, nan=0.0), group_ids, eps)
        total = total + weight * torch.where(applies, z, torch.zeros_like(z))
    return (1 - mix) * group_standardized(rewards, group_ids, eps) + mix * group_standardized(total, group_ids, eps)


def local_slice(global_values: torch.Tensor, process_index: int, local_size: int) -> torch.Tensor:
    """This process's part of a tensor gathered in process order (``accelerator.gather`` concatenates
    equally sized per-process tensors by rank)."""
    return global_values[process_index * local_size : (process_index + 1) * local_size]


def preference_pairs(
    rewards: torch.Tensor, group_ids: torch.Tensor, all_pairs: bool = False, min_gap: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Winner/loser pairs inside each group, as sample indices ``(winners, losers)``, and the number of groups
    that gave no pair. Default: one pair per group, its best and worst sample (first index on ties); with
    ``all_pairs``: every ordered pair ``(i, j)`` of the group with ``R_i - R_j > min_gap``. Either way a pair
    needs a gap above ``min_gap``, so a group whose rewards are all equal (or NaN) gives none."""
    winners, losers, skipped = [], [], 0
    for group in torch.unique(group_ids):
        members = torch.nonzero(group_ids == group).flatten()
        r = rewards[members]
        if all_pairs:
            best, worst = torch.nonzero(r[:, None] - r[None, :] > min_gap, as_tuple=True)
        else:
            best, worst = r.argmax().view(1), r.argmin().view(1)
            keep = r[best] - r[worst] > min_gap
            best, worst = best[keep], worst[keep]
        skipped += int(best.numel() == 0)
        winners.append(members[best])
        losers.append(members[worst])
    return torch.cat(winners), torch.cat(losers), skipped
