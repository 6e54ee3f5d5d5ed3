"""End-to-end benchmark of the real trainer: ``adrpo-benchmark --e2e``.

Builds an SD3 pipeline at random initialisation and a CLIP reward model, saves them with ``save_pretrained`` into
``--model_dir`` (once: a later call with the same architecture reuses them), then runs the REAL trainer
(:class:`~adrpo_diffusion.trainer.Trainer` on ``--config`` plus each variant's overrides, loading the saved
directories through ``from_pretrained`` as it loads a hub id) for ``--steps`` steps per variant, the variants one
after another in this process.

- ``--arch sd3-medium``: the full SD3-medium transformer and VAE, CLIP-L, OpenCLIP-bigG and (unless ``--no_t5``)
  T5-XXL at their real sizes on a character tokenizer, and a CLIP ViT-L/14-sized reward model: the FLOPs and memory
  of the released weights, no download. ``--arch tiny``: the same classes at tiny sizes, for the CPU.
- A variant is ``baseline`` (the config as is; always run, first) or ``NAME:KEY=VALUE[,KEY=VALUE...]``: config keys
  with values as ``adrpo-train`` takes them on its command line (YAML).

Reported per variant, from the trainer's ``metrics.jsonl``: the seconds of each phase (``seconds_rollout``: sampling
and VAE decode; ``seconds_reward``; ``seconds_train``) and of the whole step, for the first step (warm-up,
compilation) and as the median of the later steps (the steady state); rollout images/s and MFU (steady state:
``num_inference_steps x (2 with CFG)`` transformer forwards per image, counted by :func:`transformer_flops`; the
decode is in the time but not in the FLOPs); the time to the first step (the trainer's construction, which loads
every model and encodes every prompt, plus the first step); the peak GPU memory
(``torch.cuda.max_memory_allocated``) of start-up (construction, text encoders included) and of training. The
benchmark sets the keys of :data:`SET_BY_BENCHMARK` itself (no held-out check, no sample grids, no checkpoints
before the end).

    adrpo-benchmark --e2e --arch sd3-medium --config sd3_medium_80gb --steps 4 \\
        --variant compile:compile_transformer=true --output benchmarks/e2e_sd3_medium_80gb_h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import statistics
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path

import torch

from .benchmark_models import (
    CLIP_BIGG,
    CLIP_L,
    PEAK_BF16_TFLOPS,
    SD3_MEDIUM_TRANSFORMER,
    SD3_VAE,
    T5_XXL,
    clip_reward_model,
    default_dtype,
    sd3_text_encoders,
    transformer_flops,
)
from .utils import cache_dir, replace_directory

_TINY_CLIP_TEXT = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       projection_dim=32)
ARCHS = {
    "sd3-medium": dict(transformer=SD3_MEDIUM_TRANSFORMER, vae=SD3_VAE, text_encoders=[CLIP_L, CLIP_BIGG, T5_XXL]),
    "tiny": dict(
        transformer=dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32,
                         pooled_projection_dim=64, pos_embed_max_size=32),
        vae=dict(SD3_VAE, latent_channels=4, block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, sample_size=32),
        text_encoders=[_TINY_CLIP_TEXT, dict(_TINY_CLIP_TEXT, hidden_act="gelu"),
                       dict(vocab_size=514, d_model=64, d_ff=64, d_kv=16, num_heads=4, num_layers=2,
                            feed_forward_proj="gated-gelu")],
    ),
}
DEFAULT_CONFIG = {"sd3-medium": "sd3_medium_80gb", "tiny": "tiny_cpu"}
MARKER = "adrpo-e2e.json"  # written last into a model directory: what was built
PHASES = ("rollout", "reward", "train")
# Config keys the benchmark sets in every run; a variant may not change them.
SET_BY_BENCHMARK = ("pretrained_model", "reward", "reward_options", "max_steps", "output_dir", "overwrite_output_dir",
                    "checkpointing_steps", "eval_prompts", "sample_every", "report_to")


@dataclasses.dataclass
class Variant:
    name: str
    overrides: dict[str, str]  # config key -> value, as adrpo-train takes it on the command line

    def label(self) -> str:
        return self.name + (f" ({', '.join(f'{k}={v}' for k, v in self.overrides.items())})" if self.overrides else "")


def parse_variant(text: str) -> Variant:
    """``baseline`` or ``NAME:KEY=VALUE[,KEY=VALUE...]`` (a comma followed by ``KEY=`` starts the next override, so
    YAML values may hold commas)."""
    usage = f"variant {text!r}: give baseline (the config as is) or NAME:KEY=VALUE[,KEY=VALUE...]"
    name, colon, body = (part.strip() for part in text.partition(":"))
    if not colon:
        if name != "baseline":
            raise ValueError(usage)
        return Variant("baseline", {})
    if not re.fullmatch(r"[\w.+-]+", name) or name == "baseline":
        raise ValueError(f"{usage} (NAME: letters, digits, '_', '.', '+', '-'; baseline takes no overrides)")
    overrides = {}
    for pair in re.split(r",(?=\s*\w+\s*=)", body):
        key, equals, value = (part.strip() for part in pair.partition("="))
        if not (equals and re.fullmatch(r"\w+", key) and value):
            raise ValueError(f"{usage}: {pair.strip()!r} is not KEY=VALUE")
        overrides[key] = value
    return Variant(name, overrides)


def parse_variants(texts: list[str]) -> list[Variant]:
    """The variants in order, the baseline first (added when not named); names unique; no key the benchmark sets."""
    variants = [parse_variant(text) for text in texts]
    if not any(v.name == "baseline" for v in variants):
        variants.insert(0, Variant("baseline", {}))
    variants.sort(key=lambda v: v.name != "baseline")
    names = [v.name for v in variants]
    for variant in variants:
        if names.count(variant.name) > 1:
            raise ValueError(f"variant name {variant.name!r} is given more than once")
        fixed = sorted(set(variant.overrides) & set(SET_BY_BENCHMARK))
        if fixed:
            raise ValueError(f"variant {variant.name!r}: {', '.join(fixed)} is set by the benchmark itself")
    return variants


def config_path(name: str) -> Path:
    """``configs/<name>.yaml`` (relative to the working directory, as the configs' prompt files are), or a .yaml path."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else Path("configs") / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in Path("configs").glob("*.yaml"))) or "none here"
        raise ValueError(f"Unknown config {name!r}: no file {path} (run from the repository root; configs: {available})")
    return path


def trainer_argv(config: Path, variant: Variant, models: Path, output_dir: Path, steps: int) -> list[str]:
    """``adrpo-train``'s arguments for one variant: the config, the benchmark's keys, the variant's overrides."""
    reward_dtype = "float16" if torch.cuda.is_available() else "float32"
    fixed = dict(pretrained_model=str(models / "pipeline"), reward="clip",
                 reward_options=json.dumps({"model": str(models / "reward"), "dtype": reward_dtype}), max_steps=str(steps),
                 output_dir=str(output_dir), overwrite_output_dir="true", checkpointing_steps="0", eval_prompts="0",
                 sample_every="0", report_to="none")
    argv = ["--config", str(config)]
    for key, value in {**fixed, **variant.overrides}.items():
        argv += [f"--{key}", value]
    return argv


# ---------------------------------------------------------------------------------------------------- the models
def build_models(arch: str, t5: bool, directory: Path) -> None:
    """The SD3 pipeline (``directory/pipeline``) and the CLIP reward model (``directory/reward``) at random init,
    built on the GPU when there is one (bf16 pipeline, fp16 reward, as the configs load them), else in fp32."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    spec = ARCHS[arch]
    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    reward, processor = clip_reward_model(arch, device, torch.float16 if cuda else torch.float32)
    reward.save_pretrained(directory / "reward")
    processor.save_pretrained(directory / "reward")
    del reward
    with default_dtype(dtype), device:
        transformer = SD3Transformer2DModel(**spec["transformer"])
        vae = AutoencoderKL(**spec["vae"])
    encoders = sd3_text_encoders(spec["text_encoders"] if t5 else spec["text_encoders"][:2], device, dtype)
    tokenizer = processor.tokenizer  # the character tokenizer serves every text encoder slot
    StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=encoders[2] if t5 else None, tokenizer_3=tokenizer if t5 else None,
    ).save_pretrained(directory / "pipeline")


def built(directory: Path) -> dict | None:
    """What ``directory`` holds (its marker: the architecture and whether with T5), None when it does not exist.
    A directory this benchmark did not write is refused (a rebuild replaces the directory)."""
    if not directory.exists():
        return None
    if not (directory / MARKER).is_file():
        raise FileExistsError(f"--model_dir {directory} exists and was not written by adrpo-benchmark --e2e "
                              f"(no {MARKER}); choose another directory")
    return json.loads((directory / MARKER).read_text())


def prepare_models(arch: str, t5: bool, directory: Path) -> float | None:
    """Build the models into ``directory`` unless it already holds this build. Returns the seconds the build took,
    None when reused."""
    spec = {"arch": arch, "t5": t5}
    if built(directory) == spec:
        print(f"[benchmark] reusing the models in {directory}", flush=True)
        return None
    print(f"[benchmark] building the {arch} models ({'with' if t5 else 'without'} T5) into {directory}", flush=True)
    start = time.perf_counter()

    def build(tmp: Path) -> None:
        build_models(arch, t5, tmp)
        (tmp / MARKER).write_text(json.dumps(spec))

    replace_directory(directory, build)
    free_memory()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------- one variant
def free_memory() -> None:
    """diffusers' ``free_memory`` (garbage collection, the accelerator's cache emptied) after dropping compiled graphs,
    which hold the compiled transformer."""
    from diffusers.training_utils import free_memory as collect

    torch._dynamo.reset()
    collect()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def step_seconds(row: dict) -> dict[str, float]:
    seconds = {phase: row[f"seconds_{phase}"] for phase in PHASES}
    return {**seconds, "step": sum(seconds.values())}


def run_variant(variant: Variant, argv: list[str], peak_tflops: float | None) -> dict:
    """Construct the trainer, train, and measure (module docstring)."""
    from .config import config_from_args
    from .trainer import Trainer

    cfg = config_from_args(argv)
    allocated_gb_at_start = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
    reset_peak()
    start = time.perf_counter()
    trainer = Trainer(cfg)
    try:
        construct_seconds = time.perf_counter() - start
        startup_peak_gb = peak_gb()
        reset_peak()
        trainer.train()
        train_peak_gb = peak_gb()
        transformer = trainer.transformer
        text_tokens = trainer.cache.tensors["embeds"].shape[1]
        image_tokens = (cfg.resolution // trainer.family.pipe.vae_scale_factor // transformer.config.patch_size) ** 2
        flops = transformer_flops(transformer.config, image_tokens, text_tokens)
    finally:
        del trainer
        free_memory()
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines() if line]
    first = step_seconds(rows[0])
    steady = {key: statistics.median(step_seconds(row)[key] for row in rows[1:]) for key in first}
    images_per_step = cfg.prompts_per_step * cfg.images_per_prompt
    forwards = cfg.num_inference_steps * (2 if cfg.guidance_scale > 1 else 1)
    forward_flops = flops["linear"] + flops["attention"]
    images_per_s = images_per_step / steady["rollout"]
    rollout_tflops = images_per_s * forwards * forward_flops / 1e12
    return {
        "name": variant.name, "overrides": variant.overrides, "images_per_step": images_per_step,
        "rollout_forwards_per_image": forwards, "image_tokens": image_tokens, "text_tokens": text_tokens,
        "forward_gflops_per_image": forward_flops / 1e9,
        "first_step_seconds": first, "steady_seconds": steady, "steady_steps": len(rows) - 1,
        "rollout_images_per_s": images_per_s, "rollout_tflops": rollout_tflops,
        "rollout_mfu": rollout_tflops / peak_tflops if peak_tflops else None,
        "construct_seconds": construct_seconds, "time_to_first_step_seconds": construct_seconds + first["step"],
        "allocated_gb_at_start": allocated_gb_at_start, "startup_peak_gb": startup_peak_gb, "train_peak_gb": train_peak_gb,
        "metrics": rows,
    }


# ---------------------------------------------------------------------------------------------------- the report
def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def markdown(variants: list[dict]) -> str:
    """One row per variant; phase seconds are the steady-state medians, the first step's total beside them."""
    header = ["variant", "rollout s", "reward s", "train s", "step s", "first step s", "rollout images/s", "rollout MFU",
              "time to first step s", "start-up peak GB", "train peak GB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        label = Variant(v["name"], v["overrides"]).label()
        if "steady_seconds" not in v:  # skipped or failed
            cells = [label, v.get("skipped") or f"error: {v['error']}"] + ["-"] * (len(header) - 2)
        else:
            steady = v["steady_seconds"]
            cells = [label, *(f"{steady[key]:.2f}" for key in (*PHASES, "step")), f"{v['first_step_seconds']['step']:.2f}",
                     f"{v['rollout_images_per_s']:.2f}", _cell(v["rollout_mfu"], "{:.1%}"),
                     f"{v['time_to_first_step_seconds']:.1f}", _cell(v["startup_peak_gb"], "{:.1f}"),
                     _cell(v["train_peak_gb"], "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adrpo-benchmark --e2e", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    parser.add_argument("--arch", choices=sorted(ARCHS), default="tiny",
                        help="the pipeline built for the run: tiny (CPU, seconds) or a real architecture at full size "
                             "with random weights (a GPU)")
    parser.add_argument("--config", default=None, help="configs/<name>.yaml or a .yaml path (default: sd3_medium_80gb "
                                                       "for sd3-medium, tiny_cpu for tiny)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE...]",
                        help="repeatable; baseline (the config as is) always runs first")
    parser.add_argument("--steps", type=int, default=4, help="training steps per variant (>= 2: the first step, then "
                                                             "the steady state)")
    parser.add_argument("--no_t5", action="store_true", help="build the pipeline without T5-XXL")
    parser.add_argument("--model_dir", default=None, help="where the models are built (default: in the ADRPO cache, "
                                                          "one directory per architecture); reused when it holds them")
    parser.add_argument("--runs_dir", default=None, help="the trainer's output directories (default: a temporary one)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="bf16 peak of the device for MFU (default: by "
                                                                        "name)")
    parser.add_argument("--time_budget", type=float, default=float("inf"),
                        help="seconds: skip a variant when the time spent plus the longest variant so far exceeds it")
    parser.add_argument("--output", default=None, help="JSON report (default: benchmarks/e2e_<arch>_<config>.json)")
    return parser


def main(argv: list[str]) -> int:
    from .config import ConfigError, config_from_args

    start = time.perf_counter()
    args = build_parser().parse_args(argv)
    # Every check that needs no model, first.
    try:
        if args.steps < 2:
            raise ValueError(f"--steps must be >= 2 (the first step, then the steady state), got {args.steps}")
        config = config_path(args.config or DEFAULT_CONFIG[args.arch])
        variants = parse_variants(args.variant)
        t5 = not args.no_t5
        models = Path(args.model_dir or cache_dir() / f"e2e-{args.arch}{'' if t5 else '-no-t5'}")
        for variant in variants:
            try:
                config_from_args(trainer_argv(config, variant, models, Path("unused"), args.steps))
            except ConfigError as err:
                raise ConfigError(f"variant {variant.name!r}: {err}") from None
        built(models)
    except (ConfigError, ValueError, FileExistsError) as err:
        print(f"adrpo-benchmark --e2e: error: {err}", file=sys.stderr)
        return 2

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
    output = Path(args.output or f"benchmarks/e2e_{args.arch}_{config.stem}.json")
    build_seconds = prepare_models(args.arch, t5, models)
    report = {"command": " ".join(["adrpo-benchmark --e2e", *argv]), "device": device,
              **{package: version(package) for package in ("torch", "diffusers", "transformers", "peft", "accelerate")},
              "arch": args.arch, "t5": t5, "config": str(config), "steps": args.steps, "peak_tflops": peak_tflops,
              "model_dir": str(models), "build_seconds": build_seconds, "variants": []}
    print(json.dumps({k: v for k, v in report.items() if k != "variants"}), flush=True)
    failed, longest = 0, 0.0
    with (contextlib.nullcontext(args.runs_dir) if args.runs_dir else tempfile.TemporaryDirectory()) as runs:
        for variant in variants:
            spent = time.perf_counter() - start
            if spent + longest > args.time_budget:
                print(f"[benchmark] time budget {args.time_budget:.0f} s: {spent:.0f} s spent and the longest variant "
                      f"took {longest:.0f} s; skipping {variant.name}", flush=True)
                result = {"name": variant.name, "overrides": variant.overrides, "skipped": "time budget"}
            else:
                print(f"[benchmark] variant {variant.label()}", flush=True)
                began = time.perf_counter()
                try:
                    result = run_variant(variant, trainer_argv(config, variant, models, Path(runs) / variant.name,
                                                               args.steps), peak_tflops)
                except Exception as err:  # one failing variant (out of memory, say) must not lose the others' numbers
                    traceback.print_exc()
                    result = {"name": variant.name, "overrides": variant.overrides,
                              "error": f"{type(err).__name__}: {err}"[:500]}
                    failed += 1
                    free_memory()
                result["seconds"] = time.perf_counter() - began
                longest = max(longest, result["seconds"])
            report["variants"].append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "metrics"}), flush=True)
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(report, indent=2))  # after each variant: nothing lost
    print(markdown(report["variants"]))
    return 1 if failed else 0
