"""ADRPO and its baselines as one registry: each method's documented parameters, their checks, the training
plan it makes from a step's rewards, and its micro-batch loss. The tensor math lives in :mod:`.losses` and
:mod:`.advantages`; this module wires parameters to it.

A method turns the rewards of the whole (gathered) rollout batch into a :class:`TrainingPlan`: the rows of this
process's rollouts to train on, in units that share one (noise, t) draw (one sample, or a DPO pair), the
per-sample values its loss reads, and the velocities besides the policy's it needs (the frozen base, or an extra
LoRA adapter that is a moving copy of the policy). The trainer draws noise and t per unit, micro-batches whole
units, and calls :meth:`Method.loss` on each micro-batch (a :class:`FlowBatch`). A method may keep copies of the
policy (:meth:`Method.copies`: extra adapters on the same transformer, updated after every step as
``copy = d copy + (1 - d) policy`` with ``d = Method.copy_decay(name, step)``) and roll out from one of them
(:attr:`Method.rollout_adapter`). Adding a method is one registered dataclass below.

Config: ``method: NAME`` and ``method_options: {...}`` (the fields of that method's dataclass).
"""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from dataclasses import dataclass
from typing import ClassVar

import torch

from . import settings
from .advantages import NORMALIZATIONS, group_advantages, group_means, local_slice, normalized_advantages, preference_pairs
from .losses import (
    awm_log_prob,
    clipped_ratio_loss,
    flow_dpo_loss,
    flow_dpo_margins,
    nft_loss,
    per_sample_mse,
    weighted_fm_w2_loss,
)
from .settings import documented


@dataclass(frozen=True)
class TrainingPlan:
    """What one step trains on, on this process.

    ``rows`` index this process's rollouts; each consecutive ``unit`` rows form one unit that shares its noise and
    t and stays in one micro-batch (1: a sample; 2: a DPO pair, winner then loser). ``values`` are per-sample
    tensors (indexed like the rollouts) the method's loss reads. The step's loss is the mean over the
    ``global_units`` units of all processes; 0 means nothing to train on (no update). ``anchors``: the velocities
    the loss needs besides the policy's, computed without gradient: ``reference`` (the frozen base: adapters
    off) and the names of the method's :meth:`~Method.copies` (that adapter active).
    """

    rows: torch.Tensor
    unit: int
    values: dict[str, torch.Tensor]
    global_units: int
    anchors: tuple[str, ...]
    metrics: dict[str, float]

    @property
    def needs_reference(self) -> bool:
        return "reference" in self.anchors


@dataclass
class FlowBatch:
    """One micro-batch of the regression in diffusers' convention (:func:`.losses.flow_sample`): the clean
    rollout latents ``x_data``, the input ``x_sigma = (1 - sigma) x_data + sigma noise`` at noise levels ``sigma``
    ``(N,)``, the target ``noise - x_data``, the policy's velocity ``v_theta`` (with gradient), and ``anchors``: the
    plan's other velocities by name (``reference``, ``old``, ``ema``), without gradient."""

    x_data: torch.Tensor
    x_sigma: torch.Tensor
    sigma: torch.Tensor
    target: torch.Tensor
    v_theta: torch.Tensor
    anchors: dict[str, torch.Tensor]

    @property
    def v_ref(self) -> torch.Tensor | None:
        return self.anchors.get("reference")


def ramp(step: int, rate: float, maximum: float, delay: int = 0) -> float:
    """A copy's decay after ``step`` updates: 0 before ``delay``, then ``min(rate (step - delay), maximum)``
    (DiffusionNFT's and AWM's schedules: NFT ``decay_type`` 0 = rate 0; 1 = rate 0.001, maximum 0.5; 2 = delay 75,
    rate 0.0075, maximum 0.999; AWM ``linear`` = rate 0.001, maximum 0.3)."""
    return 0.0 if step < delay else min(rate * (step - delay), maximum)


