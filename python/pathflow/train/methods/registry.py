"""timm-style registry of SSL methods: ``@register_method("name")``, ``create_method``,
``list_methods``.

Adding a method is one file (an :class:`~pathflow.train.methods.base.SSLMethod` subclass
and its options dataclass) and one line: ``@register_method("name")`` on the class, and the
file imported (``pathflow.train.methods`` imports those of pathflow).

Example:
    >>> from pathflow.train.methods import list_methods, method_class
    >>> list_methods()  # doctest: +NORMALIZE_WHITESPACE
    ['barlowtwins', 'byol', 'clubyol', 'clusiam', 'dino', 'hipt4k', 'mocov2', 'mocov3',
     'sgcl', 'simclr', 'simsiam', 'swav']
    >>> method_class("dino").views_preset, method_class("simclr").config_class.__name__
    ('dino', 'SimCLRConfig')
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from torch import nn

from pathflow.exceptions import ConfigError
from pathflow.train.methods.base import default_channels_last
from pathflow.train.plan import RunPlan

if TYPE_CHECKING:
    from pathflow.train.methods.base import MethodConfig, SSLMethod

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


def create_method(
    name: str,
    backbone: nn.Module,
    embed_dim: int,
    options: MethodConfig | Any,  # Any: a resolved TrainConfig (plan None)
    plan: RunPlan | None = None,
    channels_last: bool | None = None,
) -> SSLMethod:
    """Build method ``name`` around ``backbone`` (features of size ``embed_dim``) from its
    ``options`` (an instance of its ``config_class``) and the run's ``plan``. Without a
    plan, ``options`` is a resolved :class:`TrainConfig` whose ``steps`` or
    ``steps_per_epoch`` is known: its options, and :meth:`RunPlan.from_config` of it.
    ``channels_last``: None for the plan's setting (None there: CNNs).

    Example:
        >>> from pathflow.train import TrainConfig, create_backbone, create_method
        >>> net, dim = create_backbone("resnet18")  # doctest: +SKIP
        >>> cfg = TrainConfig(method="simclr", steps=100).resolve()
        >>> method = create_method("simclr", net, dim, cfg)  # doctest: +SKIP
        >>> plan = RunPlan.from_config(cfg, steps_per_epoch=25)
        >>> plan.total_steps, plan.lengths()
        (100, {'lr_warmup': 10})
        >>> method = create_method("simclr", net, dim, cfg.options, plan)  # doctest: +SKIP
    """
    if plan is None:
        plan = RunPlan.from_config(options)
        options = options.options  # type: ignore[union-attr]
    if channels_last is None:
        channels_last = default_channels_last(backbone, plan.channels_last)
    return method_class(name)(backbone, embed_dim, options, plan, channels_last)  # type: ignore[call-arg]
