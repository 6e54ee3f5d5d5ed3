"""Weight loading shared by the evaluation scorers: one clear ``FileNotFoundError`` when weights are missing.

Offline (``HF_HUB_OFFLINE=1``) a hub id only works when the Hugging Face cache already holds it; otherwise the
error names the file and the scorer option that takes a local path instead.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse


def resolve_file(spec: str, filename: str, option: str) -> str:
    """The local path of ``filename`` named by ``spec``: a file, a directory holding ``filename``, an http(s) URL
    (cached in torch.hub's checkpoint directory) or a Hugging Face hub repo id holding ``filename``.

    Raises ``FileNotFoundError`` naming the file and the option (``option=``) that takes a local path."""
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        if (path / filename).is_file():
            return str(path / filename)
        raise FileNotFoundError(f"No {filename} in directory {spec}; pass its path with the {option!r} option")
    is_url = spec.startswith(("http://", "https://"))
    if not is_url and (spec.startswith(("/", ".", "~")) or spec.count("/") > 1):  # a path, not an owner/name id
        raise FileNotFoundError(f"{option}={spec!r}: no such file or directory")
    try:
        if is_url:
            return _download_url(spec)
        from huggingface_hub import hf_hub_download

        return hf_hub_download(spec, filename)
    except (OSError, ValueError) as err:  # offline cache misses, HTTP errors, malformed repo ids
        raise FileNotFoundError(
            f"Cannot find {filename}: {spec!r} is not a local path and fetching it failed ({type(err).__name__}: "
            f"{err}). Download it where there is network and pass its local path with the {option!r} option "
            f"({option}=...)."
        ) from err


def _download_url(url: str) -> str:
    import torch
    from huggingface_hub import is_offline_mode

    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not target.is_file():
        if is_offline_mode():
            raise OSError(f"offline mode (HF_HUB_OFFLINE) is on and {target} is not cached")
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target))
    return str(target)


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