class Method:
    """Base of every method: a frozen dataclass of its parameters (``method_options``)."""

    name: ClassVar[str]
    whole_groups_per_process: ClassVar[bool] = False  # pairs are formed inside a process: groups must not split
    rollout_adapter: ClassVar[str] = "default"  # the adapter the training rollouts sample from (the policy's)

    def problems(self, images_per_prompt: int) -> list[str]:
        """Invalid parameter values, as messages (none: valid)."""
        return []

    def warnings(self) -> list[str]:
        return []

    def plan(self, rewards: torch.Tensor, group_ids: torch.Tensor, rank: int, n_local: int) -> TrainingPlan:
        """The step's plan from the rewards and group ids of the whole batch (gathered over processes, in process
        order); ``rank`` and ``n_local`` locate this process's slice."""
        raise NotImplementedError

    def loss(self, batch: FlowBatch, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch (a mean over its units) and its detached parts to log."""
        raise NotImplementedError

    def copies(self) -> tuple[str, ...]:
        """Names of the extra LoRA adapters this method keeps as moving copies of the policy (none by default)."""
        return ()

    def copy_decay(self, name: str, step: int) -> float:
        """``d`` of the update ``copy = d copy + (1 - d) policy`` after ``step`` updates."""
        raise NotImplementedError


def plan_on_finite_groups(method: Method, rewards: torch.Tensor, group_ids: torch.Tensor, rank: int,
                          n_local: int) -> tuple[TrainingPlan, int]:
    """``method``'s plan for this process as if the prompt groups holding a NaN or inf reward were not in the batch,
    and the number of samples left out. The plan is made once over the kept samples of all processes (one virtual
    process: baselines, normalisations and ``global_units`` see only kept groups), then mapped back to this
    process's rows; a unit (a DPO pair) is never split, since its groups never span processes."""
    valid = group_means(torch.isfinite(rewards).float(), group_ids) == 1
    if bool(valid.all()):
        return method.plan(rewards, group_ids, rank, n_local), 0
    keep = torch.nonzero(valid).flatten()
    dropped = rewards.numel() - keep.numel()
    if not keep.numel():
        return TrainingPlan(torch.zeros(0, dtype=torch.long), 1, {}, 0, (), {}), dropped
    plan = method.plan(rewards[keep], group_ids[keep], 0, keep.numel())
    local = keep.cpu() - rank * n_local  # kept sample -> its row on this process (outside [0, n_local): another's)
    mine = (local >= 0) & (local < n_local)
    units = plan.rows.view(-1, plan.unit)
    rows = local[units[mine[units].all(1)]].flatten()
    values = {name: value.new_zeros((n_local, *value.shape[1:])).index_copy_(0, local[mine].to(value.device),
                                                                              value[mine.to(value.device)])
              for name, value in plan.values.items()}
    return dataclasses.replace(plan, rows=rows, values=values), dropped


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY:
        raise ValueError(f"Method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = dataclass(frozen=True)(cls)
    return _REGISTRY[cls.name]


def available_methods() -> list[str]:
    return list(_REGISTRY)


def _checked_method(name: str, options: dict, images_per_prompt: int) -> tuple[Method | None, list[str]]:
    """The method with its options typed as its fields (the config engine's checks) and every problem found; the
    method is None when there is any."""
    if name not in _REGISTRY:
        return None, [f"method must be one of {', '.join(_REGISTRY)}, got {name!r}"]
    if not isinstance(options, dict):
        return None, [f"method_options must be a mapping of {name}'s parameters, got {options!r}"]
    problems: list[str] = []
    method = settings.from_mapping(_REGISTRY[name], options, f"method_options of {name}", problems,
                                   prefix="method_options.")
    problems = problems or method.problems(images_per_prompt)
    return (None if problems else method), problems


def method_problems(name: str, options: dict, images_per_prompt: int) -> list[str]:
    """Every problem of a method name and its options, checked without any model."""
    return _checked_method(name, options, images_per_prompt)[1]


def build_method(name: str, options: dict, images_per_prompt: int) -> Method:
    method, problems = _checked_method(name, options, images_per_prompt)
    if problems:
        raise ValueError("; ".join(problems))
    return method


def methods_with_option(key: str) -> list[str]:
    """The methods that have a parameter named ``key``."""
    return [name for name, cls in _REGISTRY.items() if key in {f.name for f in dataclasses.fields(cls)}]


def methods_help() -> str:
    """Each method's parameters with types, defaults and help, for ``adrpo-train --help``."""
    def field_lines(cls, skip=()):
        hints = typing.get_type_hints(cls)
        return [textwrap.fill(f"{f.name} ({hints[f.name].__name__}, default {f.default!r}): {f.metadata['help']}", 110,
                              initial_indent="    ", subsequent_indent="      ")
                for f in dataclasses.fields(cls) if (f.name, f.default) not in skip]

    # the advantage normalisation's fields once, at the end; a method lists them only where its default differs
    shared = {(f.name, f.default) for f in dataclasses.fields(NormalizedAdvantages)}
    lines = ["method_options, per method (e.g. --method raft --method_options '{top_k: 2}'):"]
    for name, cls in _REGISTRY.items():
        lines.append(textwrap.fill(f"{name}: {cls.__doc__.strip().splitlines()[0]}", 110, initial_indent="  ",
                                   subsequent_indent="    "))
        lines += field_lines(cls, skip=shared)
    normalized = [name for name, cls in _REGISTRY.items() if issubclass(cls, NormalizedAdvantages)]
    lines.append(f"  {', '.join(normalized)} also take:")
    return "\n".join(lines + field_lines(NormalizedAdvantages))


def _advantage_metrics(raw: torch.Tensor, clipped: torch.Tensor | None = None, clip_range=None) -> dict[str, float]:
    """The spread of the rewards inside the prompt groups (every method), and for advantage-weighted methods the
    clipped advantages and the fraction clipped (``raw``: before clipping, after any normalisation)."""
    metrics = {"advantage_raw_abs_mean": raw.abs().mean().item(), "advantage_raw_std": raw.std().item()}
    if clipped is not None:
        metrics |= {"advantage_mean": clipped.mean().item(), "advantage_abs_mean": clipped.abs().mean().item(),
                    "clip_fraction": ((raw < clip_range[0]) | (raw > clip_range[1])).float().mean().item()}
    return metrics


@dataclass(frozen=True)
class NormalizedAdvantages(Method):
    """Methods that train on group advantages, optionally divided by a standard deviation
    (:func:`.advantages.normalized_advantages`); ``advantage_normalization`` is logged with the divisor."""

    advantage_normalization: str = documented(
        "none", "none: A = R - group mean (the paper's raw differences); group_std: divided by the prompt group's "
                "std; batch_std: by the whole batch's std (Flow-GRPO, DiffusionNFT, AWM). Normalised, the reward's "
                "scale no longer matters.")
    advantage_epsilon: float = documented(1e-4, "the std is floored at this (> 0): equal rewards give A = 0.")

    def problems(self, images_per_prompt):
        problems = []
        if self.advantage_normalization not in NORMALIZATIONS:
            problems.append(f"advantage_normalization must be one of {', '.join(NORMALIZATIONS)}, got "
                            f"{self.advantage_normalization!r}")
        if self.advantage_epsilon <= 0:
            problems.append(f"advantage_epsilon must be > 0, got {self.advantage_epsilon}")
        return problems

    def advantages(self, rewards, group_ids) -> tuple[torch.Tensor, dict[str, float]]:
        """Unclipped (normalised) advantages of the whole batch and the divisor's mean (1 without normalisation)."""
        advantages, divisor = normalized_advantages(rewards, group_ids, self.advantage_normalization,
                                                    self.advantage_epsilon)
        return advantages, {"advantage_divisor_mean": divisor.mean().item()}


class WeightedFlowMatching(Method):
    """Methods whose loss is ``mean_i[w_fm_i * mse_i(v_theta, target) + w_w2_i * mse_i(v_theta, v_anchor)]`` over
    every sample (:func:`.losses.weighted_fm_w2_loss`); they differ in the weights. ``v_anchor`` is the frozen base
    ``v_ref`` unless the method anchors elsewhere (:attr:`anchor_name`)."""

    anchor_name: ClassVar[str] = "reference"

    def weights(self, rewards, group_ids) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """``(w_fm, w_w2, metrics)`` for every sample of the whole batch."""
        raise NotImplementedError

    def plan(self, rewards, group_ids, rank, n_local):
        fm, w2, metrics = self.weights(rewards, group_ids)
        metrics |= {"fm_weight_mean": fm.mean().item(), "beta_tot_mean": w2.mean().item()}
        values = {"fm": local_slice(fm, rank, n_local), "w2": local_slice(w2, rank, n_local)}
        anchors = (self.anchor_name, *self.logged_anchors()) if bool(torch.any(w2 != 0)) else ()
        return TrainingPlan(torch.arange(n_local), 1, values, rewards.numel(), anchors, metrics)

    def logged_anchors(self) -> tuple[str, ...]:
        """Velocities the loss does not read but whose divergence is logged: the frozen base, when the W2 term pulls
        elsewhere (``w2_divergence``)."""
        return ("reference",) if self.anchor_name != "reference" else ()

    def loss(self, batch, values):
        loss, parts = weighted_fm_w2_loss(batch.v_theta, batch.anchors.get(self.anchor_name), batch.target,
                                          values["fm"], values["w2"])
        if self.anchor_name != "reference":  # the W2 term pulls to the moving anchor; the divergence to the base too
            parts["anchor_divergence"] = parts.pop("w2_divergence")
            if batch.v_ref is not None:
                parts["w2_divergence"] = per_sample_mse(batch.v_theta, batch.v_ref).mean().detach()
        return loss, {"loss": loss.detach(), **parts}


class AdvantageWeighted(NormalizedAdvantages, WeightedFlowMatching):
    """``w_fm = A``, the group advantage (normalised if asked) clipped to ``[advantage_min, advantage_max]``;
    subclasses give ``w_w2``."""

    def problems(self, images_per_prompt):
        problems = super().problems(images_per_prompt)
        if self.advantage_min >= self.advantage_max:
            problems.append(f"advantage_min ({self.advantage_min}) must be < advantage_max ({self.advantage_max})")
        return problems

    def w2_weights(self, advantages: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weights(self, rewards, group_ids):
        raw, metrics = self.advantages(rewards, group_ids)
        clip_range = (self.advantage_min, self.advantage_max)
        clipped = raw.clamp(min=clip_range[0], max=clip_range[1])
        return clipped, self.w2_weights(clipped), _advantage_metrics(raw, clipped, clip_range) | metrics


@register_method
class ADRPO(AdvantageWeighted):
    """ADRPO, Eq. 6: w_fm = A, w_w2 = beta0 - A, with A the clipped group advantage.

    Per sample the loss is ``beta0 * mse(v_theta, v*) + const`` with ``v* = v_anchor + (A / beta0)(target -
    v_anchor)`` (the weights sum to beta0), so over many samples the minimiser is ``v_anchor + (1/beta0) E[A (target
    - v_anchor) | x_sigma]``. With the paper's anchor, the frozen base (``anchor: base``), that is a re-weighting of
    the BASE model that does not compound over steps: however long it trains, the policy stays within ``A/beta0``
    of the base's velocity. ``anchor: ema`` (our variant, not the paper's) pulls to an exponential moving average of
    the policy instead (an extra LoRA adapter, ``ema = anchor_decay * ema + (1 - anchor_decay) * policy`` after every
    step), so each step's re-weighting starts from where the policy is and the gains compound, as DiffusionNFT's and
    AWM's anchors do; the W2 divergence to the base is still logged (``w2_divergence``; to the anchor:
    ``anchor_divergence``) unless ``base_divergence: false`` saves the base's forward pass it costs.
    """

    name: ClassVar[str] = "adrpo"
    beta0: float = documented(1.0, "base regularisation strength (> 0); the W2 weight of a sample is beta0 - A.")
    advantage_min: float = documented(-1.0, "A_min: lower clip of the advantages.")
    advantage_max: float = documented(1.0, "A_max: upper clip of the advantages (> beta0 warns: negative W2 weight).")
    anchor: str = documented("base", "base: the W2 term pulls to the frozen base (the paper); ema: to a moving average "
                                     "of the policy (our variant: gains compound over steps).")
    anchor_decay: float = documented(0.5, "anchor: ema only: the average's decay d in [0, 1) (ema = d ema + (1 - d) "
                                          "policy after each step; 0: the policy before the step).")
    base_divergence: bool = documented(True, "anchor: ema only: also run the frozen base on every sample to log "
                                             "w2_divergence, the divergence to it (false: no w2_divergence, a step "
                                             "about 8% faster; training is the same).")

    @property
    def anchor_name(self) -> str:
        return "ema" if self.anchor == "ema" else "reference"

    def problems(self, images_per_prompt):
        problems = super().problems(images_per_prompt)
        if self.beta0 <= 0:
            problems.append(f"beta0 must be > 0 (the loss is beta0 * ||v - v*||^2 + const), got {self.beta0}")
        if self.anchor not in ("base", "ema"):
            problems.append(f"anchor must be base or ema, got {self.anchor!r}")
        if not 0 <= self.anchor_decay < 1:
            problems.append(f"anchor_decay must be in [0, 1), got {self.anchor_decay}")
        return problems

    def warnings(self):
        if self.advantage_max <= self.beta0:
            return []
        return [f"advantage_max ({self.advantage_max}) > beta0 ({self.beta0}): samples with A > beta0 get a negative "
                "W2 weight: their target v* = v_ref + (A / beta0)(target - v_ref) extrapolates past the sample."]

    def w2_weights(self, advantages):
        return self.beta0 - advantages

    def logged_anchors(self):
        return super().logged_anchors() if self.base_divergence else ()

    def copies(self):
        return ("ema",) if self.anchor == "ema" else ()

    def copy_decay(self, name, step):
        return self.anchor_decay


@register_method
class FixedBeta(AdvantageWeighted):
    """The ablation without adaptivity: w_fm = A (clipped group advantage), w_w2 = beta."""

    name: ClassVar[str] = "fixed-beta"
    beta: float = documented(1.0, "the constant W2 weight (>= 0).")
    advantage_min: float = documented(-1.0, "A_min: lower clip of the advantages.")
    advantage_max: float = documented(1.0, "A_max: upper clip of the advantages.")

    def problems(self, images_per_prompt):
        problems = super().problems(images_per_prompt)
        return problems + ([f"beta must be >= 0, got {self.beta}"] if self.beta < 0 else [])

    def w2_weights(self, advantages):
        return torch.full_like(advantages, self.beta)


@register_method
class ORWCFMW2(NormalizedAdvantages, WeightedFlowMatching):
    """ORW-CFM-W2 (Fan, Shen et al., ICLR 2025): w_fm = exp(tau R), normalised per prompt; w_w2 = beta.

    With ``advantage_normalization`` the tilt is ``exp(tau A)`` with A the normalised advantage (needs ``normalize:
    group``).

    The source. The paper's loss (restated in the official repository's README, github.com/markerthu/orw-cfm)
    is ``E_{t, x1 ~ q(x1; theta_ft), x ~ p_t(x|x1)}[ w(x1) ||v_ft(t, x) - u_t(x|x1)||^2 + alpha ||v_ft(t, x) -
    v_ref(t, x)||^2 ]`` with ``alpha`` the W2 coefficient (``beta`` here; the ADRPO paper sets it to beta0 = 1).
    The official code (markerthu/orw-cfm, ``finetune_fm.py``, ``ORWCFMTrainer.training_step`` and
    ``compute_loss``) computes ``weights = exp(temperature * rewards)`` on the raw rewards of one batch, with no
    normalisation and no baseline, and ``loss = mean(weights * fm_loss + alpha * w2_loss)`` with per-sample mean
    squared errors; its defaults are ``temperature = 0.5`` and ``w2_coefficient = 1.0``, and its reward is a CLIP
    text contrast (``prob("An image of dog") - prob("Not an image of dog")``, in [-1, 1]) on ONE task: every
    sample of a batch answers the same text. The paper's own text (arXiv 2502.06061) could not be read from this
    project's machines, so any normalisation it states beyond that code is not reproduced here.

    What this method does. ``tau`` is that temperature on the reward as the trainer sees it (``reward_scale`` x
    scorer), default 0.5 as in the official code. With ``normalize: group`` (default) the weights are
    ``w_i = exp(tau R_i) / mean_{j in prompt(i)} exp(tau R_j)``: the official weights divided by their mean over
    the samples of one prompt, which is the official code's batch (one prompt) carried over to many prompts.
    Two consequences, both deliberate: a prompt's absolute reward level (DrawBench prompts differ by several
    CLIP points) no longer decides how much that prompt trains, only the ranking inside its group does, and the
    FM term keeps total weight 1 per sample so ``beta`` means the same whatever the reward's offset (unnormalised,
    a 100*cos CLIP score of ~30 would outweigh the W2 term by e^(30 tau)). ``normalize: none`` is the official
    code's ``exp(tau R)`` verbatim, for rewards that, like its CLIP contrast, are centred near 0 and O(1).
    Logged: ``orw_ess = (sum w)^2 / sum w^2`` over the whole batch (N when all weights are equal).
    """

    name: ClassVar[str] = "orw-cfm-w2"
    tau: float = documented(0.5, "temperature of the reward weights exp(tau R) (>= 0; the official code's 0.5).")
    beta: float = documented(1.0, "W2 coefficient (the paper's alpha, >= 0; the ADRPO paper uses beta0 = 1).")
    normalize: str = documented("group", "group: exp(tau R) / its mean over the prompt's K samples; none: exp(tau R) "
                                         "as in the official code (needs rewards near 0).")

    def problems(self, images_per_prompt):
        problems = super().problems(images_per_prompt)
        problems += [f"{k} must be >= 0, got {getattr(self, k)}" for k in ("tau", "beta") if getattr(self, k) < 0]
        if self.normalize not in ("group", "none"):
            problems.append(f"normalize must be group or none, got {self.normalize!r}")
        elif self.normalize == "none" and self.advantage_normalization != "none":
            problems.append("advantage_normalization needs normalize: group (normalize: none weights the raw rewards)")
        return problems

    def weights(self, rewards, group_ids):
        raw, metrics = self.advantages(rewards, group_ids)
        if self.normalize == "group":
            tilt = torch.exp(self.tau * raw)  # exp(tau R) up to a per-prompt factor, without overflow
            fm = tilt / group_means(tilt, group_ids)
        else:
            fm = torch.exp(self.tau * rewards)
        metrics |= _advantage_metrics(raw) | {"orw_ess": (fm.sum() ** 2 / fm.pow(2).sum()).item()}
        return fm, torch.full_like(rewards, self.beta), metrics


@register_method
class RAFT(WeightedFlowMatching):
    """RAFT: keep the top_k samples of each prompt, plain FM loss on them (w_fm = K / k), no regulariser."""

    name: ClassVar[str] = "raft"
    top_k: int = documented(1, "samples kept per prompt group, in [1, K - 1].")

    def problems(self, images_per_prompt):
        if not 1 <= self.top_k < images_per_prompt:
            return [f"top_k must be in [1, images_per_prompt - 1 = {images_per_prompt - 1}], got {self.top_k}"]
        return []

    def weights(self, rewards, group_ids):
        keep = torch.zeros_like(rewards)
        for group in torch.unique(group_ids):
            members = torch.nonzero(group_ids == group).flatten()
            keep[members[torch.topk(rewards[members], self.top_k).indices]] = 1.0
        fm = keep * (rewards.numel() / keep.sum())
        return fm, torch.zeros_like(rewards), _advantage_metrics(group_advantages(rewards, group_ids, None))


@register_method
class FlowDPO(Method):
    """Diffusion-DPO for flow matching: winner/loser pairs inside each prompt group, same noise and t per pair."""

    name: ClassVar[str] = "dpo"
    whole_groups_per_process: ClassVar[bool] = True
    beta: float = documented(2500.0, "DPO's beta (> 0) on per-element MSEs (Diffusion-DPO: 5000 for SD1.5, 2500 "
                                     "for SDXL).")
    pairs: str = documented("best-worst", "best-worst: one pair per prompt, its best and worst sample; all: every "
                                          "pair whose reward gap exceeds min_gap.")
    min_gap: float = documented(0.0, "a pair needs a reward gap > min_gap (>= 0); groups without one are skipped.")

    def problems(self, images_per_prompt):
        problems = [f"beta must be > 0, got {self.beta}"] if self.beta <= 0 else []
        if self.pairs not in ("best-worst", "all"):
            problems.append(f"pairs must be best-worst or all, got {self.pairs!r}")
        return problems + ([f"min_gap must be >= 0, got {self.min_gap}"] if self.min_gap < 0 else [])

    def plan(self, rewards, group_ids, rank, n_local):
        winners, losers, skipped = preference_pairs(rewards, group_ids, self.pairs == "all", self.min_gap)
        mine = torch.div(winners, n_local, rounding_mode="floor") == rank  # groups never span processes
        rows = torch.stack([winners[mine], losers[mine]], dim=1).flatten().cpu() - rank * n_local
        metrics = _advantage_metrics(group_advantages(rewards, group_ids, None)) | {
            "dpo_pairs": winners.numel(), "dpo_groups_skipped": skipped,
            "dpo_reward_gap_mean": (rewards[winners] - rewards[losers]).mean().item() if winners.numel() else 0.0}
        return TrainingPlan(rows, 2, {}, winners.numel(), ("reference",), metrics)

    def loss(self, batch, values):
        """Rows alternate winner, loser: :func:`.losses.flow_dpo_loss` on the pairs of the micro-batch."""
        v_theta, v_ref, target = batch.v_theta, batch.v_ref, batch.target
        pairs = (v_theta[0::2], v_ref[0::2], target[0::2], v_theta[1::2], v_ref[1::2], target[1::2])
        loss = flow_dpo_loss(*pairs, self.beta)
        with torch.no_grad():
            margins = flow_dpo_margins(*pairs, self.beta)
            parts = {"loss": loss.detach(), "dpo_accuracy": (margins > 0).float().mean(),
                     "dpo_margin": margins.mean(), "mse_fm": per_sample_mse(v_theta, target).mean(),
                     "w2_divergence": per_sample_mse(v_theta, v_ref).mean()}
        return loss, parts


@register_method
class NFT(NormalizedAdvantages):
    """DiffusionNFT (Zheng et al. 2025): implicit positive and negative policies around an old copy of the policy.

    Follows the official code (github.com/NVlabs/DiffusionNFT, ``scripts/train_nft_sd3.py``, ``config/nft.py``).
    The rollouts are sampled from ``v_old``, an "old" copy of the LoRA (an extra adapter), updated after every step
    as ``old = d old + (1 - d) policy`` with ``d = min(old_decay_rate (step - old_decay_delay), old_decay_max)``
    (0 before the delay; the code's ``decay_type`` 1 by default: 0.001 per step up to 0.5). Advantages: prompt-group
    mean, batch std (the code's ``global_std``), clipped to ``+-advantage_clip``; ``r = A / (2 advantage_clip) +
    1/2`` in ``[0, 1]``. Loss per sample: ``advantage_clip * nft_loss(v_theta, v_old, x_sigma, x_data, sigma, r,
    beta) + kl_beta * mse(v_theta, v_ref)`` (:func:`.losses.nft_loss`; the code's constant factor is its clip).
    The code trains on the sampler's own timesteps (``time_sampling: sampler``, ``timesteps_per_sample`` ~ 90% of
    ``num_inference_steps``); LoRA r = 32, alpha = 64, learning rate 3e-4.
    """

    name: ClassVar[str] = "nft"
    rollout_adapter: ClassVar[str] = "old"
    advantage_normalization: str = documented("batch_std", "as for every advantage-based method (below); the "
                                                            "official code's batch std by default.")
    beta: float = documented(1.0, "the implicit policies' step beta (> 0; the code's 1.0, 0.1 for OCR and several "
                                  "rewards).")
    advantage_clip: float = documented(5.0, "advantages clipped to +-advantage_clip (> 0), which also maps them to r.")
    kl_beta: float = documented(1e-4, "weight of the W2 (KL) term mse(v_theta, v_ref) to the frozen base (>= 0).")
    old_decay_rate: float = documented(0.001, "the old copy's decay grows by this per step (0: on-policy, old = the "
                                              "policy before each step) ...")
    old_decay_max: float = documented(0.5, "... up to this (in [0, 1)) ...")
    old_decay_delay: int = documented(0, "... after this many steps (decay 0 before).")

    def problems(self, images_per_prompt):
        problems = super().problems(images_per_prompt)
        problems += [f"{k} must be > 0, got {getattr(self, k)}" for k in ("beta", "advantage_clip") if getattr(self, k) <= 0]
        problems += [f"{k} must be >= 0, got {getattr(self, k)}" for k in ("kl_beta", "old_decay_rate", "old_decay_delay")
                     if getattr(self, k) < 0]
        if not 0 <= self.old_decay_max < 1:
            problems.append(f"old_decay_max must be in [0, 1), got {self.old_decay_max}")
        return problems

    def copies(self):
        return ("old",)

    def copy_decay(self, name, step):
        return ramp(step, self.old_decay_rate, self.old_decay_max, self.old_decay_delay)

    def plan(self, rewards, group_ids, rank, n_local):
        raw, metrics = self.advantages(rewards, group_ids)
        clipped = raw.clamp(-self.advantage_clip, self.advantage_clip)
        r = (clipped / self.advantage_clip / 2 + 0.5).clamp(0, 1)
        metrics |= _advantage_metrics(raw, clipped, (-self.advantage_clip, self.advantage_clip))
        metrics["nft_r_mean"] = r.mean().item()
        anchors = ("old", "reference") if self.kl_beta > 0 else ("old",)
        return TrainingPlan(torch.arange(n_local), 1, {"r": local_slice(r, rank, n_local)}, rewards.numel(), anchors,
                            metrics)

    def loss(self, batch, values):
        v_old = batch.anchors["old"]
        policy = self.advantage_clip * nft_loss(batch.v_theta, v_old, batch.x_sigma, batch.x_data, batch.sigma,
                                                values["r"], self.beta).mean()
        parts = {"loss_policy": policy.detach(), "old_divergence": per_sample_mse(batch.v_theta, v_old).mean().detach()}
        loss = policy
        if batch.v_ref is not None:
            w2 = per_sample_mse(batch.v_theta, batch.v_ref).mean()
            loss = loss + self.kl_beta * w2
            parts |= {"loss_w2": (self.kl_beta * w2).detach(), "w2_divergence": w2.detach()}
        return loss, {"loss": loss.detach(), **parts}


@register_method
class AWM(NormalizedAdvantages):
    """Advantage Weighted Matching (Xue et al. 2025): the flow-matching "log-likelihood" weighted by the advantage.

    Follows the official code (github.com/scxue/advantage_weighted_matching, ``scripts/train_sd3_awm.py``, configs
    in ``config/dgx_awm.py``, GenEval). ``log p = -sigma ((m + 1e-10)^p - (1e-10)^p) / p`` with ``m =
    mse(v_theta, target)`` and ``p = ghuber_power`` (:func:`.losses.awm_log_prob`); the policy loss is the clipped
    surrogate ``max(-A ratio, -A clip(ratio, 1 - clip_range, 1 + clip_range))`` with ``ratio = exp(log p - log
    p_old)`` (:func:`.losses.clipped_ratio_loss`) and A the prompt-group mean, batch std advantage clipped to
    ``+-advantage_clip`` and rescaled to ``+-advantage_max``. Plus ``kl_beta * mse(v_theta, v_ref)`` to the frozen
    base and ``ema_beta * mse(v_theta, v_ema)`` to an EMA copy of the policy (an extra adapter, ``ema = d ema + (1 -
    d) policy`` after every step, ``d = min(ema_decay_rate * step, ema_decay_max)``: the code's ``linear``).
    ``log p_old`` is the rollout policy's: as in the official configs (one optimiser step per rollout batch), that
    is the policy at the step itself, so the ratio is 1 in value and only its gradient acts. The code trains on the
    sampler's timesteps (``time_sampling: sampler``, 6 per sample); LoRA r = 32, alpha = 64, learning rate 3e-4.
    """

    name: ClassVar[str] = "awm"
    advantage_normalization: str = documented("batch_std", "as for every advantage-based method (below); the "
                                                            "official code's batch std by default.")
    advantage_clip: float = documented(5.0, "advantages clipped to +-advantage_clip (> 0) ...")
    advantage_max: float = documented(1.0, "... then rescaled to +-advantage_max (> 0).")
    clip_range: float = documented(1.0, "the ratio is clipped to [1 - clip_range, 1 + clip_range] (> 0).")
    weighting: str = documented("ghuber", "ghuber: the code's generalised Huber log-probability; uniform: -mse.")
    ghuber_power: float = documented(0.25, "the power p of ghuber (> 0).")
    kl_beta: float = documented(0.003, "weight of mse(v_theta, v_ref) to the frozen base (>= 0; the code's 0.003 "
                                       "for GenEval, 1e-4 for PickScore).")
    ema_beta: float = documented(1.0, "weight of mse(v_theta, v_ema) to the EMA copy (>= 0; 0: no copy).")
    ema_decay_rate: float = documented(0.001, "the EMA's decay grows by this per step ...")
    ema_decay_max: float = documented(0.3, "... up to this (in [0, 1)).")

    def problems(self, images_per_prompt):
        problems = super().problems(images_per_prompt)
        problems += [f"{k} must be > 0, got {getattr(self, k)}"
                     for k in ("advantage_clip", "advantage_max", "clip_range", "ghuber_power") if getattr(self, k) <= 0]
        problems += [f"{k} must be >= 0, got {getattr(self, k)}" for k in ("kl_beta", "ema_beta", "ema_decay_rate")
                     if getattr(self, k) < 0]
        if not 0 <= self.ema_decay_max < 1:
            problems.append(f"ema_decay_max must be in [0, 1), got {self.ema_decay_max}")
        if self.weighting not in ("ghuber", "uniform"):
            problems.append(f"weighting must be ghuber or uniform, got {self.weighting!r}")
        return problems

    def copies(self):
        return ("ema",) if self.ema_beta > 0 else ()

    def copy_decay(self, name, step):
        return ramp(step, self.ema_decay_rate, self.ema_decay_max)

    def plan(self, rewards, group_ids, rank, n_local):
        raw, metrics = self.advantages(rewards, group_ids)
        clipped = raw.clamp(-self.advantage_clip, self.advantage_clip)
        metrics |= _advantage_metrics(raw, clipped, (-self.advantage_clip, self.advantage_clip))
        advantages = clipped / self.advantage_clip * self.advantage_max
        anchors = self.copies() + (("reference",) if self.kl_beta > 0 else ())
        return TrainingPlan(torch.arange(n_local), 1, {"advantage": local_slice(advantages, rank, n_local)},
                            rewards.numel(), anchors, metrics)

    def loss(self, batch, values):
        log_prob = awm_log_prob(batch.v_theta, batch.target, batch.sigma, self.weighting, self.ghuber_power)
        old_log_prob = log_prob.detach()  # the rollout policy: the policy of this step (one update per batch)
        ratio = torch.exp(log_prob - old_log_prob)
        policy = clipped_ratio_loss(log_prob, old_log_prob, values["advantage"], self.clip_range).mean().float()
        loss = policy
        parts = {"loss_policy": policy.detach(), "awm_log_prob": log_prob.mean().detach().float(),
                 "awm_clip_fraction": ((ratio - 1).abs() > self.clip_range).float().mean().detach()}
        for name, weight, key in (("reference", self.kl_beta, "w2_divergence"), ("ema", self.ema_beta, "ema_divergence")):
            if name in batch.anchors:
                divergence = per_sample_mse(batch.v_theta, batch.anchors[name]).mean()
                loss = loss + weight * divergence
                parts[key] = divergence.detach()
        return loss, {"loss": loss.detach(), **parts}
