"""HIPT's 256 -> 4096 hierarchy: region feature grids and region descriptors.

A 4096 px region is a 16 x 16 grid of 256 px patches. The ViT-256 (timm
``vit_small_patch16_224`` run on 256 px inputs, position embeddings resized as DINO does)
embeds each patch; its [CLS] features, in row-major patch order (row ``16 * r + c``), form
the region's ``[256, 384]`` tensor, the input of HIPT's ViT-4K pretraining. The ViT-4K
(:class:`~pathflow.models.vit4k.ViT4K`) reads that tensor as a ``[384, 16, 16]`` grid.
A region is described, as HIPT's ``HIPT_4K.forward_asset_dict`` does, by

* ``cls4k``: the ViT-4K [CLS] output (192-d),
* ``mean256``: the mean of its patches' ViT-256 features (384-d),
* ``concat``: ``[mean256, cls4k]`` (576-d, HIPT's ``features_mean256_cls4k``);

and a slide by the mean of its regions' descriptors.

HIPT's own inference normalises pixels with mean = std = 0.5 (:data:`HIPT_MEAN`,
:data:`HIPT_STD`), although its ViT-256 was pretrained with ImageNet statistics; pathflow
uses HIPT's choice with HIPT's weights so features match the official ones.

HIPT's published files (``vit256_small_dino.pth``, ``vit4k_xs_dino.pth``) are whole DINO
training checkpoints; :func:`load_hipt_model` takes their ``teacher``, removes ``module.`` and
``backbone.``, ignores ``head.*`` and fails on any other missing or unexpected key.

Example:
    >>> import torch
    >>> from pathflow.models import create_model
    >>> from pathflow.models.hipt import region_descriptors
    >>> vit4k = create_model("vit4k_xs").eval()
    >>> d = region_descriptors(vit4k, torch.randn(3, 256, 384))
    >>> {k: tuple(v.shape) for k, v in d.items()}
    {'cls4k': (3, 192), 'mean256': (3, 384), 'concat': (3, 576)}
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor, nn

#: HIPT's inference normalisation (``transforms.Normalize((0.5,) * 3, (0.5,) * 3)``).
HIPT_MEAN = (0.5, 0.5, 0.5)
HIPT_STD = (0.5, 0.5, 0.5)

#: Region descriptors, in the order of HIPT's ``features_mean256_cls4k``.
DESCRIPTORS = ("cls4k", "mean256", "concat")


def grid_side(tokens: int) -> int:
    """Side of a square grid of ``tokens`` patches (ValueError if not a square)."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{tokens} patches do not form a square grid")
    return side


def as_grid(region_features: Tensor) -> Tensor:
    """``[R, G*G, D]`` (row-major patches) -> ``[R, D, G, G]``, the ViT-4K input."""
    r, n, d = region_features.shape
    g = grid_side(n)
    return region_features.reshape(r, g, g, d).permute(0, 3, 1, 2)


@torch.inference_mode()
def region_descriptors(
    vit4k: nn.Module, region_features: Tensor, batch_size: int = 256
) -> dict[str, Tensor]:
    """HIPT's three descriptors of each region from its ``[R, G*G, 384]`` feature grid
    (float32 results on the input's device; ``vit4k`` in eval mode on that device)."""
    feats = region_features.float()
    mean256 = feats.mean(dim=1)
    outs = [vit4k(as_grid(feats[i : i + batch_size])) for i in range(0, len(feats), batch_size)]
    cls4k = (
        torch.cat(outs).float()
        if outs
        else feats.new_zeros((0, int(getattr(vit4k, "num_features", 192))))
    )
    return {"cls4k": cls4k, "mean256": mean256, "concat": torch.cat([mean256, cls4k], dim=1)}


def load_hipt_model(
    arch: str, weights: str | os.PathLike[str] | None = None, **kwargs: Any
) -> nn.Module:
    """Build ``arch`` (a timm ViT such as ``vit_small_patch16_224`` for the ViT-256, or
    ``vit4k_xs``) and load ``weights`` strictly: a pathflow export or checkpoint, or a HIPT /
    DINO training checkpoint (teacher; ``module.``/``backbone.`` removed; ``head.*``
    ignored). Any other missing, unexpected or mis-shaped key raises
    :class:`~pathflow.exceptions.PathflowError` naming it."""
    from pathflow.models.weights import load_backbone

    return load_backbone(arch, weights, **kwargs)


__all__ = [
    "DESCRIPTORS",
    "HIPT_MEAN",
    "HIPT_STD",
    "as_grid",
    "grid_side",
    "load_hipt_model",
    "region_descriptors",
]
