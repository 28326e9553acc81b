"""Position embeddings resized as facebookresearch/dino (and HIPT) resize them.

DINO's ``interpolate_pos_encoding`` resizes the learned grid of position embeddings to the
input's token grid with bicubic interpolation and ``scale_factor = (g + 0.1) / sqrt(N)``
(the ``+ 0.1`` avoids a floating-point error in the output size), not to an explicit
output ``size`` as timm's ``resample_abs_pos_embed`` does; the two give different values, so
weights trained with DINO (HIPT's ViT-256 and ViT-4K among them) must be run with DINO's
resize to reproduce their features. The [CLS] embedding is kept as it is.

:func:`use_dino_pos_embed` switches a timm ``VisionTransformer`` (one [CLS] token, no
register tokens) to this resize in place; its state dict does not change.

Example:
    >>> import torch
    >>> from pathflow.models.pos_embed import interpolate_pos_encoding
    >>> pos = torch.randn(1, 1 + 14 * 14, 192)
    >>> interpolate_pos_encoding(pos, 16, 16).shape
    torch.Size([1, 257, 192])
    >>> torch.equal(interpolate_pos_encoding(pos, 14, 14), pos)
    True
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def interpolate_pos_encoding(pos_embed: Tensor, h: int, w: int) -> Tensor:
    """``pos_embed`` ([1, 1 + N, D], [CLS] first, N a square) for an ``h x w`` token grid.

    As dino's ``VisionTransformer.interpolate_pos_encoding``: returned unchanged when the grid
    already has N tokens and is square; else the patch embeddings are resized by bicubic
    interpolation with ``scale_factor = ((h + 0.1) / sqrt(N), (w + 0.1) / sqrt(N))``.
    """
    n = pos_embed.shape[1] - 1
    if h * w == n and h == w:
        return pos_embed
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position embeddings of {n} tokens are not a square grid")
    dim = pos_embed.shape[-1]
    cls_pos = pos_embed[:, :1]
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid.float(),
        scale_factor=((h + 0.1) / side, (w + 0.1) / side),
        mode="bicubic",
        align_corners=False,
    ).to(pos_embed.dtype)
    if grid.shape[-2:] != (h, w):  # pragma: no cover - the +0.1 makes this exact
        raise RuntimeError(f"resized position grid is {tuple(grid.shape[-2:])}, not {(h, w)}")
    return torch.cat((cls_pos, grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)), dim=1)


def _dino_pos_embed(self: Any, x: Tensor) -> Tensor:
    """Replacement of timm ``VisionTransformer._pos_embed``: [CLS] prepended, then DINO's
    resized position embeddings added (``x``: [B, H, W, D] or [B, N, D] with N square)."""
    if x.ndim == 4:
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
    else:
        h = w = math.isqrt(x.shape[1])
    pos = interpolate_pos_encoding(self.pos_embed, h, w)
    x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    return self.pos_drop(x + pos)


def supports_dino_pos_embed(model: nn.Module) -> bool:
    """True for a timm ViT with learned position embeddings over [CLS] + a square grid."""
    pos = getattr(model, "pos_embed", None)
    return (
        hasattr(model, "_pos_embed")
        and isinstance(pos, Tensor)
        and getattr(model, "cls_token", None) is not None
        and getattr(model, "reg_token", None) is None
        and not getattr(model, "no_embed_class", False)
        and int(getattr(model, "num_prefix_tokens", 1)) == 1
        and math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1
    )


def use_dino_pos_embed(model: nn.Module) -> nn.Module:
    """Make a timm ``VisionTransformer`` resize its position embeddings as DINO does (in
    place; returns ``model``). Raises ``ValueError`` for models it does not fit (no [CLS],
    register tokens, ``no_embed_class``)."""
    if not supports_dino_pos_embed(model):
        raise ValueError(f"{type(model).__name__}: not a ViT with [CLS] + square position grid")
    model._pos_embed = types.MethodType(_dino_pos_embed, model)  # type: ignore[method-assign,assignment]
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and hasattr(patch_embed, "strict_img_size"):
        patch_embed.strict_img_size = False  # any multiple of the patch size
    return model


__all__ = ["interpolate_pos_encoding", "supports_dino_pos_embed", "use_dino_pos_embed"]
