"""Small helpers every layer shares (core: imports nothing else of the package).

- :func:`write_atomic` and :func:`replace_directory`: a file or a directory written under a temporary name and
  renamed into place, so an interrupted write never leaves a half-written result behind;
- :func:`load_yaml_mapping` and :func:`unknown_keys_message`: YAML config files and the did-you-mean message of
  both configs (training and evaluation);
- :func:`mean_and_se`: the standard error used everywhere (held-out checks, tables, the method lab);
- :func:`cache_dir`: where built-in models and assets are built once.
"""

from __future__ import annotations

import difflib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def cache_dir() -> Path:
    """``$ADRPO_CACHE``, else ``~/.cache/adrpo_diffusion``."""
    return Path(os.environ.get("ADRPO_CACHE", Path.home() / ".cache" / "adrpo_diffusion"))


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then one rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
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
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / "out", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_yaml_mapping(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict:
    """The mapping a YAML config file holds (empty file: ``{}``); ``error`` for a missing file, bad YAML or a
    top level that is not a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"Config file {path} does not exist.")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise error(f"{path} is not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise error(f"{path} must hold a mapping of config keys to values.")
    return loaded


def did_you_mean(key: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid key, or an empty string."""
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_keys_message(keys: Iterable[str], valid: Iterable[str], where: str,
                         hint: Callable[[str], str | None] = lambda key: None) -> str:
    """``Unknown config key(s) in <where>: 'key' (did you mean 'x'?), ... Valid keys: ...``; ``hint(key)``, when it
    returns text, replaces the did-you-mean of that key."""
    valid = list(valid)
    names = ", ".join(f"{key!r}{hint(key) or did_you_mean(key, valid)}" for key in keys)
    return f"Unknown config key(s) in {where}: {names}. Valid keys: {', '.join(valid)}"


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


def image_grid(images, cols: int, labels: list[str] | None = None):
    """A PIL grid of images ``(N, 3, H, W)`` in ``[0, 1]``, ``cols`` per row, the last row padded with black.
    ``labels``: one text per row (e.g. its prompt), written in PIL's default font in a white band on the left."""
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw, ImageFont

    pil = [Image.fromarray((img.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()) for img in images]
    cols = min(len(pil), cols)
    rows = math.ceil(len(pil) / cols)
    pil += [Image.new("RGB", pil[0].size)] * (rows * cols - len(pil))
    grid = make_image_grid(pil, rows=rows, cols=cols)
    if not labels:
        return grid
    font = ImageFont.load_default()
    texts = [label if len(label) <= 60 else label[:57] + "..." for label in labels]
    boxes = [ImageDraw.Draw(grid).textbbox((0, 0), text, font=font) for text in texts]
    band = max(box[2] for box in boxes) + 8
    labelled = Image.new("RGB", (grid.width + band, grid.height), "white")
    labelled.paste(grid, (band, 0))
    draw, height = ImageDraw.Draw(labelled), pil[0].height
    for row, (text, box) in enumerate(zip(texts, boxes)):
        draw.text((4, row * height + (height - box[3] - box[1]) / 2), text, fill="black", font=font)
    return labelled
