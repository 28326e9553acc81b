"""Backbones: any timm model by name, plus CLAM's truncated ResNet-50.

``create_backbone(name)`` returns ``(module, embed_dim)`` where ``module(images)`` gives pooled
features ``[B, embed_dim]`` (timm with ``num_classes=0``). Vision transformers are built with
``dynamic_img_size=True`` so one backbone takes DINO's 224 px global and 96 px local crops;
this changes no weight, so the state dict stays the stock timm one. Their position embeddings
are resized to the input's grid as facebookresearch/dino does (bicubic with scale factor
``(g + 0.1) / 14``, :mod:`pathflow.models.pos_embed`), not as timm does, so DINO- and
HIPT-trained weights give their published features at any input size (224 px is unaffected).
CNNs are converted to channels-last memory format. pathflow's own models
(:func:`pathflow.models.list_models`, e.g. HIPT's ``vit4k_xs`` over feature grids) are built
by the same call. (``pathflow.train.backbones`` re-exports this module.)

``"resnet50_trunc"`` is the feature extractor of CLAM (``resnet50_baseline`` /
``TimmCNNEncoder``): timm ``resnet50`` up to ``layer3`` followed by global average pooling,
1024-d. It is a timm ``ResNet`` whose ``layer4`` is an ``nn.Identity``, so its state dict is the
resnet50 one without the ``layer4.*`` keys.

Example:
    >>> from pathflow.models.backbones import create_backbone
    >>> net, dim = create_backbone("resnet50_trunc")
    >>> dim
    1024
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from pathflow.exceptions import ConfigError
from pathflow.models.pos_embed import supports_dino_pos_embed, use_dino_pos_embed
from pathflow.models.registry import create_model, list_models

#: Names handled here rather than by ``timm.create_model`` (plus pathflow.models' names).
CUSTOM_BACKBONES = ("resnet50_trunc", "vit4k_xs")


def is_cnn(module: nn.Module) -> bool:
    """True for convolutional trunks (more than one ``Conv2d``; a ViT has one, its patch
    embedding), which benefit from channels-last memory format."""
    return sum(isinstance(m, nn.Conv2d) for m in module.modules()) > 1


def backbone_names() -> list[str]:
    """Every name :func:`create_backbone` takes without a pretrained tag: pathflow's own
    (``resnet50_trunc``, :func:`pathflow.models.list_models`) and ``timm.list_models()``."""
    import timm

    return sorted({*CUSTOM_BACKBONES, *list_models(), *timm.list_models()})


def check_backbone(name: str) -> None:
    """Raise a one-line :class:`~pathflow.exceptions.ConfigError` naming the closest known
    names if :func:`create_backbone` cannot build ``name``. A timm pretrained tag
    (``resnet50.tv_in1k``) is allowed; ``hf-hub:`` names are not checked (no network here).

    Example:
        >>> from pathflow.exceptions import ConfigError
        >>> try:
        ...     check_backbone("vit_smal_patch16_224")
        ... except ConfigError as exc:
        ...     print(str(exc)[:70])
        unknown backbone 'vit_smal_patch16_224'; did you mean vit_small_patch1
    """
    if name in CUSTOM_BACKBONES or name in list_models():
        return
    import timm
    from timm.models import parse_model_name, split_model_name_tag

    source, timm_name = parse_model_name(name)
    if source or timm.is_model(timm_name):
        return
    arch = split_model_name_tag(timm_name)[0]
    close = difflib.get_close_matches(arch, backbone_names(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"unknown backbone {name!r}{hint} (expected a timm.list_models() name, "
        f"{' or '.join(CUSTOM_BACKBONES)})"
    )


def _timm_model(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        # ViT-family models accept any input size with dynamic_img_size (DINO multi-crop).
        return timm.create_model(
            name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **kwargs
        )
    except TypeError as exc:
        if "dynamic_img_size" not in str(exc):
            raise
    return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)


def create_backbone(
    name: str,
    pretrained: bool = False,
    channels_last: bool | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, int]:
    """Build a feature extractor and return it with its output dimension.

    Args:
        name: a timm model name (``vit_small_patch16_224``, ``resnet50``...) or
            ``"resnet50_trunc"`` (CLAM's ResNet-50 up to layer3, 1024-d; ``pretrained`` loads
            timm's ``resnet50.tv_in1k``, the torchvision ImageNet weights CLAM uses).
        pretrained: load timm's pretrained weights (needs them cached or a network).
        channels_last: convert to channels-last memory format; default: CNNs only.
        kwargs: passed to ``timm.create_model`` (e.g. ``img_size=96``, ``drop_path_rate=0.1``).

    Raises :class:`~pathflow.exceptions.ConfigError` naming close matches for an unknown
    ``name`` (:func:`check_backbone`).

    Example:
        >>> net, dim = create_backbone("vit_tiny_patch16_224", img_size=64)  # doctest: +SKIP
        >>> net(torch.zeros(2, 3, 64, 64)).shape, dim  # doctest: +SKIP
        (torch.Size([2, 192]), 192)
    """
    check_backbone(name)
    if name in list_models():
        model = create_model(name, pretrained=pretrained, **kwargs)
        return model, int(model.num_features)  # type: ignore[arg-type]
    if name == "resnet50_trunc":
        model = _timm_model("resnet50.tv_in1k" if pretrained else "resnet50", pretrained, kwargs)
        model.layer4 = nn.Identity()  # type: ignore[assignment]
        model.num_features = 1024  # type: ignore[assignment]
        if hasattr(model, "head_hidden_size"):
            model.head_hidden_size = 1024  # type: ignore[assignment]
    else:
        model = _timm_model(name, pretrained, kwargs)
        if supports_dino_pos_embed(model):
            use_dino_pos_embed(model)
    embed_dim = int(getattr(model, "num_features", 0))
    if embed_dim <= 0:  # pragma: no cover - every timm classifier has num_features
        with torch.no_grad():
            embed_dim = int(model(torch.zeros(1, 3, 224, 224)).shape[-1])
    if channels_last is None:
        channels_last = is_cnn(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, embed_dim


__all__ = ["CUSTOM_BACKBONES", "backbone_names", "check_backbone", "create_backbone", "is_cnn"]
