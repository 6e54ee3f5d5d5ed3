"""ClipDiversity: how different the K images generated for one prompt are, in CLIP image-embedding space.

For each group ``g`` (the images of one prompt) with embeddings ``e_1..e_k`` (``k >= 2``)::

    D_g = scale * mean over pairs i < j of d(e_i, e_j)
    ClipDiversity = mean over groups of D_g        (every prompt counts equally)

Variants (``distance``, ``normalize``, ``scale``; the evaluation config selects them under
``metric_options: {clipdiversity: {...}}``):

- ``distance="l2", normalize=False`` (the default): ``d = ||e_i - e_j||`` between the unnormalised embeddings
  that ``CLIPModel.get_image_features`` returns;
- ``distance="l2", normalize=True``: the same on L2-normalised embeddings, ``sqrt(2 (1 - cos))``, in ``[0, 2]``;
- ``distance="cosine"``: ``d = 1 - cos(e_i, e_j)``, in ``[0, 2]`` (``normalize`` has no effect);
- ``scale`` multiplies the result (e.g. ``distance: cosine, scale: 100`` for ``100 (1 - cos)``, ClipScore's units).

Why the default. The ADRPO paper reports ClipDiversity without a formula, with values from 1.85 to 5.08 for
FLUX.1-dev and SD3. Both cosine variants are bounded by 2, so they cannot give 5.08. The projected image embeddings
of CLIP ViT-L/14 are not normalised: their norm is about 21 (the one documented case we found, ViT-L/14@336px,
differs from its normalised embedding by a constant factor of 20.8), so for two images of equal norm ``n`` and
cosine ``c`` the unnormalised L2 distance is ``n sqrt(2 (1 - c))``: 1.85 to 5.08 means ``c`` from 0.996 to 0.97, a
few units for images of one prompt, which are close in CLIP space. That is the scale the paper reports, and the
plainest computation that gives it (``torch.cdist`` on ``get_image_features``). ``100 (1 - cos)`` would put the
paper's values at ``c`` from 0.98 to 0.95; we could not check the paper's code, so that reading stays selectable.
The norm varies with image statistics, which the cosine variants ignore; compare numbers of one variant only.

Embeddings come from the CLIP scorer::

    clip_diversity(build_scorer("clip").image_embeddings(images), group_ids)
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

DEFAULT_OPTIONS = {"distance": "l2", "normalize": False, "scale": 1.0}


def diversity_options(**options) -> dict:
    """The variant: :data:`DEFAULT_OPTIONS` updated by ``options``; ValueError for an unknown option or value (the
    evaluation config calls it before any model loads)."""
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown ClipDiversity option(s) {unknown}; valid: {sorted(DEFAULT_OPTIONS)}")
    variant = {**DEFAULT_OPTIONS, **options}
    if variant["distance"] not in ("cosine", "l2"):
        raise ValueError(f"distance must be 'cosine' or 'l2', got {variant['distance']!r}")
    if not isinstance(variant["normalize"], bool):
        raise ValueError(f"normalize must be true or false, got {variant['normalize']!r}")
    scale = variant["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"scale must be a number > 0, got {scale!r}")
    return variant


def describe(distance: str, normalize: bool, scale: float) -> str:
    """A variant in words, for table captions."""
    pairs = ("cosine distance 1 - cos" if distance == "cosine" else
             f"L2 distance between {'L2-normalised' if normalize else 'unnormalised'} CLIP image embeddings")
    return f"{'' if scale == 1 else f'{scale:g} x '}mean pairwise {pairs} of a prompt's images"


def clip_diversity(embeddings, group_ids: Sequence[Hashable], **options) -> float:
    """Mean pairwise distance between the embeddings ``(N, D)`` (tensor or array) of each group, averaged over
    groups; ``group_ids[i]`` names the group (e.g. the prompt) of row ``i``. Every group needs two images.
    ``options``: ``distance``, ``normalize``, ``scale`` (module docstring; defaults :data:`DEFAULT_OPTIONS`)."""
    variant = diversity_options(**options)
    embeddings = torch.as_tensor(embeddings).detach().cpu().double()
    group_ids = list(group_ids)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(group_ids):
        raise ValueError(f"Expected embeddings (N, D) and N group ids; got {tuple(embeddings.shape)} and "
                         f"{len(group_ids)} ids")
    if variant["normalize"] or variant["distance"] == "cosine":
        embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
    rows: dict[Hashable, list[int]] = {}
    for row, group in enumerate(group_ids):
        rows.setdefault(group, []).append(row)
    small = [group for group, members in rows.items() if len(members) < 2]
    if small:
        raise ValueError(f"Diversity needs at least 2 images per group; {len(small)} group(s) have one, "
                         f"e.g. {small[0]!r}")
    means = []
    for members in rows.values():
        group = embeddings[members]
        if variant["distance"] == "cosine":
            pairwise = 1.0 - group @ group.T
        else:
            pairwise = torch.cdist(group, group)
        upper = torch.triu_indices(len(members), len(members), offset=1)
        means.append(pairwise[upper[0], upper[1]].mean())
    return float(variant["scale"] * torch.stack(means).mean())
