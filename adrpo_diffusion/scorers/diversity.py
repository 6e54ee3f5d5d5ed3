"""ClipDiversity: how different the K images generated for one prompt are, in CLIP image-embedding space.

For each group ``g`` (the images of one prompt) with embeddings ``e_1..e_k`` (``k >= 2``)::

    D_g = scale * mean over pairs i < j of d(e_i, e_j)
    ClipDiversity = mean over groups of D_g        (every prompt counts equally)

The ADRPO paper reports ClipDiversity without a formula; the default here is the cosine distance
``d = 1 - cos(e_i, e_j)`` with ``scale=1``, because CLIP is trained to compare embeddings by their cosine, and
an embedding's norm carries no meaning CLIP was trained for (it varies with image statistics), so it should not
move the metric. The result lies in ``[0, 2]``; 0 means identical images. ``distance="l2"`` gives
``||e_i - e_j||``, on L2-normalised embeddings by default (then ``sqrt(2 * cosine distance)``);
``normalize`` matters only for ``l2``, cosine being scale-free.

Embeddings come from the CLIP scorer::

    clip_diversity(build_scorer("clip").image_embeddings(images), group_ids)
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def clip_diversity(embeddings, group_ids: Sequence[Hashable], distance: str = "cosine", normalize: bool = True,
                   scale: float = 1.0) -> float:
    """Mean pairwise distance between the embeddings ``(N, D)`` (tensor or array) of each group, averaged over
    groups; ``group_ids[i]`` names the group (e.g. the prompt) of row ``i``. Every group needs two images."""
    if distance not in ("cosine", "l2"):
        raise ValueError(f"distance must be 'cosine' or 'l2', got {distance!r}")
    embeddings = torch.as_tensor(embeddings).detach().cpu().double()
    group_ids = list(group_ids)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(group_ids):
        raise ValueError(f"Expected embeddings (N, D) and N group ids; got {tuple(embeddings.shape)} and "
                         f"{len(group_ids)} ids")
    if normalize or distance == "cosine":
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
        if distance == "cosine":
            pairwise = 1.0 - group @ group.T
        else:
            pairwise = torch.cdist(group, group)
        upper = torch.triu_indices(len(members), len(members), offset=1)
        means.append(pairwise[upper[0], upper[1]].mean())
    return float(scale * torch.stack(means).mean())
