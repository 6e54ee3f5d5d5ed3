"""A synthetic caption-image dataset of coloured shapes, generated procedurally (no download).

Images are ``size x size`` (32 by default) RGB tensors in ``[0, 1]``: flat-coloured shapes on a uniform grey
background. Captions come from a small grammar covering four pixel-checkable DrawBench skills:

    colour     "a red circle"                       a {colour} {shape}
    binding    "a red circle and a blue square"     a {colour} {shape} and a {colour} {shape}
                                                    (two different colours and two different shapes)
    count      "three green squares"                {two|three} {colour} {shape}s
    position   "a yellow triangle on the left"      a {colour} {shape} {on the left|on the right|at the top|at the bottom}

:func:`parse_caption` maps a caption to a :class:`Scene` (the structured spec) and rejects anything outside the
grammar; :func:`caption_of` is its inverse. :func:`sample_batch` draws (image, caption) pairs deterministically
from a ``torch.Generator``: the same seed gives the same data on every machine.

Drawing (:func:`place_scene`): random sizes and non-overlapping positions; "on the left" means the shape's
centre lies in the left 40% of the image (right, top, bottom likewise), which is what the reward checks
(:mod:`adrpo_diffusion.scorers.shapes`).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

COLOURS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
BACKGROUND = (0.5, 0.5, 0.5)
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {"two": 2, "three": 3}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
SKILLS = ("colour", "binding", "count", "position")
POSITION_LIMIT = 0.4  # "on the left": centre x below 40% of the width (and likewise for the other sides)
# Bounding-box sides as fractions of the image side, by the number of shapes in the image (a lone shape; two, as in
# a binding caption or "two ..."; three). As large as fits: at 32 px a shape then spans 3-5 of the tiny
# transformer's 4x4-pixel tokens, enough for a small model to learn its outline. Smaller shapes stayed at chance on
# the shape check (lone shapes of 0.28-0.44; two or three shapes of 0.26-0.36: 0.31 on binding captions).
SIDES = {1: (0.4, 0.6), 2: (0.36, 0.46), 3: (0.3, 0.4)}


class CaptionError(ValueError):
    """A caption outside the shapes grammar."""


@dataclass(frozen=True)
class ShapeSpec:
    """One clause of a caption: ``count`` shapes of one colour, optionally at one side of the image."""

    colour: str
    shape: str
    count: int = 1
    position: str | None = None  # left, right, top, bottom


@dataclass(frozen=True)
class Scene:
    """A parsed caption: its skill and its clauses (two for binding, one otherwise)."""

    skill: str
    objects: tuple[ShapeSpec, ...]


def _clause(words: list[str], caption: str) -> ShapeSpec:
    """``a {colour} {shape}`` or ``{two|three} {colour} {shape}s``."""
    if len(words) != 3:
        raise CaptionError(f"{caption!r}: expected 'a <colour> <shape>' or '<two|three> <colour> <shapes>'")
    article, colour, noun = words
    if colour not in COLOURS:
        raise CaptionError(f"{caption!r}: unknown colour {colour!r}; colours: {', '.join(COLOURS)}")
    if article == "a":
        count, shape = 1, noun
    elif article in COUNT_WORDS:
        count, shape = COUNT_WORDS[article], noun.removesuffix("s")
        if not noun.endswith("s"):
            raise CaptionError(f"{caption!r}: a count needs a plural shape ({noun}s)")
    else:
        raise CaptionError(f"{caption!r}: a clause starts with 'a', {' or '.join(repr(w) for w in COUNT_WORDS)}")
    if shape not in SHAPES:
        raise CaptionError(f"{caption!r}: unknown shape {noun!r}; shapes: {', '.join(SHAPES)}")
    return ShapeSpec(colour, shape, count)


def parse_caption(caption: str) -> Scene:
    """The structured spec of a caption of the shapes grammar (see the module docstring); raises
    :class:`CaptionError` naming what does not fit."""
    words = caption.strip().lower().split()
    for position, phrase in POSITION_PHRASES.items():
        tail = phrase.split()
        if words[-3:] == tail:
            spec = _clause(words[:-3], caption)
            if spec.count != 1:
                raise CaptionError(f"{caption!r}: a position applies to a single shape ('a <colour> <shape> {phrase}')")
            return Scene("position", (ShapeSpec(spec.colour, spec.shape, 1, position),))
    if "and" in words:
        cut = words.index("and")
        first, second = _clause(words[:cut], caption), _clause(words[cut + 1 :], caption)
        if first.count != 1 or second.count != 1:
            raise CaptionError(f"{caption!r}: binding joins two single shapes ('a red circle and a blue square')")
        if first.colour == second.colour or first.shape == second.shape:
            raise CaptionError(f"{caption!r}: binding needs two different colours and two different shapes")
        return Scene("binding", (first, second))
    spec = _clause(words, caption)
    return Scene("count" if spec.count > 1 else "colour", (spec,))


def is_caption(caption: str) -> bool:
    try:
        parse_caption(caption)
    except CaptionError:
        return False
    return True


def _phrase(spec: ShapeSpec) -> str:
    if spec.count == 1:
        return f"a {spec.colour} {spec.shape}"
    word = next(w for w, n in COUNT_WORDS.items() if n == spec.count)
    return f"{word} {spec.colour} {spec.shape}s"


def caption_of(scene: Scene) -> str:
    """The caption of a scene (the inverse of :func:`parse_caption`)."""
    text = " and ".join(_phrase(spec) for spec in scene.objects)
    position = scene.objects[0].position
    return f"{text} {POSITION_PHRASES[position]}" if position else text


def all_captions(skills=SKILLS) -> list[str]:
    """Every caption of the grammar for the given skills, in a fixed order."""
    captions = []
    pairs = list(itertools.product(COLOURS, SHAPES))
    if "colour" in skills:
        captions += [caption_of(Scene("colour", (ShapeSpec(c, s),))) for c, s in pairs]
    if "binding" in skills:
        for (c1, s1), (c2, s2) in itertools.permutations(pairs, 2):
            if c1 != c2 and s1 != s2:
                captions.append(caption_of(Scene("binding", (ShapeSpec(c1, s1), ShapeSpec(c2, s2)))))
    if "count" in skills:
        captions += [caption_of(Scene("count", (ShapeSpec(c, s, n),))) for n in COUNT_WORDS.values() for c, s in pairs]
    if "position" in skills:
        captions += [caption_of(Scene("position", (ShapeSpec(c, s, 1, p),))) for p in POSITION_PHRASES for c, s in pairs]
    return captions


# ----------------------------------------------------------------------------------------------------------
# Drawing


@dataclass(frozen=True)
class Placed:
    """A shape drawn on the canvas: centre ``(cx, cy)`` and bounding-box side ``side``, in pixels."""

    shape: str
    colour: str
    cx: float
    cy: float
    side: float


@functools.lru_cache(maxsize=4)
def _pixel_centres(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")


def shape_mask(placed: Placed, size: int) -> torch.Tensor:
    """Boolean ``(size, size)`` mask of the shape, sampled at pixel centres."""
    y, x = _pixel_centres(size)
    dx, dy, half = x - placed.cx, y - placed.cy, placed.side / 2
    if placed.shape == "circle":
        return dx**2 + dy**2 <= half**2
    if placed.shape == "square":
        return (dx.abs() <= half) & (dy.abs() <= half)
    if placed.shape == "triangle":  # apex up; the half-width grows linearly from the apex to the base
        depth = dy + half
        return (depth >= 0) & (depth <= placed.side) & (dx.abs() <= depth / 2)
    raise ValueError(f"Unknown shape {placed.shape!r}; shapes: {', '.join(SHAPES)}")


def render(shapes: list[Placed], size: int = 32) -> torch.Tensor:
    """The image ``(3, size, size)`` in ``[0, 1]``: grey background, shapes painted in order."""
    image = torch.tensor(BACKGROUND).view(3, 1, 1).repeat(1, size, size)
    for placed in shapes:
        image[:, shape_mask(placed, size)] = torch.tensor(COLOURS[placed.colour]).view(3, 1)
    return image


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _centre_range(side: float, size: int, position: str | None, axis: str) -> tuple[float, float]:
    """Where a centre may go along ``axis`` (x or y): inside the canvas with a 1-pixel margin, and inside the
    named side's 40% band when the position constrains this axis."""
    low, high = side / 2 + 1, size - side / 2 - 1
    limit = POSITION_LIMIT * size
    if (axis, position) in (("x", "left"), ("y", "top")):
        high = min(high, limit)
    elif (axis, position) in (("x", "right"), ("y", "bottom")):
        low = max(low, size - limit)
    return low, high


