"""timm-style registry of SSL methods: ``@register_method("name")``, ``create_method``,
``list_methods``.

Example:
    >>> from pathflow.train.methods import list_methods
    >>> list_methods()
    ['dino', 'simclr']
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from torch import nn

from pathflow.exceptions import ConfigError

if TYPE_CHECKING:
    from pathflow.train.config import TrainConfig
    from pathflow.train.methods.base import SSLMethod

M = TypeVar("M", bound="type[SSLMethod]")

_METHODS: dict[str, type[SSLMethod]] = {}


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator adding an :class:`SSLMethod` subclass to the registry."""

    def wrap(cls: M) -> M:
        _METHODS[name] = cls
        return cls

    return wrap


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_METHODS)


def method_class(name: str) -> type[SSLMethod]:
    """The registered class of method ``name`` (e.g. to read its ``views_preset``); an
    unknown name is a one-line :class:`~pathflow.exceptions.ConfigError` naming the close
    matches."""
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list_methods(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint} (expected {', '.join(list_methods())})")
    return _METHODS[name]


def create_method(name: str, backbone: nn.Module, embed_dim: int, cfg: TrainConfig) -> SSLMethod:
    """Build method ``name`` around ``backbone`` (features of size ``embed_dim``), with the
    hyper-parameters and schedule lengths of ``cfg`` (a resolved :class:`TrainConfig` whose
    ``steps`` or ``steps_per_epoch`` is known).

    Example:
        >>> from pathflow.train import TrainConfig, create_backbone, create_method
        >>> net, dim = create_backbone("resnet18")  # doctest: +SKIP
        >>> cfg = TrainConfig(method="simclr", steps=100).resolve()
        >>> method = create_method("simclr", net, dim, cfg)  # doctest: +SKIP
    """
    return method_class(name)(backbone, embed_dim, cfg)
