"""Scoring a folder of images generated elsewhere (``images_dir``).

Each image's prompt comes from one of:

- a JSON sidecar beside it (``cat.png`` -> ``cat.json``) with a ``prompt`` field; optional fields ``model``,
  ``seed``, ``prompt_set``, ``prompt_index``, ``category``, ``k``. The records the generator writes are such
  sidecars, so ``images_dir: outputs/eval/images`` rescoring works as is;
- a CSV (``images_prompts``) with columns ``file`` (relative to ``images_dir``) and ``prompt``, optionally ``model``,
  ``seed``, ``prompt_set``, ``category``; only the files it lists are scored.

Defaults: model = the folder's name, seed 0, prompt set ``images``. The images of one (model, seed, prompt set,
prompt) form a ClipDiversity group; prompts without an index are numbered in order of first appearance.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .config import EvalConfigError
from .generate import ImageRecord
from .score import open_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _sidecar_rows(root: Path) -> list[dict]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".tmp-"))
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    rows, missing = [], []
    for path in files:
        sidecar = path.with_suffix(".json")
        try:
            info = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            info = {}
        if not isinstance(info, dict) or not isinstance(info.get("prompt"), str):
            missing.append(sidecar)
            continue
        rows.append({**info, "file": str(path.relative_to(root))})
    if missing:
        raise EvalConfigError(f"{len(missing)} of {len(files)} images under {root} have no readable JSON sidecar with a "
                         f"'prompt' field, e.g. {missing[0]}; write sidecars or pass images_prompts (a CSV with "
                         "columns file,prompt).")
    return rows


def _csv_rows(root: Path, mapping: Path) -> list[dict]:
    rows = list(csv.DictReader(mapping.read_text(encoding="utf-8").splitlines()))
    if not rows or not {"file", "prompt"} <= set(rows[0]):
        raise EvalConfigError(f"{mapping}: needs a header with columns 'file' and 'prompt'")
    absent = [row["file"] for row in rows if not (root / row["file"]).is_file()]
    if absent:
        raise FileNotFoundError(f"{mapping}: {len(absent)} listed file(s) are not under {root}, e.g. {absent[0]!r}")
    return rows


def undecodable(root: str | Path, records: list[ImageRecord]) -> dict[str, str]:
    """``{path: why}`` of the records' images that cannot be decoded (empty, truncated, not an image): every image is
    decoded once, before any model loads."""
    failed = {}
    for record in records:
        image = open_image(Path(root) / record.path)
        if isinstance(image, str):
            failed[record.path] = image
    return failed


def collect_images(images_dir: str, images_prompts: str | None = None) -> list[ImageRecord]:
    """The records of the images under ``images_dir`` (paths relative to it)."""
    root = Path(images_dir)
    rows = _csv_rows(root, Path(images_prompts)) if images_prompts else _sidecar_rows(root)
    indices: dict[tuple[str, str], int] = {}
    records, counts = [], {}
    for row in rows:
        prompt_set = str(row.get("prompt_set") or "images")
        if row.get("prompt_index") not in (None, ""):
            index = int(row["prompt_index"])
        else:
            index = indices.setdefault((prompt_set, row["prompt"]), len(indices))
        model, seed = str(row.get("model") or root.name), int(row.get("seed") or 0)
        group = (model, seed, prompt_set, index)
        k = int(row["k"]) if row.get("k") not in (None, "") else counts.get(group, 0)
        counts[group] = counts.get(group, 0) + 1
        records.append(ImageRecord(row["file"], model, prompt_set, index, row["prompt"], row.get("category") or None,
                                   seed, k))
    return records
