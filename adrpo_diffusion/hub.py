"""``adrpo-push``: publish a training run's LoRA on the Hugging Face Hub, with a model card written from the run.

    adrpo-push outputs/sd3-medium-adrpo-80gb --repo_id you/sd3-medium-adrpo [--private] [--dry_run]

The upload folder ``<run>/hub/`` is written afresh each time: the LoRA, ``README.md`` (the model card: YAML front
matter with base_model, library_name, tags and the base model's license; method and its options, reward, steps,
the held-out reward before and after training, the sample grid and a ``load_lora_weights`` snippet), the sample grid
``samples/final.png``, and the run's ``config.json`` and ``summary.json``. ``--dry_run`` writes it and lists what
would be uploaded; otherwise ``huggingface_hub`` creates the repository (if needed) and uploads the folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import yaml

from .builtin import PREFIX as BUILTIN_PREFIX
from .checkpoint import LORA_WEIGHTS_NAME
from .evaluation.generate import write_atomic
from .methods import build_method

SAMPLES = Path("samples") / "final.png"
# The files of a run that are uploaded, beside the generated README.md (the LoRA is required, the rest optional).
UPLOADED = [LORA_WEIGHTS_NAME, "config.json", "summary.json", str(SAMPLES)]
# Keys of config.json that describe the machine the run was on, not the model: left out of the upload.
RUN_ONLY = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir")
# Card licenses of known base models (hub id prefix -> front-matter fields); others get `other` and a pointer.
LICENSES = {
    "stabilityai/stable-diffusion-3": {"license": "other", "license_name": "stabilityai-ai-community",
                                       "license_link": "https://stability.ai/community-license-agreement"},
}


class PushError(ValueError):
    pass


def check_run(run_dir: str | Path) -> tuple[dict, dict | None]:
    """The run's config and summary (None when the run measured none); PushError when it cannot be published."""
    run_dir = Path(run_dir)
    if not (run_dir / LORA_WEIGHTS_NAME).is_file():
        raise PushError(f"{run_dir} has no {LORA_WEIGHTS_NAME}: adrpo-train writes it into its output_dir when "
                        "training ends. Point adrpo-push at such a directory.")
    if not (run_dir / "config.json").is_file():
        raise PushError(f"{run_dir} has no config.json (adrpo-train writes it at start); the model card needs the "
                        "run's base model and settings.")
    config = json.loads((run_dir / "config.json").read_text())
    summary_path = run_dir / "summary.json"
    return config, json.loads(summary_path.read_text()) if summary_path.is_file() else None


def _is_hub_id(name: str) -> bool:
    return not Path(name).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def _heldout_line(summary: dict | None) -> str:
    if summary is None or "heldout_reward_before" not in summary:
        return "not measured (the run wrote no held-out reward: `eval_prompts: 0`, or it has not finished)."
    return (f"before {summary['heldout_reward_before']:.4f} -> after {summary['heldout_reward_after']:.4f}, change "
            f"{summary['heldout_improvement']:+.4f} ± {summary['heldout_improvement_se']:.4f} (standard error, paired "
            f"over {summary['heldout_samples']} prompt x seed samples; those seeds were never used in training).")


def _reward_text(reward: str | dict) -> str:
    """The reward as the card writes it: its scorer's name, or ``1 x pickscore + 0.5 x clip - 0.2 x aesthetic`` for
    a weighted sum of several."""
    if isinstance(reward, str):
        return reward
    return " + ".join(f"{weight:g} x {name}" for name, weight in reward.items()).replace("+ -", "- ")


def model_card(config: dict, summary: dict | None, repo_id: str, has_samples: bool) -> str:
    """The README.md of the upload folder: YAML front matter, then the card."""
    base, method = config["pretrained_model"], config["method"]
    license_fields = next((fields for prefix, fields in LICENSES.items() if base.startswith(prefix)),
                          {"license": "other"})
    front = {**({"base_model": base} if _is_hub_id(base) else {}), "library_name": "diffusers",
             "tags": list(dict.fromkeys(["lora", "text-to-image", "diffusers", "adrpo", method])), **license_fields}
    options = dataclasses.asdict(build_method(method, config["method_options"], config["images_per_prompt"]))
    prompts = config["prompt_file"] if isinstance(config["prompt_file"], list) else [config["prompt_file"]]
    steps = summary["steps"] if summary else config["max_steps"]
    reward = _reward_text(config["reward"])
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {repo_id.split('/')[-1]}", "",
        f"A LoRA for {f'[{base}](https://huggingface.co/{base})' if _is_hub_id(base) else f'`{base}`'} fine-tuned "
        "by online "
        f"reinforcement learning with **{method}** "
        "(adrpo_diffusion: ADRPO, Adaptive Divergence Regularized Policy Optimization, and its baselines).", "",
        "## Training", "",
        f"- method: `{method}`, options `{json.dumps(options)}`",
        f"- reward: `{reward}` x {config['reward_scale']:g}, options `{json.dumps(config['reward_options'])}`",
        f"- steps: {steps}; each samples {config['prompts_per_step']} prompts x {config['images_per_prompt']} images "
        f"at {config['resolution']} px, {config['num_inference_steps']} steps, CFG {config['guidance_scale']:g}",
        f"- prompts: {', '.join(f'`{p}`' for p in prompts)}" + (
            f", without the held-out fraction {config['heldout_fraction']:g}" if config.get("heldout_fraction") else ""),
        f"- LoRA rank {config['lora_rank']}, alpha {config['lora_alpha']:g}; learning rate {config['learning_rate']:g}; "
        f"seed {config['seed']}", "",
        f"**Held-out reward** (`{reward}`): {_heldout_line(summary)}", "",
    ]
    if has_samples:
        which = f" ({summary['heldout_prompts']})" if summary and "heldout_prompts" in summary else ""
        lines += ["## Samples", "", f"After training, one row per prompt, one column per seed{which}: "
                  f"![samples]({SAMPLES.as_posix()})", ""]
    lines += ["## Use", "", "```python", *usage_snippet(config, repo_id), "```", ""]
    lines += [
        "`config.json` holds every training setting and `summary.json` the held-out numbers. License: "
        + (f"that of the base model, `{license_fields['license_name']}`." if "license_name" in license_fields
           else f"that of the base model ({base})."),
        "",
    ]
    return "\n".join(lines)


