"""Self-supervised methods, one file each, behind a timm-style registry.

Example:
    >>> from pathflow.train.methods import list_methods
    >>> list_methods()
    ['dino', 'hipt4k', 'simclr']
"""

from __future__ import annotations

from pathflow.train.methods import dino, hipt4k, simclr  # noqa: F401  (register the methods)
from pathflow.train.methods.base import (
    MethodConfig,
    MultiCropEncoder,
    SSLMethod,
    clip_per_parameter,
    split_decay_groups,
)
from pathflow.train.methods.dino import DINO, DINOConfig
from pathflow.train.methods.hipt4k import HIPT4K, HIPT4KConfig
from pathflow.train.methods.registry import (
    create_method,
    list_methods,
    method_class,
    register_method,
)
from pathflow.train.methods.simclr import SimCLR, SimCLRConfig

__all__ = [
    "DINO",
    "HIPT4K",
    "DINOConfig",
    "HIPT4KConfig",
    "MethodConfig",
    "MultiCropEncoder",
    "SSLMethod",
    "SimCLR",
    "SimCLRConfig",
    "clip_per_parameter",
    "create_method",
    "list_methods",
    "method_class",
    "register_method",
    "split_decay_groups",
]
