"""Resumable training checkpoints written atomically, and loading their LoRA back (the export is the model
family's: :meth:`adrpo_diffusion.families.base.ModelFamily.export_lora`).

A checkpoint ``step-N`` holds ``manifest.json``: the run's config and the size and SHA-1 of every file. Resuming
checks both before any model loads: a missing, truncated or altered file (``latest`` then falls back to the previous
checkpoint), and config keys that change what the checkpoint's state means (:data:`config.RESUME_MAY_CHANGE` lists
the keys a resumed run may change).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

from .faults import write_failed
from .utils import umask_permissions

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
MANIFEST_NAME = "manifest.json"
# What a training run writes into its output_dir (README, "What a run writes").
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", LORA_WEIGHTS_NAME, "checkpoints", "samples", "logs")
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    pass


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


TRAINER_STATE_NAME = "trainer_state.pt"


def save_state_dicts(objects: dict, directory: str | os.PathLike) -> None:
    """``{name: obj.state_dict()}`` of the trainer's own objects (LR schedule, prompt sampler, the methods' copies of
    the policy) into ``trainer_state.pt``."""
    import torch

    torch.save({name: obj.state_dict() for name, obj in objects.items()}, Path(directory) / TRAINER_STATE_NAME)


def load_state_dicts(objects: dict, directory: str | os.PathLike) -> None:
    """The states :func:`save_state_dicts` wrote, read as tensors and plain values only (``torch.load(...,
    weights_only=True)``, numpy's types allowed): a file that holds anything else, such as a pickle crafted to run
    code when loaded, is refused with :class:`CheckpointError` before anything in it runs. (accelerate unpickles the
    objects registered with it with ``weights_only=False``; hence these are not registered.)"""
    from accelerate.utils import load

    path = Path(directory) / TRAINER_STATE_NAME
    try:
        states = load(path, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise unsafe_file_error(path, err) from None
    for name, obj in objects.items():
        obj.load_state_dict(states[name])


def check_rng_state(directory: str | os.PathLike, process_index: int) -> None:
    """This process's ``random_states_<i>.pkl`` can be read safely. accelerate skips random states it cannot load
    with only a log line, and the resumed run would then silently not be the uninterrupted one."""
    from accelerate.utils import load

    path = Path(directory) / f"random_states_{process_index}.pkl"
    try:
        load(path)
    except pickle.UnpicklingError as err:
        raise unsafe_file_error(path, err) from None
    except Exception as err:  # missing, or not a torch.save file
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err}); without it the run cannot "
                              "resume exactly. Resume from another checkpoint.") from None


def unsafe_file_error(path, err: Exception) -> CheckpointError:
    reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return CheckpointError(f"{path} holds more than tensors and plain values, so it was not loaded (a pickle can run "
                           f"code when loaded; a checkpoint written by adrpo_diffusion never needs that): {reason}")


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step-N`` directories; temporary ones are ignored), oldest first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def run_files(output_dir: str | os.PathLike) -> list[Path]:
    """The files and directories of a training run (:data:`RUN_FILES`) that ``output_dir`` holds."""
    return [path for name in RUN_FILES if (path := Path(output_dir) / name).exists()]


def write_manifest(directory: Path, config: dict) -> None:
    """``manifest.json`` in a checkpoint: ``config`` and the size and SHA-1 of every file in ``directory``."""
    from .utils import file_sha1

    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha1": file_sha1(p)}
             for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / MANIFEST_NAME).write_text(json.dumps({"config": config, "files": files}, indent=1))


def _manifest_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` is not complete (naming the file), or None."""
    from .utils import file_sha1

    try:
        files = json.loads((path / MANIFEST_NAME).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path / MANIFEST_NAME} is missing or unreadable (the checkpoint is incomplete or from an older version)"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{file} is truncated or changed ({file.stat().st_size} bytes, {expected['size']} were written)"
        if file_sha1(file) != expected["sha1"]:
            return f"{file} is corrupted (its SHA-1 differs from the one written with it)"
    return None


def config_changes(path: Path, config: dict) -> list[str]:
    """The keys of ``config`` that differ from the checkpoint's and may not change on resume, as readable lines."""
    from .config import RESUME_MAY_CHANGE

    saved = json.loads((path / MANIFEST_NAME).read_text())["config"]
    config = json.loads(json.dumps(config))  # tuples -> lists, as saved
    keys = sorted((saved.keys() | config.keys()) - set(RESUME_MAY_CHANGE))
    return [f"{key}: {saved.get(key)!r} in the checkpoint, {config.get(key)!r} now"
            for key in keys if saved.get(key) != config.get(key)]


def resolve_resume(resume: str | None, checkpoints_dir: str | os.PathLike, config: dict, log=print) -> Path | None:
    """The checkpoint to resume, checked to be complete and made with a compatible ``config``, or None for a new run.

    ``latest`` -> the newest complete checkpoint (an incomplete one is skipped with a warning through ``log``; None
    if there is no checkpoint yet); a ``checkpoints/step-N`` path must exist and be complete."""
    if resume is None:
        return None
    if resume == "latest":
        candidates = [path for _, path in reversed(list_checkpoints(checkpoints_dir))]
        if not candidates:
            return None
    else:
        path = Path(resume)
        if not path.is_dir() or not _STEP_DIR.match(path.name):
            raise FileNotFoundError(f"resume_from_checkpoint={resume!r} is not a checkpoints/step-N directory.")
        candidates = [path]
    problems = []
    for path in candidates:
        problem = _manifest_problem(path)
        if problem is None:
            changes = config_changes(path, config)
            if changes:
                raise CheckpointError(
                    f"Cannot resume from {path}: the config differs from the checkpoint's in keys that decide the "
                    "model, the optimizer state or what the run optimises:\n  " + "\n  ".join(changes) + "\nResume "
                    "with the checkpoint's values, or start a new run in another output_dir.")
            return path
        problems.append(problem)
        if resume == "latest":
            log(f"WARNING: not resuming from {path}: {problem}"
                + ("; trying the previous checkpoint" if path != candidates[-1] else ""))
    raise CheckpointError(f"Cannot resume from {resume!r}: no complete checkpoint (" + "; ".join(problems) + "). Resume "
                          "from another checkpoints/step-N, or start over with --overwrite_output_dir true.")


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def save_checkpoint(accelerator, checkpoints_dir: str | os.PathLike, step: int, total_limit: int, config: dict) -> Path:
    """``accelerator.save_state`` and the manifest (``config``, every file's size and SHA-1) into a temporary
    directory, then one rename: a ``step-N`` directory is always complete, so a run killed at any moment resumes
    from the previous one. Keeps the newest ``total_limit`` checkpoints (0 keeps all)."""
    root = Path(checkpoints_dir)
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_manifest(tmp, config)
            umask_permissions(tmp)
    except OSError as err:  # a full disk, an I/O error: the previous checkpoints stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(root)
        raise write_failed(final, err, "the previous checkpoint, " + (str(previous[-1][1]) if previous else "none")
                           + ", is intact") from err
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit > 0:
            for _, old in list_checkpoints(root)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
