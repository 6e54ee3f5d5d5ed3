"""Small helpers every layer shares (core: imports nothing else of the package).

- :func:`write_atomic` and :func:`replace_directory`: a file or a directory written under a temporary name and
  renamed into place, so an interrupted write never leaves a half-written result behind; :func:`umask_permissions`
  gives what they (and safetensors) write the permissions of the process's umask;
- :func:`did_you_mean`: the closest valid name, for every error about an unknown name (config keys, scorers);
- :func:`mean_and_se` and :func:`paired_change`: the standard error used everywhere (held-out checks, tables, the
  method lab, the LLM demos);
- :func:`cache_dir` and :func:`build_once`: where built-in models and assets are built, once, by one process;
- :func:`check_source`: whether a model (local, cached or on the hub) can be loaded, asked before anything loads.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

try:
    import fcntl
except ImportError:  # not POSIX (build_once then takes no lock)
    fcntl = None

if TYPE_CHECKING:
    import torch

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # owner/name, or a legacy name such as bert-base-uncased


def check_source(spec: str, filename: str, local_option: Callable[[str], str], file_ok: bool = True) -> None:
    """Fail in a moment, before anything loads, when ``spec`` cannot provide ``filename``: a local file; a local
    directory holding it; an http(s) URL (offline: already in torch.hub's cache); a hub id whose ``filename`` is in
    the hub cache or, online, on the hub (one request). ``local_option(path)`` is how the user passes a local copy
    instead, in the command's own words (``--pretrained_model /models/x``, ``--reward_options '{model: /models/x}'``).
    ``file_ok``: whether a file may stand for ``filename`` itself (a checkpoint), or only a directory (a model)."""
    path = Path(spec).expanduser()
    if path.is_file():
        if file_ok:
            return
        raise FileNotFoundError(f"{spec} is a file: pass the directory that holds {filename}, {local_option('DIR')}.")
    if path.is_dir():
        if (path / filename).is_file():
            return
        raise FileNotFoundError(f"{spec} is a directory without {filename}: pass a directory that holds it (a "
                                f"save_pretrained output or a downloaded snapshot), {local_option(str(path))}.")
    from huggingface_hub import constants, file_exists, try_to_load_from_cache

    name = spec.rstrip("/").split("/")[-1]
    if spec.startswith(("http://", "https://")):
        import torch

        if (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file() or not constants.HF_HUB_OFFLINE:
            return
        raise FileNotFoundError(f"{spec} is not in torch.hub's cache and HF_HUB_OFFLINE is set. Download it where there "
                                f"is network and pass the file: {local_option('/models/' + name)}.")
    hint = (f"Download it once where there is network (`hf download {spec} --local-dir /models/{name}`) and pass the "
            f"directory: {local_option('/models/' + name)}.")
    if not HUB_ID.match(spec):
        raise FileNotFoundError(f"{spec!r} is neither a local file or directory nor a hub id (owner/name). {hint}")
    if isinstance(try_to_load_from_cache(spec, filename), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{spec!r} is not a local directory and not in the hub cache, and HF_HUB_OFFLINE is "
                                f"set. {hint}")
    try:
        found = file_exists(spec, filename)
    except Exception as err:  # no network, a gated repository without a token, ...
        raise FileNotFoundError(f"Cannot reach {spec!r} on the hub ({type(err).__name__}: {err}). {hint}") from err
    if not found:
        raise FileNotFoundError(f"{spec!r} has no {filename} on the hub. {hint}")


def cache_dir() -> Path:
    """``$ADRPO_CACHE``, else ``~/.cache/adrpo_diffusion``."""
    return Path(os.environ.get("ADRPO_CACHE", Path.home() / ".cache" / "adrpo_diffusion"))


def umask_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a directory and everything in it) the permissions a plain ``open`` or ``mkdir`` gives
    under the process's umask (0644 / 0755 with the usual 022). safetensors and ``tempfile.mkdtemp`` create owner-only
    files and directories, which teammates on a shared filesystem could not read."""
    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then one rename: never a half-written file. The file
    gets the umask's permissions whatever ``write`` used."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    umask_permissions(tmp)
    os.replace(tmp, path)


def file_sha1(path: str | os.PathLike) -> str:
    """The SHA-1 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def replace_directory(target: str | os.PathLike, build: Callable[[Path], object]) -> Path:
    """``build(directory)`` fills a fresh, empty temporary directory beside ``target``, which then replaces ``target``
    in one rename (a previous ``target`` is removed first): present means complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        (tmp / "out").mkdir()
        build(tmp / "out")
        umask_permissions(tmp / "out")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / "out", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_once(target: str | os.PathLike, build: Callable[[Path], object], announce: Callable[[], None] = lambda: None
               ) -> Path:
    """``target``, a directory built by ``build`` (:func:`replace_directory`) unless it exists. Processes that share
    the cache (parallel tests, runs started together) take a file lock first, so one builds it and the others wait
    and load it, never a directory being replaced. ``announce`` runs when this process builds."""
    target = Path(target)
    if target.is_dir():  # renamed into place whole: present means complete
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        if fcntl is not None:  # not POSIX: no lock (a cache shared by parallel processes is then unsafe)
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not target.is_dir():  # not built by another process while this one waited
            announce()
            replace_directory(target, build)
    return target


def did_you_mean(key: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid key, or an empty string."""
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def mean_and_se(values) -> tuple[float, float | None]:
    """Mean and standard error ``std(ddof=1) / sqrt(n)`` of ``values`` (numbers or a 1-D tensor); SE is None for a
    single value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_and_se needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def paired_change(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """Means before and after (1-D tensors of the same pairs: prompt x seed), and the mean of the paired change
    ``after - before`` with its standard error (:func:`mean_and_se`), over the pairs where both are defined (a
    diagnostic is NaN where it does not apply). Every held-out before/after of the package is this one."""
    keep = before.isfinite() & after.isfinite()
    before, after = before[keep], after[keep]
    improvement, se = mean_and_se(after - before)
    return {"before": before.mean().item(), "after": after.mean().item(), "improvement": improvement,
            "improvement_se": float("nan") if se is None else se}


def image_grid(images, cols: int, labels: list[str] | None = None, column_labels: list[str] | None = None,
               min_cell: int = 96):
    """A PIL grid of images ``(N, 3, H, W)`` in ``[0, 1]``, ``cols`` per row, the last row padded with black. Each
    image is enlarged by a whole factor (nearest neighbour, pixels stay sharp) to at least ``min_cell`` pixels.
    ``labels``: one text per row (e.g. its prompt), in PIL's default font in a white band on the left;
    ``column_labels``: one per column (e.g. its seed), in a white band on top."""
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw, ImageFont

    scale = max(1, math.ceil(min_cell / max(images.shape[-2:])))
    pil = [Image.fromarray((img.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()) for img in images]
    pil = [image.resize((image.width * scale, image.height * scale), Image.NEAREST) for image in pil]
    cols = min(len(pil), cols)
    rows = math.ceil(len(pil) / cols)
    pil += [Image.new("RGB", pil[0].size)] * (rows * cols - len(pil))
    grid = make_image_grid(pil, rows=rows, cols=cols)
    font = ImageFont.load_default()

    def fitted(texts):
        texts = [text if len(text) <= 60 else text[:57] + "..." for text in texts]
        return texts, [ImageDraw.Draw(grid).textbbox((0, 0), text, font=font) for text in texts]

    texts, boxes = fitted(labels or [])
    left = max(box[2] for box in boxes) + 8 if labels else 0
    headers, header_boxes = fitted(column_labels or [])
    top = max(box[3] for box in header_boxes) + 8 if column_labels else 0
    labelled = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    labelled.paste(grid, (left, top))
    draw, (width, height) = ImageDraw.Draw(labelled), pil[0].size
    for row, (text, box) in enumerate(zip(texts, boxes)):
        draw.text((4, top + row * height + (height - box[3] - box[1]) / 2), text, fill="black", font=font)
    for col, (text, box) in enumerate(zip(headers, header_boxes)):
        draw.text((left + col * width + (width - box[2]) / 2, 4), text, fill="black", font=font)
    return labelled
