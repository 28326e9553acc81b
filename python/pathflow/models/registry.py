"""pathflow's own models behind a timm-style registry (``list_models`` / ``create_model``).

Example:
    >>> from pathflow.models.registry import list_models
    >>> list_models()
    ['vit4k_xs']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from pathflow.models.vit4k import vit4k_xs

_MODELS: dict[str, Callable[..., nn.Module]] = {"vit4k_xs": vit4k_xs}

#: Keyword arguments of ``timm.create_model`` that pathflow's models accept and ignore
#: (they are built for feature grids, not images).
_IMAGE_KWARGS = ("img_size", "dynamic_img_size", "num_classes", "pretrained")


def list_models() -> list[str]:
    """Names of pathflow's own models."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build one of :func:`list_models` (``drop_path_rate``, ``drop_rate``... passed on).

    Raises ``KeyError`` naming the known models for an unknown name, and ``ValueError`` for
    ``pretrained=True`` (load published weights with :func:`pathflow.models.hipt.load_hipt_model`).
    """
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r} (pathflow models: {', '.join(list_models())})")
    if kwargs.get("pretrained"):
        raise ValueError(f"{name}: no built-in pretrained weights; pass a weights file instead")
    for k in _IMAGE_KWARGS:
        kwargs.pop(k, None)
    return _MODELS[name](**kwargs)


__all__ = ["create_model", "list_models"]
