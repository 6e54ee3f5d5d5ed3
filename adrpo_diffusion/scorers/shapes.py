"""``shapes``: a programmatic reward for the coloured-shapes captions of :mod:`adrpo_diffusion.tasks.shapes`,
computed from pixels, in ``[0, 1]``. It dispatches on the caption's structure (its parsed ``Scene``).

Pixels. With ``d_k(p)`` the RGB Euclidean distance of pixel ``p`` to reference colour ``k`` (a palette colour
or the background), the pixel's soft membership in ``k`` is ``w_k(p) = exp(-d_k(p)^2 / (2 COLOUR_SOFTNESS^2))``
(1 at the exact colour, so a slightly better colour always scores slightly better). For shapes, a pixel *has*
colour ``k`` when ``k`` is its nearest reference and ``d_k(p) <= COLOUR_RADIUS``; mixed pixels (blurred edges,
muddy colours) have none. A *blob* of colour ``k`` is an 8-connected component of the pixels of colour ``k``
with at least ``MIN_BLOB`` pixels (smaller specks are ignored).

Checks, each in ``[0, 1]``, for every clause of the caption (colour ``c``, shape ``s``, count ``n``, optional
position), averaged over the clauses:

- ``colour``   = presence x precision: presence ``min(1, sum_p w_c(p) / (n * MIN_AREA))``; precision
  ``sum_p sum_{caption's colours k} w_k(p) / sum_p (1 - w_background(p))`` (a shape of another colour, a grainy
  or muddy background, smeared edges all lower it).
- ``shape``    = mean over the ``n`` largest blobs of ``c`` (a missing blob counts 0) of a soft shape
  classification: the softmax over the three shapes of ``IoU(blob, template) / SHAPE_TEMPERATURE``, taken at
  ``s``, where a shape's template is drawn inscribed in the blob's bounding box (:func:`template`). With two
  clauses this is attribute *binding*: the red blob must have the red clause's shape, the blue blob the blue one's.
- ``count``    = ``exp(-|number of blobs of c - n|)``.
- ``position`` (position captions only): the centre of the largest blob's bounding box, as a fraction ``f`` of
  the width (left, right) or height (top, bottom) counted from the named side, scores
  ``clip(0.5 + (0.5 - f) / (1 - 2 * POSITION_LIMIT), 0, 1)``: 1 inside the side's 40% band (where the generator
  puts it), 0.5 at the middle, 0 in the opposite band.

The reward is the mean of the checks that apply. :meth:`ShapesScorer.checks` returns them one by one.

``geneval_pass`` (:meth:`ShapesScorer.details`), the strict reading GenEval reports: 1 when *every* check that
applies exceeds ``PASS_THRESHOLD`` = 0.5, else 0. So the count must be exact (``exp(-1) < 0.5``), the named shape
must be the most likely one by a margin, the colour must be mostly present and clean, and a positioned shape must
sit on the named half of the image.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..tasks.shapes import BACKGROUND, COLOURS, POSITION_LIMIT, SHAPES, SKILLS, CaptionError, parse_caption
from .base import Scorer, to_image_tensor
from .registry import register_scorer

COLOUR_RADIUS = 0.3
COLOUR_SOFTNESS = 0.15
MIN_BLOB = 4
MIN_AREA = 16
SHAPE_TEMPERATURE = 0.05
CHECKS = ("colour", "shape", "count", "position")
PASS_THRESHOLD = 0.5


def colour_distances(images: torch.Tensor) -> torch.Tensor:
    """``d_k(p)`` for the references ``list(COLOURS) + ["background"]``: ``(N, R, H, W)``."""
    references = torch.tensor([*COLOURS.values(), BACKGROUND], dtype=images.dtype, device=images.device)
    return (images.clamp(0, 1)[:, None] - references[None, :, :, None, None]).norm(dim=2)


def colour_labels(distances: torch.Tensor) -> torch.Tensor:
    """Per pixel, the index of its colour among the references, or -1 for none; ``(N, H, W)``."""
    nearest, index = distances.min(dim=1)
    return torch.where(nearest <= COLOUR_RADIUS, index, torch.full_like(index, -1))


def connected_components(masks: torch.Tensor) -> torch.Tensor:
    """8-connected components of boolean masks ``(N, H, W)``: every pixel of a component carries the same
    positive label (0 off the mask). Labels spread by 3x3 max-pooling until nothing changes."""
    n, h, w = masks.shape
    start = torch.arange(1, h * w + 1, dtype=torch.float32, device=masks.device).view(1, h, w)
    labels = start * masks
    while True:
        spread = torch.nn.functional.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * masks
        if torch.equal(spread, labels):
            return labels.long()
        labels = spread


def template(shape: str, height: int, width: int) -> np.ndarray:
    """The named shape inscribed in a ``height x width`` box, sampled at pixel centres: the full box (square),
    the inscribed ellipse (circle), or the triangle with its apex at the top centre and its base at the bottom."""
    y, x = np.mgrid[0:height, 0:width] + 0.5
    u, v = (x - width / 2) / (width / 2), y / height  # u in [-1, 1] across, v in [0, 1] down
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "circle":
        return u**2 + (2 * v - 1) ** 2 <= 1
    if shape == "triangle":
        return np.abs(u) <= v
    raise ValueError(f"Unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def blobs_of(labels: np.ndarray) -> list[dict]:
    """The components of one label map with at least ``MIN_BLOB`` pixels, largest first: ``pixels``, the centre
    ``x``, ``y`` of the bounding box (fractions of the width and height) and ``iou``, the IoU of the blob with
    each shape's template in that box."""
    height, width = labels.shape
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    blobs = []
    for value, count in zip(values, counts):
        if count < MIN_BLOB:
            continue
        ys, xs = np.nonzero(labels == value)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        crop = labels[y0:y1, x0:x1] == value
        iou = {}
        for shape in SHAPES:
            drawn = template(shape, y1 - y0, x1 - x0)
            iou[shape] = (crop & drawn).sum() / (crop | drawn).sum()
        blobs.append({"pixels": int(count), "x": (x0 + x1) / 2 / width, "y": (y0 + y1) / 2 / height, "iou": iou})
    return sorted(blobs, key=lambda b: -b["pixels"])


