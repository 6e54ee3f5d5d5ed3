"""Scoring: one metric at a time over every image, each scorer freed before the next loads.

Scores are cached in ``<output_dir>/scores/<metric>.json`` under a key made of the image file's SHA-1 and the
prompt (ClipDiversity: the SHA-1s of the group's images), so a rerun scores only new or changed images, and a
change of scorer options (stored in the cache) starts that metric's cache afresh. An image that cannot be decoded
is reported, left out of every metric and counted; nothing that involved it is cached, so a rerun reports it again.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..scorers import build_scorer
from ..scorers.diversity import clip_diversity
from .config import EvalConfig, clipdiversity_variant, metric_scorer
from .generate import ImageRecord, file_sha1, write_atomic


@dataclass
class Scores:
    """``values[metric][group]``: the metric of one (model, seed, prompt set, prompt index) group, i.e. the mean
    over its readable images, or ClipDiversity of its images. ``failed``: image path -> decoding error.
    ``skipped[metric]``: groups left without a value (no readable image; for diversity fewer than two)."""

    values: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)


def open_image(path: Path):
    """The image as RGB, or the error text when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises all three for broken files
        return f"{type(err).__name__}: {err}"


def _cache_key(*parts: str) -> str:
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


class ScoreCache:
    """One metric's cached values, valid for one scorer configuration; saved atomically."""

    def __init__(self, path: Path, identity: dict):
        self.path, self.identity, self.values = path, identity, {}
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("identity") == identity:
                self.values = saved["values"]
            else:
                print(f"{path}: scored with other settings ({saved.get('identity')}); scoring again")

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, lambda tmp: tmp.write_text(json.dumps({"identity": self.identity, "values": self.values})))


def _decoded_by_size(root: Path, records: list[ImageRecord], failed: dict) -> dict:
    """Decode ``records``' images; failures go to ``failed``. Returns {size: [(record, image)]}: a scorer batch
    needs images of one size."""
    by_size = defaultdict(list)
    for record in records:
        image = open_image(root / record.path)
        if isinstance(image, str):
            failed[record.path] = image
        else:
            by_size[image.size].append((record, image))
    return by_size


def _build(cfg: EvalConfig, name: str, options: dict):
    return build_scorer(name, **{"device": cfg.resolved_device(), "batch_size": cfg.score_batch_size, **options})


def score_images(cfg: EvalConfig, metric: str, records: list[ImageRecord], root: Path, hashes: dict,
                 failed: dict) -> dict:
    """Per-image scores ``{path: score}`` of a prompt-conditioned (or not) scorer metric."""
    from diffusers.training_utils import free_memory  # gc, and the accelerator's cache emptied

    name, options = metric_scorer(metric, cfg.metric_options.get(metric, {}))
    file_name = re.sub(r"[^\w.+-]", "_", metric)  # a custom reward's name holds ':' and maybe '/'
    cache = ScoreCache(Path(cfg.output_dir) / "scores" / f"{file_name}.json", {"scorer": name, "options": options})
    key = {r.path: _cache_key(hashes[r.path], r.prompt) for r in records}
    todo = [r for r in records if key[r.path] not in cache.values and r.path not in failed]
    if todo:
        scorer = _build(cfg, name, options)
        for start in tqdm(range(0, len(todo), cfg.score_batch_size), desc=f"score {metric}", unit="batch"):
            for pairs in _decoded_by_size(root, todo[start : start + cfg.score_batch_size], failed).values():
                scores = scorer.score([image for _, image in pairs], [r.prompt for r, _ in pairs])
                cache.values.update({key[r.path]: float(s) for (r, _), s in zip(pairs, scores)})
            cache.save()
        del scorer
        free_memory()
    return {r.path: cache.values[key[r.path]] for r in records if r.path not in failed}


def score_diversity(cfg: EvalConfig, records: list[ImageRecord], root: Path, hashes: dict, failed: dict) -> dict:
    """ClipDiversity ``{group: value}`` of each (model, seed, prompt) group with at least two readable images."""
    from diffusers.training_utils import free_memory  # gc, and the accelerator's cache emptied

    name, options = metric_scorer("clipdiversity", cfg.metric_options.get("clipdiversity", {}))
    variant = clipdiversity_variant(cfg.metric_options.get("clipdiversity", {}))
    cache = ScoreCache(Path(cfg.output_dir) / "scores" / "clipdiversity.json",
                       {"scorer": name, "options": options, "variant": variant})
    groups = defaultdict(list)
    for record in records:
        groups[record.group()].append(record)
    key = {group: _cache_key(*sorted(hashes[r.path] for r in members)) for group, members in groups.items()}
    todo = [g for g in groups if key[g] not in cache.values]
    values = {g: cache.values[key[g]] for g in groups if key[g] in cache.values}
    if todo:
        scorer = _build(cfg, name, options)
        images = [r for g in todo for r in groups[g] if r.path not in failed]
        embeddings = {}
        for start in tqdm(range(0, len(images), cfg.score_batch_size), desc="score clipdiversity", unit="batch"):
            for pairs in _decoded_by_size(root, images[start : start + cfg.score_batch_size], failed).values():
                found = scorer.image_embeddings([image for _, image in pairs])
                embeddings.update({r.path: e for (r, _), e in zip(pairs, found)})
        for group in todo:
            readable = [embeddings[r.path] for r in groups[group] if r.path in embeddings]
            if len(readable) >= 2:
                values[group] = clip_diversity(torch.stack(readable), [0] * len(readable), **variant)
                if len(readable) == len(groups[group]):  # never cache a value that left an unreadable image out
                    cache.values[key[group]] = values[group]
        cache.save()
        del scorer
        free_memory()
    return values


def score_all(cfg: EvalConfig, records: list[ImageRecord], root: Path) -> Scores:
    """Every configured metric over ``records`` (image paths relative to ``root``)."""
    hashes = {r.path: file_sha1(root / r.path) for r in tqdm(records, desc="hash images", unit="image")}
    result = Scores()
    groups = {r.group() for r in records}
    for metric in cfg.metrics:
        if metric == "clipdiversity":
            values = score_diversity(cfg, records, root, hashes, result.failed)
        else:
            per_image = score_images(cfg, metric, records, root, hashes, result.failed)
            sums = defaultdict(list)
            for record in records:
                if record.path in per_image:
                    sums[record.group()].append(per_image[record.path])
            values = {group: sum(v) / len(v) for group, v in sums.items()}
        result.values[metric] = values
        result.skipped[metric] = sorted(groups - set(values))
    return result
