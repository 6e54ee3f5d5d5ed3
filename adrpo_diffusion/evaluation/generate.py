"""Image generation for evaluation: every (model, seed, prompt, k) image once, resumable.

Layout: ``<output_dir>/images/<model>/<seed>/<prompt set>/<prompt index>_<k>.png`` beside a ``.json`` record
(model, prompt, prompt set, prompt index, category, seed, k, the image's generator seed, and the generation
settings). An image counts as done when its record exists and holds the current settings; the PNG is written
first and both files are written to a temporary name and renamed, so an interrupted run never leaves a partial
image that looks done, and a rerun generates only what is missing (or what was made with other settings).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import LORA_WEIGHTS_NAME
from ..seeds import image_generators, image_seed
from ..utils import file_sha1, write_atomic
from .config import EvalConfig, ModelSpec, PromptEntry


class LoraMismatchError(ValueError):
    pass


@dataclass
class ImageRecord:
    """One image and what it shows. ``path`` is relative to the images root."""

    path: str
    model: str
    prompt_set: str
    prompt_index: int
    prompt: str
    category: str | None
    seed: int
    k: int

    def group(self) -> tuple:
        """The K images of one (model, seed, prompt) form a group (ClipDiversity's unit)."""
        return self.model, self.seed, self.prompt_set, self.prompt_index


def model_settings(model: ModelSpec, cfg: EvalConfig) -> dict:
    """Everything that decides a model's images; an image made with other settings is generated again. The LoRA
    is identified by its file's hash (not its path), so retraining into the same directory counts as a change."""
    settings = {k: v for k, v in asdict(model).items() if k not in ("name", "lora", "cpu_offload")}
    settings["lora_sha1"] = file_sha1(Path(model.lora) / LORA_WEIGHTS_NAME) if model.lora else None
    settings["dtype"] = str(cfg.resolved_dtype()).removeprefix("torch.")
    return settings


# Library warnings that say nothing here: our LoRAs train the transformer only (load_lora_checked checks what a LoRA
# reaches), and the tokenizer's length warning repeats diffusers' truncation warning, which is kept.
_SILENCED = ("No LoRA keys associated to", "Token indices sequence length is longer than")


class _OncePerCause(logging.Filter):
    """Lets each distinct library warning through once, and none of ``_SILENCED``. CLIP's truncation warning, logged
    per batch with the cut text of every prompt (padded with hundreds of ``<|endoftext|>``), is cut to its cause and
    shown once for all prompts."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_SILENCED):
            return False
        if "can only handle sequences up to" in message:
            message = message.split(":")[0] + " (for some prompts; shown once)"
            record.msg, record.args = message, ()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@contextlib.contextmanager
def warnings_once():
    """Within the block, diffusers' and transformers' logs show every warning once (:class:`_OncePerCause`)."""
    import diffusers  # noqa: F401  (sets up the handlers of their logs)
    import transformers  # noqa: F401

    handlers = logging.getLogger("diffusers").handlers + logging.getLogger("transformers").handlers
    once = _OncePerCause()
    for handler in handlers:
        handler.addFilter(once)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(once)


def load_model(model: ModelSpec, dtype: torch.dtype, device: str):
    """The model's family (:func:`adrpo_diffusion.families.load_family`) on ``device``, with its LoRA loaded and
    checked."""
    from ..families import load_family

    family = load_family(model.base, dtype, guidance_scale=model.guidance_scale, pipeline=model.pipeline,
                         load_kwargs=model.load_kwargs)
    pipe = family.pipe
    if model.lora is not None:
        load_lora_checked(pipe, model.lora, model.base)
    if model.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return family


def load_lora_checked(pipe, directory: str, base: str, adapter_name: str = "evaluated") -> None:
    """``pipe.load_lora_weights(directory)``, then a check that the adapter reached as many layers as the file has
    LoRA layers: diffusers only warns (or says nothing) when keys match no module, and would otherwise evaluate
    the base model under the LoRA's name."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open

    with safe_open(str(Path(directory) / LORA_WEIGHTS_NAME), "pt") as handle:
        names = handle.keys()
    layers = sum(1 for name in names if name.endswith(("lora_A.weight", "lora_down.weight")))
    hint = f"Is {directory} a LoRA trained on {base}?"
    try:
        pipe.load_lora_weights(directory, adapter_name=adapter_name)
    except (ValueError, RuntimeError, KeyError) as err:
        first_lines = "\n".join(str(err).splitlines()[:3])  # size-mismatch errors list every tensor
        raise LoraMismatchError(f"The LoRA in {directory} does not fit {base}: {first_lines}\n...\n{hint}") from err
    touched = sum(1 for component in pipe.components.values() if isinstance(component, torch.nn.Module)
                  for module in component.modules()
                  if isinstance(module, BaseTunerLayer) and adapter_name in module.lora_A)
    if touched == 0 or touched < layers:
        raise LoraMismatchError(f"The LoRA in {directory} has {layers} LoRA layers but only {touched} matched a layer "
                                f"of {base}. {hint}")


def _record_path(root: Path, record: ImageRecord) -> Path:
    return root / Path(record.path).with_suffix(".json")


def _done(root: Path, record: ImageRecord, settings: dict) -> bool:
    sidecar = _record_path(root, record)
    if not (sidecar.is_file() and (root / record.path).is_file()):
        return False
    try:
        saved = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return saved.get("settings") == settings and saved.get("prompt") == record.prompt


def generate_images(cfg: EvalConfig, prompts: list[PromptEntry], root: Path) -> list[ImageRecord]:
    """Every model's images under ``root`` (missing ones generated); returns the records of all of them."""
    from diffusers.training_utils import free_memory  # gc, and the accelerator's cache emptied

    device, dtype = cfg.resolved_device(), cfg.resolved_dtype()
    records = []
    for model in cfg.models:
        settings = model_settings(model, cfg)
        planned = [ImageRecord(f"{model.name}/{seed}/{p.prompt_set}/{p.index:04d}_{k}.png", model.name, p.prompt_set,
                               p.index, p.prompt, p.category, seed, k)
                   for seed in cfg.seeds for p in prompts for k in range(cfg.images_per_prompt)]
        records += planned
        todo = [r for r in planned if not _done(root, r, settings)]
        print(f"[{model.name}] {len(planned) - len(todo)} of {len(planned)} images already generated")
        if not todo:
            continue
        family = load_model(model, dtype, device)
        try:
            for start in tqdm(range(0, len(todo), cfg.batch_size), desc=f"generate {model.name}", unit="batch"):
                batch = todo[start : start + cfg.batch_size]
                images = run_pipeline(family, model, model.resolution, batch)
                for record, image in zip(batch, images):
                    _save(root, record, image, settings)
        finally:
            del family
            free_memory()
    return records


def run_pipeline(family, model: ModelSpec, resolution: int, batch: list[ImageRecord]) -> list:
    """One pipeline call of the model's family for a batch of images, each with its own seeded generator (PIL images
    out)."""
    generators = image_generators((r.seed, r.prompt_index, r.k) for r in batch)
    return family.generate([r.prompt for r in batch], num_inference_steps=model.num_inference_steps,
                           resolution=resolution, generators=generators, **model.call_kwargs)


def _save(root: Path, record: ImageRecord, image, settings: dict) -> None:
    path = root / record.path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))
    sidecar = {**asdict(record), "image_seed": image_seed(record.seed, record.prompt_index, record.k),
               "settings": settings}
    del sidecar["path"]
    write_atomic(_record_path(root, record), lambda tmp: tmp.write_text(json.dumps(sidecar, indent=1)))