def shape_score(blob: dict, shape: str) -> float:
    """Softmax over the shapes of ``IoU / SHAPE_TEMPERATURE``, at ``shape``."""
    logits = {s: iou / SHAPE_TEMPERATURE for s, iou in blob["iou"].items()}
    top = max(logits.values())
    return math.exp(logits[shape] - top) / sum(math.exp(v - top) for v in logits.values())


def position_score(blob: dict, position: str) -> float:
    fraction = blob["x"] if position in ("left", "right") else blob["y"]
    if position in ("right", "bottom"):
        fraction = 1 - fraction
    return min(1.0, max(0.0, 0.5 + (0.5 - fraction) / (1 - 2 * POSITION_LIMIT)))


@register_scorer("shapes")
class ShapesScorer(Scorer):
    """The reward of the coloured-shapes lab (definitions in the module docstring)."""

    def __init__(self, batch_size: int = 256):
        self.batch_size = batch_size

    @classmethod
    def check_prompts(cls, prompts) -> None:
        bad = []
        for prompt in prompts:
            try:
                parse_caption(prompt)
            except CaptionError as err:
                bad.append(str(err))
        if bad:
            raise ValueError(
                f"The shapes reward scores captions of the shapes grammar only ({', '.join(SKILLS)}: e.g. 'a red "
                f"circle', 'a red circle and a blue square', 'three green squares', 'a yellow triangle on the left'; "
                f"colours {', '.join(COLOURS)}); {len(bad)} prompt(s) do not fit, e.g. {bad[0]}"
            )

    def checks(self, images, prompts) -> dict[str, torch.Tensor]:
        """Every check of every image, ``{name: (N,) tensor}``; NaN where a check does not apply."""
        prompts = list(prompts)
        self.check_prompts(prompts)
        distances = colour_distances(to_image_tensor(images).float())
        weights = torch.exp(-distances.pow(2) / (2 * COLOUR_SOFTNESS**2)).cpu().numpy()
        labels = colour_labels(distances)
        names = list(COLOURS)
        scenes = [parse_caption(prompt) for prompt in prompts]
        # components only of the colours each caption names (one or two maps per image)
        pairs = [(i, names.index(spec.colour)) for i, scene in enumerate(scenes) for spec in scene.objects]
        index = torch.tensor(pairs, device=labels.device)
        components = connected_components(labels[index[:, 0]] == index[:, 1, None, None]).cpu().numpy()
        labels = labels.cpu().numpy()
        out = {name: torch.full((len(prompts),), math.nan) for name in CHECKS}
        row = 0
        for i, scene in enumerate(scenes):
            foreground = (1 - weights[i, len(names)]).sum()
            named = sum(weights[i, names.index(colour)].sum() for colour in {spec.colour for spec in scene.objects})
            precision = min(1.0, named / max(1.0, foreground))
            values = {name: [] for name in CHECKS}
            for spec in scene.objects:
                blobs = blobs_of(components[row])
                row += 1
                presence = min(1.0, weights[i, names.index(spec.colour)].sum() / (spec.count * MIN_AREA))
                values["colour"].append(presence * precision)
                values["shape"].append(sum(shape_score(b, spec.shape) for b in blobs[: spec.count]) / spec.count)
                values["count"].append(math.exp(-abs(len(blobs) - spec.count)))
                if spec.position is not None:
                    values["position"].append(position_score(blobs[0], spec.position) if blobs else 0.0)
            for name, scores in values.items():
                if scores:
                    out[name][i] = float(sum(scores) / len(scores))
        return out

    def details(self, images, prompts) -> dict[str, torch.Tensor]:
        """The :meth:`checks` and ``geneval_pass`` (module docstring) of every image."""
        checks = self.checks(images, prompts)
        stacked = torch.stack(list(checks.values()))
        passed = (stacked.isnan() | (stacked > PASS_THRESHOLD)).all(dim=0).float()
        return {**checks, "geneval_pass": passed}

    def _score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.stack(list(self.checks(images, prompts).values())).nanmean(dim=0)
