"""Resumable training checkpoints written atomically, and loading their LoRA back (the export is the model
family's: :meth:`adrpo_diffusion.families.base.ModelFamily.export_lora`)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def load_lora_into(transformer, directory: str | os.PathLike) -> None:
    """Load a diffusers-format LoRA (``transformer.``-prefixed PEFT keys, as every family's
    :meth:`~adrpo_diffusion.families.base.ModelFamily.export_lora` writes) into a transformer that already carries an
    adapter of the same shape; every key must match."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(directory) / LORA_WEIGHTS_NAME))
    state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{directory}: LoRA keys that do not match the model's adapter: {unexpected[:5]}")


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step-N`` directories; temporary ones are ignored), oldest first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def resolve_resume(resume: str | None, checkpoints_dir: str | os.PathLike) -> Path | None:
    """``latest`` -> newest complete checkpoint (None if there is none yet); a path must exist."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(checkpoints_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_dir() or not _STEP_DIR.match(path.name):
        raise FileNotFoundError(f"resume_from_checkpoint={resume!r} is not a checkpoints/step-N directory.")
    return path


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def save_checkpoint(accelerator, checkpoints_dir: str | os.PathLike, step: int, total_limit: int) -> Path:
    """``accelerator.save_state`` into a temporary directory, then one rename: a ``step-N`` directory is
    always complete, so a run killed at any moment resumes from the previous one. Keeps the newest
    ``total_limit`` checkpoints (0 keeps all)."""
    root = Path(checkpoints_dir)
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit > 0:
            for _, old in list_checkpoints(root)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