def place_scene(scene: Scene, generator: torch.Generator, size: int = 32) -> list[Placed]:
    """Random sizes and non-overlapping positions (bounding boxes at least 2 pixels apart) for every shape of
    the scene, by rejection sampling from ``generator``."""
    wanted = [spec for spec in scene.objects for _ in range(spec.count)]
    low, high = SIDES[len(wanted)]
    side_range = (low * size, high * size)
    for _ in range(1000):
        placed = []
        for spec in wanted:
            side = _uniform(generator, *side_range)
            cx = _uniform(generator, *_centre_range(side, size, spec.position, "x"))
            cy = _uniform(generator, *_centre_range(side, size, spec.position, "y"))
            placed.append(Placed(spec.shape, spec.colour, cx, cy, side))
        if all(abs(a.cx - b.cx) >= (a.side + b.side) / 2 + 2 or abs(a.cy - b.cy) >= (a.side + b.side) / 2 + 2
               for a, b in itertools.combinations(placed, 2)):
            return placed
    raise RuntimeError(f"Could not place {caption_of(scene)!r} on a {size}x{size} canvas")


def draw_caption(caption: str, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """One random image that matches ``caption``."""
    return render(place_scene(parse_caption(caption), generator, size), size)


def sample_batch(n: int, generator: torch.Generator, captions: list[str] | None = None,
                 size: int = 32) -> tuple[torch.Tensor, list[str]]:
    """``n`` (image, caption) pairs: captions drawn uniformly from ``captions`` (default: skill first, uniformly
    over the four skills, then a caption of that skill), images ``(n, 3, size, size)`` in ``[0, 1]``."""
    by_skill = [all_captions((skill,)) for skill in SKILLS]
    chosen = []
    for _ in range(n):
        pool = captions or by_skill[torch.randint(len(by_skill), (), generator=generator).item()]
        chosen.append(pool[torch.randint(len(pool), (), generator=generator).item()])
    return torch.stack([draw_caption(c, generator, size) for c in chosen]), chosen