def usage_snippet(config: dict, repo_id: str) -> list[str]:
    """Python lines that load the base pipeline and the LoRA and draw one image as in training: a hub id or a local
    directory as is; a ``builtin:`` model through :func:`adrpo_diffusion.builtin.resolve_model` (on the CPU, float32);
    SD3 trained without T5 (``drop_t5``, the tiny SD3 models) with ``text_encoder_3=None, tokenizer_3=None``."""
    base = config["pretrained_model"]
    builtin = base.startswith(BUILTIN_PREFIX)
    sd3 = base.startswith("stabilityai/stable-diffusion-3") or base.startswith(BUILTIN_PREFIX + "tiny-sd3")
    pipeline = "StableDiffusion3Pipeline" if sd3 else "DiffusionPipeline"
    arguments = ["resolve_model(BASE)" if builtin else "BASE"]
    if sd3 and (config.get("drop_t5") or builtin):
        arguments.append("text_encoder_3=None, tokenizer_3=None")  # trained without T5
    arguments.append("dtype=torch.float32" if builtin else "dtype=torch.bfloat16")
    return [
        "import torch", f"from diffusers import {pipeline}",
        *(["from adrpo_diffusion.builtin import resolve_model  # the toolkit's built-in test model"] if builtin else []),
        "", f'BASE = "{base}"',
        f"pipe = {pipeline}.from_pretrained({', '.join(arguments)}).to(\"{'cpu' if builtin else 'cuda'}\")",
        f'pipe.load_lora_weights("{repo_id}")',
        f"image = pipe(\"A green pear and a black umbrella\", num_inference_steps={config['num_inference_steps']}, "
        f"guidance_scale={config['guidance_scale']:g}, height={config['resolution']},",
        f"             width={config['resolution']}, max_sequence_length={config['max_sequence_length']}).images[0]"
        "  # as in training",
    ]


def write_upload_folder(run_dir: str | Path, repo_id: str) -> Path:
    """``<run>/hub/`` afresh: the run's files to upload and the generated README.md. Returns the folder."""
    run_dir = Path(run_dir)
    config, summary = check_run(run_dir)
    folder = run_dir / "hub"
    if folder.exists():
        shutil.rmtree(folder)
    for name in UPLOADED:
        if (run_dir / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / name, folder / name)  # new files under the umask (copy2 keeps old modes)
    uploaded_config = {key: value for key, value in config.items() if key not in RUN_ONLY}
    write_atomic(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(uploaded_config, indent=2)))
    card = model_card(config, summary, repo_id, has_samples=(folder / SAMPLES).is_file())
    write_atomic(folder / "README.md", lambda tmp: tmp.write_text(card, encoding="utf-8"))
    return folder


def push(run_dir: str | Path, repo_id: str, private: bool = False, dry_run: bool = False) -> Path:
    """Write the upload folder and, unless ``dry_run``, upload it to ``repo_id``. Every check comes first."""
    from huggingface_hub import HfApi, get_token

    check_run(run_dir)
    if not dry_run and get_token() is None:
        raise PushError("Not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN), or use "
                        "--dry_run to write the upload folder only.")
    folder = write_upload_folder(run_dir, repo_id)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    listing = "\n".join(f"  {p.relative_to(folder).as_posix()} ({p.stat().st_size:,} bytes)" for p in files)
    if dry_run:
        print(f"Dry run: would upload {folder} to {'private ' if private else ''}repository {repo_id}:\n{listing}")
        return folder
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload LoRA trained with adrpo_diffusion")
    print(f"Uploaded to {url}:\n{listing}")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="adrpo-push", description="Publish a training run's LoRA on the Hugging Face "
                                     "Hub with a model card written from the run; --dry_run writes <run_dir>/hub/ only.")
    parser.add_argument("run_dir", help="A training run's output_dir (pytorch_lora_weights.safetensors, config.json).")
    parser.add_argument("--repo_id", required=True, help="Hub repository, e.g. you/sd3-medium-adrpo.")
    parser.add_argument("--private", action="store_true", help="Create the repository private.")
    parser.add_argument("--dry_run", action="store_true", help="Write <run_dir>/hub/ and list it; upload nothing.")
    args = parser.parse_args(argv)
    try:
        push(args.run_dir, args.repo_id, private=args.private, dry_run=args.dry_run)
    except PushError as err:
        print(f"adrpo-push: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
