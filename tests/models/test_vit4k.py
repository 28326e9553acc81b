"""HIPT's ViT-4K, DINO's position-embedding resize and the timm ViT-256, against references
written here with plain torch ops (nothing of pathflow's implementation is reused).

The references follow facebookresearch/dino ``VisionTransformer.interpolate_pos_encoding``
(bicubic, ``scale_factor = (g + 0.1) / sqrt(N)``, [CLS] kept) and mahmoodlab/HIPT
``VisionTransformer4K`` (``phi`` = Linear + GELU, [CLS] prepended, positions added, pre-norm
blocks, final LayerNorm, [CLS] out).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from pathflow.models import create_model, list_models
from pathflow.models.hipt import region_descriptors
from pathflow.models.pos_embed import interpolate_pos_encoding, use_dino_pos_embed
from pathflow.train.backbones import create_backbone
from torch import Tensor, nn


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- references


def dino_interpolate(pos: Tensor, rows: int, cols: int) -> Tensor:
    """DINO's resize of ``pos`` ([1, 1 + N, D]) to a ``rows x cols`` token grid."""
    n = pos.shape[1] - 1
    if n == rows * cols and rows == cols:
        return pos
    side = int(math.sqrt(n))
    dim = pos.shape[-1]
    patch = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(
        patch,
        scale_factor=((rows + 0.1) / math.sqrt(n), (cols + 0.1) / math.sqrt(n)),
        mode="bicubic",
        align_corners=False,
    )
    assert patch.shape[-2:] == (rows, cols)
    patch = patch.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat([pos[:, :1], patch], dim=1)


def _cubic(x: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel (PyTorch's bicubic uses a = -0.75)."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def _bicubic_matrix(n_in: int, n_out: int, scale: float) -> Tensor:
    """[n_out, n_in] 1-D bicubic resampling, half-pixel centres (align_corners False):
    output i reads source ``(i + 0.5) / scale - 0.5``, indices clamped at the borders."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        i0 = math.floor(src)
        t = src - i0
        for k in (-1, 0, 1, 2):
            m[i, min(max(i0 + k, 0), n_in - 1)] += _cubic(t - k)
    return m


def hand_bicubic_resize(
    pos: Tensor, rows: int, cols: int, scale_r: float, scale_c: float
) -> Tensor:
    """``pos``'s patch grid resampled to rows x cols with the given scale factors, [CLS] kept."""
    n = pos.shape[1] - 1
    side = math.isqrt(n)
    grid = pos[0, 1:].double().reshape(side, side, -1)  # [r, c, D]
    out = torch.einsum(
        "ir,jc,rcd->ijd",
        _bicubic_matrix(side, rows, scale_r),
        _bicubic_matrix(side, cols, scale_c),
        grid,
    )
    return torch.cat([pos[0, :1].double(), out.reshape(rows * cols, -1)])[None]


def _linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return x @ w.T + b


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))


def _layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _block(x: Tensor, sd: dict[str, Tensor], p: str, heads: int) -> Tensor:
    """One pre-norm transformer block (keys ``p + norm1.weight``...)."""
    b, n, c = x.shape
    hd = c // heads
    h = _layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    qkv = _linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
    qkv = qkv.reshape(b, n, 3, heads, hd)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, heads, N, hd]
    attn = torch.softmax((q @ k.transpose(-2, -1)) * hd**-0.5, dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(b, n, c)
    x = x + _linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    h = _layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    h = _gelu(_linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
    return x + _linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])


def vit4k_reference(model: nn.Module, grid: Tensor, heads: int = 6) -> Tensor:
    """HIPT's ViT-4K forward in float64 from ``model``'s tensors; ``grid`` [B, 384, r, c]."""
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    b, d, rows, cols = grid.shape
    tokens = grid.double().permute(0, 2, 3, 1).reshape(b, rows * cols, d)  # token r * cols + c
    tokens = _gelu(_linear(tokens, sd["phi.0.weight"], sd["phi.0.bias"]))
    x = torch.cat([sd["cls_token"].expand(b, 1, -1), tokens], dim=1)
    x = x + dino_interpolate(sd["pos_embed"], rows, cols)
    for i in range(depth):
        x = _block(x, sd, f"blocks.{i}.", heads)
    return _layer_norm(x, sd["norm.weight"], sd["norm.bias"])[:, 0]


