"""HIPT's ViT-4K: a vision transformer over a grid of ViT-256 [CLS] features.

Chen et al., CVPR 2022 ("Scaling Vision Transformers to Gigapixel Images via Hierarchical
Self-Supervised Learning"). The input is a ``[B, 384, g, g]`` grid of 384-d ViT-256 features
(g = 16 for a 4096 px region of 256 px patches; 14 and 6 for DINO's global and local crops;
4 for 1024 px regions); each token goes through ``phi`` = Linear(384, 192) + GELU + dropout, a
learned [CLS] token is prepended and learned position embeddings, stored for a 14 x 14 grid
+ [CLS] (``[1, 197, 192]``), are added after DINO's bicubic resize to the actual grid
(:func:`~pathflow.models.pos_embed.interpolate_pos_encoding`). Then 6 pre-norm transformer
blocks (6 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6) and a final LayerNorm; the output
is the normed [CLS] token (192-d).

Parameter names are those of the published HIPT checkpoints (``vit4k_xs_dino.pth``):
``cls_token``, ``pos_embed``, ``phi.0.weight`` [192, 384], ``phi.0.bias``,
``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight, bias}``,
``norm.{weight, bias}``; load them with :func:`pathflow.models.hipt.load_hipt_model`.

Example:
    >>> import torch
    >>> from pathflow.models import create_model
    >>> vit4k = create_model("vit4k_xs")
    >>> vit4k(torch.randn(2, 384, 16, 16)).shape
    torch.Size([2, 192])
    >>> vit4k.pos_embed.shape
    torch.Size([1, 197, 192])
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from pathflow.models.pos_embed import interpolate_pos_encoding


class ViT4K(nn.Module):
    """ViT over feature grids ``[B, in_dim, h, w]`` -> normed [CLS] ``[B, embed_dim]``.

    Args:
        in_dim: dimension of the input tokens (384, ViT-256 small).
        embed_dim: model width (192 for ``vit4k_xs``).
        depth, num_heads, mlp_ratio, qkv_bias: transformer blocks.
        pos_grid: side of the stored position grid (14, HIPT's ``img_size 224 // 16``).
        drop_rate: dropout after ``phi`` and on the tokens; ``attn_drop_rate``: attention
            dropout; ``drop_path_rate``: stochastic depth, linearly increasing over blocks.
    """

    def __init__(
        self,
        in_dim: int = 384,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pos_grid: int = 14,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        from timm.layers import trunc_normal_
        from timm.models.vision_transformer import Block

        self.in_dim = in_dim
        self.embed_dim = self.num_features = embed_dim
        self.pos_grid = pos_grid
        self.phi = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.GELU(), nn.Dropout(drop_rate))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid * pos_grid + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[i],
                    norm_layer=norm,  # type: ignore[arg-type]
                )
                for i in range(depth)
            ]
        )
        self.norm = norm(embed_dim)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """``[B, in_dim, h, w]`` -> ``[B, 1 + h*w, embed_dim]`` ([CLS] + phi(tokens) + pos);
        tokens in row-major grid order."""
        if x.ndim != 4 or x.shape[1] != self.in_dim:
            raise ValueError(
                f"ViT4K expects [B, {self.in_dim}, h, w] feature grids, got {tuple(x.shape)}"
            )
        b, _, h, w = x.shape
        tokens = self.phi(x.flatten(2).transpose(1, 2))
        tokens = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        tokens = tokens + interpolate_pos_encoding(self.pos_embed, h, w)
        return self.pos_drop(tokens)

    def forward_features(self, x: Tensor) -> Tensor:
        """All tokens after the final norm, ``[B, 1 + h*w, embed_dim]``."""
        return self.norm(self.blocks(self.prepare_tokens(x)))

    def forward(self, x: Tensor) -> Tensor:
        """The normed [CLS] token, ``[B, embed_dim]``."""
        return self.forward_features(x)[:, 0]


def _init_weights(m: nn.Module) -> None:
    from timm.layers import trunc_normal_

    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def vit4k_xs(**kwargs: Any) -> ViT4K:
    """HIPT's ``vit4k_xs``: 384 -> 192-d, 6 blocks, 6 heads (2.8M parameters). ``in_dim``
    follows the ViT-256's feature width when it is not ViT-S (e.g. 768 for a ViT-B/16)."""
    args: dict[str, Any] = {"in_dim": 384, "embed_dim": 192, "depth": 6, "num_heads": 6,
                            "mlp_ratio": 4.0}  # fmt: skip
    args.update(kwargs)
    return ViT4K(**args)


__all__ = ["ViT4K", "vit4k_xs"]
