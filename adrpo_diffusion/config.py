"""Training configuration: one documented dataclass, loaded from YAML with command-line overrides, validated
before anything heavy is loaded."""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import settings
from .losses import TIME_SAMPLING
from .methods import available_methods, build_method, method_problems, methods_help, methods_with_option
from .scorers import check_reward
from .settings import ConfigError  # noqa: F401  (the error of load_config and config_from_args)
from .settings import documented as _f


@dataclass
class TrainConfig:
    # --- model
    pretrained_model: str = _f("stabilityai/stable-diffusion-3-medium-diffusers",
                               "Hub id or local directory of a diffusers pipeline of a supported family (SD3/SD3.5, "
                               "FLUX.1, SANA; detected from model_index.json), or builtin:tiny-sd3, builtin:tiny-sd3-shapes, "
                               "builtin:tiny-flux, builtin:tiny-sana.")
    drop_t5: bool = _f(False, "SD3 family only: load without the T5 text encoder (saves ~9 GB; the pipeline feeds zeros "
                              "instead).")
    mixed_precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU), no, fp16 or bf16. LoRA parameters stay fp32.")
    lora_rank: int = _f(32, "LoRA rank r.")
    lora_alpha: float = _f(32.0, "LoRA alpha (the update is scaled by alpha / r).")
    lora_target_modules: list = _f([], "Transformer modules that get LoRA; empty: the family's default (SD3, FLUX: the "
                                       "image and context attention projections to_q/k/v, to_out.0, add_q/k/v_proj, "
                                       "to_add_out; SANA: to_q/k/v, to_out.0 of the self- and cross-attention).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass (less memory, ~40% slower).")
    compile_transformer: bool = _f(False, "torch.compile the transformer's repeated blocks in place (regional "
                                          "compilation: rollouts, reference and policy passes; ModelFamily."
                                          "compile_repeated_blocks). BENCHMARKS.md has what it gains.")
    compile_backend: str = _f("inductor", "torch.compile backend for compile_transformer.")
    compile_mode: str = _f("default", "torch.compile mode for compile_transformer: default, reduce-overhead (CUDA "
                                      "graphs), max-autotune or max-autotune-no-cudagraphs.")
    rollout_merge_lora: bool = _f(False, "Fold the LoRA into the base weights for the rollouts (restored bitwise for "
                                         "the training step): fewer matmuls per sampler step; with bf16 weights the "
                                         "merged weights are rounded stochastically, so rollouts differ from unmerged "
                                         "ones by noise of the size of bf16 rounding (families.MergedLoRA).")
    anchor_merge_lora: bool = _f(False, "Fold a moving copy's LoRA (DiffusionNFT's old policy, AWM's and ADRPO's EMA "
                                        "anchor) into the base weights for its velocity in the loss, as "
                                        "rollout_merge_lora does for the rollouts (restored bitwise before the policy's "
                                        "pass; rounding as there): that forward costs what the base's does. No effect "
                                        "on the frozen base's velocity or where the method has no copies.")
    # --- prompts and rollouts
    prompt_file: str | list = _f("prompts/drawbench.csv", "Prompts: .txt (one per line), .csv/.tsv (a 'prompt' column) or "
                                                      ".jsonl; or a list of such files, e.g. '[a.csv, b.txt]'.")
    heldout_fraction: float = _f(0.0, "Leave this fraction of the prompts out of training, chosen by a hash of each "
                                      "prompt's text (prompts.is_heldout); adrpo-evaluate with the same "
                                      "heldout_fraction evaluates only those. 0: train on every prompt.")
    prompts_per_step: int = _f(8, "P: prompts drawn per iteration (over all processes).")
    images_per_prompt: int = _f(4, "K: images sampled per prompt from the current policy; the group for the baseline.")
    num_inference_steps: int = _f(20, "ODE (Euler) steps per rollout.")
    guidance_scale: float = _f(4.5, "Guidance of the rollouts. SD3, SANA: classifier-free guidance scale (1 disables "
                                    "CFG). FLUX.1-dev: the distilled guidance embedding's value (3.5 in its model card), "
                                    "given in the rollouts and in the loss; FLUX.1-schnell: ignored.")
    resolution: int = _f(512, "Image height and width in pixels.")
    max_sequence_length: int = _f(256, "Text tokens of the per-token encoder: SD3's and FLUX's T5 (SD3 default 256, "
                                       "FLUX.1-dev 512), SANA's Gemma-2 (300).")
    rollout_batch_size: int = _f(8, "Images sampled per forward batch on each process.")
    # --- reward
    reward: str | dict = _f("clip", "Reward: a scorer name of the scorer registry (clip, color, ...), or a mapping name "
                                    "-> weight, e.g. {pickscore: 1.0, clip: 0.5}, for R = sum_k w_k * scorer_k (weights "
                                    "may be negative, not 0).")
    reward_options: dict = _f({}, "Options of the reward scorer, e.g. {model: openai/clip-vit-large-patch14}; with a "
                                  "mapping reward, keyed by scorer name, e.g. {clip: {model: DIR}}.")
    reward_scale: float = _f(1.0, "Multiplies the reward. CLIP score is 100*cos: rewards spread by O(1) inside a group.")
    # --- method
    method: str = _f("adrpo", f"One of {', '.join(available_methods())}; its parameters go in method_options.")
    method_options: dict = _f({}, "Parameters of the method, e.g. {beta0: 1.0, advantage_min: -1.0, advantage_max: 1.0} "
                                  "for adrpo; each method's are listed at the end of --help.")
    decoupled_normalization: float = _f(0.0, "GDPO's decoupled normalisation, mixed in: the method ranks or normalises "
                                             "s = (1 - m) z(R) + m z(sum_k w_k z(c_k)) instead of the reward R, with z "
                                             "the standardisation within each prompt group and c_k each reward part (each "
                                             "check of a scorer with checks, e.g. shapes; else the scorer's score). 0: "
                                             "R itself (default); 1: GDPO. advantages.decoupled_signal.")
    # --- loss
    time_sampling: str = _f("uniform", "t ~ uniform (the paper), logit_normal, or sampler: the times at which the rollout "
                                       "sampler evaluates the transformer (its shifted schedule of num_inference_steps "
                                       "steps, as Flow-GRPO, DiffusionNFT and AWM train).")
    logit_mean: float = _f(0.0, "logit_normal: mean.")
    logit_std: float = _f(1.0, "logit_normal: standard deviation.")
    timesteps_per_sample: int = _f(1, "Fresh (noise, t) draws per rollout sample in the loss, stratified: draw d of D "
                                      "takes its t from the d-th D-quantile slice of time_sampling's distribution.")
    shared_noise: bool = _f(False, "The samples of one prompt group share each (noise, t) draw (on each process): "
                                   "common random numbers. Unbiased (every sample's draw keeps its distribution); with "
                                   "advantages that sum to zero per group the noise's own term cancels in the "
                                   "advantage-weighted gradient. Measured (BENCHMARKS.md): less gradient noise where "
                                   "a group's samples are alike (a weak base), none on a trained one.")
    updates_per_rollout: int = _f(1, "Optimizer updates on each iteration's rollouts, each with fresh (noise, t) draws "
                                     "(Flow-GRPO's and DDPO's inner epochs): 1 is on-policy; more reuse the rollouts, "
                                     "whose cost is then shared. The methods' moving copies follow every update, and "
                                     "the learning-rate schedule counts updates (max_steps x updates_per_rollout).")
    train_batch_size: int = _f(8, "Samples per forward/backward on each process; gradients accumulate over the update.")
    # --- optimiser
    learning_rate: float = _f(1e-4, "AdamW learning rate.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float = _f(1e-4, "AdamW weight decay.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    use_8bit_adam: bool = _f(False, "bitsandbytes' 8-bit AdamW (needs bitsandbytes and a GPU).")
    max_grad_norm: float = _f(1.0, "Gradient clipping (0 disables).")
    lr_scheduler: str = _f("constant", "diffusers.optimization scheduler: constant, constant_with_warmup, cosine, linear, ...")
    lr_warmup_steps: int = _f(0, "Warm-up of the LR scheduler, in optimizer updates (steps x updates_per_rollout).")
    # --- run
    output_dir: str = _f("outputs/adrpo-sd3", "Where LoRA weights, checkpoints, metrics and samples go.")
    max_steps: int = _f(1000, "Training iterations (each: rollouts, rewards, updates_per_rollout optimiser steps).")
    seed: int = _f(0, "Seed of every random draw (prompts, rollouts, noise, t).")
    checkpointing_steps: int = _f(100, "Write a resumable checkpoint every N steps (0: only at the end).")
    checkpoints_total_limit: int = _f(3, "Keep the newest N checkpoints (0: keep all).")
    checkpoint_every_minutes: float = _f(0.0, "Also write a checkpoint when this many minutes have passed since the last "
                                              "one (0: off); for long steps, or a scheduler that preempts.")
    resume_from_checkpoint: str | None = _f(None, "latest, or a checkpoints/step-N directory. The checkpoint's files and "
                                                  "config are checked first: only max_steps and the checkpointing, held-out, "
                                                  "logging, speed and batch-size keys may differ (RESUME_MAY_CHANGE).")
    overwrite_output_dir: bool = _f(False, "Start a new run in an output_dir that holds another one, deleting that run's "
                                           "files first (config.json, metrics.jsonl, summary.json, the LoRA, checkpoints/, "
                                           "samples/, logs/); without it such a directory is refused. Ignored when resuming.")
    sample_every: int = _f(100, "Save a grid of held-out samples every N steps (0: never).")
    eval_prompts: int = _f(8, "Prompts for the held-out reward printed before and after training (0: no check).")
    eval_seeds: list = _f([1000, 1001], "Held-out seeds (never used in training) for that reward: one image per "
                                         "held-out prompt i and seed s, from the seed (s, i, 0) of adrpo_diffusion.seeds.")
    report_to: str = _f("tensorboard", "Tracker: tensorboard, wandb or none. metrics.jsonl is always written.")
    max_consecutive_nonfinite: int = _f(5, "Stop after this many non-finite losses in a row (each is skipped).")
    allow_tf32: bool = _f(True, "Allow TF32 matmuls on Ampere+ GPUs.")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The keys a resumed run may change: how long it runs, how fast, what it logs and where. Every other key must match
# the checkpoint's (the model, the LoRA and optimizer state shapes, the method, the reward, the data, the seed).
RESUME_MAY_CHANGE = (
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "max_steps", "checkpointing_steps",
    "checkpoint_every_minutes", "checkpoints_total_limit", "sample_every", "eval_prompts", "eval_seeds", "report_to",
    "max_consecutive_nonfinite", "allow_tf32", "compile_transformer", "compile_backend", "compile_mode",
    "rollout_merge_lora", "anchor_merge_lora", "gradient_checkpointing", "rollout_batch_size", "train_batch_size",
)


def _reward(value):
    """reward: a scorer name or a mapping of scorer names to weights; validate checks what they name."""
    if isinstance(value, (str, dict)):
        return value
    raise ValueError(f"reward must be a scorer name or a mapping of scorer names to weights, got {value!r} "
                     f"({type(value).__name__})")


def _method_option(key: str) -> str | None:
    owners = methods_with_option(key)
    return f" (a parameter of {', '.join(owners)}: give it in method_options)" if owners else None


def load_config(path: str | Path | None = None, overrides: dict | None = None, *,
                overrides_from: str = "the overrides") -> TrainConfig:
    """Read a YAML file (if any), apply ``overrides`` on top, check keys and types, and validate."""
    config = settings.load(TrainConfig, path, overrides, hint=_method_option, convert={"reward": _reward},
                           overrides_from=overrides_from)
    validate(config)
    return config


def validate(cfg: TrainConfig) -> None:
    """Every check that needs no model: raises one ConfigError listing all problems."""
    problems = method_problems(cfg.method, cfg.method_options, cfg.images_per_prompt)
    try:
        check_reward(cfg.reward, cfg.reward_options)
    except ValueError as err:
        problems += str(err).splitlines()
    if cfg.images_per_prompt < 2:
        problems.append(f"images_per_prompt (K) must be >= 2 for a group baseline, got {cfg.images_per_prompt}")
    if cfg.time_sampling not in TIME_SAMPLING:
        problems.append(f"time_sampling must be one of {', '.join(TIME_SAMPLING)}, got {cfg.time_sampling!r}")
    if cfg.compile_mode not in COMPILE_MODES:
        problems.append(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {cfg.compile_mode!r}")
    if cfg.mixed_precision not in ("auto", "no", "fp16", "bf16"):
        problems.append(f"mixed_precision must be auto, no, fp16 or bf16, got {cfg.mixed_precision!r}")
    if cfg.report_to not in ("tensorboard", "wandb", "none"):
        problems.append(f"report_to must be tensorboard, wandb or none, got {cfg.report_to!r}")
    for name in ("prompts_per_step", "num_inference_steps", "rollout_batch_size", "train_batch_size",
                 "timesteps_per_sample", "updates_per_rollout", "lora_rank", "max_steps", "resolution",
                 "max_consecutive_nonfinite"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("checkpointing_steps", "checkpoint_every_minutes", "checkpoints_total_limit", "sample_every", "eval_prompts",
                 "lr_warmup_steps"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.learning_rate <= 0:
        problems.append(f"learning_rate must be > 0, got {cfg.learning_rate}")
    if cfg.resolution % 16:
        problems.append(f"resolution must be a multiple of 16, got {cfg.resolution}")
    if not 0 <= cfg.decoupled_normalization <= 1:
        problems.append(f"decoupled_normalization must be in [0, 1], got {cfg.decoupled_normalization}")
    if not 0 <= cfg.heldout_fraction < 1:
        problems.append(f"heldout_fraction must be in [0, 1), got {cfg.heldout_fraction}")
    if isinstance(cfg.prompt_file, list) and not (cfg.prompt_file and all(isinstance(f, str) for f in cfg.prompt_file)):
        problems.append(f"prompt_file must be a file or a non-empty list of files, got {cfg.prompt_file}")
    if not all(isinstance(s, int) for s in cfg.eval_seeds):
        problems.append(f"eval_seeds must be a list of integers, got {cfg.eval_seeds}")
    if problems:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))
    for message in build_method(cfg.method, cfg.method_options, cfg.images_per_prompt).warnings():
        warnings.warn(message, stacklevel=2)


def build_arg_parser() -> argparse.ArgumentParser:
    return settings.arg_parser(
        TrainConfig, "adrpo-train", epilog=methods_help(),
        description="Online RL fine-tuning of SD3-family models with LoRA (ADRPO and baselines).\n"
        "Every config key can be given as --key value; values are parsed as YAML (--method_options '{beta0: 0.5}'); "
        "a list is\nseveral values or one YAML list (--eval_seeds 1 2, or --eval_seeds '[1, 2]').")


def config_from_args(argv=None) -> TrainConfig:
    args, overrides = settings.overrides_from_args(TrainConfig, build_arg_parser(), argv)
    return load_config(args.config, overrides, overrides_from="the command line")