def timm_vit_reference(model: nn.Module, images: Tensor) -> Tensor:
    """timm ViT forward with token preparation (patchify, [CLS], DINO positions) and final
    norm written here; the transformer blocks are timm's own ``model.blocks``."""
    w = model.patch_embed.proj.weight.detach()  # [D, 3, p, p]
    bias = model.patch_embed.proj.bias.detach()
    dim, c, p, _ = w.shape
    b, _, hgt, wid = images.shape
    gh, gw = hgt // p, wid // p
    patches = images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
    tokens = _linear(patches.reshape(b, gh * gw, c * p * p), w.reshape(dim, -1), bias)
    x = torch.cat([model.cls_token.detach().expand(b, 1, -1), tokens], dim=1)
    x = x + dino_interpolate(model.pos_embed.detach(), gh, gw)
    x = model.blocks(x)
    return _layer_norm(x, model.norm.weight, model.norm.bias)[:, 0]


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (LayerNorm weights around 1, biases non-zero, position
    embeddings large), so that no part of the forward is an identity by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name in ("pos_embed", "cls_token"):
                p.copy_(0.5 * r)
            elif p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))
    return model


# ------------------------------------------------------------------------------- ViT-4K


def _vit4k_params_by_hand(in_dim: int = 384, d: int = 192, depth: int = 6, mlp: int = 768) -> int:
    phi = in_dim * d + d
    cls = d
    pos = (14 * 14 + 1) * d
    block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    return phi + cls + pos + depth * block + 2 * d


def test_vit4k_parameter_count() -> None:
    model = create_model("vit4k_xs")
    assert _vit4k_params_by_hand() == 2_781_504
    assert sum(p.numel() for p in model.parameters()) == _vit4k_params_by_hand()
    assert model.num_features == 192
    assert tuple(model.pos_embed.shape) == (1, 197, 192)


@pytest.mark.parametrize("grid", [(16, 16), (14, 14), (6, 6), (4, 4), (4, 6)])
def test_vit4k_forward_matches_hand_written(grid: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = randomize_(create_model("vit4k_xs"), seed=1).eval()
    x = torch.randn(2, 384, *grid)
    with torch.no_grad():
        out = model(x)
    ref = vit4k_reference(model, x)
    assert out.shape == (2, 192)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    # the two samples are not mixed up, and the grid is not read transposed
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    if grid[0] == grid[1]:
        ref_t = vit4k_reference(model, x.transpose(2, 3))
        assert (ref_t - ref).abs().max() > 1e-3


def test_vit4k_rejects_wrong_input() -> None:
    model = create_model("vit4k_xs")
    with pytest.raises(ValueError, match="384"):
        model(torch.zeros(1, 256, 4, 4))
    with pytest.raises(ValueError):
        model(torch.zeros(1, 384, 16))


# ----------------------------------------------------------------------- position resize


def test_reference_resize_is_bicubic_with_dino_scale_factor() -> None:
    """The reference (F.interpolate with a scale factor) equals bicubic resampling written
    out with DINO's scale ``(g + 0.1) / 14``, and not with the size ratio ``g / 14``, which
    pins the reference down independently of F.interpolate."""
    pos = torch.randn(1, 197, 8, generator=torch.Generator().manual_seed(0))
    for g in (16, 6):
        ref = dino_interpolate(pos.double(), g, g)
        dino = hand_bicubic_resize(pos, g, g, (g + 0.1) / 14, (g + 0.1) / 14)
        by_size = hand_bicubic_resize(pos, g, g, g / 14, g / 14)
        torch.testing.assert_close(ref, dino, atol=1e-10, rtol=0)
        assert (ref - by_size).abs().max() > 1e-3


@pytest.mark.parametrize("grid", [(16, 16), (6, 6), (4, 4), (4, 6), (16, 5)])
def test_pos_embed_resize_matches_dino(grid: tuple[int, int]) -> None:
    pos = torch.randn(1, 197, 192, generator=torch.Generator().manual_seed(1))
    out = interpolate_pos_encoding(pos, *grid)
    ref = dino_interpolate(pos.double(), *grid)
    assert out.shape == (1, 1 + grid[0] * grid[1], 192)
    assert out.dtype == pos.dtype
    assert torch.equal(out[:, 0], pos[:, 0])  # [CLS] kept
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)  # float32 rounding


def test_pos_embed_resize_keeps_14x14() -> None:
    pos = torch.randn(1, 197, 192)
    out = interpolate_pos_encoding(pos, 14, 14)
    assert torch.equal(out, pos)
    assert torch.equal(dino_interpolate(pos, 14, 14), pos)


def test_pos_embed_resize_differs_from_timm() -> None:
    """timm's resize (explicit output size) gives other values than DINO's: a test that
    would catch one being swapped for the other."""
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 197, 192, generator=torch.Generator().manual_seed(2))
    timm_16 = resample_abs_pos_embed(pos, new_size=[16, 16], num_prefix_tokens=1)
    ours = interpolate_pos_encoding(pos, 16, 16)
    assert timm_16.shape == ours.shape == (1, 257, 192)
    assert torch.equal(timm_16[:, 0], ours[:, 0])
    assert (timm_16 - ours).abs().max() > 1e-2
    assert (timm_16.double() - dino_interpolate(pos.double(), 16, 16)).abs().max() > 1e-2


