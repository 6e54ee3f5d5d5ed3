"""ADRPO and its baselines as one registry: each method's documented parameters, their checks, the training
plan it makes from a step's rewards, and its micro-batch loss. The tensor math lives in :mod:`.losses` and
:mod:`.advantages`; this module wires parameters to it.

A method turns the rewards of the whole (gathered) rollout batch into a :class:`TrainingPlan`: the rows of this
process's rollouts to train on, in units that share one (noise, t) draw (one sample, or a DPO pair), and the
per-sample values its loss reads. The trainer draws noise and t per unit, micro-batches whole units, and calls
:meth:`Method.loss` on each micro-batch. Adding a method is one registered dataclass below.

Config: ``method: NAME`` and ``method_options: {...}`` (the fields of that method's dataclass).
"""

from __future__ import annotations

import dataclasses
import difflib
import textwrap
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .advantages import group_advantages, group_means, local_slice, preference_pairs
from .losses import flow_dpo_loss, flow_dpo_margins, per_sample_mse, weighted_fm_w2_loss


def documented(default, help: str):
    """A dataclass field with a help string (shown by ``adrpo-train --help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainingPlan:
    """What one step trains on, on this process.

    ``rows`` index this process's rollouts; each consecutive ``unit`` rows form one unit that shares its noise and
    t and stays in one micro-batch (1: a sample; 2: a DPO pair, winner then loser). ``values`` are per-sample
    tensors (indexed like the rollouts) the method's loss reads. The step's loss is the mean over the
    ``global_units`` units of all processes; 0 means nothing to train on (no update).
    """

    rows: torch.Tensor
    unit: int
    values: dict[str, torch.Tensor]
    global_units: int
    needs_reference: bool
    metrics: dict[str, float]


class Method:
    """Base of every method: a frozen dataclass of its parameters (``method_options``)."""

    name: ClassVar[str]
    whole_groups_per_process: ClassVar[bool] = False  # pairs are formed inside a process: groups must not split

    def problems(self, images_per_prompt: int) -> list[str]:
        """Invalid parameter values, as messages (none: valid)."""
        return []

    def warnings(self) -> list[str]:
        return []

    def plan(self, rewards: torch.Tensor, group_ids: torch.Tensor, rank: int, n_local: int) -> TrainingPlan:
        """The step's plan from the rewards and group ids of the whole batch (gathered over processes, in process
        order); ``rank`` and ``n_local`` locate this process's slice."""
        raise NotImplementedError

    def loss(self, v_theta, v_ref, target, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch (a mean over its units) and its detached parts to log."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY:
        raise ValueError(f"Method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = dataclass(frozen=True)(cls)
    return _REGISTRY[cls.name]


def available_methods() -> list[str]:
    return list(_REGISTRY)


def _option_problems(cls: type[Method], options: dict) -> tuple[dict, list[str]]:
    """Options typed as the method's fields (an int is accepted for a float), and the problems found."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values, problems = {}, []
    for key, value in options.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            problems.append(f"unknown option {key!r} for method {cls.name!r}"
                            + (f" (did you mean {close[0]!r}?)" if close else "") + f"; valid: {', '.join(fields)}")
            continue
        kind = hints[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            problems.append(f"method_options.{key} must be {kind.__name__}, got {value!r}")
            continue
        values[key] = value
    return values, problems


def method_problems(name: str, options: dict, images_per_prompt: int) -> list[str]:
    """Every problem of a method name and its options, checked without any model."""
    if name not in _REGISTRY:
        return [f"method must be one of {', '.join(_REGISTRY)}, got {name!r}"]
    if not isinstance(options, dict):
        return [f"method_options must be a mapping of {name}'s parameters, got {options!r}"]
    values, problems = _option_problems(_REGISTRY[name], options)
    return problems or _REGISTRY[name](**values).problems(images_per_prompt)


def build_method(name: str, options: dict, images_per_prompt: int) -> Method:
    problems = method_problems(name, options, images_per_prompt)
    if problems:
        raise ValueError("; ".join(problems))
    return _REGISTRY[name](**_option_problems(_REGISTRY[name], options)[0])


def methods_with_option(key: str) -> list[str]:
    """The methods that have a parameter named ``key``."""
    return [name for name, cls in _REGISTRY.items() if key in {f.name for f in dataclasses.fields(cls)}]


def methods_help() -> str:
    """Each method's parameters with types, defaults and help, for ``adrpo-train --help``."""
    lines = ["method_options, per method (e.g. --method raft --method_options '{top_k: 2}'):"]
    for name, cls in _REGISTRY.items():
        lines.append(textwrap.fill(f"{name}: {cls.__doc__.strip().splitlines()[0]}", 110, initial_indent="  ",
                                   subsequent_indent="    "))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            text = f"{f.name} ({hints[f.name].__name__}, default {f.default!r}): {f.metadata['help']}"
            lines.append(textwrap.fill(text, 110, initial_indent="    ", subsequent_indent="      "))
    return "\n".join(lines)


def _advantage_metrics(raw: torch.Tensor, clipped: torch.Tensor | None = None, clip_range=None) -> dict[str, float]:
    """The spread of the rewards inside the prompt groups (every method), and for advantage-weighted methods the
    clipped advantages and the fraction clipped."""
    metrics = {"advantage_raw_abs_mean": raw.abs().mean().item(), "advantage_raw_std": raw.std().item()}
    if clipped is not None:
        metrics |= {"advantage_mean": clipped.mean().item(), "advantage_abs_mean": clipped.abs().mean().item(),
                    "clip_fraction": ((raw < clip_range[0]) | (raw > clip_range[1])).float().mean().item()}
    return metrics


class WeightedFlowMatching(Method):
    """Methods whose loss is ``mean_i[w_fm_i * mse_i(v_theta, target) + w_w2_i * mse_i(v_theta, v_ref)]`` over every
    sample (:func:`.losses.weighted_fm_w2_loss`); they differ in the weights."""

    def weights(self, rewards, group_ids) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """``(w_fm, w_w2, metrics)`` for every sample of the whole batch."""
        raise NotImplementedError

    def plan(self, rewards, group_ids, rank, n_local):
        fm, w2, metrics = self.weights(rewards, group_ids)
        metrics |= {"fm_weight_mean": fm.mean().item(), "beta_tot_mean": w2.mean().item()}
        values = {"fm": local_slice(fm, rank, n_local), "w2": local_slice(w2, rank, n_local)}
        return TrainingPlan(torch.arange(n_local), 1, values, rewards.numel(), bool(torch.any(w2 != 0)), metrics)

    def loss(self, v_theta, v_ref, target, values):
        loss, parts = weighted_fm_w2_loss(v_theta, v_ref, target, values["fm"], values["w2"])
        return loss, {"loss": loss.detach(), **parts}


class AdvantageWeighted(WeightedFlowMatching):
    """``w_fm = A``, the group advantage clipped to ``[advantage_min, advantage_max]``; subclasses give ``w_w2``."""

    def problems(self, images_per_prompt):
        if self.advantage_min >= self.advantage_max:
            return [f"advantage_min ({self.advantage_min}) must be < advantage_max ({self.advantage_max})"]
        return []

    def w2_weights(self, advantages: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weights(self, rewards, group_ids):
        raw = group_advantages(rewards, group_ids, clip_range=None)
        clip_range = (self.advantage_min, self.advantage_max)
        clipped = raw.clamp(min=clip_range[0], max=clip_range[1])
        return clipped, self.w2_weights(clipped), _advantage_metrics(raw, clipped, clip_range)


@register_method
class ADRPO(AdvantageWeighted):
    """ADRPO, Eq. 6: w_fm = A, w_w2 = beta0 - A, with A the clipped group advantage."""

    name: ClassVar[str] = "adrpo"
    beta0: float = documented(1.0, "base regularisation strength (> 0); the W2 weight of a sample is beta0 - A.")
    advantage_min: float = documented(-1.0, "A_min: lower clip of the advantages.")
    advantage_max: float = documented(1.0, "A_max: upper clip of the advantages (> beta0 warns: negative W2 weight).")

    def problems(self, images_per_prompt):
        problems = super().problems(images_per_prompt)
        if self.beta0 <= 0:
            problems.append(f"beta0 must be > 0 (the loss is beta0 * ||v - v*||^2 + const), got {self.beta0}")
        return problems

    def warnings(self):
        if self.advantage_max <= self.beta0:
            return []
        return [f"advantage_max ({self.advantage_max}) > beta0 ({self.beta0}): samples with A > beta0 get a negative "
                "W2 weight, i.e. the target extrapolates past the sample (DESIGN.md section 2)."]

    def w2_weights(self, advantages):
        return self.beta0 - advantages


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
class ORWCFMW2(WeightedFlowMatching):
    """ORW-CFM-W2 (Fan, Shen et al., ICLR 2025): w_fm = exp(tau R), normalised per prompt; w_w2 = beta.

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
        problems = [f"{k} must be >= 0, got {getattr(self, k)}" for k in ("tau", "beta") if getattr(self, k) < 0]
        if self.normalize not in ("group", "none"):
            problems.append(f"normalize must be group or none, got {self.normalize!r}")
        return problems

    def weights(self, rewards, group_ids):
        raw = group_advantages(rewards, group_ids, clip_range=None)
        if self.normalize == "group":
            tilt = torch.exp(self.tau * raw)  # exp(tau R) up to a per-prompt factor, without overflow
            fm = tilt / group_means(tilt, group_ids)
        else:
            fm = torch.exp(self.tau * rewards)
        metrics = _advantage_metrics(raw) | {"orw_ess": (fm.sum() ** 2 / fm.pow(2).sum()).item()}
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
        return TrainingPlan(rows, 2, {}, winners.numel(), True, metrics)

    def loss(self, v_theta, v_ref, target, values):
        """Rows alternate winner, loser: :func:`.losses.flow_dpo_loss` on the pairs of the micro-batch."""
        pairs = (v_theta[0::2], v_ref[0::2], target[0::2], v_theta[1::2], v_ref[1::2], target[1::2])
        loss = flow_dpo_loss(*pairs, self.beta)
        with torch.no_grad():
            margins = flow_dpo_margins(*pairs, self.beta)
            parts = {"loss": loss.detach(), "dpo_accuracy": (margins > 0).float().mean(),
                     "dpo_margin": margins.mean(), "mse_fm": per_sample_mse(v_theta, target).mean(),
                     "w2_divergence": per_sample_mse(v_theta, v_ref).mean()}
        return loss, parts
