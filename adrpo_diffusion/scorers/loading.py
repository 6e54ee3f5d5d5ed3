"""Weight loading shared by the evaluation scorers: one clear ``FileNotFoundError`` when weights are missing.

Offline (``HF_HUB_OFFLINE=1``) a hub id only works when the Hugging Face cache already holds it; otherwise the
error names the file and the scorer option that takes a local path instead.
"""

from __future__ import annotations

import os


def checkpoint_file(path: str | None, repo_id: str, filename: str, option: str) -> str:
    """``path`` when given (it must exist), else ``filename`` from the hub repo ``repo_id`` (cached after the
    first download)."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{option}={str(path)!r}: no such file")
        return str(path)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename)
    except OSError as err:  # offline cache misses and HTTP errors are both OSErrors
        raise FileNotFoundError(
            f"Could not get {filename!r} from the Hugging Face hub repo {repo_id!r} ({type(err).__name__}: {err}). "
            f"Download it where there is network and pass its local path as {option}=..."
        ) from err


def from_pretrained(loader, name: str, option: str, **kwargs):
    """``loader.from_pretrained(name, **kwargs)``, turning "not found" into a ``FileNotFoundError`` that names the
    option to pass a local ``save_pretrained`` directory with."""
    from huggingface_hub.errors import HFValidationError

    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, HFValidationError) as err:  # HFValidationError: a missing local path read as a hub id
        raise FileNotFoundError(
            f"Could not load {loader.__name__} from {name!r} ({type(err).__name__}: {err}). Offline, pass "
            f"{option}= a local directory holding it (written by save_pretrained)."
        ) from err