def test_pos_embed_resize_rejects_non_square_store() -> None:
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_encoding(torch.zeros(1, 1 + 12, 4), 4, 4)
    with pytest.raises(ValueError):
        use_dino_pos_embed(nn.Linear(2, 2))


# -------------------------------------------------------------------------- timm ViT-256


@pytest.fixture(scope="module")
def vit_tiny() -> nn.Module:
    model, dim = create_backbone("vit_tiny_patch16_224")
    assert dim == 192
    assert isinstance(model.norm_pre, nn.Identity)  # the reference has no pre-norm
    return randomize_(model, seed=3).eval()


@pytest.mark.parametrize("size", [(256, 256), (96, 96), (256, 160)])
def test_timm_vit_uses_dino_pos_embed(vit_tiny: nn.Module, size: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = vit_tiny(x)
        ref = timm_vit_reference(vit_tiny, x)
    assert out.shape == (2, 192)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_timm_vit_256_differs_from_timm_resize(vit_tiny: nn.Module) -> None:
    import timm

    stock = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True)
    stock.load_state_dict(vit_tiny.state_dict())
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (stock.eval()(x) - vit_tiny(x)).abs().max() > 1e-3


def test_timm_vit_224_equals_stock_timm(vit_tiny: nn.Module) -> None:
    import timm

    stock = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    stock.load_state_dict(vit_tiny.state_dict())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = vit_tiny(x)
        torch.testing.assert_close(out, stock.eval()(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(out, timm_vit_reference(vit_tiny, x), atol=1e-5, rtol=0)


def test_dino_pos_embed_survives_deepcopy(vit_tiny: nn.Module) -> None:
    """DINO's teacher is a deep copy of the student: the copy must resize its own position
    embeddings (not the original's)."""
    import copy

    teacher = copy.deepcopy(vit_tiny)
    with torch.no_grad():
        teacher.pos_embed.add_(1.0)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), timm_vit_reference(teacher, x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- region descriptors


def test_region_descriptors_order_and_grid() -> None:
    torch.manual_seed(0)
    vit4k = randomize_(create_model("vit4k_xs"), seed=8).eval()
    regions = 3
    feats = torch.randn(regions, 256, 384)
    for r in range(16):
        for c in range(16):
            feats[:, 16 * r + c, 0] = r  # each row says where it belongs
            feats[:, 16 * r + c, 1] = c
    grid = torch.empty(regions, 384, 16, 16)
    for r in range(16):
        for c in range(16):
            grid[:, :, r, c] = feats[:, 16 * r + c]
    assert torch.equal(grid[0, 0], torch.arange(16.0)[:, None].expand(16, 16))
    assert torch.equal(grid[0, 1], torch.arange(16.0)[None, :].expand(16, 16))

    d = region_descriptors(vit4k, feats, batch_size=2)  # two batches: 2 + 1 regions
    assert set(d) == {"cls4k", "mean256", "concat"}
    assert d["mean256"].shape == (regions, 384)
    assert d["cls4k"].shape == (regions, 192)
    assert d["concat"].shape == (regions, 576)
    torch.testing.assert_close(d["mean256"], feats.mean(dim=1))
    with torch.no_grad():
        expected = vit4k(grid)
        transposed = vit4k(grid.transpose(2, 3))
    torch.testing.assert_close(d["cls4k"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(d["cls4k"].double(), vit4k_reference(vit4k, grid), atol=1e-5, rtol=0)
    assert (transposed - expected).abs().max() > 1e-3  # the order matters
    assert torch.equal(d["concat"], torch.cat([d["mean256"], d["cls4k"]], dim=1))


def test_region_descriptors_empty() -> None:
    d = region_descriptors(create_model("vit4k_xs").eval(), torch.zeros(0, 256, 384))
    assert d["cls4k"].shape == (0, 192)
    assert d["concat"].shape == (0, 576)


# ---------------------------------------------------------------------------- registry


def test_create_model_unknown_name() -> None:
    assert "vit4k_xs" in list_models()
    with pytest.raises(KeyError, match="vit4k_xs"):
        create_model("vit4k_xxl")


def test_create_model_pretrained_is_refused() -> None:
    with pytest.raises(ValueError, match="vit4k_xs"):
        create_model("vit4k_xs", pretrained=True)
    with pytest.raises(ValueError):
        create_backbone("vit4k_xs", pretrained=True)


def test_create_model_ignores_image_kwargs() -> None:
    model = create_model("vit4k_xs", img_size=224, num_classes=0, pretrained=False)
    assert model.num_features == 192
    net, dim = create_backbone("vit4k_xs")
    assert dim == 192
    assert sum(p.numel() for p in net.parameters()) == _vit4k_params_by_hand()
