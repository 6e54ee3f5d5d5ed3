"""Evaluation configuration: documented dataclasses, loaded from YAML with ``--key value`` overrides, validated
(prompt files read, model sources and LoRA files found, metric names and scorer options checked) before any model
loads."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from .. import settings
from ..builtin import is_builtin, resolve_asset
from ..checkpoint import LORA_WEIGHTS_NAME
from ..prompts import PromptFileError, is_heldout, load_prompts
from ..scorers import available_scorers, check_scorer, check_scorer_sources
from ..scorers.custom import is_custom
from ..scorers.diversity import DEFAULT_OPTIONS as DIVERSITY_DEFAULTS
from ..scorers.diversity import diversity_options
from ..settings import ConfigError, required
from ..settings import documented as _f

# Table 1 of the paper, in its column order.
TABLE1_METRICS = ["clipscore", "clipdiversity", "aesthetic", "blipscore", "imagereward", "pickscore"]
# Metrics that are not a registry scorer used as is: metric -> (scorer name, fixed scorer options).
# ClipScore follows torchmetrics: 100 * max(cos, 0). ClipDiversity uses the CLIP scorer's image embeddings; its
# options distance, normalize and scale choose the variant (scorers/diversity.py), the others go to the CLIP scorer.
DERIVED_METRICS = {"clipscore": ("clip", {"clamp_negative": True}), "clipdiversity": ("clip", {})}
_NAME = re.compile(r"^[A-Za-z0-9][\w.+-]*$")  # model and prompt set names become directory names
# Optional modules (the eval extra): module -> (pip package, the metric that needs it, what for).
OPTIONAL_MODULES = {"matplotlib": ("matplotlib", "clipdiversity", "the reward_vs_diversity.png plot"),
                    "open_clip": ("open_clip_torch", "hpsv2", "the hpsv2 metric")}


class EvalConfigError(ConfigError):
    pass


@dataclass
class ModelSpec:
    """One row of the table: a base pipeline, optionally with a LoRA, and its sampling settings."""

    name: str = required("Row label and directory name (letters, digits, . _ + -).")
    base: str = required("Hub id or local directory of a diffusers pipeline of a supported family (SD3, FLUX.1, "
                          "SANA), or builtin:tiny-sd3, builtin:tiny-flux, builtin:tiny-sana.")
    lora: str | None = _f(None, "Directory holding pytorch_lora_weights.safetensors (as adrpo-train writes).")
    pipeline: str = _f("auto", "auto (the family is read from the pipeline's model_index.json) or a family's pipeline "
                               "class: StableDiffusion3Pipeline, FluxPipeline, SanaPipeline.")
    resolution: int | None = _f(None, "Image height and width in pixels for this model; null: the config's resolution.")
    num_inference_steps: int = _f(28, "Sampler steps.")
    guidance_scale: float = _f(7.0, "Guidance scale (classifier-free; FLUX.1-dev's is its distilled guidance).")
    call_kwargs: dict = field(default_factory=dict, metadata={
        "help": "Extra keyword arguments of the pipeline call, e.g. {max_sequence_length: 512}."})
    load_kwargs: dict = field(default_factory=dict, metadata={
        "help": "Extra keyword arguments of from_pretrained, e.g. {variant: fp16} or "
                "{text_encoder_3: null, tokenizer_3: null} to load SD3 without T5."})
    cpu_offload: bool = _f(False, "enable_model_cpu_offload(): each component on the GPU only while it runs.")


@dataclass
class PromptSet:
    """A named prompt file."""

    name: str = required("Name in tables and directory names.")
    file: str = required("Prompt file (.txt, .csv/.tsv with a 'prompt' column, .jsonl). A CSV 'category' column "
                         "(DrawBench's) gives a per-category breakdown.")


@dataclass
class EvalConfig:
    """Everything an evaluation run needs; every field can be set in YAML or as ``--key value``."""

    models: list = field(default_factory=list, metadata={
        "help": "The models to compare (list of ModelSpec mappings); unused with images_dir."})
    prompt_sets: list = field(default_factory=lambda: [{"name": "drawbench", "file": "prompts/drawbench.csv"},
                                                       {"name": "styles", "file": "prompts/styles.txt"}],
                              metadata={"help": "Prompt sets: list of {name, file}."})
    max_prompts_per_set: int | None = _f(None, "Keep this many prompts of each set, evenly spaced through the file "
                                               "(so DrawBench keeps every category); null: all.")
    heldout_fraction: float = _f(0.0, "Evaluate only the prompts in the held-out split of this fraction "
                                      "(prompts.is_heldout): set it to the training runs' heldout_fraction and no "
                                      "evaluated prompt was trained on. 0: every prompt.")
    images_per_prompt: int = _f(4, "K: images per (model, seed, prompt); ClipDiversity compares these K images.")
    seeds: list = field(default_factory=lambda: [0, 1, 2], metadata={
        "help": "Evaluation seeds; mean and standard error are taken over seeds."})
    resolution: int = _f(1024, "Image height and width in pixels of the models that set no resolution of their own.")
    metrics: list = field(default_factory=lambda: list(TABLE1_METRICS), metadata={
        "help": f"Metrics, all higher-is-better: {', '.join(TABLE1_METRICS)}, or any registered scorer name (e.g. hpsv2)."})
    metric_options: dict = field(default_factory=dict, metadata={
        "help": "Per-metric scorer options, e.g. {pickscore: {model: /models/PickScore_v1}}; clipdiversity also "
                "takes distance (l2, cosine), normalize and scale (default: L2 between unnormalised embeddings). "
                "'builtin:tiny-scorers/<name>' names a tiny random asset built into the cache."})
    reward_metric: str = _f("clipscore", "The y axis of reward_vs_diversity.png (x is clipdiversity).")
    output_dir: str = _f("outputs/eval", "Images, score caches, tables and results.json go here.")
    batch_size: int = _f(4, "Images generated per pipeline call.")
    score_batch_size: int = _f(32, "Images scored per batch.")
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    dtype: str = _f("auto", "Pipeline dtype: auto (bfloat16 on GPU, float32 on CPU), float32, float16, bfloat16.")
    images_dir: str | None = _f(None, "Score the images in this folder instead of generating (each with a JSON "
                                      "sidecar holding its prompt, or see images_prompts).")
    images_prompts: str | None = _f(None, "With images_dir: a CSV with columns file (relative to images_dir) and "
                                          "prompt; optional model, seed, prompt_set, category.")
    skip_bad_images: bool = _f(False, "With images_dir: score the images that decode and list the others (empty, "
                                      "truncated or not images); without it they are refused before any model loads.")

    def resolved_device(self) -> str:
        import torch

        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device

    def resolved_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.float32 if self.resolved_device() == "cpu" else torch.bfloat16
        return getattr(torch, self.dtype)


@dataclass
class PromptEntry:
    """One prompt of a set: its index in the file (stable whatever max_prompts_per_set keeps) and category."""

    prompt_set: str
    index: int
    prompt: str
    category: str | None


FIELDS = {f.name: f for f in dataclasses.fields(EvalConfig)}


def load_eval_config(path: str | Path | None = None, overrides: dict | None = None, *,
                     overrides_from: str = "the overrides") -> EvalConfig:
    """Read a YAML file (if any), apply ``overrides`` on top, check keys and types (the models' and prompt sets'
    too), and validate."""
    source = settings.source_text(path, overrides)
    problems: list[str] = []
    values = settings.read_values(EvalConfig, path, overrides, problems, error=EvalConfigError,
                                  overrides_from=overrides_from)
    cfg = settings.from_mapping(EvalConfig, values, source, problems)
    if cfg is not None:
        cfg.models = [settings.from_mapping(ModelSpec, m, f"models[{i}]", problems, prefix=f"models[{i}].")
                      for i, m in enumerate(cfg.models)]
        for model in cfg.models:
            if model is not None and model.resolution is None:
                model.resolution = cfg.resolution
        cfg.prompt_sets = [settings.from_mapping(PromptSet, s, f"prompt_sets[{i}]", problems,
                                                 prefix=f"prompt_sets[{i}].") for i, s in enumerate(cfg.prompt_sets)]
        problems = problems or validate(cfg)
    if problems:
        raise EvalConfigError(f"Invalid evaluation config ({source}):\n  " + "\n  ".join(problems))
    cfg.metric_options = resolve_builtin_assets(cfg.metric_options)
    return cfg


def resolve_builtin_assets(metric_options: dict) -> dict:
    """``metric_options`` with every ``builtin:<asset>/<path>`` value (e.g. ``builtin:tiny-scorers/clip``) replaced by
    its path in the cache (built on first use)."""
    resolved = {}
    for metric, options in metric_options.items():
        resolved[metric] = dict(options)
        for key, value in options.items():
            if is_builtin(value):
                try:
                    resolved[metric][key] = str(resolve_asset(value))
                except (ValueError, FileNotFoundError) as err:
                    raise FileNotFoundError(f"metric_options.{metric}.{key}: {err}") from None
    return resolved


def metric_scorer(metric: str, options: dict) -> tuple[str, dict]:
    """The registry scorer name and options that compute ``metric``."""
    name, fixed = DERIVED_METRICS.get(metric, (metric, {}))
    if metric == "clipdiversity":
        options = {k: v for k, v in options.items() if k not in DIVERSITY_DEFAULTS}
    return name, {**options, **fixed}


def clipdiversity_variant(options: dict) -> dict:
    """ClipDiversity's ``distance``, ``normalize`` and ``scale`` from its metric options, defaults filled in."""
    return diversity_options(**{k: v for k, v in options.items() if k in DIVERSITY_DEFAULTS})


def check_metric_sources(cfg: EvalConfig) -> None:
    """Every model and file the metrics' scorers would load can be had (on disk, in the hub cache or, online, on the
    hub): asked when the evaluation starts, before anything loads; one :class:`EvalConfigError` names what cannot,
    each with the ``metric_options`` entry that passes a local copy. ``builtin:`` assets are built when used."""
    problems = []
    for metric in cfg.metrics:
        try:
            check_scorer_sources(*metric_scorer(metric, cfg.metric_options.get(metric, {})), lambda option, path,
                                 metric=metric: f"metric_options: {{{metric}: {{{option}: {path}}}}}")
        except FileNotFoundError as err:
            problems += [f"metric {metric}: {line}" for line in str(err).splitlines()]
    if problems:
        raise EvalConfigError("Cannot evaluate:\n  " + "\n  ".join(problems))


def validate(cfg: EvalConfig) -> list[str]:
    """Every check that needs no model weights; returns the list of problems."""
    problems = []
    valid_metrics = TABLE1_METRICS + [s for s in available_scorers() if s not in ("clip",)]

    def known(metric):
        return metric in valid_metrics or is_custom(metric)

    for metric in cfg.metrics:
        if not known(metric):
            problems.append(f"Unknown metric {metric!r}; valid: {', '.join(valid_metrics)}, or your own reward as "
                            "module.path:function or path/to/file.py:function")
    if not cfg.metrics:
        problems.append(f"metrics is empty; e.g. {TABLE1_METRICS}")
    for metric, options in cfg.metric_options.items():  # options of metrics not in `metrics` are kept, unused
        if not known(metric):
            problems.append(f"metric_options has an unknown metric {metric!r}; valid: {', '.join(valid_metrics)}")
        elif not isinstance(options, dict):
            problems.append(f"metric_options.{metric} must be a mapping of scorer options, got {options!r}")
    for metric in dict.fromkeys([*cfg.metrics, *cfg.metric_options]):
        options = cfg.metric_options.get(metric, {})
        if known(metric) and isinstance(options, dict):
            try:
                check_scorer(*metric_scorer(metric, options))
                if metric == "clipdiversity":
                    clipdiversity_variant(options)
            except ValueError as err:
                problems.append(f"metric_options.{metric}: {err}" if metric in cfg.metric_options else str(err))
    if cfg.reward_metric not in cfg.metrics:
        problems.append(f"reward_metric {cfg.reward_metric!r} is not in metrics {cfg.metrics}")
    for module, (package, metric, purpose) in OPTIONAL_MODULES.items():
        if metric in cfg.metrics and find_spec(module) is None:
            problems.append(f"{purpose} needs {package}, which is not installed: pip install -c constraints-ci.txt -e "
                            f"\".[eval]\" in the repository (or pip install {package})")
    for name in ("batch_size", "score_batch_size", "resolution", "images_per_prompt"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if "clipdiversity" in cfg.metrics and cfg.images_per_prompt < 2 and cfg.images_dir is None:
        problems.append(f"clipdiversity compares the K images of a prompt: images_per_prompt must be >= 2, "
                        f"got {cfg.images_per_prompt}")
    if not 0 <= cfg.heldout_fraction < 1:
        problems.append(f"heldout_fraction must be in [0, 1), got {cfg.heldout_fraction}")
    if cfg.max_prompts_per_set is not None and cfg.max_prompts_per_set < 1:
        problems.append(f"max_prompts_per_set must be >= 1 or null, got {cfg.max_prompts_per_set}")
    if not cfg.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in cfg.seeds):
        problems.append(f"seeds must be a non-empty list of integers, got {cfg.seeds}")
    elif len(set(cfg.seeds)) != len(cfg.seeds):
        problems.append(f"seeds has duplicates: {cfg.seeds}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        problems.append(f"device must be auto, cpu, mps, cuda or cuda:N, got {cfg.device!r}")
    elif cfg.device.startswith("cuda") and not _cuda_available():
        problems.append(f"device is {cfg.device!r} but torch sees no CUDA GPU; use device: auto or cpu")
    if cfg.dtype not in ("auto", "float32", "float16", "bfloat16"):
        problems.append(f"dtype must be auto, float32, float16 or bfloat16, got {cfg.dtype!r}")
    if cfg.images_dir is not None:
        if not Path(cfg.images_dir).is_dir():
            problems.append(f"images_dir {cfg.images_dir} is not a directory")
        if cfg.images_prompts is not None and not Path(cfg.images_prompts).is_file():
            problems.append(f"images_prompts {cfg.images_prompts} does not exist")
        return problems
    if cfg.images_prompts is not None:
        problems.append("images_prompts is only used together with images_dir")
    problems += _validate_models(cfg.models)
    if not cfg.prompt_sets:
        problems.append("prompt_sets is empty: give at least one {name, file}")
    for name in _duplicates(s.name for s in cfg.prompt_sets):
        problems.append(f"Two prompt sets are named {name!r}")
    for prompt_set in cfg.prompt_sets:
        if not _NAME.match(prompt_set.name):
            problems.append(f"Prompt set name {prompt_set.name!r} must be letters, digits, . _ + - (a directory name)")
        try:
            if not load_prompt_set(prompt_set, heldout_fraction=cfg.heldout_fraction):
                problems.append(f"prompt set {prompt_set.name!r}: none of its prompts is in the held-out split of "
                                f"heldout_fraction {cfg.heldout_fraction}")
        except PromptFileError as err:
            problems.append(f"prompt set {prompt_set.name!r}: {err}")
    return problems


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _duplicates(names) -> list[str]:
    seen, repeated = set(), []
    for name in names:
        if name in seen:
            repeated.append(name)
        seen.add(name)
    return repeated


def _validate_models(models: list[ModelSpec]) -> list[str]:
    from ..families import FAMILIES, check_model_source

    problems = [] if models else ["models is empty: name at least one model (or score a folder with images_dir)"]
    for name in _duplicates(m.name for m in models):
        problems.append(f"Two models are named {name!r}")
    for model in models:
        if not _NAME.match(model.name):
            problems.append(f"Model name {model.name!r} must be letters, digits, . _ + - (it is a directory name)")
        if model.num_inference_steps < 1:
            problems.append(f"model {model.name!r}: num_inference_steps must be >= 1")
        if model.resolution is not None and model.resolution < 1:
            problems.append(f"model {model.name!r}: resolution must be >= 1")
        classes = [cls.pipeline_class for cls in FAMILIES.values()]
        if model.pipeline != "auto" and model.pipeline not in classes:
            problems.append(f"model {model.name!r}: pipeline {model.pipeline!r} is not a supported family's pipeline "
                            f"class; use auto or one of {', '.join(classes)}")
        try:
            check_model_source(model.base, option=f"models[{model.name}].base:")
        except (FileNotFoundError, ValueError) as err:
            problems.append(f"model {model.name!r}: base: {err}")
        if model.lora is not None and (Path(model.lora) / "config.json").is_file():
            _warn_if_not_trained_so(model)
        if model.lora is not None and not (Path(model.lora) / LORA_WEIGHTS_NAME).is_file():
            problems.append(
                f"model {model.name!r}: LoRA directory {model.lora} has no {LORA_WEIGHTS_NAME}. adrpo-train writes it "
                f"into its output_dir when training ends (e.g. `adrpo-train --config configs/tiny_cpu.yaml` writes "
                f"outputs/tiny-cpu); train first, or point lora at such a directory."
            )
    return problems


def _warn_if_not_trained_so(model: ModelSpec) -> None:
    """Warn when a LoRA row samples otherwise than its training run did (the run's config.json): a LoRA is best
    judged with the sampler it was trained with."""
    trained = json.loads((Path(model.lora) / "config.json").read_text())
    differences = [f"{key} {getattr(model, key)} (trained with {trained[key]})"
                   for key in ("resolution", "num_inference_steps", "guidance_scale")
                   if key in trained and getattr(model, key) != trained[key]]
    if differences:
        warnings.warn(f"model {model.name!r} samples otherwise than its LoRA's training run: {', '.join(differences)}",
                      stacklevel=2)


def load_prompt_set(prompt_set: PromptSet, max_prompts: int | None = None,
                    heldout_fraction: float = 0.0) -> list[PromptEntry]:
    """The prompts of a set with their file index and category (a CSV/TSV ``category`` column, else None); with
    ``heldout_fraction`` > 0 only those of its held-out split; ``max_prompts`` keeps that many, evenly spaced."""
    import csv

    path = Path(prompt_set.file)
    prompts = load_prompts(path)
    categories = [None] * len(prompts)
    if path.suffix.lower() in (".csv", ".tsv"):
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        rows = [r for r in csv.DictReader(path.read_text(encoding="utf-8").splitlines(), delimiter=delimiter)
                if (r["prompt"] or "").strip()]  # load_prompts drops the same empty rows
        if "category" in rows[0]:
            categories = [(r["category"] or "").strip() or None for r in rows]
    indices = [i for i, prompt in enumerate(prompts) if not heldout_fraction or is_heldout(prompt, heldout_fraction)]
    if max_prompts is not None and max_prompts < len(indices):
        indices = [indices[i * len(indices) // max_prompts] for i in range(max_prompts)]
    return [PromptEntry(prompt_set.name, i, prompts[i], categories[i]) for i in indices]


def build_arg_parser() -> argparse.ArgumentParser:
    return settings.arg_parser(
        EvalConfig, "adrpo-evaluate", config_help="YAML config file (see configs/eval_*.yaml).",
        description="Generate images with each model, score them with the Table 1 metrics, and write table1.md/.csv/"
        ".tex, results.json and reward_vs_diversity.png. Every config key can be given as --key value (values are "
        "parsed as YAML; a list is several values or one YAML list: --seeds 0 1, or --seeds '[0, 1]'). Score a folder "
        "of images made elsewhere with --images_dir DIR.")


def eval_config_from_args(argv=None) -> EvalConfig:
    args, overrides = settings.overrides_from_args(EvalConfig, build_arg_parser(), argv, error=EvalConfigError)
    return load_eval_config(args.config, overrides, overrides_from="the command line")
